"""Instant-mask math (InstDiffEdit's rule) on synthetic attention with a known object region."""

import torch

from attention_edit.attention.instant_mask import (
    MapAccumulator,
    attention_probabilities,
    classify_words,
    cue_maps,
    gaussian_blur,
    instant_mask,
    mean_over_samples,
    normalise,
    opencv_sigma,
    refined_map,
    word_maps,
)

SIDE = 16
WORDS = [[1], [2, 3], [4], [5], [6], [7]]


def synthetic_maps(obj_box=(4, 12, 3, 9), tokens=8, start_on_object=False):
    """(1, tokens, 16, 16) attention: token 0 = start (on the background, as in SD, or on the object), tokens
    2-3 = a two-token object word on the box, token 5 = a background word, others flat."""
    y0, y1, x0, x1 = obj_box
    inside = torch.zeros(SIDE, SIDE)
    inside[y0:y1, x0:x1] = 1.0
    maps = torch.full((1, tokens, SIDE, SIDE), 0.05)
    maps[0, 0] = 0.1 + 0.8 * inside if start_on_object else 0.9 - 0.8 * inside
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
    latent = 4 * SIDE  # maps at a quarter of the latent side, as at 512 px
    small = torch.nn.functional.avg_pool2d(maps, 4)  # 4x4 maps, resized to the 16x16 latent by the rule
    truth = inside.bool()
    for edit_words in ([1], None):  # the user's word, or the index word found through the start token
        tight, classes = instant_mask(maps, WORDS, (latent, latent), edit_words=edit_words, threshold=0.5)
        big_truth = inside.repeat_interleave(4, 0).repeat_interleave(4, 1).bool()
        assert iou(tight[0, 0], big_truth) >= 0.8
        assert classes.is_object[0].tolist() == [False, True, False, False, False, False]
        assert classes.is_background[0, 3]  # the background word is subtracted
        if edit_words is None:
            assert int(classes.index[0]) == 1  # the object word is the map most like the inverted start token
        # The paper's phi = 0.2 takes the whole object (but for a corner pixel) and nothing far outside it;
        # from 4x4 maps on a 16x16 latent (the toy world's sizes) the blurred corners fall away.
        generous = instant_mask(maps, WORDS, (latent, latent), edit_words=edit_words)[0][0, 0].bool()
        assert float(generous[big_truth].float().mean()) >= 0.95 and iou(generous, big_truth) >= 0.9
        coarse = instant_mask(small, WORDS, (SIDE, SIDE), edit_words=edit_words)[0][0, 0].bool()
        assert float(coarse[truth].float().mean()) >= 0.9 and float(coarse[~truth].float().mean()) < 0.05


def test_index_word_then_classes_by_similarity_to_it():
    maps = torch.zeros(1, 5, 2, 2)
    maps[0, 0] = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # start: background everywhere but bottom right
    maps[0, 1] = torch.tensor([[0.0, 0.0], [0.0, 1.0]])  # an object token
    maps[0, 2] = torch.tensor([[0.0, 0.0], [0.0, 0.5]])  # the same word's second token
    maps[0, 3] = torch.tensor([[0.0, 0.1], [0.0, 1.0]])  # a word close to the object word (cos 0.995)
    maps[0, 4] = torch.tensor([[1.0, 1.0], [1.0, 0.2]])  # a background word (cos 0.2 to the object word)
    words = [[1, 2], [3], [4]]
    assert torch.equal(word_maps(maps, [[1, 2]])[0, 0], torch.tensor([[0.0, 0.0], [0.0, 0.75]]))
    start, per_word = cue_maps(maps, words, (2, 2))
    assert torch.equal(start[0], torch.tensor([[0.0, 0.0], [0.0, 1.0]]))  # inverted, normalised
    classes = classify_words(start, per_word)
    assert int(classes.index[0]) == 0
    assert classes.is_object[0].tolist() == [True, True, False]
    assert classes.is_background[0].tolist() == [False, False, True]
    refined = refined_map(per_word, classes)
    assert refined.min() >= 0 and torch.allclose(refined[0], torch.tensor([[0.0, 0.0], [0.0, 1.0]]))
    # Without a background word the refined map is the normalised object mean.
    classes = classify_words(start, per_word[:, :2])
    assert not classes.is_background.any()
    assert torch.allclose(refined_map(per_word[:, :2], classes)[0], normalise(per_word[:, :2].mean(1))[0])


def test_a_named_word_is_the_index_even_where_the_start_token_sits_on_the_object():
    """Where the start token attends to the object (the toy-world model's does), the old rule compared every
    word with the inverted start map: the object's own words came out as background and the named word's
    mask was empty. With the named word as the index they are object."""
    maps, inside = synthetic_maps(start_on_object=True)
    mask, classes = instant_mask(maps, WORDS, (SIDE, SIDE), edit_words=[1])
    assert classes.is_object[0, 1] and not classes.is_background[0, 1] and classes.is_background[0, 3]
    assert iou(mask[0, 0], inside) >= 0.6
    # No word named: the inverted start map marks the background, so the index word is the background word
    # (the paper's rule, on such a model); start_map "direct" takes the map as it is and finds the object.
    inverted, classes = instant_mask(maps, WORDS, (SIDE, SIDE))
    assert int(classes.index[0]) != 1 and iou(inverted[0, 0], inside) < 0.2 and inverted[0, 0][inside == 0].mean() > 0.9
    direct, classes = instant_mask(maps, WORDS, (SIDE, SIDE), invert_start=False)
    assert int(classes.index[0]) == 1 and iou(direct[0, 0], inside) >= 0.6


