"""MasaCtrl's default first block on a DiT (`masactrl_start_layer` -1): the first block at 10/16 of the depth,
the last block on a model too shallow to have one (the SD3.5-shaped toy model of the sd35_real_edit smoke run
has 2 joint blocks, at depths 0 and 1/2)."""

import math

from attention_edit.engine.dit import dit_blocks
from attention_edit.engine.dit_methods import default_masactrl_block
from attention_edit.nodes.injection import SelfAttentionInjection
from fixtures import tiny_dit
from toyworld.model import SD3, build_toy, family_config


def _first_at_ten_sixteenths(total: int) -> int:
    """Plainly: the smallest block number i with i / total >= 10/16, or the last block."""
    for i in range(total):
        if 16 * i >= 10 * total:
            return i
    return total - 1


def test_default_block_on_a_deep_enough_dit():
    model = tiny_dit.build("sd35")
    total = len(dit_blocks(model))
    assert total == 3
    assert default_masactrl_block(model) == _first_at_ten_sixteenths(total) == math.ceil(10 * total / 16) == 2


def test_default_block_on_a_too_shallow_dit_is_the_last():
    model, _, _ = build_toy(family_config(SD3), seed=0)
    total = len(dit_blocks(model))
    assert total == 2 and all(b.depth < 10 / 16 for b in dit_blocks(model))
    assert default_masactrl_block(model) == _first_at_ten_sixteenths(total) == 1
    # The node accepts the default there (it raised StopIteration before).
    patched = SelfAttentionInjection.execute(model=model, mode="masactrl", fpe_ratio=0.8, fpe_max_map_side=0.5,
                                             masactrl_start_step=4, masactrl_start_layer=-1).args[0]
    assert patched is not model
