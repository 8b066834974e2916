"""Self-attention injection: the target branch attends with inputs taken from the source branch.

Free-Prompt-Editing (arXiv 2403.03431) replaces the target's self-attention map by the source's:
out_tgt = attention(Q_src, K_src, V_tgt). MasaCtrl's mutual self-attention lets the target query the
source: out_tgt = attention(Q_tgt, K_src, V_src). Both are ordinary attention with substituted
inputs, so the host's optimized kernel runs them and no map is ever built.
"""

from __future__ import annotations

import torch

FPE = "fpe"
MASACTRL = "masactrl"
MODES = (FPE, MASACTRL)


def substitute_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str,
                      source_rows: list[int], target_rows: list[int]):
    """q, k, v with the target rows' inputs substituted from the source rows as `mode` says."""
    if mode not in MODES:
        raise ValueError(f"unknown injection mode '{mode}', expected one of {MODES}")
    src = torch.as_tensor(source_rows, device=q.device)
    tgt = torch.as_tensor(target_rows, device=q.device)
    k = k.clone()
    k[tgt] = k[src]
    if mode == FPE:
        q = q.clone()
        q[tgt] = q[src]
    else:
        v = v.clone()
        v[tgt] = v[src]
    return q, k, v
