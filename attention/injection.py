"""Self-attention injection: the target branch attends with inputs taken from the source branch.

Free-Prompt-Editing (arXiv 2403.03431) replaces the target's self-attention map by the source's:
out_tgt = attention(Q_src, K_src, V_tgt). MasaCtrl's mutual self-attention lets the target query the
source: out_tgt = attention(Q_tgt, K_src, V_src). Both are ordinary attention with substituted
inputs, so the host's optimized kernel runs them and no map is ever built.

Which classifier-free-guidance half each official code changes: FPE's controller edits the conditional
half of the batch only (the unconditional target keeps its own map); MasaCtrl's mutual self-attention
runs in both halves, each against the source of the same half.

MasaCtrl's mask-guided variant (its MutualSelfAttentionControlMask) splits the target's query into two
attentions over the source: one over the source's foreground keys only, one over its background keys
only, combined by the target's foreground mask: out = m_t * out_fg + (1 - m_t) * out_bg. Attention over
a subset of the keys is exactly a softmax whose other scores are -inf, so the kernel still runs it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FPE = "fpe"
MASACTRL = "masactrl"
MODES = (FPE, MASACTRL)

# Which guidance halves (cond chunks) the target rows are changed in.
OFFICIAL_ROWS = "official"  # as each method's official code: fpe conditional only, masactrl both
COND_ROWS = "cond"
ALL_ROWS = "cond_and_uncond"
ROW_CHOICES = (OFFICIAL_ROWS, COND_ROWS, ALL_ROWS)
OFFICIAL_CHUNKS = {FPE: COND_ROWS, MASACTRL: ALL_ROWS}


# The source inputs each mode reads: all the source replay has to keep for it.
SOURCE_INPUTS = {FPE: ("q", "k"), MASACTRL: ("k", "v")}


def injected_chunks(mode: str, rows: str) -> str:
    """COND_ROWS or ALL_ROWS: the halves `mode` changes under the `rows` choice."""
    if mode not in MODES:
        raise ValueError(f"unknown injection mode '{mode}', expected one of {MODES}")
    if rows not in ROW_CHOICES:
        raise ValueError(f"unknown injection rows '{rows}', expected one of {ROW_CHOICES}")
    return OFFICIAL_CHUNKS[mode] if rows == OFFICIAL_ROWS else rows


def substitute_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str, target_rows: list[int],
                      source: dict[str, torch.Tensor]):
    """q, k, v with the target rows' inputs replaced as `mode` says.

    source: the source branch's inputs named in SOURCE_INPUTS[mode], one row per target row (taken
    from the same call's source rows, or replayed from the inversion).
    """
    if mode not in MODES:
        raise ValueError(f"unknown injection mode '{mode}', expected one of {MODES}")
    tgt = torch.as_tensor(target_rows, device=q.device, dtype=torch.long)
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


def mask_at(mask: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """A MASK (images, H, W) or (H, W) as a foreground flag per map position: (images, h * w) bool.

    Resized as MasaCtrl's code resizes its masks to each layer (nearest neighbour), then split at 0.5
    (its masks are binary; a soft MASK's edge goes to the nearer side).
    """
    m = mask.float().reshape(-1, 1, *mask.shape[-2:])
    m = F.interpolate(m, size=tuple(int(s) for s in hw), mode="nearest")
    return (m >= 0.5).reshape(m.shape[0], -1)


def masked_mutual_attention(attend, q: torch.Tensor, k_src: torch.Tensor, v_src: torch.Tensor,
                            source_fg: torch.Tensor, target_fg: torch.Tensor) -> torch.Tensor:
    """MasaCtrl's mask-guided mutual self-attention for rows of one image (each guidance half a row).

    q: the target's queries (rows, N, C); k_src, v_src: the source's keys and values of the same rows;
    source_fg, target_fg: (N,) bool, the source's and the target's foreground. attend(q, k, v) is the
    attention kernel. A part with no keys at this resolution gets every key with equal weight (the mean
    of V), which is what the official -inf-like score offset gives there.
    """

    def part(keys: torch.Tensor) -> torch.Tensor:
        index = keys.nonzero().flatten()
        if index.numel() == 0:
            return v_src.mean(dim=1, keepdim=True).expand(q.shape[0], q.shape[1], v_src.shape[2])
        return attend(q, k_src[:, index], v_src[:, index])

    m = target_fg.to(q.dtype).reshape(1, -1, 1)
    return part(source_fg) * m + part(~source_fg) * (1 - m)
