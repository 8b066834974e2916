"""Mask strategies inside the edit sampler: user MASKs and UAM's adaptive mask, on the three families."""

import pytest
import torch
from test_attention_control import STEPS, invert

from attention_edit.nodes.adaptive_mask import AdaptiveMask
from attention_edit.nodes.edit_sampler import EditSampler
from attention_edit.nodes.uniform_attention import UniformAttention
from fixtures import tiny


def edit(model, source, target, negative, handle, mask_strategy=None, mask=None):
    out = EditSampler.execute(model=model, source=source, target=target, negative=negative, cfg=7.5, steps=STEPS,
                              scheduler="ddim_uniform", pin_source=True, seed=0, inversion=handle,
                              mask_strategy=mask_strategy, edit_mask=mask).args
    return out[0]["samples"], out[1]["samples"], out[2]


def adaptive(lam=0.5, t_mask=200.0, dilation="edit_region", blend_source=False):
    return AdaptiveMask.execute(lambda_max=lam, t_mask=t_mask, dilation=dilation, blend_source=blend_source).args[0]


@pytest.fixture(scope="module", params=tiny.FAMILIES)
def world(request):
    name = request.param
    model = tiny.build(name)
    lat = tiny.latent()
    empty, tgt = tiny.conditioning(name, 1), tiny.conditioning(name, 3)
    _, handle = invert(model, lat, empty)
    return name, model, lat, empty, tgt, handle


def test_user_mask_keeps_everything_outside_it_exactly(world):
    name, model, lat, empty, tgt, handle = world
    mask = torch.zeros(1, 128, 128)
    mask[:, 32:96, 40:88] = 1.0  # on the 8 px latent grid: rows 4-11, cols 5-10
    edited, source, out_mask = edit(model, empty, tgt, empty, handle, mask=mask)
    inside = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    inside[..., 4:12, 5:11] = True
    outside = ~inside.expand_as(edited)
    assert (edited - lat)[outside].abs().max() <= 1e-4  # the source reconstruction, exactly (pinned)
    assert (edited - lat)[inside.expand_as(edited)].abs().max() > 1e-2  # the edit happened inside
    assert torch.equal(out_mask, mask)
    assert out_mask.min() >= 0 and out_mask.max() <= 1


def test_adaptive_mask_runs_the_aux_branch_and_blends_in_the_last_steps(world):
    name, model, lat, empty, tgt, handle = world
    m = UniformAttention.execute(model=model, scope="inversion_and_aux", start_percent=0.0, end_percent=1.0,
                                 blocks="all").args[0]
    plain, _, ones = edit(m, empty, tgt, empty, handle)
    assert torch.all(ones == 1)
    edited, source, mask = edit(m, empty, tgt, empty, handle, mask_strategy=adaptive())
    assert (source - lat).abs().max() <= 1e-4
    assert mask.shape == (1, 128, 128) and mask.min() >= 0 and mask.max() <= 1
    assert 0 < mask.mean() < 1
    blend_effect = float((edited - plain).abs().max())
    assert blend_effect > 1e-2  # the blend changed the result
    # T_mask 0: never active, so the same as no mask: the aux rows do not disturb the others. The
    # target is then computed in a batch of 6 rows instead of 4, a float-order difference two orders
    # of magnitude below the blend's effect (measured up to 1.3e-4 on the SDXL fixture).
    never, _, never_mask = edit(m, empty, tgt, empty, handle, mask_strategy=adaptive(t_mask=0.0))
    assert float((never - plain).abs().max()) < blend_effect / 100
    assert torch.all(never_mask == 1)


def test_mask_errors():
    from attention_edit.nodes.adaptive_mask import AdaptiveMask

    assert "dilation 'bogus' is not a choice" in AdaptiveMask.validate_inputs(lambda_max=0.5, t_mask=200.0,
                                                                             dilation="bogus")
    name = "sd15"
    model = tiny.build(name)
    lat, empty = tiny.latent(), tiny.conditioning(name, 1)
    _, handle = invert(model, lat, empty)
    with pytest.raises(ValueError, match="finite MASK"):
        edit(model, empty, empty, empty, handle, mask=torch.full((1, 128, 128), float("nan")))


