"""Mask strategies on flow-matching DiTs (tiny Flux-dev, SD3.5) through the Edit Sampler and the branch
sampler: the user MASK and UAM's adaptive mask (model-agnostic: x0 differences at the latent). The instant
mask on the joint attention: tests/reference/test_dit_instant_mask_reference.py."""

import pytest
import torch

from attention_edit.attention.layout import AUX, SOURCE, TARGET
from attention_edit.engine.adaptive_mask import mask_sigma
from attention_edit.nodes.adaptive_mask import AdaptiveMask
from attention_edit.nodes.edit_sampler import EditSampler
from attention_edit.nodes.inversion import DDIMInversion
from attention_edit.nodes.uniform_attention import UniformAttention
from fixtures import tiny, tiny_dit

DITS = ("flux", "sd35")
STEPS = 8


def invert(model, lat, c, steps=STEPS):
    return DDIMInversion.execute(model=model, latent={"samples": lat}, positive=c, negative=None, cfg=1.0,
                                 steps=steps, scheduler="simple", strength=1.0).args[1]


def edit(model, source, target, handle, mask_strategy=None, mask=None, aux=None, pin=True, steps=STEPS):
    # cfg 1: Flux-dev's guidance rides in the conditioning; SD3.5 at cfg 1 inverts exactly
    out = EditSampler.execute(model=model, source=source, target=target, negative=source, cfg=1.0, steps=steps,
                              scheduler="simple", pin_source=pin, seed=0, inversion=handle,
                              mask_strategy=mask_strategy, edit_mask=mask, aux_inversion=aux).args
    return out[0]["samples"], out[1]["samples"], out[2]


def adaptive(t_mask=200.0, recipe="two_trajectories"):
    return AdaptiveMask.execute(lambda_max=0.5, t_mask=t_mask, dilation="edit_region", blend_source=True,
                                recipe=recipe).args[0]


def uniform_model(model):
    return UniformAttention.execute(model=model, scope="inversion_and_aux", start_percent=0.0, end_percent=1.0,
                                    blocks="all").args[0]


@pytest.fixture(scope="module", params=DITS)
def world(request):
    name = request.param
    model = tiny_dit.build(name)
    lat = tiny_dit.latent()
    src, tgt = tiny_dit.conditioning(name, 1), tiny_dit.conditioning(name, 3)
    return name, model, lat, src, tgt, invert(model, lat, src)


@pytest.fixture(scope="module")
def uam(world):
    name, model, lat, src, tgt, handle = world
    m = uniform_model(model)
    return m, invert(m, lat, src)


def spy_runs(strategy):
    """The strategy's runs, each with the (step, x0 in, x0 out) of every blend_denoised call."""
    runs, start = [], strategy.start

    def started(*args):
        run = start(*args)
        blend, run.seen = run.blend_denoised, []

        def blend_denoised(i, x, denoised):
            out = blend(i, x, denoised)
            run.seen.append((i, denoised.clone(), out.clone()))
            return out

        run.blend_denoised = blend_denoised
        runs.append(run)
        return run

    strategy.start = started
    return runs


def test_user_mask_keeps_the_source_outside_it_exactly_at_latent_resolution(world):
    """The user MASK blends at the latent's resolution (16 x 16 here), not the token grid (8 x 8, patch 2):
    a mask edge inside a 2 x 2 patch still keeps the unmasked half of that patch exactly."""
    name, model, lat, src, tgt, handle = world
    mask = torch.zeros(1, 128, 128)
    mask[:, 24:96, 40:88] = 1.0  # the 8 px latent grid: rows 3-11, cols 5-10 (odd edges split patches)
    edited, source, out_mask = edit(model, src, tgt, handle, mask=mask)
    inside = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    inside[..., 3:12, 5:11] = True
    outside = ~inside.expand_as(edited)
    assert (edited - lat)[outside].abs().max() <= 1e-4  # the pinned source reconstruction, exactly
    assert (edited - lat)[inside.expand_as(edited)].abs().max() > 1e-2  # the edit happened inside
    # the half patches: row 2 (outside) and row 3 (inside) share token row 1
    assert (edited - lat)[:, :, 2, 5:11].abs().max() <= 1e-4 < (edited - lat)[:, :, 3, 5:11].abs().max()
    assert (source - lat).abs().max() <= 1e-4
    assert torch.equal(out_mask, mask)


