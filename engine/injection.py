"""Patching self-attention injection (Free-Prompt-Editing, MasaCtrl) onto a model."""

from __future__ import annotations

import uuid

from ..attention.injection import FPE, MASACTRL, SOURCE_INPUTS, substitute_inputs
from ..attention.layout import TARGET
from .patching import add_attention_replace, transformer_blocks


def default_masactrl_layer(model) -> int:
    """MasaCtrl's layer 10 of SD1.5's 16, by meaning: the first decoder block at >= 1/2 the latent side.

    SD1.x/2.x: output 6 (execution index 10); SDXL: output 3 (the 64x64 decoder level at 1024 px).
    """
    keys = transformer_blocks(model)
    unet = model.model.diffusion_model
    levels = len(unet.channel_mult)
    # Output block o sits at level (levels - 1) - o // (res blocks + 1); side ratio 1 / 2**level.
    per_level = len(unet.output_blocks) // levels
    for index, (name, number, _) in enumerate(keys):
        if name == "output" and (levels - 1 - number // per_level) <= 1:
            return index
    return len(keys)


def apply_injection(model, mode: str, fpe_ratio: float = 0.8, fpe_max_map_side: float = 0.5,
                    masactrl_start_step: int = 4, masactrl_start_layer: int = -1):
    """A clone whose target-branch self-attention reads from the source branch.

    fpe: attention(Q_src, K_src, V_tgt) for steps [0, ratio * N) in layers whose map side is at most
    `fpe_max_map_side` of the latent side. masactrl: attention(Q_tgt, K_src, V_src) from step S and
    layer L (execution order; -1 = the model's equivalent of SD1.5's layer 10).
    """
    if mode not in (FPE, MASACTRL):
        raise ValueError(f"unknown mode '{mode}', expected '{FPE}' or '{MASACTRL}'")
    if not 0.0 <= fpe_ratio <= 1.0:
        raise ValueError(f"fpe_ratio must be in [0, 1], got {fpe_ratio}")
    if masactrl_start_step < 0:
        raise ValueError(f"masactrl_start_step must be >= 0, got {masactrl_start_step}")
    keys = transformer_blocks(model)
    start_layer = default_masactrl_layer(model) if masactrl_start_layer < 0 else masactrl_start_layer
    if mode == MASACTRL and start_layer >= len(keys):
        raise ValueError(f"masactrl_start_layer {start_layer} is past the model's {len(keys)} transformer blocks")
    selected = set(keys[start_layer:]) if mode == MASACTRL else set(keys)
    m = model.clone()
    reader = uuid.uuid4().hex  # names this application's source inputs in an inversion's record

    def active(call) -> bool:
        if call.step is None:
            return False
        i, n = call.step
        if mode == FPE:
            return i < fpe_ratio * n and call.map_side is not None and call.map_side <= fpe_max_map_side
        return i >= masactrl_start_step

    def injected_self_attention(call, q, k, v, previous, source):
        tgt = call.rows(TARGET)
        if not tgt:
            return previous(q, k, v)
        q, k, v = substitute_inputs(q, k, v, mode, tgt, source)
        return previous(q, k, v)

    # Only the target rows change; the source's inputs are read where `active` says.
    add_attention_replace(m, "attn1", f"injection:{mode}", injected_self_attention, lambda key: key in selected,
                          effect=lambda branch: ("injection", reader) if branch == TARGET else None,
                          reads_source=SOURCE_INPUTS[mode], reader=reader, active=active)
    return m