def test_adaptive_strategy_blends_target_with_aux_outside_a_known_edit():
    from attention_edit.attention.layout import AUX, SOURCE, TARGET, BranchLayout
    from attention_edit.engine.adaptive_mask import AdaptiveMaskStrategy

    layout = BranchLayout((SOURCE, TARGET, AUX), images=1)
    model_sampling = tiny.build("sd15").get_model_object("model_sampling")
    sigmas = torch.tensor([0.5, 0.2, 0.0])  # both steps below sigma(t=200)
    strategy = AdaptiveMaskStrategy(lam=0.5, t_mask=200.0, dilation="edit_region", blend_source=True)
    run = strategy.start(layout, sigmas, None, model_sampling)
    src = torch.zeros(1, 4, 8, 8)
    tgt = src.clone()
    tgt[..., 3:5, 3:5] = 2.0  # the edit
    aux = torch.full_like(src, 0.25)
    out = run.blend_denoised(1, None, torch.cat([src, tgt, aux]))
    edit_region = torch.zeros(1, 4, 8, 8, dtype=torch.bool)
    edit_region[..., 2:6, 2:6] = True  # 2x2 change dilated 3x3
    assert torch.equal(out[1:2][edit_region], tgt[edit_region])
    assert torch.equal(out[1:2][~edit_region], aux[~edit_region])
    assert torch.equal(out[0:1][~edit_region], aux[~edit_region])  # the red line: source outside = aux
    assert torch.equal(out[2:3], aux)
    assert torch.equal(run.final_mask()[0], edit_region[0, 0].float())
    # Above T_mask nothing is blended.
    run = strategy.start(layout, torch.tensor([20.0, 10.0, 0.0]), None, model_sampling)
    same = torch.cat([src, tgt, aux])
    assert torch.equal(run.blend_denoised(0, None, same), same) and run.final_mask() is None


def runs_of(strategy) -> list:
    """The runs a strategy starts (each sampling run gets its own state; the strategy keeps none)."""
    runs, start = [], strategy.start
    strategy.start = lambda *args: runs.append(start(*args)) or runs[-1]
    return runs


def instant(words=((1,), (2, 3), (4,), (5,)), edit_words=None, **settings):
    from attention_edit.engine.instant_mask import InstantMaskStrategy

    return InstantMaskStrategy([list(w) for w in words], edit_words, **settings)


def test_instant_mask_keeps_the_source_outside_its_final_mask_exactly(world):
    name, model, lat, empty, tgt, handle = world
    strategy = instant(edit_words=[1])
    runs = runs_of(strategy)
    edited, source, mask = edit(model, empty, tgt, empty, handle, mask_strategy=strategy)
    assert (source - lat).abs().max() <= 1e-4
    latent_mask = torch.nn.functional.interpolate(mask[:, None], size=(16, 16), mode="nearest").bool()
    assert mask.shape == (1, 128, 128) and set(mask.unique().tolist()) <= {0.0, 1.0}
    outside = ~latent_mask.expand_as(edited)
    assert outside.any(), "the mask covers everything"
    assert (edited - lat)[outside].abs().max() <= 1e-4
    # Only the low-resolution maps are kept: one (images, tokens, h, w) buffer at a quarter of the side.
    assert runs[0].peak_stored == 1 * 77 * 4 * 4


def test_instant_mask_memory_does_not_grow_with_steps():
    name = "sd15"
    model = tiny.build(name)
    lat, empty, tgt = tiny.latent(), tiny.conditioning(name, 1), tiny.conditioning(name, 3)
    peaks = []
    for steps in (4, 12):
        _, handle = DDIMInversionRun(model, lat, empty, steps)
        strategy = instant()
        runs = runs_of(strategy)
        EditSampler.execute(model=model, source=empty, target=tgt, negative=empty, cfg=7.5, steps=steps,
                            scheduler="ddim_uniform", pin_source=True, seed=0, inversion=handle,
                            mask_strategy=strategy)
        peaks.append(runs[0].peak_stored)
    assert peaks[0] == peaks[1] > 0


def DDIMInversionRun(model, lat, cond, steps):
    from attention_edit.nodes.inversion import DDIMInversion

    return DDIMInversion.execute(model=model, latent={"samples": lat}, positive=cond, negative=None, cfg=1.0,
                                 steps=steps, scheduler="ddim_uniform", strength=1.0).args


@pytest.fixture(scope="module")
def toy_clip():
    from attention_edit.toyworld.model import build_toy, default_config

    return build_toy(default_config())[1]


def test_words_are_found_through_the_clip_tokenizer(toy_clip):
    from attention_edit.engine.tokens import prompt_word_positions, word_positions
    from attention_edit.nodes.instant_mask import InstantMask

    prompt = "a large red watermelon next to a xylophonist"
    groups = prompt_word_positions(toy_clip, prompt)
    assert groups[0] == [1] and len(groups) == 8
    multi = word_positions(toy_clip, prompt, ["xylophonist"])[0]
    assert len(multi) > 1 and multi in groups  # a rare word spans several tokens, merged
    assert word_positions(toy_clip, prompt, ["red watermelon"])[0] == groups[2] + groups[3]
    with pytest.raises(ValueError, match="'dog' is not in the prompt"):
        word_positions(toy_clip, prompt, ["dog"])
    with pytest.raises(ValueError, match="not in the prompt"):
        InstantMask.execute(clip=toy_clip, target_prompt=prompt, words="dog", map_side=0.25, object_similarity=0.9,
                            background_similarity=0.6, blur_passes=2, threshold=0.2)
    strategy = InstantMask.execute(clip=toy_clip, target_prompt=prompt, words="watermelon", map_side=0.25,
                                   object_similarity=0.9, background_similarity=0.6, blur_passes=2,
                                   threshold=0.2).args[0]
    assert [strategy.words[i] for i in strategy.edit_words] == [groups[3]]
