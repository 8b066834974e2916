"""Mask strategies inside the edit sampler: user MASKs and UAM's adaptive mask, on the three families.
(UAM's edit against the official algorithm written out: tests/reference/test_uam_reference.py.)"""

import logging

import pytest
import torch
from test_attention_control import STEPS, invert

from attention_edit.nodes.adaptive_mask import AdaptiveMask
from attention_edit.nodes.edit_sampler import EditSampler
from attention_edit.nodes.inversion import DDIMInversion
from attention_edit.nodes.uniform_attention import UniformAttention
from fixtures import tiny


def edit(model, source, target, negative, handle, mask_strategy=None, mask=None, aux=None, pin=True):
    out = EditSampler.execute(model=model, source=source, target=target, negative=negative, cfg=7.5, steps=STEPS,
                              scheduler="ddim_uniform", pin_source=pin, seed=0, inversion=handle,
                              mask_strategy=mask_strategy, edit_mask=mask, aux_inversion=aux).args
    return out[0]["samples"], out[1]["samples"], out[2]


def adaptive(lam=0.5, t_mask=200.0, dilation="edit_region", blend_source=True, recipe="two_trajectories"):
    return AdaptiveMask.execute(lambda_max=lam, t_mask=t_mask, dilation=dilation, blend_source=blend_source,
                                recipe=recipe).args[0]


def uniform_model(model):
    return UniformAttention.execute(model=model, scope="inversion_and_aux", start_percent=0.0, end_percent=1.0,
                                    blocks="all").args[0]


@pytest.fixture(scope="module", params=tiny.FAMILIES)
def world(request):
    name = request.param
    model = tiny.build(name)
    lat = tiny.latent()
    empty, tgt = tiny.conditioning(name, 1), tiny.conditioning(name, 3)
    _, handle = invert(model, lat, empty)
    return name, model, lat, empty, tgt, handle


@pytest.fixture(scope="module")
def uam(world):
    """UAM's official wiring: the uniform model (scope inversion_and_aux) edits and makes the aux inversion; the
    world's handle is the normal-attention inversion."""
    name, model, lat, empty, tgt, handle = world
    m = uniform_model(model)
    _, aux = invert(m, lat, empty)
    return m, aux


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


def test_adaptive_mask_runs_the_aux_branch_and_blends_in_the_last_steps(world, uam):
    """The official recipe: source and target from the normal inversion, the aux branch from the uniform one,
    nothing pinned (whatever pin_source says), the source blended too (the red line)."""
    name, model, lat, empty, tgt, handle = world
    m, aux = uam
    plain, plain_source, ones = edit(m, empty, tgt, empty, handle, pin=False)
    assert torch.all(ones == 1)
    edited, source, mask = edit(m, empty, tgt, empty, handle, mask_strategy=adaptive(), aux=aux)
    assert mask.shape == (1, 128, 128) and mask.min() >= 0 and mask.max() <= 1
    assert 0 < mask.mean() < 1
    blend_effect = edited - plain
    assert float(blend_effect.abs().max()) > 1e-2  # the blend changed the result
    assert float((source - plain_source).abs().max()) > 1e-2  # the red line moved the (unpinned) source
    unpinned, _, _ = edit(m, empty, tgt, empty, handle, mask_strategy=adaptive(), aux=aux, pin=False)
    assert torch.equal(unpinned, edited)  # the recipe pins nothing: pin_source has no effect
    # T_mask 0: never active, so the same as no mask: the aux rows do not disturb the others (the target is
    # then computed in a batch of 6 rows instead of 4: float drift only).
    never, never_source, never_mask = edit(m, empty, tgt, empty, handle, mask_strategy=adaptive(t_mask=0.0), aux=aux)
    tiny.assert_same_computation(never, plain, effect=blend_effect)
    tiny.assert_same_computation(never_source, plain_source, effect=source - plain_source)
    assert torch.all(never_mask == 1)


def test_the_pinned_uniform_recipe_keeps_the_source_exact_and_blends_the_target(world, uam):
    """The named variant uniform_pinned: one uniform-attention inversion for every branch, source and aux pinned."""
    name, model, lat, empty, tgt, _ = world
    m, uniform_handle = uam
    plain, _, _ = edit(m, empty, tgt, empty, uniform_handle)
    edited, source, mask = edit(m, empty, tgt, empty, uniform_handle, mask_strategy=adaptive(recipe="uniform_pinned"))
    assert (source - lat).abs().max() <= 1e-4  # pinned: the red line cannot move it
    assert 0 < mask.mean() < 1
    assert float((edited - plain).abs().max()) > 1e-2
    official, _, _ = edit(m, empty, tgt, empty, world[5], mask_strategy=adaptive(), aux=uniform_handle)
    assert float((official - edited).abs().max()) > 1e-2  # another recipe, another edit


