"""Registering attention patches on a cloned ModelPatcher, composing with patches already there."""

from __future__ import annotations

from collections.abc import Callable

import comfy.model_patcher
from comfy.ldm.modules.attention import optimized_attention

from .contract import AttentionCall, AttentionPatch, Compute
from .dit import DIT_FAMILIES, OVERRIDE_KEY, BlockTag, DitAttentionPatch, dit_family, override_of

UNET_FAMILIES = "SD1.x, SD2.x (eps or v-prediction) and SDXL"
SUPPORTED_FAMILIES = f"{UNET_FAMILIES} UNets and the {' and '.join(DIT_FAMILIES.values())} DiTs"
UNET = "unet"
NOT_YET = ("Flux.2, Chroma, Qwen-Image, HiDream, AuraFlow, Lumina, HunyuanDiT and video models are not "
           "supported yet")


def _is_unet(model) -> bool:
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    return unet is not None and all(hasattr(unet, a) for a in ("input_blocks", "middle_block", "output_blocks"))


def _family_name(model) -> str:
    base = getattr(model, "model", None)
    return type(base).__name__ if base is not None else type(model).__name__


def model_family(model) -> str:
    """UNET, dit.FLUX or dit.SD3; a clear error, before any compute, for any other family."""
    if _is_unet(model):
        return UNET
    family = dit_family(model)
    if family is None:
        raise ValueError(f"attention-edit supports {SUPPORTED_FAMILIES}; this model is '{_family_name(model)}' "
                         f"({NOT_YET})")
    return family


def unet_of(model: comfy.model_patcher.ModelPatcher):
    """The model's UNet; a clear error for every other family (DiTs included: callers that take them ask
    model_family first)."""
    if not _is_unet(model):
        model_family(model)  # unsupported families: the general refusal
        raise ValueError(f"this node supports {UNET_FAMILIES} UNets so far, not yet the Flux and SD3 DiTs; "
                         f"this model is '{_family_name(model)}'")
    return model.model.diffusion_model


def transformer_blocks(model) -> list[tuple[str, int, int]]:
    """(block name, block number, transformer index) of every transformer block, in execution order."""
    return unet_transformer_blocks(unet_of(model))


def block_map_sides(model) -> dict[tuple[str, int, int], float]:
    """Map side relative to the latent side of every transformer block (its key as in transformer_blocks),
    from the UNet's structure: each downsampling halves it, each upsampling doubles it (a Downsample /
    Upsample layer, or a ResBlock that resamples)."""
    unet = unet_of(model)

    def resamples(layer, kind: str) -> bool:
        name = type(layer).__name__
        return name == kind or (name == "ResBlock" and bool(getattr(layer, "updown", False))
                                and type(getattr(layer, "h_upd", None)).__name__ == kind)

    sides: dict[tuple[str, int], float] = {}
    side = 1.0
    for number, block in enumerate(unet.input_blocks):
        for layer in block:
            if resamples(layer, "Downsample"):
                side /= 2
            elif hasattr(layer, "transformer_blocks"):
                sides[("input", number)] = side
    sides[("middle", 0)] = side
    for number, block in enumerate(unet.output_blocks):
        for layer in block:
            if resamples(layer, "Upsample"):
                side *= 2
            elif hasattr(layer, "transformer_blocks"):
                sides[("output", number)] = side
    return {key: sides[key[:2]] for key in transformer_blocks(model)}


def unet_transformer_blocks(unet) -> list[tuple[str, int, int]]:
    """transformer_blocks of a bare UNet module (the host's block keys for attention patches)."""
    keys = []
    for name, blocks in (("input", unet.input_blocks), ("middle", [unet.middle_block]),
                         ("output", unet.output_blocks)):
        for number, block in enumerate(blocks):
            for layer in block:
                if hasattr(layer, "transformer_blocks"):
                    keys += [(name, number, j) for j in range(len(layer.transformer_blocks))]
    return keys


def default_attention(q, k, v, extra_options, **kwargs):
    """What a transformer block computes when no replace patch is set: the host's optimized kernel.

    Keyword arguments a later host passes to replaces are not the kernel's: they end here."""
    return optimized_attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
                               transformer_options=extra_options)


