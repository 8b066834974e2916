"""Attention regulation (arXiv 2403.06381) on a model: target tokens from the CLIP tokenizer, the
cross-attention patch with its per-run state, and the choice of layers by map size."""

from __future__ import annotations

import dataclasses
import logging
import math

import comfy.patcher_extension
import torch

from ..attention.blocks import block_selected, parse_block_spec
from ..attention.regulation import RegulationParams, gaussian_basis, layer_seed, regulate
from .patching import UNET, add_attention_replace, block_map_sides, model_family, unet_of
from .tokens import CHUNK, parse_words, prompt_words, tokenized, word_ids

log = logging.getLogger("attention_edit")

DEFAULT_BLOCKS = "input, output"
DEFAULT_MAP_SIDE = 0.25


@dataclasses.dataclass(frozen=True)
class TokenPlan:
    """Where the targets are in the prompt's token chunks (positions 0..76 of each chunk).

    groups[g]: (chunk, position) of every token of target g, all occurrences; keep: the start and
    the first end token of every chunk (their probabilities are restored after the softmax).
    """

    words: tuple[str, ...]
    groups: tuple[tuple[tuple[int, int], ...], ...]
    keep: tuple[tuple[int, int], ...]
    chunks: int = 1

    @classmethod
    def from_positions(cls, groups, end: int | None = None, words=None) -> TokenPlan:
        """A single-chunk plan from token positions (no tokenizer needed): groups of positions, one per
        target, and the position of the end token (the start token is position 0)."""
        groups = tuple(tuple((0, int(p)) for p in g) for g in groups)
        keep = ((0, 0),) + (() if end is None else ((0, int(end)),))
        words = tuple(words) if words is not None else tuple(f"target{i}" for i in range(len(groups)))
        return cls(words=words, groups=groups, keep=keep, chunks=1)

    def context_positions(self, length: int) -> tuple[list[list[int]], list[int]]:
        """Positions in a cross-attention context of `length` tokens: the host makes contexts of
        different lengths equal by repeating the token sequence, so 77-token block j holds chunk
        j mod chunks, and every target occurs once per block that holds its chunk."""
        if length % CHUNK:
            raise ValueError(f"attention regulation: the cross-attention context has {length} tokens, not a "
                             f"multiple of {CHUNK}: the conditioning does not come from a CLIP text encoder")
        blocks = length // CHUNK

        def expand(pairs):
            return [j * CHUNK + pos for j in range(blocks) for chunk, pos in pairs if chunk == j % self.chunks]

        return [expand(g) for g in self.groups], expand(self.keep)

    def text_positions(self) -> tuple[list[list[int]], list[int]]:
        """Positions in a DiT's text tokens, where the chunks follow each other (SD3's CLIP part: chunk j at
        77 j .. 77 j + 76; a single-chunk plan's positions as they are)."""

        def flat(pairs):
            return [chunk * CHUNK + pos for chunk, pos in pairs]

        return [flat(g) for g in self.groups], flat(self.keep)


