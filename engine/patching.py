"""Registering attention patches on a cloned ModelPatcher, composing with patches already there."""

from __future__ import annotations

from collections.abc import Callable

import comfy.model_patcher
from comfy.ldm.modules.attention import optimized_attention

AttnFn = Callable  # (q, k, v, extra_options) -> out, the host's attn replace signature
SUPPORTED_FAMILIES = "SD1.x, SD2.x (eps or v-prediction) and SDXL"


def unet_of(model: comfy.model_patcher.ModelPatcher):
    """The model's UNet; a clear error for families this pack does not support."""
    base = getattr(model, "model", None)
    unet = getattr(base, "diffusion_model", None)
    if unet is None or not all(hasattr(unet, a) for a in ("input_blocks", "middle_block", "output_blocks")):
        family = type(base).__name__ if base is not None else type(model).__name__
        raise ValueError(f"attention-edit supports {SUPPORTED_FAMILIES} UNets; this model is '{family}' "
                         f"(SD3, Flux and other transformer models are not supported)")
    return unet


def transformer_blocks(model) -> list[tuple[str, int, int]]:
    """(block name, block number, transformer index) of every transformer block, in execution order."""
    unet = unet_of(model)
    keys = []
    for name, blocks in (("input", unet.input_blocks), ("middle", [unet.middle_block]),
                         ("output", unet.output_blocks)):
        for number, block in enumerate(blocks):
            for layer in block:
                if hasattr(layer, "transformer_blocks"):
                    keys += [(name, number, j) for j in range(len(layer.transformer_blocks))]
    return keys


def default_attention(q, k, v, extra_options):
    """What a transformer block computes when no replace patch is set: the host's optimized kernel."""
    return optimized_attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
                               transformer_options=extra_options)


def add_attention_replace(model: comfy.model_patcher.ModelPatcher, attn: str,
                          make_patch: Callable[[AttnFn], AttnFn],
                          select: Callable[[tuple[str, int, int]], bool] = lambda key: True) -> int:
    """Register `make_patch(previous)` on every selected block of a (cloned) model; returns the count.

    `previous` is the replace another node already set on that block, or the default attention, so
    packs compose: our patch calls it instead of overwriting it.
    """
    if attn not in ("attn1", "attn2"):
        raise ValueError(attn)
    existing = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get(attn, {})
    setter = model.set_model_attn1_replace if attn == "attn1" else model.set_model_attn2_replace
    count = 0
    for key in transformer_blocks(model):
        if not select(key):
            continue
        previous = existing.get(key, existing.get(key[:2], default_attention))
        setter(make_patch(previous), key[0], key[1], key[2])
        count += 1
    return count
