"""Uniform attention, self-attention injection and the multi-branch edit sampler on tiny models."""

import nodes as comfy_nodes
import pytest
import torch

from attention_edit.engine.patching import transformer_blocks
from attention_edit.nodes.edit_sampler import EditSampler
from attention_edit.nodes.injection import SelfAttentionInjection
from attention_edit.nodes.inversion import DDIMInversion
from attention_edit.nodes.uniform_attention import UniformAttention
from fixtures import tiny

STEPS = 10


def uniform(model, scope="all", start=0.0, end=1.0, blocks="all"):
    return UniformAttention.execute(model=model, scope=scope, start_percent=start, end_percent=end, blocks=blocks).args[0]


def inject(model, mode="fpe", ratio=0.8, max_side=0.5, start_step=4, start_layer=-1, rows="official", mask=None,
           target_mask=None):
    return SelfAttentionInjection.execute(model=model, mode=mode, fpe_ratio=ratio, fpe_max_map_side=max_side,
                                          masactrl_start_step=start_step, masactrl_start_layer=start_layer,
                                          injection_rows=rows, masactrl_mask=mask,
                                          masactrl_target_mask=target_mask).args[0]


def invert(model, lat, cond):
    return DDIMInversion.execute(model=model, latent={"samples": lat}, positive=cond, negative=None, cfg=1.0,
                                 steps=STEPS, scheduler="ddim_uniform", strength=1.0).args


def edit(model, source, target, negative, handle=None, latent=None, pin=True, cfg=7.5, seed=0):
    out = EditSampler.execute(model=model, source=source, target=target, negative=negative, cfg=cfg, steps=STEPS,
                              scheduler="ddim_uniform", pin_source=pin, seed=seed, inversion=handle,
                              latent=None if latent is None else {"samples": latent}).args
    return out[0]["samples"], out[1]["samples"], out[2]


def stock(model, cond, negative, latent, cfg=7.5, add_noise="disable", seed=0):
    (out,) = comfy_nodes.KSamplerAdvanced().sample(model, add_noise, seed, STEPS, cfg, "euler", "ddim_uniform", cond,
                                                   negative, {"samples": latent}, 0, STEPS, "disable")
    return out["samples"]


@pytest.fixture(scope="module", params=tiny.FAMILIES)
def world(request):
    name = request.param
    model = tiny.build(name)
    lat = tiny.latent()
    conds = {k: tiny.conditioning(name, s) for k, s in (("empty", 1), ("src", 2), ("tgt", 3))}
    noisy, handle = invert(model, lat, conds["empty"])
    return name, model, lat, conds, noisy["samples"], handle


def test_uniform_patch_makes_cross_attention_prompt_independent(world):
    name, model, lat, conds, noisy, _ = world
    m = uniform(model)
    a = stock(m, conds["src"], conds["empty"], noisy, cfg=1.0)
    b = stock(m, conds["tgt"], conds["empty"], noisy, cfg=1.0)
    context = conds["src"][0][0]
    mean = context.mean(dim=1, keepdim=True)
    different_prompt_same_mean = [[mean + 3.0 * (context - mean), conds["src"][0][1]]]
    c = stock(m, different_prompt_same_mean, conds["empty"], noisy, cfg=1.0)
    # Uniform attention only sees the mean of V over tokens (V is linear in the context) ...
    tiny.assert_same_computation(a, c, effect=b - a)
    # ... so a prompt with another mean still matters, and without the patch the spread matters too.
    assert (a - b).abs().max() > 1e-3
    assert (stock(model, conds["src"], conds["empty"], noisy, cfg=1.0)
            - stock(model, different_prompt_same_mean, conds["empty"], noisy, cfg=1.0)).abs().max() > 1e-4


def test_uniform_scope_and_step_window_gate_the_patch(world):
    name, model, lat, conds, noisy, _ = world
    plain = stock(model, conds["src"], conds["empty"], noisy)
    # Scope limited to inversion/aux branches leaves stock samplers untouched; so does an empty window.
    assert torch.equal(stock(uniform(model, scope="inversion_and_aux"), conds["src"], conds["empty"], noisy), plain)
    assert torch.equal(stock(uniform(model, start=0.95, end=1.0), conds["src"], conds["empty"], noisy), plain)
    late = stock(uniform(model, start=0.5, end=1.0), conds["src"], conds["empty"], noisy)
    full = stock(uniform(model), conds["src"], conds["empty"], noisy)
    assert (late - plain).abs().max() > 1e-4 and (late - full).abs().max() > 1e-4
    # The inversion branch is in scope: the handle differs from plain inversion.
    _, h_uam = invert(uniform(model, scope="inversion_and_aux"), lat, conds["src"])
    _, h_plain = invert(model, lat, conds["src"])
    assert (h_uam.latents[0] - h_plain.latents[0]).abs().max() > 1e-4


