"""What the nodes share: socket types, category names and input checks."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..attention.blocks import parse_block_spec

CATEGORY = "attention_edit"
Inversion = io.Custom("ATTN_EDIT_INVERSION")
MaskStrategy = io.Custom("ATTN_EDIT_MASK_STRATEGY")


def block_spec_error(blocks: str) -> bool | str:
    """validate_inputs helper: True or the parse error, shown before the graph runs."""
    try:
        parse_block_spec(blocks)
    except ValueError as e:
        return str(e)
    return True


def check_conditioning(cond, name: str) -> None:
    if not cond:
        raise ValueError(f"'{name}' is empty: connect a CLIPTextEncode (the empty prompt is fine)")
    for t, _ in cond:
        if not torch.isfinite(t).all():
            raise ValueError(f"'{name}' contains NaN or infinite values")


def latent_output(samples: torch.Tensor) -> dict:
    return {"samples": samples}