@pytest.mark.parametrize("family", DITS)
def test_t_mask_is_the_same_share_of_the_schedule_on_every_flow_model(family):
    """T_mask counts on the 1000-step training schedule. SD3's model sampling takes timesteps on it, Flux's
    on [0, 1]: T_mask 200 is a fifth of the time on both, a sigma inside (0, 1)."""
    ms = tiny_dit.build(family).get_model_object("model_sampling")
    t = 0.2 if family == "flux" else 200.0  # what each model sampling's sigma() takes for a fifth of the time
    want = float(ms.sigma(torch.tensor(t)))
    assert mask_sigma(ms, 200.0) == pytest.approx(want) and 0.0 < want < 1.0
    assert mask_sigma(ms, 0.0) == 0.0 and mask_sigma(ms, 1000.0) == pytest.approx(float(ms.sigma_max))
    sd15 = tiny.build("sd15").get_model_object("model_sampling")  # the UNets: unchanged
    assert mask_sigma(sd15, 200.0) == float(sd15.sigma(torch.tensor(200.0)))


def test_adaptive_mask_blends_target_with_aux_outside_its_mask_in_the_last_steps(world, uam):
    """UAM's official recipe on a DiT: while sigma < sigma(T_mask), outside the mask M (from the target's
    and the source's x0 difference) the target's x0 is the aux branch's, inside the source's is the aux's
    (the red line); the steps before are left as they are."""
    name, model, lat, src, tgt, handle = world
    m, aux = uam
    strategy = adaptive()
    runs = spy_runs(strategy)
    plain, _, _ = edit(m, src, tgt, handle, pin=False)
    edited, source, mask = edit(m, src, tgt, handle, mask_strategy=strategy, aux=aux)
    assert mask.shape == (1, 128, 128) and 0 < float(mask.mean()) < 1
    (run,) = runs
    sigma_mask = mask_sigma(model.get_model_object("model_sampling"), 200.0)
    sigmas = handle.sigmas
    blended_steps = [i for i, before, after in run.seen if not torch.equal(before, after)]
    assert blended_steps == [i for i in range(STEPS) if float(sigmas[i]) < sigma_mask]
    assert 0 < len(blended_steps) < STEPS
    per = 1  # one image: rows source 0, target 1, aux 2 (branch-major)
    rows = {SOURCE: 0 * per, TARGET: 1 * per, AUX: 2 * per}
    for i, before, after in run.seen:
        if i not in blended_steps:
            continue
        tgt0, src0, aux0 = (before[rows[b]] for b in (TARGET, SOURCE, AUX))
        # The official rule written out: Q the q_i-quantile of |x0_src - x0_tgt| over the latent (q_i rising
        # from 0 to lambda 0.5), the edit region |d| > 2 Q grown by a 3 x 3 max, per latent element.
        d = (src0 - tgt0).abs()
        q = torch.quantile(d.flatten(), 0.5 * i / (STEPS - 1))
        region = torch.nn.functional.max_pool2d((d > 2 * q).float()[None], 3, stride=1, padding=1)[0]
        assert 0 < float(region.mean()) < 1, f"step {i}: the edit region is all or nothing"
        torch.testing.assert_close(after[rows[TARGET]], region * tgt0 + (1 - region) * aux0, rtol=0, atol=0)
        torch.testing.assert_close(after[rows[SOURCE]], region * aux0 + (1 - region) * src0, rtol=0, atol=0)
        torch.testing.assert_close(after[rows[AUX]], aux0, rtol=0, atol=0)
    assert float((edited - plain).abs().max()) > 1e-2
    never, _, never_mask = edit(m, src, tgt, handle, mask_strategy=adaptive(t_mask=0.0), aux=aux)
    tiny.assert_same_computation(never, plain, effect=edited - plain)
    assert torch.all(never_mask == 1)


def test_the_pinned_uniform_recipe_keeps_the_source_exact(world, uam):
    name, model, lat, src, tgt, _ = world
    m, uniform_handle = uam
    plain, _, _ = edit(m, src, tgt, uniform_handle)
    edited, source, mask = edit(m, src, tgt, uniform_handle, mask_strategy=adaptive(recipe="uniform_pinned"))
    assert (source - lat).abs().max() <= 1e-4
    assert 0 < float(mask.mean()) < 1
    assert float((edited - plain).abs().max()) > 1e-2
