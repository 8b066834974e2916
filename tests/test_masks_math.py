"""Adaptive-mask math against hand-computed small cases."""

import pytest
import torch

from attention_edit.attention.masks import (
    DILATE_EDIT,
    DILATE_UNCHANGED,
    adaptive_mask,
    blend,
    dilate,
    quantile_schedule,
)


def test_quantile_rises_linearly_from_zero_to_lambda():
    assert [quantile_schedule(i, 5, 0.5) for i in range(5)] == [0.0, 0.125, 0.25, 0.375, 0.5]
    assert quantile_schedule(0, 1, 0.5) == 0.5


def test_dilation_is_a_3x3_max_pool():
    m = torch.zeros(1, 1, 5, 5)
    m[0, 0, 2, 2] = 1
    expected = torch.zeros(1, 1, 5, 5)
    expected[0, 0, 1:4, 1:4] = 1
    assert torch.equal(dilate(m), expected)
    corner = torch.zeros(1, 1, 3, 3)
    corner[0, 0, 0, 0] = 1
    assert dilate(corner)[0, 0].tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 0]]


def test_adaptive_mask_thresholds_at_the_quantile_and_dilates_either_region():
    src = torch.zeros(1, 1, 5, 5)
    tgt = torch.zeros(1, 1, 5, 5)
    tgt[0, 0, 2, 2] = 3.0  # one changed element
    tgt[0, 0, 0, 4] = 0.5  # a smaller change, below the 0.96 quantile
    edit = adaptive_mask(tgt, src, q=0.96, dilation=DILATE_EDIT)
    expected = torch.zeros(1, 1, 5, 5)
    expected[0, 0, 1:4, 1:4] = 1
    assert torch.equal(edit, expected)
    # q = 0: everything that changed at all is edit region (strictly above the minimum).
    both = adaptive_mask(tgt, src, q=0.0, dilation=DILATE_UNCHANGED)
    # The paper's variant grows the unchanged region, so single changed pixels vanish.
    assert torch.equal(both, torch.zeros(1, 1, 5, 5))
    block = torch.zeros(1, 1, 6, 6)
    block[0, 0, 1:5, 1:5] = 1.0
    eroded = adaptive_mask(block, torch.zeros_like(block), q=0.5, dilation=DILATE_UNCHANGED)
    expected = torch.zeros(1, 1, 6, 6)
    expected[0, 0, 2:4, 2:4] = 1
    assert torch.equal(eroded, expected)
    with pytest.raises(ValueError):
        adaptive_mask(tgt, src, 0.5, dilation="bogus")


def test_threshold_is_per_image():
    src = torch.zeros(2, 1, 4, 4)
    tgt = torch.zeros(2, 1, 4, 4)
    tgt[0, 0, 0, 0] = 100.0
    tgt[1, 0, 3, 3] = 0.01
    m = adaptive_mask(tgt, src, q=0.9, dilation=DILATE_EDIT)
    assert m[0, 0, 0, 0] == 1 and m[1, 0, 3, 3] == 1 and m[1, 0, 0, 0] == 0


def test_blend_keeps_outside_exactly():
    mask = torch.tensor([[[[1.0, 0.0]]]])
    inside, outside = torch.full((1, 1, 1, 2), 5.0), torch.full((1, 1, 1, 2), -1.0)
    assert blend(mask, inside, outside).tolist() == [[[[5.0, -1.0]]]]
