"""Instant-mask math on synthetic attention with a known object region."""

import torch

from attention_edit.attention.instant_mask import (
    MapAccumulator,
    attention_probabilities,
    gaussian_blur,
    instant_mask,
    normalise,
    refined_map,
    word_maps,
)

SIDE = 16


def synthetic_maps(obj_box=(4, 12, 3, 9), tokens=8):
    """(1, tokens, 16, 16) attention: token 0 = start (background-heavy), token 2-3 = a two-token object
    word on the box, token 5 = a background word, others flat."""
    y0, y1, x0, x1 = obj_box
    inside = torch.zeros(SIDE, SIDE)
    inside[y0:y1, x0:x1] = 1.0
    maps = torch.full((1, tokens, SIDE, SIDE), 0.05)
    maps[0, 0] = 0.9 - 0.8 * inside  # the start token attends to the background
    maps[0, 2] = 0.05 + 0.6 * inside
    maps[0, 3] = 0.05 + 0.5 * inside
    maps[0, 5] = 0.05 + 0.3 * (1 - inside)
    maps = maps / maps.sum(dim=1, keepdim=True)  # probabilities over tokens
    return maps, inside


def iou(a, b):
    a, b = a.bool(), b.bool()
    return float((a & b).sum() / (a | b).sum())


def test_recovers_a_known_object_region():
    maps, inside = synthetic_maps()
    words = [[1], [2, 3], [4], [5], [6], [7]]
    latent = 4 * SIDE  # maps at a quarter of the latent side, as at 512 px
    truth = inside.repeat_interleave(4, 0).repeat_interleave(4, 1).bool()
    for edit_words in ([1], None):  # the user's word, or found through the start token
        tight = instant_mask(maps, words, (latent, latent), edit_words=edit_words, threshold=0.5)[0, 0]
        assert iou(tight, truth) >= 0.9
        # The paper's phi = 0.2 keeps a margin: the whole object plus at most a few latent pixels.
        generous = instant_mask(maps, words, (latent, latent), edit_words=edit_words)[0, 0].bool()
        assert bool(generous[truth].all()) and iou(generous, truth) >= 0.75


def test_word_merging_start_inversion_and_refinement_by_hand():
    maps = torch.zeros(1, 3, 2, 2)
    maps[0, 0] = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # start: background everywhere but bottom right
    maps[0, 1] = torch.tensor([[0.0, 0.0], [0.0, 1.0]])  # an object token
    maps[0, 2] = torch.tensor([[0.0, 0.0], [0.0, 0.5]])
    merged = word_maps(maps, [[1, 2]])
    assert torch.equal(merged[0, 0], torch.tensor([[0.0, 0.0], [0.0, 0.75]]))
    # inverted start = [[0,0],[0,1]]; word [1,2] normalised = same map: cosine 1 -> object.
    refined = refined_map(maps, [[1, 2]])
    assert torch.allclose(refined[0], torch.tensor([[0.0, 0.0], [0.0, 1.0]]))
    # A background word (cosine 0 <= 0.6) is subtracted and the result clamped at 0.
    maps2 = torch.cat([maps, torch.tensor([[[[1.0, 1.0], [1.0, 0.2]]]])], dim=1)
    refined2 = refined_map(maps2, [[1, 2], [3]])
    assert refined2.min() >= 0
    assert torch.allclose(refined2[0], torch.tensor([[0.0, 0.0], [0.0, 1.0]]))


def test_blur_preserves_mass_and_normalise_spans_zero_to_one():
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 4] = 1.0
    blurred = gaussian_blur(x)
    assert abs(float(blurred.sum()) - 1.0) < 1e-5 and blurred[0, 0, 4, 4] < 1.0
    n = normalise(torch.tensor([[[[2.0, 4.0], [3.0, 6.0]]]]))
    assert n.min() == 0 and n.max() == 1


def test_probabilities_and_fixed_size_accumulation():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 16, 8, generator=g), torch.randn(2, 77, 8, generator=g)
    p = attention_probabilities(q.half(), k.half(), heads=2)
    assert p.dtype == torch.float32 and torch.allclose(p.sum(-1), torch.ones(2, 16), atol=1e-5)
    acc = MapAccumulator()
    sizes = []
    for _ in range(50):
        acc.add(p, (4, 4))
        sizes.append(acc.stored_elements())
    assert len(set(sizes)) == 1 and sizes[0] == 2 * 77 * 16  # nothing grows with the calls
    assert torch.allclose(acc.mean(), p.transpose(1, 2).reshape(2, 77, 4, 4))