def add_attention_replace(model: comfy.model_patcher.ModelPatcher, attn: str, method: str, compute: Compute,
                          select: Callable[[tuple[str, int, int]], bool] = lambda key: True,
                          effect: Callable[[str], object] | None = None, reads_source: tuple[str, ...] = (),
                          reader: str | None = None, active: Callable[[AttentionCall], bool] | None = None) -> int:
    """Register an AttentionPatch of `compute` on every selected block of a (cloned) model; returns the count.

    Each patch wraps the replace another node already set on that block, or the default attention, so
    packs compose: it calls that one instead of overwriting it. effect(branch) says what the patch does
    to that branch's rows: None when it leaves them as the host computes them, else a value naming the
    change (equal values = the same change); source replay compares these between the inversion's model
    and the edit's. Without it the patch counts as changing every branch, each in its own way. A patch
    that reads the source branch names its inputs (`reads_source`), its `reader` id and where it reads
    (`active`): the inversion keeps exactly that, and the edit hands it in (engine/contract.py).
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
        patch = AttentionPatch(method=method, compute=compute, previous=previous, effect=effect,
                               reads_source=reads_source, reader=reader, active=active or (lambda call: True))
        setter(patch, key[0], key[1], key[2])
        count += 1
    return count


def _replaces(model) -> dict:
    return model.model_options.get("transformer_options", {}).get("patches_replace", {})


def branch_attention_signature(model: comfy.model_patcher.ModelPatcher, branch: str) -> tuple:
    """What every attention replace on the model does to `branch`'s rows, block by block.

    Two models with equal signatures for two branches compute those branches' attention alike. The
    pack's own patches report their effect; any other replace counts by identity (the same function
    object on both models means the same patch, e.g. one set upstream of both).
    """
    signature = []
    fn = override_of(model)
    if fn is not None:  # a DiT's attention override chain (the pack's patches, then any foreign one)
        effects = _chain_effects(fn, branch)
        if effects:
            signature.append(("dit", tuple(effects)))
    if not _is_unet(model):
        return tuple(signature)
    for attn in ("attn1", "attn2"):
        existing = _replaces(model).get(attn, {})
        for key in transformer_blocks(model):
            fn = existing.get(key, existing.get(key[:2]))
            if fn is None:
                continue
            effects = _chain_effects(fn, branch)
            if effects:
                signature.append((attn, key, tuple(effects)))
    return tuple(signature)


def _chain_effects(fn, branch: str) -> list:
    effects = []
    for link in (fn.chain() if isinstance(fn, AttentionPatch) else [fn]):
        if isinstance(link, AttentionPatch):
            change = ("patch", id(link), branch) if link.effect is None else link.effect(branch)
            if change is not None:
                effects.append(change)
        elif link is not default_attention and link is not None:
            effects.append(("foreign", id(link)))
    return effects


def source_readers(model) -> set[str]:
    """Reader ids of the pack's patches on the model that read the source branch's attention inputs."""
    found = set()
    fn = override_of(model)
    if isinstance(fn, AttentionPatch):
        found |= {link.reader for link in fn.chain() if isinstance(link, AttentionPatch) and link.reader}
    for table in _replaces(model).values():
        for fn in table.values():
            if isinstance(fn, AttentionPatch):
                found |= {link.reader for link in fn.chain() if isinstance(link, AttentionPatch) and link.reader}
    return found


def options_signature(model: comfy.model_patcher.ModelPatcher, ignore: tuple[str, ...] = ()) -> tuple:
    """Everything else on the model that changes what it computes: wrappers, cfg functions, other
    patches, weight patches. Objects count by identity; the attn1/attn2 replaces, the pack's DiT attention
    override (its chain is in the attention signature) and `ignore` keys (run data such as the branch
    layout) are left out; the pack's DiT block tags count as the replace they wrap."""

    def sig(value, path=()):
        if isinstance(value, BlockTag):
            return ("dit_tag", None if value.previous is None else id(value.previous))
        if isinstance(value, DitAttentionPatch) and path == ("transformer_options", OVERRIDE_KEY):
            return ()
        if isinstance(value, dict):
            items = []
            for k, v in value.items():
                if k in ignore or path + (k,) in (("transformer_options", "patches_replace", "attn1"),
                                                  ("transformer_options", "patches_replace", "attn2")):
                    continue
                inner = sig(v, path + (k,))
                if not (isinstance(v, dict) and inner == ()):  # an emptied table is no table
                    items.append((str(k), inner))
            return tuple(sorted(items))
        if isinstance(value, (list, tuple)):
            return tuple(sig(v, path) for v in value)
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        return ("object", id(value))

    return (sig(model.model_options), str(getattr(model, "patches_uuid", "")),
            tuple(sorted((k, len(v)) for k, v in getattr(model, "patches", {}).items())))
