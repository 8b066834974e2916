"""Pure math of attention/: uniform attention, injection, layouts, block specs, schedules."""

import math

import pytest
import torch

from attention_edit.attention.blocks import block_selected, map_size, parse_block_spec
from attention_edit.attention.injection import (
    FPE,
    MASACTRL,
    injected_chunks,
    mask_at,
    masked_mutual_attention,
    source_inputs,
    substitute_inputs,
)
from attention_edit.attention.layout import AUX, SOURCE, TARGET, BranchLayout
from attention_edit.attention.schedule import position_in_schedule
from attention_edit.attention.uniform import uniform_attention


def explicit_attention(q, k, v, heads, probs=None):
    """Reference multi-head attention with an optional explicit probability matrix."""
    b, n, c = q.shape
    d = c // heads
    qh, kh, vh = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    if probs is None:
        probs = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (probs @ vh).transpose(1, 2).reshape(b, n, c)


def test_uniform_attention_equals_explicit_one_over_t_and_ignores_q():
    g = torch.Generator().manual_seed(0)
    q, v = torch.randn(2, 10, 8, generator=g), torch.randn(2, 77, 8, generator=g)
    k = torch.randn(2, 77, 8, generator=g)
    uniform = torch.full((2, 2, 10, 77), 1 / 77)
    expected = explicit_attention(q, k, v, heads=2, probs=uniform)
    assert torch.allclose(uniform_attention(v, 10), expected, atol=1e-6)
    assert torch.equal(uniform_attention(v, 10), uniform_attention(v, 10))  # Q never enters
    # Token sequences repeated to a common length (the host's concat) give the same mean.
    assert torch.allclose(uniform_attention(v.repeat(1, 2, 1), 10), expected, atol=1e-6)


@pytest.mark.parametrize("mode", [FPE, MASACTRL])
def test_injection_equals_its_formula(mode):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(4, 16, 8, generator=g) for _ in range(3))
    originals = [t.clone() for t in (q, k, v)]
    src, tgt = [0, 2], [1, 3]
    q2, k2, v2 = substitute_inputs(q, k, v, mode, tgt, source_inputs(q, k, v, mode, src))
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), originals))  # inputs are not mutated
    out = explicit_attention(q2, k2, v2, heads=2)
    for s, t in zip(src, tgt):
        def one(a, t=t):
            return a[t:t + 1]

        def src_(a, s=s):
            return a[s:s + 1]

        if mode == FPE:  # target uses the source's map: softmax(Q_src K_src^T) V_tgt
            d = 4
            qh, kh = (a.reshape(1, 16, 2, d).transpose(1, 2) for a in (src_(q), src_(k)))
            probs = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)
            expected = explicit_attention(src_(q), src_(k), one(v), heads=2, probs=probs)
        else:  # target queries the source: attention(Q_tgt, K_src, V_src)
            expected = explicit_attention(one(q), src_(k), src_(v), heads=2)
        assert torch.allclose(out[t:t + 1], expected, atol=1e-5)
        # source rows unchanged
        assert torch.allclose(out[s:s + 1], explicit_attention(src_(q), src_(k), src_(v), heads=2), atol=1e-5)


def test_each_mode_changes_the_guidance_halves_its_official_code_changes():
    # FPE's controller edits attn[h // 2:], the conditional half; MasaCtrl's runs in both halves.
    assert injected_chunks(FPE, "official") == "cond"
    assert injected_chunks(MASACTRL, "official") == "cond_and_uncond"
    for mode in (FPE, MASACTRL):
        assert injected_chunks(mode, "cond") == "cond" and injected_chunks(mode, "cond_and_uncond") == "cond_and_uncond"
    with pytest.raises(ValueError, match="rows"):
        injected_chunks(FPE, "uncond")


