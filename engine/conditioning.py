"""Per-branch prompts in one batch: stacking CONDITIONING row by row.

A cross-attention context whose batch equals the latent batch is used row by row by the host, so
stacking the branches' contexts gives each branch its own prompt. Contexts of different lengths are
repeated up to a common multiple, as the host itself does when it concatenates conds.
"""

from __future__ import annotations

import math

import torch


def _rows(t: torch.Tensor, images: int, what: str) -> torch.Tensor:
    if t.shape[0] == images:
        return t
    if t.shape[0] == 1:
        return t.repeat(images, *([1] * (t.dim() - 1)))
    raise ValueError(f"{what} has a batch of {t.shape[0]}, expected 1 or {images} (one per image)")


def stack_conditionings(conds: list, images: int) -> list:
    """One CONDITIONING whose rows are branch-major: cond b, image i -> row b * images + i."""
    for c in conds:
        if not isinstance(c, list) or len(c) != 1:
            raise ValueError("each prompt must be one plain conditioning (one entry, e.g. from CLIPTextEncode); "
                             "combined or area conditionings cannot be split into edit branches")
    contexts = [_rows(c[0][0], images, "a conditioning") for c in conds]
    length = math.lcm(*[t.shape[1] for t in contexts])
    contexts = [t.repeat(1, length // t.shape[1], 1) for t in contexts]
    dims = {t.shape[2] for t in contexts}
    if len(dims) != 1:
        raise ValueError(f"the prompts come from different text encoders (widths {sorted(dims)}): use one CLIP")
    options = dict(conds[0][0][1])
    pooled = [c[0][1].get("pooled_output") for c in conds]
    if any(p is not None for p in pooled):
        if any(p is None for p in pooled):
            raise ValueError("some prompts have a pooled output and some do not: encode them all with the same CLIP")
        options["pooled_output"] = torch.cat([_rows(p, images, "a pooled output") for p in pooled])
    return [[torch.cat(contexts), options]]


def conditioning_key(cond: list) -> str:
    """A cheap fingerprint of a conditioning, to tell whether two prompts are the same.

    Tensors count by their sums, anything else attached (a ControlNet, an area) by value or identity,
    so that a prompt with extras never passes for the same prompt without them.
    """
    parts = []
    for t, opts in cond:
        parts.append(f"{tuple(t.shape)}:{float(t.double().sum()):.6e}:{float(t.double().abs().sum()):.6e}")
        for name in sorted(opts):
            value = opts[name]
            if isinstance(value, torch.Tensor):
                parts.append(f"{name}={float(value.double().sum()):.6e}")
            elif value is None or isinstance(value, (bool, int, float, str, tuple)):
                parts.append(f"{name}={value!r}")
            else:
                parts.append(f"{name}=<{type(value).__name__} {id(value)}>")
    return "|".join(parts)