def test_given_classes_are_kept():
    maps, _ = synthetic_maps()
    first = instant_mask(maps, WORDS, (SIDE, SIDE))[1]
    other, _ = synthetic_maps(obj_box=(0, 5, 10, 16))
    mask, kept = instant_mask(other, WORDS, (SIDE, SIDE), classes=first)
    assert kept is first and mask.sum() > 0


def test_blur_is_opencvs_and_normalise_spans_zero_to_one():
    assert abs(opencv_sigma(5) - 1.1) < 1e-12
    x = torch.zeros(1, 1, 9, 9, dtype=torch.float64)
    x[0, 0, 4, 4] = 1.0
    blurred = gaussian_blur(x)
    assert abs(float(blurred.sum()) - 1.0) < 1e-12 and blurred[0, 0, 4, 4] < 1.0
    g = torch.exp(-(torch.arange(5, dtype=torch.float64) - 2) ** 2 / (2 * 1.1 ** 2))
    g = g / g.sum()
    assert torch.allclose(blurred[0, 0, 2:7, 2:7], g[:, None] * g[None, :])
    # Border: mirrored without repeating the edge pixel (BORDER_REFLECT_101).
    edge = torch.zeros(1, 1, 9, 9, dtype=torch.float64)
    edge[0, 0, 1, 4] = 1.0  # next to the top edge: row -1 mirrors row 1
    col = gaussian_blur(edge)[0, 0, :, 4]
    assert torch.allclose(col[:3], torch.stack([g[1] + g[3], g[2] + g[0], g[1]]) * g[2])
    n = normalise(torch.tensor([[[[2.0, 4.0], [3.0, 6.0]]]]))
    assert n.min() == 0 and n.max() == 1
    assert normalise(torch.ones(1, 1, 3, 3)).abs().max() == 0  # a flat map becomes 0, not NaN


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
    # A context repeated to 154 tokens in a batched call keeps the first chunk's 77 in the same buffer.
    acc.add(torch.cat([p, p], dim=-1) / 2, (4, 4))
    assert acc.stored_elements() == sizes[0] and acc.count == 51


def test_samples_are_averaged_per_image():
    maps = torch.arange(6 * 2, dtype=torch.float32).reshape(6, 2)  # 3 samples x 2 images, sample-major
    mean = mean_over_samples(maps, 3)
    assert torch.equal(mean, torch.stack([maps[[0, 2, 4]].mean(0), maps[[1, 3, 5]].mean(0)]))


def lone_object_maps(background_on_object: float):
    """(1, 3, 16, 16) maps of a lone object (a 4x4 box) that the background word attends to as well: token 1 is
    the object word (1 on the box), token 2 the background word (`background_on_object` on the box, 0.5 on
    the rest, 0 in one far corner and 1 in the opposite one, so its cosine to the object word stays under 0.6
    and its peak is 1 whatever it is on the box)."""
    inside = torch.zeros(SIDE, SIDE)
    inside[6:10, 6:10] = 1.0
    maps = torch.zeros(1, 3, SIDE, SIDE)
    maps[0, 0] = 1.0 - inside
    maps[0, 1] = inside
    maps[0, 2] = 0.5 * (1 - inside) + background_on_object * inside
    maps[0, 2, 0, 0] = 0.0
    maps[0, 2, -1, -1] = 1.0
    return maps, inside


def test_a_subtraction_that_leaves_nothing_keeps_the_object_map():
    """Every word of a lone-object prompt attends to the one object (the toy-world model's do): the background
    word's normalised map covers the object word's, the official subtraction leaves nothing and its mask is
    empty, an edit that silently changes nothing. The guard then takes the object map, as the rule does where
    no word is background."""
    maps, inside = lone_object_maps(background_on_object=1.0)
    start, per_word = cue_maps(maps, [[1], [2]], (SIDE, SIDE))
    classes = classify_words(start, per_word, edit_words=[0])
    assert classes.is_background[0].tolist() == [False, True]
    assert float((normalise(per_word[:, 0]) - normalise(per_word[:, 1])).clamp_min(0).max()) == 0.0  # official: empty
    mask, _ = instant_mask(maps, [[1], [2]], (SIDE, SIDE), edit_words=[0])
    near = torch.zeros(SIDE, SIDE, dtype=torch.bool)
    near[4:12, 4:12] = True  # the box and the margin of two pixels the blur and phi = 0.2 leave around it
    assert mask[0, 0][inside.bool()].all() and not mask[0, 0][~near].any()
    assert torch.equal(refined_map(per_word, classes), normalise(per_word[:, 0]))


def test_where_the_subtraction_leaves_something_the_official_rule_stands_unless_asked():
    maps, _ = lone_object_maps(background_on_object=0.9)
    start, per_word = cue_maps(maps, [[1], [2]], (SIDE, SIDE))
    classes = classify_words(start, per_word, edit_words=[0])
    official = (normalise(per_word[:, 0]) - normalise(per_word[:, 1])).clamp_min(0)
    assert 0 < float(official.max()) < 0.5  # the subtraction removes most of the object
    assert torch.equal(refined_map(per_word, classes), official)
    assert torch.equal(refined_map(per_word, classes, min_object_left=0.5), normalise(per_word[:, 0]))