def test_uniform_attention_defaults_to_the_official_scope(world):
    """UAM's wiring: uniform attention in the inversion and the auxiliary branch only, so a model reused for the
    edit keeps normal attention for the source and target (and in stock samplers)."""
    from attention_edit.engine.uniform import apply_uniform_attention

    name, model, lat, conds, noisy, _ = world
    (scope,) = [i for i in UniformAttention.define_schema().inputs if i.id == "scope"]
    assert scope.default == "inversion_and_aux" and scope.options == ["all", "inversion_and_aux"]
    plain = stock(model, conds["src"], conds["empty"], noisy)
    assert torch.equal(stock(apply_uniform_attention(model), conds["src"], conds["empty"], noisy), plain)


def test_uniform_block_selection_and_errors(world):
    name, model, *_ = world
    with pytest.raises(ValueError, match="unknown block"):
        uniform(model, blocks="bogus")
    with pytest.raises(ValueError, match="matches no"):
        uniform(model, blocks="input:99")
    assert "start_percent" in UniformAttention.validate_inputs(scope="all", blocks="all", start_percent=0.5,
                                                               end_percent=0.5)
    m = uniform(model, blocks="output")
    replaced = m.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert set(replaced) == {k for k in transformer_blocks(model) if k[0] == "output"}


def test_without_injection_target_equals_plain_sampling_and_source_is_exact(world):
    name, model, lat, conds, noisy, handle = world
    edited, source, mask = edit(model, conds["empty"], conds["tgt"], conds["empty"], handle=handle)
    assert (source - lat).abs().max() <= 1e-4  # pinned source reconstructs exactly
    plain = stock(model, conds["tgt"], conds["empty"], noisy)
    another_prompt = stock(model, conds["src"], conds["empty"], noisy)
    tiny.assert_same_computation(edited, plain, effect=another_prompt - plain)
    assert mask.shape == (1, 128, 128) and torch.all(mask == 1)


@pytest.mark.parametrize("mode", ["fpe", "masactrl"])
def test_injection_changes_only_the_target_and_same_prompt_is_identity(world, mode):
    name, model, lat, conds, noisy, handle = world
    m = inject(model, mode=mode, start_step=1, start_layer=0)
    edited, source, _ = edit(m, conds["empty"], conds["tgt"], conds["empty"], handle=handle)
    free_target = stock(model, conds["tgt"], conds["empty"], noisy)
    assert (source - lat).abs().max() <= 1e-4
    assert (edited - free_target).abs().max() > 1e-3  # the source's self-attention steered the target
    # Same prompt for both branches (unpinned, generated image): injection is the identity.
    start = torch.zeros(1, 4, 16, 16)
    e2, s2, _ = edit(m, conds["src"], conds["src"], conds["empty"], latent=start, pin=False, seed=5)
    plain = stock(model, conds["src"], conds["empty"], start, add_noise="enable", seed=5)
    another_prompt = stock(model, conds["tgt"], conds["empty"], start, add_noise="enable", seed=5)
    tiny.assert_same_computation(e2, s2, effect=another_prompt - plain)
    tiny.assert_same_computation(s2, plain, effect=another_prompt - plain)


def test_injection_does_nothing_outside_its_steps_and_layers(world):
    name, model, lat, conds, noisy, handle = world
    plain_edit, _, _ = edit(model, conds["empty"], conds["tgt"], conds["empty"], handle=handle)
    injected, _, _ = edit(inject(model, "fpe"), conds["empty"], conds["tgt"], conds["empty"], handle=handle)
    for m in (inject(model, "fpe", ratio=0.0), inject(model, "fpe", max_side=0.0),
              inject(model, "masactrl", start_step=STEPS)):
        edited, _, _ = edit(m, conds["empty"], conds["tgt"], conds["empty"], handle=handle)
        # (the plain edit replays its source from the inversion, these recompute it: another batch)
        tiny.assert_same_computation(edited, plain_edit, effect=injected - plain_edit)
    # Outside the edit sampler (no branch layout) the patch is inert.
    m = inject(model, "masactrl", start_step=0, start_layer=0)
    assert torch.equal(stock(m, conds["tgt"], conds["empty"], noisy), stock(model, conds["tgt"], conds["empty"], noisy))


