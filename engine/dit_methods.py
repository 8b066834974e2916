"""Uniform attention (UAM), Free-Prompt-Editing and MasaCtrl on the joint attention of Flux and SD3.5.

The same nodes and the same contract as on the UNet (engine/uniform.py and engine/injection.py dispatch
here by family): rows come from the branch layout (`call.rows`), steps from the schedule
(`call.in_window`, `call.step`), sources from the same call or the inversion's record (replay). What
differs is where the method acts inside one attention: on the image queries, over the text keys (UAM) or
the image keys (FPE, MasaCtrl), with the formulas of attention/joint.py.
"""

from __future__ import annotations

import uuid

import torch

from ..attention.dit_blocks import dit_block_selected, parse_dit_block_spec
from ..attention.injection import COND_ROWS, FPE, MASACTRL, SOURCE_INPUTS, injected_chunks
from ..attention.joint import (
    KEEP_MASS,
    MEAN_KEYS,
    UNIFORM_VARIANTS,
    fpe_joint,
    masactrl_joint,
    uniform_text_keep_mass,
    uniform_text_mean_keys,
)
from ..attention.layout import AUX, INVERSION, TARGET
from .dit import add_dit_attention, dit_blocks

# UAM's default on DiTs, chosen by measurement (tests/test_dit_methods.py,
# test_uniform_mean_keys_removes_more_of_the_prompt): UAM's aim is an inversion the prompt does not
# steer. On the tiny Flux and SD3.5 models (0.33.0 host), text keys and values replaced by their means
# (the text's mass not kept) remove 36-50 % of the prediction's dependence on the prompt's tokens,
# keeping each query's text mass only 17-26 % (0.3.75's tiny Flux: about 40 % against 10-22 %), for a
# similar change of the prediction (and one kernel pass instead of two).
DEFAULT_UNIFORM_VARIANT = MEAN_KEYS
# MasaCtrl starts at layer 10 of SD1.5's 16: by meaning on a DiT, the first block at 10/16 of the depth.
MASACTRL_DEPTH = 10 / 16


def _index(rows, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(rows, dtype=torch.long, device=like.device)


def apply_uniform_attention_dit(model, scope: str, start: float, end: float, blocks: str,
                                variant: str = DEFAULT_UNIFORM_VARIANT, scope_all: str = "all"):
    """A clone whose image queries attend uniformly to the text tokens (joint attention) where scope,
    steps and blocks say. Text queries and image-only attentions are left as they are."""
    if variant not in UNIFORM_VARIANTS:
        raise ValueError(f"unknown uniform-attention variant '{variant}', expected one of {UNIFORM_VARIANTS}")
    items = parse_dit_block_spec(blocks)
    m = model.clone()

    def uniform_joint_attention(call, q, k, v, previous, source):
        if not call.joint or not call.in_window(start, end) or call.txt.stop == call.txt.start:
            return previous(q, k, v)
        rows = list(range(call.batch)) if scope == scope_all else call.rows(INVERSION) + call.rows(AUX)
        if not rows:
            return previous(q, k, v)
        out = previous(q, k, v).clone()
        r, img = _index(rows, q), call.img
        qi = q[r][:, :, img]
        if variant == KEEP_MASS:
            new = uniform_text_keep_mass(previous, qi, k[r], v[r], call.txt, out[r][:, :, img])
        else:
            new = uniform_text_mean_keys(previous, qi, k[r], v[r], call.txt)
        out[r, :, img] = new.to(out.dtype)
        return out

    def effect(branch):
        return ("uniform", start, end, variant) if scope == scope_all or branch in (INVERSION, AUX) else None

    count = add_dit_attention(m, "uniform", uniform_joint_attention,
                              lambda b: dit_block_selected(items, b.kind, b.index, b.order, b.total), effect=effect)
    if count == 0:
        raise ValueError(f"the block selection '{blocks}' matches no block of this model")
    return m


def default_masactrl_block(model) -> int:
    """The first block (execution order) at MASACTRL_DEPTH of the depth or deeper; the last block on a model
    too shallow to have one (2 blocks: depths 0 and 1/2)."""
    blocks = dit_blocks(model)
    return next((b.order for b in blocks if b.depth >= MASACTRL_DEPTH - 1e-9), blocks[-1].order)


def apply_injection_dit(model, mode: str, fpe_ratio: float, masactrl_start_step: int, masactrl_start_layer: int,
                        rows: str, fpe_steps):
    """A clone whose target branch reads the source's image-token attention (FPE or MasaCtrl)."""
    chunks = injected_chunks(mode, rows)
    blocks = dit_blocks(model)
    start_layer = default_masactrl_block(model) if masactrl_start_layer < 0 else masactrl_start_layer
    if mode == MASACTRL and start_layer >= len(blocks):
        raise ValueError(f"masactrl_start_layer {start_layer} is past the model's {len(blocks)} blocks")
    m = model.clone()
    reader = uuid.uuid4().hex

    def active(call) -> bool:
        if call.step is None:
            return False
        i, n = call.step
        return i < fpe_steps(n, fpe_ratio) if mode == FPE else i >= masactrl_start_step

    def injected_attention(call, q, k, v, previous, source):
        tgt, source = call.target_rows_read(chunks == COND_ROWS, source)
        if not tgt:
            return previous(q, k, v)
        t, img = _index(tgt, q), call.img
        if mode == MASACTRL:
            k2, v2 = k.clone(), v.clone()
            k2[t], v2[t] = masactrl_joint(k[t], v[t], img, source["k"], source["v"])
            return previous(q, k2, v2)
        out = previous(q, k, v).clone()
        qs, ks = source["q"].to(q), source["k"].to(k)
        if call.joint:
            new = fpe_joint(previous, q[t][:, :, img], k[t], v[t], img, qs, ks)
        else:  # an image-only self-attention (SD3.5 medium's second one): FPE's own formula
            new = previous(qs, ks, v[t][:, :, img])
        out[t, :, img] = new.to(out.dtype)
        return out

    add_dit_attention(m, f"injection:{mode}", injected_attention,
                      (lambda b: True) if mode == FPE else (lambda b: b.order >= start_layer),
                      effect=lambda branch: ("injection", reader) if branch == TARGET else None,
                      reads_source=SOURCE_INPUTS[mode], reader=reader, active=active)
    return m


__all__ = ["apply_uniform_attention_dit", "apply_injection_dit", "default_masactrl_block", "KEEP_MASS", "MEAN_KEYS"]