def find_target_tokens(clip, prompt: str, target_words: str, keys: tuple[str, ...] | None = None) -> TokenPlan | None:
    """The token positions of the comma-separated target words in `prompt`, through the pack's word finder
    (engine/tokens.py) on every text encoder the model has (SDXL's two must see the same positions). A word
    made of several tokens is one target (all of its tokens, every occurrence in every chunk). None when
    there are no target words; a ValueError naming the word and listing the prompt's words when one is not
    in the prompt. `keys`: read only these tokenizers (SD3: CLIP-L and CLIP-G; Flux: T5, which has no start
    token and one chunk: its end token is the one restored)."""
    words = parse_words(target_words)
    if not words:
        return None
    if clip is None:
        raise ValueError("attention regulation needs the CLIP that encodes the prompt, to find the target words")
    if not (prompt or "").strip():
        raise ValueError("attention regulation: the prompt is empty; type the positive prompt you encode "
                         "(the same text as in its CLIPTextEncode)")
    plans = {}
    for key, tp in tokenized(clip, prompt).items():
        if keys is not None and key not in keys:
            continue
        startless = getattr(tp, "start", 0) is None and keys is not None  # T5 (Flux), asked for by name
        if startless and len(tp.chunks) != 1:
            raise ValueError(f"attention regulation: the '{key}' tokenizer split the prompt into {len(tp.chunks)} "
                             f"chunks; one was expected")
        if not startless and any(len(chunk) != CHUNK for chunk in tp.chunks):
            raise ValueError(f"attention regulation works with CLIP text encoders (chunks of {CHUNK} tokens); "
                             f"the '{key}' tokenizer makes chunks of {sorted({len(c) for c in tp.chunks})} tokens")
        groups, missing = [], []
        for word in words:
            ids = word_ids(clip, word, key)
            found = tuple((c, i + j) for c, i in tp.occurrences_in(ids) for j in range(len(ids)))
            if not found:
                missing.append(word)
            groups.append(found)
        if missing:
            listed = ", ".join(prompt_words(prompt)) or "(none)"
            names = ", ".join(f"'{w}'" for w in missing)
            raise ValueError(f"attention regulation: target word {names} not found in the prompt. Target words must "
                             f"appear in the prompt text as written there. The prompt's words: {listed}")
        if startless:  # no start token; the end token after the words is restored (one chunk: positions as is)
            keep = tuple((c, e) for c, e in enumerate(tp.ends) if e < len(tp.chunks[c]))
        else:
            keep = tuple((c, 0) for c in range(len(tp.chunks))) + tuple((c, e) for c, e in enumerate(tp.ends)
                                                                         if e < CHUNK)
        plans[key] = TokenPlan(words=tuple(words), groups=tuple(groups), keep=keep, chunks=len(tp.chunks))
    if not plans:
        if keys:
            raise ValueError(f"attention regulation: the CLIP given has no {' or '.join(repr(k) for k in keys)} "
                             f"tokenizer, which this model's prompt tokens come from: connect the model's own CLIP")
        raise ValueError("attention regulation: the CLIP given has no CLIP-style tokenizer (start and end tokens)")
    plan = next(iter(plans.values()))
    if any(p != plan for p in plans.values()):
        raise ValueError(f"attention regulation: the text encoders ({', '.join(plans)}) place the target words at "
                         f"different token positions; this model's tokenizers are not supported")
    seen = {}
    for word, group in zip(plan.words, plan.groups):
        for pos in group:
            if pos in seen:
                raise ValueError(f"attention regulation: target words '{seen[pos]}' and '{word}' share tokens; "
                                 f"name each word once")
            seen[pos] = word
    return plan


def _side_text(side: float) -> str:
    return "1" if side >= 1 else f"1/{round(1 / side)}"


def regulation_layers(model, blocks: str = DEFAULT_BLOCKS, map_side: float = DEFAULT_MAP_SIDE) -> list:
    """The transformer blocks in `blocks` whose maps are `map_side` of the latent side (nearest power
    of two; 0 = any size). A ValueError when none matches."""
    ranges = parse_block_spec(blocks)
    sides = block_map_sides(model)
    in_blocks = [key for key in sides if block_selected(ranges, key[0], key[1])]
    if map_side > 0:
        level = round(math.log2(map_side))
        chosen = [key for key in in_blocks if round(math.log2(sides[key])) == level]
    else:
        chosen = in_blocks
    if not chosen:
        available = ", ".join(_side_text(side) for side in sorted({sides[k] for k in in_blocks}, reverse=True))
        raise ValueError(f"attention regulation: no cross-attention layer in blocks '{blocks}' has maps at "
                         f"{_side_text(2.0 ** round(math.log2(map_side))) if map_side > 0 else 'any'} of the latent "
                         f"side; this model's layers there are at {available or 'no size'}")
    return chosen