def test_fpe_counts_its_steps_as_the_official_code_rounding_down(world):
    name, model, lat, conds, noisy, handle = world

    def run(ratio):
        return edit(inject(model, "fpe", ratio=ratio), conds["empty"], conds["tgt"], conds["empty"], handle=handle)[0]

    # int(10 * 0.35) = 3 steps, as 0.3 gives; 0.4 gives 4.
    assert torch.equal(run(0.35), run(0.3))
    assert (run(0.35) - run(0.4)).abs().max() > 1e-4


def test_fpe_changes_the_conditional_prediction_only_and_masactrl_both(world):
    name, model, lat, conds, noisy, handle = world
    src, tgt, neg = conds["src"], conds["tgt"], conds["empty"]
    official, both = (edit(inject(model, "fpe", rows=rows), src, tgt, neg, handle=handle)[0]
                      for rows in ("official", "cond_and_uncond"))
    assert torch.equal(official, edit(inject(model, "fpe", rows="cond"), src, tgt, neg, handle=handle)[0])
    assert (official - both).abs().max() > 1e-3  # the unconditional target keeps its own map
    # At cfg 1 there is no unconditional prediction: the choice is moot.
    assert torch.equal(edit(inject(model, "fpe"), src, tgt, neg, handle=handle, cfg=1.0)[0],
                       edit(inject(model, "fpe", rows="cond_and_uncond"), src, tgt, neg, handle=handle, cfg=1.0)[0])
    m_official, m_both, m_cond = (edit(inject(model, "masactrl", start_step=1, rows=rows), src, tgt, neg, handle=handle)[0]
                                  for rows in ("official", "cond_and_uncond", "cond"))
    assert torch.equal(m_official, m_both) and (m_official - m_cond).abs().max() > 1e-3


def test_masactrl_mask_separates_foreground_and_background(world):
    name, model, lat, conds, noisy, handle = world
    src, tgt, neg = conds["empty"], conds["tgt"], conds["empty"]

    def run(**kw):
        return edit(inject(model, "masactrl", start_step=1, start_layer=0, **kw), src, tgt, neg, handle=handle)[0]

    plain = run()
    half = torch.zeros(1, 128, 128)
    half[:, :, :64] = 1.0
    masked = run(mask=half)
    assert (masked - plain).abs().max() > 1e-3
    # All foreground, or none: every target query reads every source key, as without a mask.
    tiny.assert_same_computation(run(mask=torch.ones(1, 128, 128)), plain, effect=masked - plain)
    tiny.assert_same_computation(run(mask=torch.zeros(1, 128, 128)), plain, effect=masked - plain)
    # The target's own mask, when given, decides which part each target position reads.
    moved = run(mask=half, target_mask=half.flip(-1))
    assert (moved - masked).abs().max() > 1e-3
    # A soft mask is split at one half.
    tiny.assert_same_computation(run(mask=half * 0.6), masked, effect=masked - plain)


