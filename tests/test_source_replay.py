"""Source replay: an edit that reuses the inversion's source computation equals the recomputed edit."""

import logging

import pytest
import torch
from test_attention_control import inject, uniform

from attention_edit.attention.layout import AUX, SOURCE, TARGET
from attention_edit.engine.adaptive_mask import RECIPE_UNIFORM_PINNED, AdaptiveMaskStrategy
from attention_edit.engine.branches import Branch, sample_branches
from attention_edit.engine.inversion import invert, schedule
from attention_edit.nodes.edit_sampler import EditSampler
from fixtures import tiny

STEPS = 8
EXACT = 1e-4  # the bound on the latent difference in fp32


def run(model, handle, source, target, negative, cfg=7.5, replay=True, strategy=None):
    """An edit through the branch sampler; replay=False recomputes every branch (the reference). With an
    adaptive mask: its uniform_pinned recipe (one inversion, source and aux pinned, aux with the source prompt)."""
    branches = [Branch(SOURCE, source, negative), Branch(TARGET, target, negative)]
    if strategy is not None:
        model = strategy.prepare(model)
        if strategy.needs_aux:
            branches.append(Branch(AUX, source, source))
    full = schedule(model, "ddim_uniform", STEPS)
    return sample_branches(model, branches, cfg, handle.sigmas, full, handle.images, trajectory=handle.latents,
                           pin=(SOURCE, AUX), strategy=strategy, handle=handle if replay else None)


def replayed_and_recomputed(model, handle, source, target, negative, make_strategy=lambda: None, **options):
    """The edit with replay and without it; the target branches must agree within EXACT."""
    replayed = run(model, handle, source, target, negative, strategy=make_strategy(), **options)
    recomputed = run(model, handle, source, target, negative, replay=False, strategy=make_strategy(), **options)
    diff = (replayed.latents[TARGET] - recomputed.latents[TARGET]).abs().max()
    assert diff <= EXACT, f"replay differs from the recomputed edit by {diff}"
    return replayed, recomputed


def counting(model):
    """A clone whose model calls record their batch sizes (a wrapper both inversion and edit inherit)."""
    m = model.clone()
    sizes = []

    def wrapper(apply_model, args):
        sizes.append(args["input"].shape[0])
        return apply_model(args["input"], args["timestep"], **args["c"])

    m.set_model_unet_function_wrapper(wrapper)
    return m, sizes


@pytest.fixture(scope="module", params=tiny.FAMILIES)
def family(request):
    name = request.param
    conds = {k: tiny.conditioning(name, s) for k, s in (("empty", 1), ("src", 2), ("tgt", 3))}
    return name, tiny.build(name), tiny.latent(), conds


@pytest.mark.parametrize("mode", ["fpe", "masactrl"])
def test_replayed_edit_equals_the_recomputed_one(family, mode):
    name, base, lat, c = family
    model, sizes = counting(inject(base, mode, start_step=1, start_layer=0))
    _, handle = invert(model, lat, c["empty"], None, 1.0, STEPS, "ddim_uniform", 1.0)
    assert handle.record.nbytes > 0 and torch.isfinite(handle.eps).all()
    sizes.clear()
    replayed = run(model, handle, c["empty"], c["tgt"], c["empty"])
    replay_sizes, sizes[:] = sizes[:], []
    recomputed = run(model, handle, c["empty"], c["tgt"], c["empty"], replay=False)
    assert replayed.info["replayed"] == (SOURCE,) and not replayed.info["recomputed"]
    assert set(replay_sizes) == {2} and set(sizes) == {4}  # target cond + uncond only, against both branches
    assert torch.equal(replayed.latents[SOURCE], recomputed.latents[SOURCE])
    # The injection did act (the target is not what it is without injection), and replaying the source
    # changes the target by float drift only (two rows per call against four), far below that effect.
    free = run(base, handle, c["empty"], c["tgt"], c["empty"], replay=False).latents[TARGET]
    assert (recomputed.latents[TARGET] - free).abs().max() > 1e-3
    tiny.assert_same_computation(replayed.latents[TARGET], recomputed.latents[TARGET],
                                 effect=recomputed.latents[TARGET] - free)