class _RunTensors:
    """The tensors every regulated call of a model reuses, made once per device: the target and kept token
    positions (per context length: a UNet's context may be a multiple of 77 tokens) and the Gaussian basis of
    each map size. `positions_for(length)` gives the positions as lists."""

    def __init__(self, positions_for):
        self.positions_for = positions_for
        self.made: dict[tuple, object] = {}

    def positions(self, length: int, device) -> tuple[list[torch.Tensor], torch.Tensor]:
        key = ("positions", length, str(device))
        if key not in self.made:
            groups, keep = self.positions_for(length)
            self.made[key] = ([torch.tensor(g, dtype=torch.long, device=device) for g in groups],
                              torch.tensor(keep, dtype=torch.long, device=device))
        return self.made[key]

    def basis(self, hw: tuple[int, int], device) -> torch.Tensor:
        key = ("basis", hw, str(device))
        if key not in self.made:
            self.made[key] = gaussian_basis(hw[0], hw[1], device=device)
        return self.made[key]


class _RunState:
    """Per layer, what `regulate` returned at the previous step (that step's optimum, which the official
    code's moving average mixes in), for one sampling run: reset by an OUTER_SAMPLE wrapper when a run
    starts (the host's per-run hook)."""

    def __init__(self):
        self.layers: dict = {}

    def reset(self) -> None:
        self.layers = {}

    def previous(self, key, step: int):
        """The bias of this layer's latest earlier step (a layer may run twice in one step)."""
        entry = self.layers.get(key)
        if entry is None:
            return None
        if entry["step"] < step:
            entry["earlier"] = entry["current"]
            entry["step"] = step
            entry["current"] = None
        return entry["earlier"]

    def store(self, key, step: int, bias: torch.Tensor) -> None:
        entry = self.layers.setdefault(key, {"step": step, "earlier": None, "current": None})
        entry["current"] = bias.detach()
        entry["step"] = step


def apply_attention_regulation(model, plan: TokenPlan | None, end_percent: float = 0.5,
                               params: RegulationParams = RegulationParams(), blocks: str = DEFAULT_BLOCKS,
                               map_side: float = DEFAULT_MAP_SIDE):
    """A clone of `model` whose selected cross-attention layers regulate the plan's targets on the
    conditional rows for steps i < end_percent * N. No plan (no target words): the model itself.

    Flux and SD3 / SD3.5: the joint attention's image->text block is regulated (engine/dit_regulation.py);
    `blocks` is then a DiT block spec (the UNet default stands for the DiT default) and map_side does not
    apply (every joint attention is at the token grid)."""
    if model_family(model) != UNET:
        from .dit_regulation import apply_attention_regulation_dit

        return apply_attention_regulation_dit(model, plan, end_percent, params, blocks)
    unet_of(model)
    if not 0.0 <= end_percent <= 1.0:
        raise ValueError(f"end_percent must be in [0, 1], got {end_percent}")
    params.validate()
    layers = set(regulation_layers(model, blocks, map_side))
    if plan is None or not plan.groups:
        return model
    m = model.clone()
    state = _RunState()
    made = _RunTensors(plan.context_positions)

    def regulated_cross_attention(call, q, k, v, previous, source):
        if call.step is None or not call.step[0] < end_percent * call.step[1]:
            return previous(q, k, v)
        step = call.step[0]
        rows = call.cond_rows()
        if not rows or call.map_hw is None:
            return previous(q, k, v)
        groups, keep = made.positions(k.shape[1], q.device)
        if k.shape[0] != q.shape[0]:
            k, v = k.expand(q.shape[0], -1, -1), v.expand(q.shape[0], -1, -1)
        index = slice(rows[0], rows[-1] + 1) if rows == list(range(rows[0], rows[-1] + 1)) else rows
        out_rows, bias = regulate(q[index], k[index], v[index], call.heads, groups, keep, call.map_hw, step,
                                  state.previous(call.block, step), params, basis=made.basis(call.map_hw, q.device),
                                  seed=layer_seed(call.block, step))
        state.store(call.block, step, bias)
        if len(rows) == q.shape[0]:
            return out_rows
        out = previous(q, k, v).clone()
        out[index] = out_rows.to(out.dtype)
        return out

    def new_run(executor, *args, **kwargs):
        state.reset()
        return executor(*args, **kwargs)

    add_attention_replace(m, "attn2", "attention regulation", regulated_cross_attention, lambda key: key in layers)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "attn_edit_regulation", new_run)
    log.debug("attention regulation on %d layers for %s", len(layers), ", ".join(plan.words))
    return m
