"""Patching uniform cross-attention (UAM) onto a model.

Scope `inversion_and_aux` (the default) is the official wiring: uniform attention in the inversion and in
the edit's auxiliary reconstruction branch only, normal attention for the source and target branches and
in stock samplers. Scope `all` makes every row uniform, the source and target of an edit too (their
images then ignore what the prompt says): for a model that only inverts or reconstructs.
"""

from __future__ import annotations

from ..attention.blocks import block_selected, parse_block_spec
from ..attention.layout import AUX, INVERSION
from ..attention.uniform import uniform_attention
from .contract import AttentionPatch
from .dit import dit_patches
from .dit_methods import apply_uniform_attention_dit
from .patching import UNET, add_attention_replace, model_family

SCOPE_ALL = "all"
SCOPE_INVERSION_AND_AUX = "inversion_and_aux"
SCOPES = (SCOPE_ALL, SCOPE_INVERSION_AND_AUX)


def apply_uniform_attention(model, scope: str = SCOPE_INVERSION_AND_AUX, start: float = 0.0, end: float = 1.0,
                            blocks: str = "all"):
    """A clone of `model` whose cross-attention is uniform where scope, steps and blocks say."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope '{scope}', expected one of {SCOPES}")
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(f"the step window must satisfy 0 <= start < end <= 1, got start={start}, end={end}")
    if model_family(model) != UNET:  # Flux, SD3.5: the image queries' attention to the text (joint attention)
        return apply_uniform_attention_dit(model, scope, start, end, blocks, scope_all=SCOPE_ALL)
    ranges = parse_block_spec(blocks)
    m = model.clone()

    def uniform_cross_attention(call, q, k, v, previous, source):
        if not call.in_window(start, end):
            return previous(q, k, v)
        if scope == SCOPE_ALL:
            return uniform_attention(v, q.shape[1])
        rows = call.rows(INVERSION) + call.rows(AUX)
        if not rows:
            return previous(q, k, v)
        if len(rows) == q.shape[0]:
            return uniform_attention(v, q.shape[1])
        out = previous(q, k, v).clone()
        out[rows] = uniform_attention(v[rows], q.shape[1]).to(out.dtype)
        return out

    def effect(branch):
        return ("uniform", start, end) if scope == SCOPE_ALL or branch in (INVERSION, AUX) else None

    count = add_attention_replace(m, "attn2", "uniform", uniform_cross_attention,
                                  lambda key: block_selected(ranges, key[0], key[1]), effect=effect)
    if count == 0:
        raise ValueError(f"the block selection '{blocks}' matches no cross-attention block of this model")
    return m


def uniform_branches(model, branches) -> list[str]:
    """Which of `branches` this pack's uniform attention covers on `model` (in any block or step window)."""
    found: list[str] = []
    table = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for link in dit_patches(model):
        if link.method == "uniform":
            found += [b for b in branches if b not in found and link.effect(b) is not None]
    for fn in table.values():
        if not isinstance(fn, AttentionPatch):
            continue
        for link in fn.chain():
            if isinstance(link, AttentionPatch) and link.method == "uniform":
                found += [b for b in branches if b not in found and link.effect(b) is not None]
    return [b for b in branches if b in found]


def uses_uniform_attention(signature: tuple) -> bool:
    """Whether an attention signature (engine.patching.branch_attention_signature, e.g. the one an inversion
    handle keeps) has this pack's uniform attention in it."""
    return any(isinstance(e, tuple) and e[:1] == ("uniform",) for *_, effects in signature for e in effects)
