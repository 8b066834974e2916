"""The attention-patch contract on flow-matching DiTs (Flux.1, SD3/SD3.5): one attention override.

A DiT has no per-block attention replace like the UNet's attn1/attn2; every attention goes through the
host's `optimized_attention`, which calls `transformer_options["optimized_attention_override"]` as
`override(func, q, k, v, heads, ..., transformer_options=...)` when one is set. The pack installs one
override per method application (`DitAttentionPatch`); each wraps the override already there (another
pack's, or the pack's own earlier one) and calls it as `previous`, so overrides compose like the UNet's
replace patches. Two more public hooks tell each attention call where it is:

* a `dit` block replace on every block (`BlockTag`, wrapping any replace already there) publishes the
  block (double/single, index, position in the depth) in the block's transformer_options;
* an APPLY_MODEL wrapper (`publish_tokens`) publishes the call's token layout: the text token count and
  the image token grid (latent size / patch size).

Token layout per attention call (q, k, v as [batch, heads, tokens, head dim] inside the pack):
Flux double blocks and SD3 joint blocks attend over [txt (T tokens), img (h*w tokens)]; Flux single
blocks over the same concatenation (+ any reference-image tokens after the image, Kontext, which the
methods leave alone); SD3.5 medium's second self-attention (x_block_self_attn) over the image tokens
only. `DitCall.txt` / `DitCall.img` are those token slices; `DitCall.joint` says whether text is in the
call. Batch rows are found exactly as on the UNet (`AttentionCall.rows`: branch-major rows per cond chunk).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import comfy.model_base
import comfy.patcher_extension
import torch

from ..attention.schedule import position_in_schedule
from .contract import RUN_KEY, AttentionCall, AttentionPatch

log = logging.getLogger("attention_edit")

FLUX = "flux"
SD3 = "sd3"
DIT_FAMILIES = {FLUX: "Flux.1 (dev, schnell, Fill, Kontext)", SD3: "SD3 / SD3.5"}
BLOCK_KEY = "attn_edit_dit_block"  # the block, in a block's transformer_options
TOKENS_KEY = "attn_edit_dit_tokens"  # the call's token layout, in a model call's transformer_options
OVERRIDE_KEY = "optimized_attention_override"
DOUBLE, SINGLE = "double", "single"
JOINT, IMAGE_ONLY = 0, 1  # the third entry of a call's block key: which attention of the block


def dit_family(model) -> str | None:
    """FLUX or SD3 for the DiTs this pack edits, else None."""
    base = getattr(model, "model", None)
    if type(base) is comfy.model_base.Flux:  # not Flux.2 or Chroma (subclasses with other blocks)
        return FLUX
    if type(base) is comfy.model_base.SD3:
        return SD3
    return None


@dataclass(frozen=True)
class DitBlock:
    """A transformer block: kind (double/single), index among its kind, position in execution order."""

    kind: str
    index: int
    order: int
    total: int

    @property
    def depth(self) -> float:
        """Fraction of the depth before this block (0 for the first)."""
        return self.order / self.total

    @property
    def replace_key(self) -> tuple[str, int]:
        return (f"{self.kind}_block", self.index)


def dit_blocks(model) -> list[DitBlock]:
    """Every block of the DiT in execution order (Flux: double then single blocks; SD3: joint blocks,
    which the host's `dit` replace names double blocks)."""
    family = dit_family(model)
    dm = model.model.diffusion_model
    if family == FLUX:
        kinds = [(DOUBLE, i) for i in range(len(dm.double_blocks))] + [(SINGLE, i) for i in range(len(dm.single_blocks))]
    elif family == SD3:
        kinds = [(DOUBLE, i) for i in range(len(dm.joint_blocks))]
    else:
        raise ValueError("not a supported DiT")
    return [DitBlock(kind, index, order, len(kinds)) for order, (kind, index) in enumerate(kinds)]


@dataclass(frozen=True)
class Tag:
    block: DitBlock
    txt: int | None  # the block's text token count where its inputs show it (double blocks)


class BlockTag:
    """A `dit` block replace that publishes its block to the attention calls inside it, then runs the
    replace it wraps (another pack's) or the host's original block."""

    def __init__(self, block: DitBlock, previous=None):
        self.block, self.previous = block, previous

    def __call__(self, args, extra, **kwargs):
        options = dict(args.get("transformer_options") or {})
        txt = args.get("txt")
        options[BLOCK_KEY] = Tag(self.block, txt.shape[1] if isinstance(txt, torch.Tensor) else None)
        args = dict(args, transformer_options=options)
        if self.previous is not None:
            return self.previous(args, extra, **kwargs)
        return extra["original_block"](args)

    def __deepcopy__(self, memo):
        return self


def publish_tokens(executor, *args, **kwargs):
    """APPLY_MODEL wrapper: the call's text token count and image token grid, for the attention calls."""
    options = kwargs.get("transformer_options")
    if options is None:  # apply_model(x, t, c_concat, c_crossattn, control, transformer_options, ...)
        options = args[5]
    x = args[0]
    context = kwargs.get("c_crossattn", args[3] if len(args) > 3 else None)
    dm = executor.class_obj.diffusion_model
    p = int(getattr(dm, "patch_size", 2))
    txt = (context.shape[1] if isinstance(context, torch.Tensor) else 0) + int(getattr(dm, "register_length", 0) or 0)
    options[TOKENS_KEY] = (txt, math.ceil(x.shape[-2] / p), math.ceil(x.shape[-1] / p), p)
    try:
        return executor(*args, **kwargs)
    finally:
        options.pop(TOKENS_KEY, None)


@dataclass(frozen=True)
class DitCall(AttentionCall):
    """An AttentionCall on a DiT, with where the text and image tokens are."""

    txt: slice  # the text tokens (empty in an image-only attention)
    img: slice  # the image tokens
    joint: bool  # text and image tokens attend together
    tag: Tag

    @property
    def dit_block(self) -> DitBlock:
        return self.tag.block

    @classmethod
    def build(cls, q: torch.Tensor, heads: int, options: dict, masked: bool) -> DitCall | None:
        """The call's facts, or None where the layout is not known (then the pack leaves it alone)."""
        tag, tokens = options.get(BLOCK_KEY), options.get(TOKENS_KEY)
        if tag is None or tokens is None:
            return None
        txt, h, w, patch = tokens
        if tag.txt is not None:
            txt = tag.txt
        elif "img_slice" in options:  # 0.33.0 Flux publishes it in single blocks
            txt = int(options["img_slice"][0])
        n, hw = q.shape[2], h * w
        if masked:  # an attention mask over the keys (Flux's attention_mask input): left to the host
            return None
        if n == hw and not (tag.txt and n == txt + hw):
            joint, txt_s, img_s = False, slice(0, 0), slice(0, hw)
        elif n >= txt + hw:
            joint, txt_s, img_s = True, slice(0, txt), slice(txt, txt + hw)
        else:
            return None
        run = options.get(RUN_KEY)
        schedule = run.schedule if run is not None else options.get("sample_sigmas")
        position = position_in_schedule(schedule, options.get("sigmas"))
        return cls(options=options, batch=q.shape[0], heads=heads, chunks=tuple(options.get("cond_or_uncond", [0])),
                   run=run, step=None if position is None else position[:2],
                   exact_step=position is not None and position[2],
                   block=(tag.block.kind, tag.block.index, JOINT if joint else IMAGE_ONLY),
                   map_hw=(h, w), map_side=1.0 / patch, txt=txt_s, img=img_s, joint=joint, tag=tag)


class _Format:
    """The host call's tensor layout, to and from the pack's [batch, heads, tokens, head dim]."""

    def __init__(self, args, kwargs):
        self.heads = int(args[3] if len(args) > 3 else kwargs["heads"])
        self.skip_reshape = bool(kwargs.get("skip_reshape", False))
        self.skip_output_reshape = bool(kwargs.get("skip_output_reshape", False))

    def to_bhnd(self, t: torch.Tensor) -> torch.Tensor:
        if self.skip_reshape:
            return t
        # [B, N, H * D], or [B, N, H, D] (SD3's values): the host kernel reads either as view(B, -1, H, D)
        return t.reshape(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)

    def from_bhnd(self, t: torch.Tensor) -> torch.Tensor:
        if self.skip_reshape:
            return t
        b, h, n, d = t.shape
        return t.transpose(1, 2).reshape(b, n, h * d)

    def out_to_bhnd(self, t: torch.Tensor) -> torch.Tensor:
        if self.skip_output_reshape:
            return t
        b, n, c = t.shape
        return t.view(b, n, self.heads, c // self.heads).transpose(1, 2)

    def out_from_bhnd(self, t: torch.Tensor) -> torch.Tensor:
        if self.skip_output_reshape:
            return t
        b, h, n, d = t.shape
        return t.transpose(1, 2).reshape(b, n, h * d)


class DitAttentionPatch(AttentionPatch):
    """One method on a DiT's selected blocks, installed as the attention override.

    compute(call: DitCall, q, k, v, previous, source) works on [batch, heads, tokens, head dim] and
    returns the same; previous(q, k, v) runs the wrapped override (or the host kernel) in that layout.
    `source` holds the source branch's inputs named in reads_source at the image tokens only.
    `previous` (the field) is the override this one wraps, None for the host's kernel.
    """

    def __init__(self, method, compute, previous, blocks: frozenset, effect=None, reads_source=(), reader=None,
                 active=None):
        super().__init__(method=method, compute=compute, previous=previous, effect=effect,
                         reads_source=tuple(reads_source), reader=reader, active=active or (lambda call: True))
        self.blocks = blocks  # (kind, index) of the selected blocks

    def __call__(self, func, *args, **kwargs):
        prior = self.previous

        def host(q, k, v):
            rest = (q, k, v) + tuple(args[3:])
            return prior(func, *rest, **kwargs) if prior is not None else func(*rest, **kwargs)

        options = kwargs.get("transformer_options") or {}
        tag = options.get(BLOCK_KEY)
        if tag is None or (tag.block.kind, tag.block.index) not in self.blocks or len(args) < 3:
            return host(*args[:3])
        fmt = _Format(args, kwargs)
        q, k, v = (fmt.to_bhnd(t) for t in args[:3])
        call = DitCall.build(q, fmt.heads, options, kwargs.get("mask") is not None)
        if call is None:
            return host(*args[:3])

        def previous(q, k, v):
            return fmt.out_to_bhnd(host(fmt.from_bhnd(q), fmt.from_bhnd(k), fmt.from_bhnd(v)))

        if not self.reads_source:
            return fmt.out_from_bhnd(self.compute(call, q, k, v, previous, None))
        img = call.img
        inputs = {"q": q[:, :, img], "k": k[:, :, img], "v": v[:, :, img]}
        recorder = call.run.recorder if call.run is not None else None
        if recorder is not None:  # an inversion: keep the image tokens' inputs the source branch will read
            kept = {n: inputs[n] for n in self.reads_source} if self.active(call) else {}
            recorder.keep(self.reader, call, kept)
            return host(*args[:3])
        if call.layout is None or not self.active(call):
            return host(*args[:3])
        source = call.source_inputs(self, inputs["q"], inputs["k"], inputs["v"])
        if source is None:
            return host(*args[:3])
        return fmt.out_from_bhnd(self.compute(call, q, k, v, previous, source))


def _options(model) -> dict:
    if "transformer_options" not in model.model_options:
        model.model_options["transformer_options"] = {}
    return model.model_options["transformer_options"]


def _ensure_hooks(model) -> None:
    """The block tags and the token publisher, once per model (clones carry them)."""
    table = _options(model).get("patches_replace", {}).get("dit", {})
    for block in dit_blocks(model):
        existing = table.get(block.replace_key)
        if not isinstance(existing, BlockTag):
            model.set_model_patch_replace(BlockTag(block, existing), "dit", block.replace_key[0], block.index)
    wrappers = _options(model).get("wrappers", {}).get(comfy.patcher_extension.WrappersMP.APPLY_MODEL, {})
    if TOKENS_KEY not in wrappers:
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, TOKENS_KEY, publish_tokens)


def add_dit_attention(model, method: str, compute, select=lambda block: True, effect=None, reads_source=(),
                      reader=None, active=None) -> int:
    """Install `compute` on the selected blocks of a (cloned) DiT model; returns how many blocks."""
    chosen = frozenset((b.kind, b.index) for b in dit_blocks(model) if select(b))
    if not chosen:
        return 0
    _ensure_hooks(model)
    options = _options(model)
    patch = DitAttentionPatch(method, compute, options.get(OVERRIDE_KEY), chosen, effect=effect,
                              reads_source=reads_source, reader=reader, active=active)
    options[OVERRIDE_KEY] = patch
    return len(chosen)


def override_of(model):
    return model.model_options.get("transformer_options", {}).get(OVERRIDE_KEY)


def dit_patches(model) -> list[DitAttentionPatch]:
    """The pack's overrides on the model, outermost first."""
    fn = override_of(model)
    return [link for link in fn.chain() if isinstance(link, DitAttentionPatch)] if isinstance(fn, DitAttentionPatch) \
        else []