def test_masactrl_mask_errors(world):
    name, model, lat, conds, noisy, handle = world
    mask = torch.ones(1, 128, 128)
    with pytest.raises(ValueError, match="mode to 'masactrl'"):
        inject(model, "fpe", mask=mask)
    with pytest.raises(ValueError, match="needs masactrl_mask"):
        inject(model, "masactrl", target_mask=mask)
    with pytest.raises(ValueError, match="NaN"):
        inject(model, "masactrl", mask=torch.full((1, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="batch of 3 masks"):
        edit(inject(model, "masactrl", start_step=0, mask=mask.repeat(3, 1, 1)), conds["empty"], conds["tgt"],
             conds["empty"], handle=handle)
    assert "injection_rows" in SelfAttentionInjection.validate_inputs(mode="fpe", fpe_ratio=0.8, fpe_max_map_side=0.5,
                                                                      injection_rows="uncond")


def test_masactrl_default_layer_means_the_same_on_every_family(world):
    name, model, *_ = world
    from attention_edit.engine.injection import default_masactrl_layer
    keys = transformer_blocks(model)
    first = keys[default_masactrl_layer(model)]
    assert first[0] == "output"
    # The first decoder block whose maps are at least half the latent side.
    unet = model.model.diffusion_model
    levels = len(unet.channel_mult)
    per_level = len(unet.output_blocks) // levels
    assert levels - 1 - first[1] // per_level == 1


def test_stock_model_unaffected_after_pack_nodes_ran_on_clones(world):
    name, model, lat, conds, noisy, handle = world
    before = stock(model, conds["src"], conds["empty"], noisy)
    patched = inject(uniform(model, scope="inversion_and_aux"), "fpe")
    edit(patched, conds["empty"], conds["tgt"], conds["empty"], handle=handle)
    invert(uniform(model), lat, conds["empty"])
    assert torch.equal(stock(model, conds["src"], conds["empty"], noisy), before)
    assert "patches_replace" not in model.model_options.get("transformer_options", {})


def test_batch_of_two_images_with_two_different_edits():
    name = "sd15"
    model = inject(tiny.build(name), "fpe")
    lat = torch.cat([tiny.latent(seed=1), tiny.latent(seed=2)])
    empty = tiny.conditioning(name, 1)
    targets = [tiny.conditioning(name, 10), tiny.conditioning(name, 11)]
    _, handle = invert(model, lat, empty)
    both = [[torch.cat([targets[0][0][0], targets[1][0][0]]), {}]]
    edited, source, _ = edit(model, empty, both, empty, handle=handle)
    assert (source - lat).abs().max() <= 1e-4
    for i in range(2):
        _, h_i = invert(model, lat[i:i + 1], empty)
        e_i, _, _ = edit(model, empty, targets[i], empty, handle=h_i)
        tiny.assert_same_computation(edited[i:i + 1], e_i, effect=edited[1 - i:2 - i] - edited[i:i + 1])


def test_edit_sampler_errors_before_compute(world):
    name, model, lat, conds, noisy, handle = world
    with pytest.raises(ValueError, match="connect an inversion"):
        edit(model, conds["src"], conds["tgt"], conds["empty"])
    with pytest.raises(ValueError, match="steps"):
        EditSampler.execute(model=model, source=conds["src"], target=conds["tgt"], negative=conds["empty"], cfg=7.5,
                            steps=STEPS + 5, scheduler="ddim_uniform", pin_source=True, seed=0, inversion=handle)
    with pytest.raises(ValueError, match="scheduler"):
        EditSampler.execute(model=model, source=conds["src"], target=conds["tgt"], negative=conds["empty"], cfg=7.5,
                            steps=STEPS, scheduler="karras", pin_source=True, seed=0, inversion=handle)
    with pytest.raises(ValueError, match="another model"):
        edit(tiny.build(name, seed=7), conds["src"], conds["tgt"], conds["empty"], handle=handle)
    with pytest.raises(ValueError, match="NaN"):
        edit(model, conds["src"], [[torch.full_like(conds["tgt"][0][0], float("nan")), conds["tgt"][0][1]]],
             conds["empty"], handle=handle)


def test_patches_wrap_an_existing_attention_replace_instead_of_overwriting_it(world):
    """Another pack's attn replace stays in effect: ours call it (so packs compose)."""
    name, model, lat, conds, noisy, handle = world
    from attention_edit.engine.patching import default_attention

    calls = {"attn1": 0, "attn2": 0}

    def counting(kind):
        def patch(q, k, v, extra_options):
            calls[kind] += 1
            return default_attention(q, k, v, extra_options)
        return patch

    other = model.clone()
    for key in transformer_blocks(model):
        other.set_model_attn1_replace(counting("attn1"), *key)
        other.set_model_attn2_replace(counting("attn2"), *key)
    ours = inject(uniform(other, scope="inversion_and_aux"), "fpe")
    stock(ours, conds["src"], conds["empty"], noisy)  # outside our scope: every call reaches the other patch
    blocks = len(transformer_blocks(model))
    assert calls == {"attn1": STEPS * blocks, "attn2": STEPS * blocks}
    # Inside our scope the other attn1 patch still runs, on the injected inputs.
    calls.update(attn1=0, attn2=0)
    edit(ours, conds["empty"], conds["tgt"], conds["empty"], handle=handle)
    assert calls["attn1"] == STEPS * blocks


def test_edit_sampler_progress_advances_every_step_and_cancel_stops_within_one_step():
    import comfy.model_management

    name = "sd15"
    model = inject(tiny.build(name), "fpe")
    lat, empty, tgt = tiny.latent(), tiny.conditioning(name, 1), tiny.conditioning(name, 3)
    _, handle = invert(model, lat, empty)
    with tiny.ProgressWatch() as watch:
        edit(watch.wrap(model), empty, tgt, empty, handle=handle)
        assert watch.ticks == [(i, STEPS) for i in range(1, STEPS + 1)]
        watch.cancel_after(2)
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            edit(watch.wrap(model), empty, tgt, empty, handle=handle)
        assert 2 <= watch.steps <= 3  # the step in flight may finish; no other starts
        assert len(watch.ticks) <= 3