def test_masks_are_resized_by_nearest_neighbour_and_split_at_one_half():
    mask = torch.tensor([[0.0, 0.1, 1.0, 1.0],
                         [0.0, 0.0, 1.0, 1.0],
                         [0.5, 0.0, 0.49, 0.0],
                         [0.0, 0.0, 0.0, 0.0]])
    # nearest: source index floor(i * 4 / 2) = 0, 2 in each direction
    assert mask_at(mask, (2, 2)).tolist() == [[False, True, True, False]]
    assert mask_at(mask[None].expand(3, -1, -1), (4, 4)).shape == (3, 16)


def masked_reference(q, k, v, heads, keys):
    """Attention whose scores outside `keys` are -inf; no keys at all: every key weighs the same."""
    b, n, c = q.shape
    d = c // heads
    qh, kh = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k))
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(d)
    if keys.any():
        scores = scores.masked_fill(~keys, float("-inf"))
    else:
        scores = torch.zeros_like(scores)
    return explicit_attention(q, k, v, heads, probs=torch.softmax(scores, dim=-1))


def test_mask_guided_mutual_attention_splits_foreground_and_background():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 6, 8, generator=g, dtype=torch.float64) for _ in range(3))

    def kernel(q, k, v):
        return explicit_attention(q, k, v, heads=2)

    source_fg = torch.tensor([True, True, False, False, True, False])
    target_fg = torch.tensor([False, True, True, False, False, True])
    out = masked_mutual_attention(kernel, q, k, v, source_fg, target_fg)
    fg, bg = masked_reference(q, k, v, 2, source_fg), masked_reference(q, k, v, 2, ~source_fg)
    m = target_fg.double()[None, :, None]
    assert torch.allclose(out, fg * m + bg * (1 - m), atol=1e-12)
    # A source with no foreground at this resolution: the official offset leaves every key equal there.
    none = torch.zeros(6, dtype=torch.bool)
    out = masked_mutual_attention(kernel, q, k, v, none, target_fg)
    expected = v.mean(dim=1, keepdim=True) * m + kernel(q, k, v) * (1 - m)
    assert torch.allclose(out, expected, atol=1e-12)
    # Everything foreground is plain mutual attention.
    every = torch.ones(6, dtype=torch.bool)
    assert torch.allclose(masked_mutual_attention(kernel, q, k, v, every, every), kernel(q, k, v), atol=1e-12)


def test_layout_rows_per_chunk_and_call():
    layout = BranchLayout((SOURCE, TARGET, AUX), images=2)
    assert layout.rows(SOURCE, 6) == [0, 1]
    assert layout.rows(TARGET, 6) == [2, 3]
    assert layout.rows(AUX, 12) == [4, 5, 10, 11]  # cond and uncond chunks in one call
    assert layout.rows("missing", 6) == []
    assert layout.rows(SOURCE, 5) == []  # not this layout's call


def test_block_spec_parsing_and_errors():
    ranges = parse_block_spec("input:7-8, middle, output:3")
    assert block_selected(ranges, "input", 7) and block_selected(ranges, "input", 8)
    assert not block_selected(ranges, "input", 4)
    assert block_selected(ranges, "middle", 0) and block_selected(ranges, "output", 3)
    assert not block_selected(ranges, "output", 4)
    assert all(block_selected(parse_block_spec("all"), n, 5) for n in ("input", "middle", "output"))
    for bad in ("bogus", "input:x", "output:5-3"):
        with pytest.raises(ValueError):
            parse_block_spec(bad)
    assert map_size(16 * 16, 64, 64) == (16, 16) and map_size(3 * 3, 20, 20) == (3, 3)  # 20 -> 10 -> 5 -> 3


def test_position_in_schedule():
    sigmas = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
    assert position_in_schedule(sigmas, torch.tensor([2.0])) == (2, 4, True)
    assert position_in_schedule(sigmas, torch.tensor([0.03])) == (3, 4, False)  # the model's smallest sigma
    assert position_in_schedule(None, torch.tensor([2.0])) is None and position_in_schedule(sigmas, None) is None
