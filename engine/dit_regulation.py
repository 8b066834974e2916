"""Attention regulation (arXiv 2403.06381) on the joint attention of Flux and SD3 / SD3.5.

engine/regulation.py dispatches here by model family. The paper regulates the cross-attention of the target
words: the image queries' scores on the prompt's tokens. In a DiT's joint attention that is the image->text
block; it is regulated exactly as the UNet's cross-attention (attention/regulation.py regulate_joint, the one
implementation of the math): the bias S on the target tokens' scores, optimised each step on the targets'
maps over the image token grid (the latent side / the patch size), the start and end tokens restored, and
the block scaled back to the text mass the query had, so the image->image probabilities are the model's
own. The text queries, the image-only attentions (SD3.5 medium's second self-attention) and the
unconditional rows are left as they are; steps i < end_percent * N only, as on the UNet.

Blocks by meaning (attention/dit_blocks.py specs). The paper's layers are SD's 16x16 cross-attentions
(down_blocks.2 and up_blocks.1): in SD's execution order of 16 transformer blocks they sit at positions
4, 5 and 7, 8, 9, the middle of the network without its bottleneck. Every joint attention of a DiT runs at
one resolution, so the default picks the same part of the depth: `depth:0.25-0.625` (Flux.1-dev: blocks 15
to 35 of 57, the last four double blocks and the first 17 single ones; SD3.5 large: 10 to 23 of 38).

Token positions: the text tokens of the call are the conditioning's tokens (the text encoder's output).
- SD3 / SD3.5: [CLIP-L | CLIP-G (77-token chunks, channels concatenated), then T5's tokens]; the word finder
  reads CLIP-L and CLIP-G (engine/regulation.find_target_tokens, keys "l" and "g"), so chunk j's token p is
  text token 77 j + p; start and end tokens restored as on the UNet. The T5 copy of the words is not
  regulated. Where the host repeats a short context to a longer negative's length, the first copy is
  regulated. A T5-only SD3 text encoder (no CLIP-L or CLIP-G) puts T5's tokens first: not supported.
- Flux.1: the conditioning is T5's tokens alone (comfy/text_encoders/flux.py: CLIP-L gives only the pooled
  vector): the words are found by the T5 tokenizer (engine/tokens.py's start-less path), text token i is T5
  token i, and T5's end token after the words is the one restored (T5 has no start token).
"""

from __future__ import annotations

import logging

import comfy.patcher_extension
import torch

from ..attention.dit_blocks import dit_block_selected, parse_dit_block_spec
from ..attention.regulation import RegulationParams, layer_seed, regulate_joint
from . import tokens
from .dit import FLUX, add_dit_attention, dit_blocks, dit_family
from .regulation import DEFAULT_BLOCKS, _RunState, _RunTensors  # the UNet side's per-run state and tensors

log = logging.getLogger("attention_edit")

DEFAULT_DIT_BLOCKS = "depth:0.25-0.625"
CLIP_KEYS = ("g", "l")  # the tokenizers whose positions index SD3's text tokens (its CLIP part)


def regulation_token_keys(family: str, clip=None) -> tuple[str, ...]:
    """The tokenizers whose positions index the family's text tokens: SD3's CLIP part; on Flux.1 T5's (its
    context), or, for a CLIP without a T5 tokenizer (a CLIP-prompted Flux such as the toy flow world, whose
    context is the CLIP tokens), the CLIP ones."""
    if family != FLUX:
        return CLIP_KEYS
    if clip is not None and tokens.T5 not in tokens.tokenized(clip, "", None):
        return CLIP_KEYS
    return (tokens.T5,)


def dit_block_spec(blocks: str) -> str:
    """The node's block spec on a DiT: its UNet default ('input, output') stands for DEFAULT_DIT_BLOCKS."""
    return DEFAULT_DIT_BLOCKS if " ".join((blocks or "").split()) == DEFAULT_BLOCKS else blocks


def regulation_blocks_dit(model, blocks: str = DEFAULT_DIT_BLOCKS) -> list:
    """The DiT blocks `blocks` selects (dit_blocks' DitBlock, execution order); a ValueError when none."""
    blocks = dit_block_spec(blocks)
    items = parse_dit_block_spec(blocks)
    chosen = [b for b in dit_blocks(model) if dit_block_selected(items, b.kind, b.index, b.order, b.total)]
    if not chosen:
        total = len(dit_blocks(model))
        raise ValueError(f"attention regulation: the block selection '{blocks}' matches no block of this model "
                         f"({total} blocks; e.g. '{DEFAULT_DIT_BLOCKS}', 'double', 'single' or 'all')")
    return chosen


def apply_attention_regulation_dit(model, plan, end_percent: float = 0.5,
                                   params: RegulationParams = RegulationParams(), blocks: str = DEFAULT_DIT_BLOCKS):
    """A clone of the DiT `model` whose selected blocks' joint attentions regulate the plan's targets (text
    token positions: plan.text_positions()) on the conditional rows for steps i < end_percent * N. No plan
    (no target words): the model itself."""
    if dit_family(model) is None:
        raise ValueError("attention regulation on joint attention needs a Flux or SD3 model")
    if not 0.0 <= end_percent <= 1.0:
        raise ValueError(f"end_percent must be in [0, 1], got {end_percent}")
    params.validate()
    chosen = regulation_blocks_dit(model, blocks)
    if plan is None or not plan.groups:
        return model
    groups_pos, keep_pos = plan.text_positions()
    every = [p for g in groups_pos for p in g] + list(keep_pos)
    needed = max(every) + 1 if every else 0
    selected = frozenset((b.kind, b.index) for b in chosen)
    m = model.clone()
    state = _RunState()
    made = _RunTensors(lambda length: (groups_pos, keep_pos))  # positions among the text tokens, any length

    def regulated_joint_attention(call, q, k, v, previous, source):
        if not call.joint or call.step is None or not call.step[0] < end_percent * call.step[1]:
            return previous(q, k, v)
        rows = call.cond_rows()
        n_txt = call.txt.stop - call.txt.start
        if not rows or n_txt == 0:
            return previous(q, k, v)
        if needed > n_txt:
            raise ValueError(f"attention regulation: the target words sit at text tokens up to {needed - 1}, but "
                             f"this model call has {n_txt} text tokens: the conditioning does not come from the "
                             f"prompt the words were found in (or its text encoder has no CLIP-L / CLIP-G)")
        step = call.step[0]
        groups, keep = made.positions(n_txt, q.device)
        out = previous(q, k, v).clone()
        r = torch.as_tensor(rows, dtype=torch.long, device=q.device)
        key = call.block
        new, best = regulate_joint(previous, q[r][:, :, call.img], k[r], v[r], call.txt, groups, keep,
                                   call.map_hw, step, state.previous(key, step), params,
                                   basis=made.basis(call.map_hw, q.device), seed=layer_seed(key, step))
        state.store(key, step, best)
        out[r, :, call.img] = new.to(out.dtype)
        return out

    def new_run(executor, *args, **kwargs):
        state.reset()
        return executor(*args, **kwargs)

    add_dit_attention(m, "attention regulation", regulated_joint_attention,
                      lambda b: (b.kind, b.index) in selected)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "attn_edit_regulation", new_run)
    log.debug("attention regulation on %d DiT blocks for %s", len(selected), ", ".join(plan.words))
    return m
