"""Patching self-attention injection (Free-Prompt-Editing, MasaCtrl) onto a model."""

from __future__ import annotations

import uuid

from ..attention.blocks import map_side_ratio
from ..attention.injection import FPE, MASACTRL, SOURCE_INPUTS, source_inputs, substitute_inputs
from ..attention.layout import SOURCE, TARGET, read_layout
from ..attention.schedule import step_position
from .patching import add_attention_replace, transformer_blocks
from .replay import RECORDER_KEY, REPLAY_KEY


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

    def active(q, extra_options) -> bool:
        pos = step_position(extra_options)
        if pos is None:
            return False
        i, n = pos
        if mode == FPE:
            return i < fpe_ratio * n and map_side_ratio(q.shape[1], extra_options["original_shape"]) <= fpe_max_map_side
        return i >= masactrl_start_step

    reader = uuid.uuid4().hex  # names this patch's source inputs in an inversion's record
    needs = SOURCE_INPUTS[mode]

    def make_patch(previous):
        def injected_self_attention(q, k, v, extra_options, **kwargs):
            layout = read_layout(extra_options)
            recorder = extra_options.get(RECORDER_KEY)
            if recorder is not None:  # an inversion: keep what the source branch will read here
                inputs = {"q": q, "k": k, "v": v}
                recorder.keep(reader, extra_options, {n: inputs[n] for n in needs} if active(q, extra_options) else {})
                return previous(q, k, v, extra_options, **kwargs)
            if layout is None or not active(q, extra_options):
                return previous(q, k, v, extra_options, **kwargs)
            tgt = layout.rows(TARGET, q.shape[0])
            if not tgt:
                return previous(q, k, v, extra_options, **kwargs)
            src = layout.rows(SOURCE, q.shape[0])
            if src:
                source = source_inputs(q, k, v, mode, src)
            elif extra_options.get(REPLAY_KEY) is not None:
                source = extra_options[REPLAY_KEY].source_inputs(reader, extra_options, q.shape[0], needs, q)
            else:
                return previous(q, k, v, extra_options, **kwargs)
            q, k, v = substitute_inputs(q, k, v, mode, tgt, source)
            return previous(q, k, v, extra_options, **kwargs)
        injected_self_attention.attn_edit_reader = reader
        return injected_self_attention

    # Only the target rows change.
    add_attention_replace(m, "attn1", make_patch, lambda key: key in selected,
                          effect=lambda branch: ("injection", reader) if branch == TARGET else None)
    return m