def test_the_official_recipe_needs_the_aux_inversion_and_asks_for_it_only_then(world, uam, caplog):
    name, model, lat, empty, tgt, handle = world
    m, aux = uam
    with pytest.raises(ValueError, match="connect 'aux_inversion'.*uniform_pinned"):
        edit(m, empty, tgt, empty, handle, mask_strategy=adaptive())
    inputs = dict(model=m, source=empty, target=tgt, negative=empty, cfg=7.5, steps=STEPS, scheduler="ddim_uniform",
                  pin_source=True, seed=0, inversion=None)
    # Refused before either inversion runs; the aux inversion is only evaluated when the recipe reads it.
    with pytest.raises(ValueError, match="aux_inversion"):
        EditSampler.check_lazy_status(mask_strategy=adaptive(), **inputs)
    assert EditSampler.check_lazy_status(mask_strategy=adaptive(), aux_inversion=None, **inputs) == [
        "inversion", "aux_inversion"]
    assert EditSampler.check_lazy_status(mask_strategy=adaptive(recipe="uniform_pinned"), aux_inversion=None,
                                         **inputs) == ["inversion"]
    assert EditSampler.check_lazy_status(aux_inversion=None, **inputs) == ["inversion"]
    # An aux inversion of another schedule part or image is refused, naming it.
    _, half = DDIMInversion.execute(model=m, latent={"samples": lat}, positive=empty, negative=None, cfg=1.0,
                                    steps=STEPS, scheduler="ddim_uniform", strength=0.5).args
    with pytest.raises(ValueError, match="aux_inversion covers another part of the schedule"):
        edit(m, empty, tgt, empty, handle, mask_strategy=adaptive(), aux=half)
    _, two = invert(m, torch.cat([lat, lat]), empty)
    with pytest.raises(ValueError, match="aux_inversion is of latents of shape"):
        edit(m, empty, tgt, empty, handle, mask_strategy=adaptive(), aux=two)
    # Swapped inversions (uniform for source and target, normal for the aux) run, and the log says what is off.
    with caplog.at_level(logging.WARNING, logger="attention_edit"):
        edit(m, empty, tgt, empty, aux, mask_strategy=adaptive(t_mask=0.0), aux=handle)
    assert "aux_inversion was made without uniform attention" in caplog.text
    assert "the inversion was made with uniform attention" in caplog.text


def test_a_scope_all_model_in_the_edit_sampler_warns(world, caplog):
    name, model, lat, empty, tgt, handle = world
    everywhere = UniformAttention.execute(model=model, scope="all", start_percent=0.0, end_percent=1.0,
                                          blocks="all").args[0]
    with caplog.at_level(logging.WARNING, logger="attention_edit"):
        edit(uniform_model(model), empty, tgt, empty, handle)
    assert "scope 'all'" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="attention_edit"):
        edit(everywhere, empty, tgt, empty, handle)
    assert "covers the source and target branch (scope 'all')" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="attention_edit"):  # the aux branch without uniform attention
        edit(model, empty, tgt, empty, handle, mask_strategy=adaptive(t_mask=0.0), aux=handle)
    assert "auxiliary branch runs with normal attention" in caplog.text


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
    assert run.keeps_noise  # the sampler steps each branch with its own noise from the blended x0
    src = torch.zeros(1, 4, 8, 8)
    tgt = src.clone()
    tgt[..., :, :] = 1.0  # a change everywhere: the median Q of the difference is 1
    tgt[..., 0, 0] = 1.5  # above Q but not above 2 Q: not edit region (the official soft threshold)
    tgt[..., 3:5, 3:5] = 3.0  # the edit, above 2 Q
    aux = torch.full_like(src, 0.25)
    out = run.blend_denoised(1, None, torch.cat([src, tgt, aux]))  # q = lambda at the last step
    edit_region = torch.zeros(1, 4, 8, 8, dtype=torch.bool)
    edit_region[..., 2:6, 2:6] = True  # 2x2 change dilated 3x3
    assert torch.equal(out[1:2][edit_region], tgt[edit_region])
    assert torch.equal(out[1:2][~edit_region], aux[~edit_region])
    # The red line (Algorithm 1 line 18, the official code): the source takes the aux inside the edit region.
    assert torch.equal(out[0:1][edit_region], aux[edit_region])
    assert torch.equal(out[0:1][~edit_region], src[~edit_region])
    assert torch.equal(out[2:3], aux)
    assert torch.equal(run.final_mask()[0], edit_region[0, 0].float())  # the mask used, per pixel
    without = AdaptiveMaskStrategy(blend_source=False).start(layout, sigmas, None, model_sampling)
    assert torch.equal(without.blend_denoised(1, None, torch.cat([src, tgt, aux]))[0:1], src)
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


def test_the_mask_and_regulation_find_a_word_at_the_same_tokens(toy_clip):
    """One word finder: the instant mask's positions of a word are regulation's first occurrence of it, and
    regulation also finds the word's later occurrences (it regulates each)."""
    from attention_edit.engine.regulation import find_target_tokens
    from attention_edit.engine.tokens import word_positions

    prompt = "a red xylophonist beside a blue xylophonist"
    mask_positions = word_positions(toy_clip, prompt, ["xylophonist"])[0]
    plan = find_target_tokens(toy_clip, prompt, "xylophonist")
    found = [i for chunk, i in plan.groups[0] if chunk == 0]
    assert len(mask_positions) > 1 and found[:len(mask_positions)] == mask_positions
    assert len(found) == 2 * len(mask_positions) and found[len(mask_positions)] > mask_positions[-1]