def test_only_the_layers_and_steps_a_reader_uses_are_kept():
    name = "sd15"
    base, lat, empty = tiny.build(name), tiny.latent(), tiny.conditioning(name, 1)
    model = inject(base, "fpe", ratio=0.5, max_side=0.5)
    _, handle = invert(model, lat, empty, None, 1.0, STEPS, "ddim_uniform", 1.0)
    kept = handle.record.inputs
    assert {step for _, _, step, _ in kept} == set(range(STEPS // 2))  # FPE's steps [0, 0.5 N)
    assert {kind for *_, kind in kept} == {0}  # cfg 1: only the conditional chunk ran
    assert all(set(v) == {"q", "k"} for v in kept.values())  # FPE reads the source's Q and K
    side = lat.shape[-1]
    for value in kept.values():  # maps at most half the latent side
        assert value["q"].shape[1] <= (side // 2) ** 2
    masactrl = inject(base, "masactrl", start_step=5)
    _, handle = invert(masactrl, lat, empty, None, 1.0, STEPS, "ddim_uniform", 1.0)
    assert {step for _, _, step, _ in handle.record.inputs} == set(range(5, STEPS))
    assert all(set(v) == {"k", "v"} for v in handle.record.inputs.values())
    _, plain = invert(base, lat, empty, None, 1.0, STEPS, "ddim_uniform", 1.0)
    assert plain.record.nbytes == 0  # nothing reads the source: nothing kept


def test_uam_replays_its_auxiliary_branch_and_recomputes_the_source(caplog):
    """The uniform_pinned recipe: the pinned aux branch is the uniform inversion's own computation."""
    name = "sd15"
    base, lat = tiny.build(name), tiny.latent()
    empty, tgt = tiny.conditioning(name, 1), tiny.conditioning(name, 3)
    inversion_model = uniform(base, scope="inversion_and_aux")
    _, handle = invert(inversion_model, lat, empty, None, 1.0, STEPS, "ddim_uniform", 1.0)
    edit_model = inject(inversion_model, "masactrl", start_step=1)
    strategy = lambda: AdaptiveMaskStrategy(t_mask=1000.0, recipe=RECIPE_UNIFORM_PINNED)  # noqa: E731
    replayed, recomputed = replayed_and_recomputed(edit_model, handle, empty, tgt, empty, make_strategy=strategy)
    assert replayed.info["replayed"] == (AUX,)
    assert "patched differently" in replayed.info["recomputed"][SOURCE]  # uniform on the inversion, not the source
    assert (replayed.mask - recomputed.mask).abs().max() <= EXACT
    # Through the node: the same recipe replays the aux branch; the official one (two trajectories, nothing
    # pinned) replays nothing and says why.
    from attention_edit.nodes.adaptive_mask import AdaptiveMask

    def node_edit(recipe, inversion, aux=None):
        mask = AdaptiveMask.execute(lambda_max=0.5, t_mask=1000.0, dilation="edit_region", blend_source=True,
                                    recipe=recipe).args[0]
        return EditSampler.execute(model=edit_model, source=empty, target=tgt, negative=empty, cfg=7.5, steps=STEPS,
                                   scheduler="ddim_uniform", pin_source=True, seed=0, inversion=inversion,
                                   mask_strategy=mask, aux_inversion=aux).args[0]["samples"]

    assert (node_edit(RECIPE_UNIFORM_PINNED, handle) - replayed.latents[TARGET]).abs().max() <= EXACT
    _, normal = invert(base, lat, empty, None, 1.0, STEPS, "ddim_uniform", 1.0)
    with caplog.at_level(logging.INFO, logger="attention_edit"):
        node_edit("two_trajectories", normal, handle)
    assert "replayed the" not in caplog.text
    for branch in (SOURCE, AUX):
        assert f"the {branch} branch was recomputed, not replayed: the {branch} branch is not pinned" in caplog.text


def test_guided_inversion_replays_the_same_guided_source():
    name = "sd15"
    base, lat = tiny.build(name), tiny.latent()
    src, empty, tgt = (tiny.conditioning(name, s) for s in (2, 1, 3))
    model = inject(base, "fpe")
    _, handle = invert(model, lat, src, empty, 7.5, STEPS, "ddim_uniform", 1.0)
    assert {kind for *_, kind in handle.record.inputs} == {0, 1}
    replayed, _ = replayed_and_recomputed(model, handle, src, tgt, empty, cfg=7.5)
    assert replayed.info["replayed"] == (SOURCE,)
    # Another guidance scale is another source prediction: recomputed.
    assert run(model, handle, src, tgt, empty, cfg=5.0).info["replayed"] == ()


@pytest.mark.parametrize("case", ["source prompt", "negative prompt", "inverted without injection",
                                  "other model options", "not pinned"])
def test_replay_falls_back_to_recomputing_where_it_would_not_be_exact(case):
    name = "sd15"
    base, lat = tiny.build(name), tiny.latent()
    empty, src, tgt = (tiny.conditioning(name, s) for s in (1, 2, 3))
    model = inject(base, "fpe")
    _, handle = invert(base if case == "inverted without injection" else model, lat, empty, None, 1.0, STEPS,
                       "ddim_uniform", 1.0)
    source, negative = (src if case == "source prompt" else empty), (src if case == "negative prompt" else empty)
    if case == "other model options":
        model, _ = counting(model)
    if case == "not pinned":
        full = schedule(model, "ddim_uniform", STEPS)
        out = sample_branches(model, [Branch(SOURCE, source, negative), Branch(TARGET, tgt, negative)], 7.5,
                              handle.sigmas, full, 1, trajectory=handle.latents, handle=handle)
    else:
        out = run(model, handle, source, tgt, negative)
    assert out.info["replayed"] == () and out.info["recomputed"][SOURCE]


def test_edit_sampler_node_says_what_it_replayed(caplog):
    name = "sd15"
    model = inject(tiny.build(name), "fpe")
    empty, tgt = tiny.conditioning(name, 1), tiny.conditioning(name, 3)
    images = torch.cat([tiny.latent(seed=1), tiny.latent(seed=2)])
    _, handle = invert(model, images, empty, None, 1.0, STEPS, "ddim_uniform", 1.0)
    with caplog.at_level(logging.INFO, logger="attention_edit"):
        out = EditSampler.execute(model=model, source=empty, target=tgt, negative=empty, cfg=7.5, steps=STEPS,
                                  scheduler="ddim_uniform", pin_source=True, seed=0, inversion=handle).args
    assert "replayed the source branch" in caplog.text
    reference = run(model, handle, empty, tgt, empty, replay=False).latents[TARGET]
    assert (out[0]["samples"] - reference).abs().max() <= EXACT  # a batch of two images
    assert (out[1]["samples"] - images).abs().max() <= EXACT  # the replayed source is the exact reconstruction


def test_only_a_model_patched_for_editing_pays_the_extra_call_at_the_noisiest_latent():
    name = "sd15"
    base, lat, empty = tiny.build(name), tiny.latent(), tiny.conditioning(name, 1)
    plain, sizes = counting(base)
    _, handle = invert(plain, lat, empty, None, 1.0, STEPS, "ddim_uniform", 1.0)
    assert len(sizes) == STEPS and torch.isnan(handle.eps[0]).all()  # exactly the stock sampler's calls
    for patched in (inject(plain, "masactrl"), uniform(plain, scope="inversion_and_aux")):
        sizes.clear()
        _, handle = invert(patched, lat, empty, None, 1.0, STEPS, "ddim_uniform", 1.0)
        assert len(sizes) == STEPS + 1 and torch.isfinite(handle.eps).all()
    _, handle = invert(plain, lat, empty, None, 1.0, STEPS, "ddim_uniform", 1.0)
    out = run(inject(plain, "fpe"), handle, empty, tiny.conditioning(name, 3), empty)
    assert out.info["replayed"] == () and "unpatched model" in out.info["recomputed"][SOURCE]


def test_a_pinned_source_nothing_reads_is_not_run_whatever_its_prompt():
    from attention_edit.engine.instant_mask import InstantMaskStrategy

    name = "sd15"
    base, lat = tiny.build(name), tiny.latent()
    empty, src, tgt = (tiny.conditioning(name, s) for s in (1, 2, 3))
    model, sizes = counting(base)
    _, handle = invert(model, lat, empty, None, 1.0, STEPS, "ddim_uniform", 1.0)  # unpatched: nothing kept
    for make_strategy in (lambda: None, lambda: InstantMaskStrategy([[1], [2], [3]], [1])):
        sizes.clear()
        skipped = run(model, handle, src, tgt, empty, strategy=make_strategy())
        skip_sizes, sizes[:] = sizes[:], []
        full = run(model, handle, src, tgt, empty, replay=False, strategy=make_strategy())
        assert skipped.info["unused"] == (SOURCE,) and set(skip_sizes) == {2} and set(sizes) == {4}
        edit_effect = full.latents[TARGET] - full.latents[SOURCE]
        tiny.assert_same_computation(skipped.latents[TARGET], full.latents[TARGET], effect=edit_effect)
        assert torch.equal(skipped.latents[SOURCE], full.latents[SOURCE])
        if skipped.mask is not None:
            tiny.assert_same_computation(skipped.mask, full.mask, effect=torch.ones(()))  # a mask spans 0..1
    # The adaptive mask reads the source's prediction: the source runs.
    out = run(model, handle, src, tgt, empty, strategy=AdaptiveMaskStrategy())
    assert out.info["unused"] == () and SOURCE in out.info["recomputed"]


def test_a_model_without_the_inversions_patches_shares_its_options():
    """Signatures ignore the attention tables (compared branch by branch) and empty leftovers."""
    from attention_edit.engine.patching import options_signature

    base = tiny.build("sd15")
    assert options_signature(base) == options_signature(inject(base, "fpe")) == options_signature(uniform(base))
    assert options_signature(counting(base)[0]) != options_signature(base)


def test_a_pinned_reconstruction_runs_no_model_call():
    from attention_edit.nodes.inversion import InversionReconstruct

    name = "sd15"
    model, sizes = counting(tiny.build(name))
    lat, empty = tiny.latent(), tiny.conditioning(name, 1)
    _, handle = invert(model, lat, empty, None, 1.0, STEPS, "ddim_uniform", 1.0)
    sizes.clear()
    out = InversionReconstruct.execute(model=model, inversion=handle, positive=empty, negative=empty, cfg=1.0,
                                       pin_source=True).args[0]["samples"]
    assert sizes == [] and (out - lat).abs().max() <= EXACT
    unpinned = InversionReconstruct.execute(model=model, inversion=handle, positive=empty, negative=empty, cfg=1.0,
                                            pin_source=False).args[0]["samples"]
    assert len(sizes) == STEPS and (unpinned - lat).abs().max() > 0


def test_at_cfg_1_only_the_conditional_prompt_has_to_match():
    name = "sd15"
    base, lat = tiny.build(name), tiny.latent()
    empty, src, tgt = (tiny.conditioning(name, s) for s in (1, 2, 3))
    model = inject(base, "fpe")
    _, handle = invert(model, lat, empty, None, 1.0, STEPS, "ddim_uniform", 1.0)
    # The negative is never evaluated at cfg 1.
    replayed, _ = replayed_and_recomputed(model, handle, empty, tgt, src, cfg=1.0)
    assert replayed.info["replayed"] == (SOURCE,)
    # Unless the host is told to evaluate it anyway.
    forced = model.clone()
    forced.model_options["disable_cfg1_optimization"] = True
    _, forced_handle = invert(forced, lat, empty, None, 1.0, STEPS, "ddim_uniform", 1.0)
    assert run(forced, forced_handle, empty, tgt, src, cfg=1.0).info["replayed"] == ()


def test_a_prompt_with_extras_attached_is_not_the_inversions_prompt():
    from attention_edit.engine.conditioning import conditioning_key

    empty = tiny.conditioning("sd15", 1)
    with_control = [[empty[0][0], {**empty[0][1], "control": object()}]]
    assert conditioning_key(empty) == conditioning_key([[empty[0][0].clone(), dict(empty[0][1])]])
    assert conditioning_key(with_control) != conditioning_key(empty)
