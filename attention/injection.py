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


# The source inputs each mode reads: all the source replay has to keep for it.
SOURCE_INPUTS = {FPE: ("q", "k"), MASACTRL: ("k", "v")}


def substitute_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str, target_rows: list[int],
                      source: dict[str, torch.Tensor]):
    """q, k, v with the target rows' inputs replaced as `mode` says.

    source: the source branch's inputs named in SOURCE_INPUTS[mode], one row per target row (taken
    from the same call's source rows, or replayed from the inversion).
    """
    if mode not in MODES:
        raise ValueError(f"unknown injection mode '{mode}', expected one of {MODES}")
    tgt = torch.as_tensor(target_rows, device=q.device)
    inputs = {"q": q, "k": k, "v": v}
    for name in SOURCE_INPUTS[mode]:
        changed = inputs[name].clone()
        changed[tgt] = source[name].to(changed)
        inputs[name] = changed
    return inputs["q"], inputs["k"], inputs["v"]


def source_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str,
                  source_rows: list[int]) -> dict[str, torch.Tensor]:
    """The inputs `mode` reads from the source rows of the same call."""
    inputs = {"q": q, "k": k, "v": v}
    return {name: inputs[name][source_rows] for name in SOURCE_INPUTS[mode]}
