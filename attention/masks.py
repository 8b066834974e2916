"""Edit masks as pure tensor math.

Adaptive mask (UAM, arXiv 2411.19652): where the target's x0 prediction departs from the source's,
thresholded at a quantile that rises over the steps, dilated, and used to blend the target's x0 with
the auxiliary uniform-attention reconstruction's x0 outside the edit (and, the paper's "red line", the
source's x0 with the auxiliary one inside it).

The official code soft-thresholds the difference by its quantile Q before comparing it with Q
(d - clamp(d, -Q, Q), then |.| > Q), so the edit region is |d| > 2 Q; `adaptive_mask` computes it
in that order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DILATE_EDIT = "edit_region"  # the official code: grow the region the edit may change
DILATE_UNCHANGED = "unchanged_region"  # the paper's Algorithm 1: grow the region kept from the source
DILATIONS = (DILATE_EDIT, DILATE_UNCHANGED)


def quantile_schedule(step: int, steps: int, lam: float) -> float:
    """q_i rising linearly from 0 at the first step to lambda at the last."""
    if steps <= 1:
        return lam
    return lam * step / (steps - 1)


def dilate(mask: torch.Tensor, size: int = 3) -> torch.Tensor:
    """Binary dilation with a size x size square (max-pool), per channel; mask (B, C, H, W)."""
    return F.max_pool2d(mask, kernel_size=size, stride=1, padding=size // 2)


def adaptive_mask(x0_target: torch.Tensor, x0_source: torch.Tensor, q: float, dilation: str = DILATE_EDIT,
                  size: int = 3) -> torch.Tensor:
    """The edit region (1) per latent element, per image: with Q the q-quantile of |x0_src - x0_tgt|,
    the difference soft-thresholded by Q still exceeds Q, i.e. |x0_src - x0_tgt| > 2 Q (the official code)."""
    if dilation not in DILATIONS:
        raise ValueError(f"unknown dilation '{dilation}', expected one of {DILATIONS}")
    diff = (x0_source - x0_target).float()
    flat = diff.abs().flatten(1)
    threshold = torch.quantile(flat, q, dim=1).view(-1, *([1] * (diff.dim() - 1)))
    shrunk = diff - torch.maximum(torch.minimum(diff, threshold), -threshold)  # soft threshold by Q
    edit = (shrunk.abs() > threshold).float()
    if dilation == DILATE_EDIT:
        return dilate(edit, size)
    return 1.0 - dilate(1.0 - edit, size)


def blend(mask: torch.Tensor, inside: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """mask * inside + (1 - mask) * outside."""
    mask = mask.to(inside.dtype)
    return mask * inside + (1.0 - mask) * outside
