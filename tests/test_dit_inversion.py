"""Inversion and reconstruction on flow-matching DiTs (tiny Flux-dev, Flux-schnell, SD3.5) through the
pack's nodes and the host's own model classes and samplers."""

import comfy.model_base
import pytest
import torch

from attention_edit.attention.layout import SOURCE
from attention_edit.engine.branches import Branch, sample_branches
from attention_edit.engine.inversion import schedule
from attention_edit.nodes.inversion import DDIMInversion
from fixtures import inversion_calls, tiny_dit
from fixtures.inversion_calls import reconstruct, rel_err


def invert(model, lat, positive, negative=None, cfg=1.0, steps=10, strength=1.0, scheduler="simple"):
    return inversion_calls.invert(model, lat, positive, negative, cfg, steps, strength, scheduler)


@pytest.fixture(scope="module", params=tiny_dit.FAMILIES)
def family(request):
    return request.param, tiny_dit.build(request.param)


def test_pinned_reconstruction_is_exact(family):
    name, model = family
    lat = tiny_dit.latent(batch=2)
    c = tiny_dit.conditioning(name, 1)
    _, handle = invert(model, lat, c)
    out = reconstruct(model, handle, c, c, pin=True)
    # The trajectory's last entry is the clean latent in model space; out of it: float rounding only.
    assert (out - lat).abs().max() <= 1e-5 * float(lat.abs().max())


def test_trajectory_starts_at_the_clean_latent_and_ends_at_the_noise_level(family):
    """The host scales a sampler's start latent by (1 - sigma_max), zero for a full flow schedule: the
    inversion must start from the clean latent all the same, and its first step follows the flow ODE."""
    name, model = family
    lat = tiny_dit.latent()
    c = tiny_dit.conditioning(name, 1)
    _, handle = invert(model, lat, c, steps=10)
    clean = model.model.process_latent_in(lat)
    torch.testing.assert_close(handle.latents[-1], clean, rtol=0, atol=1e-6)
    # One Euler step of dx/dsigma = (x - x0) / sigma from the clean latent (at the model's smallest sigma)
    s_min = float(model.get_model_object("model_sampling").sigma_min)
    x0 = model.model.apply_model(clean, torch.tensor([s_min]), c_crossattn=c[0][0], y=c[0][1]["pooled_output"],
                                 guidance=torch.tensor([3.5]) if name == "flux" else None)
    step = clean + float(handle.sigmas[-2]) * (clean - x0) / s_min
    torch.testing.assert_close(handle.latents[-2], step, rtol=1e-4, atol=1e-4)


def test_round_trip_converges_with_steps(family):
    """Unpinned DDIM (Euler) inversion then sampling back: first-order error, shrinking with the steps."""
    name, model = family
    lat = tiny_dit.latent()
    c = tiny_dit.conditioning(name, 1)
    errors = []
    for steps in (10, 40):
        _, handle = invert(model, lat, c, steps=steps)
        errors.append(rel_err(reconstruct(model, handle, c, c), lat))
    assert errors[1] < 0.05, f"{name}: 40-step round trip error {errors[1]:.4f}"
    assert errors[1] < errors[0] / 2, f"{name}: errors {errors} do not shrink like a first-order method"


def test_partial_inversion_covers_the_tail_and_is_the_full_inversions_tail(family):
    name, model = family
    lat = tiny_dit.latent()
    c = tiny_dit.conditioning(name, 1)
    noisy, handle = invert(model, lat, c, steps=10, strength=0.5)
    assert handle.inverted_steps == 5 and handle.steps == 10
    _, full = invert(model, lat, c, steps=10)
    torch.testing.assert_close(handle.sigmas, full.sigmas[5:])
    # The same backward steps from the same clean latent (the host's start scaling is (1 - sigma) != 0 here)
    torch.testing.assert_close(handle.latents, full.latents[5:], rtol=0, atol=1e-5)
    torch.testing.assert_close(reconstruct(model, handle, c, c, pin=True), lat, rtol=0, atol=1e-5)


def test_sd35_cfg_inversion_drifts_more_than_cfg1():
    model = tiny_dit.build("sd35")
    lat = tiny_dit.latent()
    empty, prompt = tiny_dit.conditioning("sd35", 1), tiny_dit.conditioning("sd35", 2)
    _, h1 = invert(model, lat, empty, steps=20)
    err1 = rel_err(reconstruct(model, h1, empty, empty), lat)
    _, h5 = invert(model, lat, prompt, empty, cfg=5.0, steps=20)
    err5 = rel_err(reconstruct(model, h5, prompt, empty, cfg=5.0), lat)
    assert err5 > 2 * err1, f"cfg 5 error {err5:.4f} vs cfg 1 {err1:.4f}"


def test_flux_dev_guidance_is_part_of_the_inversions_prompt():
    """Flux-dev has no real CFG: the distilled guidance rides in the conditioning (FluxGuidance). The
    inversion's own guidance reconstructs; another guidance is another prompt (not replayed, not exact)."""
    model = tiny_dit.build("flux")
    lat = tiny_dit.latent()
    g2, g5 = tiny_dit.conditioning("flux", 1, guidance=2.0), tiny_dit.conditioning("flux", 1, guidance=5.0)
    _, handle = invert(model, lat, g2, steps=20)
    same = rel_err(reconstruct(model, handle, g2, g2), lat)
    other = rel_err(reconstruct(model, handle, g5, g5), lat)
    assert same < other, f"guidance 2 inverted: error {same:.4f} with 2, {other:.4f} with 5"


def test_invert_once_edit_many_reuses_one_handle(family):
    """Two reconstructions from one handle with different prompts run no inversion again and leave the
    handle as it was."""
    name, model = family
    lat = tiny_dit.latent()
    c, other = tiny_dit.conditioning(name, 1), tiny_dit.conditioning(name, 2)
    _, handle = invert(model, lat, c)
    before = handle.latents.clone()
    a = reconstruct(model, handle, c, c)
    b = reconstruct(model, handle, other, other)
    assert torch.equal(handle.latents, before)
    assert float((a - b).abs().max()) > 0
    handle.check_model(model.clone())


def test_pinned_source_nothing_reads_is_not_run(family):
    """Source replay: a pinned source that nothing reads costs no model call, on DiTs as on UNets."""
    name, model = family
    lat = tiny_dit.latent()
    c = tiny_dit.conditioning(name, 1)
    _, handle = invert(model, lat, c)
    calls = []

    def counted(apply_model, args):
        calls.append(args["input"].shape[0])
        return apply_model(args["input"], args["timestep"], **args["c"])

    m = model.clone()
    m.set_model_unet_function_wrapper(counted)
    full = schedule(m, handle.scheduler, handle.steps)
    run = sample_branches(m, [Branch(SOURCE, c, c)], 1.0, handle.sigmas, full, 1, trajectory=handle.latents,
                          pin=(SOURCE,), handle=handle)
    assert calls == [] and run.info["unused"] == (SOURCE,)
    torch.testing.assert_close(run.latents[SOURCE], lat, rtol=0, atol=1e-5)


def test_unsupported_families_are_refused_by_name_before_compute():
    """Families not done yet (subclasses of Flux with other blocks, Qwen-Image) are named in the error,
    raised before any model call (the stand-in model object has no weights at all)."""
    model = tiny_dit.build("flux")
    names = [n for n in ("Flux2", "Chroma", "QwenImage") if hasattr(comfy.model_base, n)]
    assert "Chroma" in names and "QwenImage" in names
    for name in names:
        other = model.clone()
        other.model = object.__new__(getattr(comfy.model_base, name))
        with pytest.raises(ValueError, match=f"'{name}'.*not supported yet"):
            DDIMInversion.execute(model=other, latent={"samples": tiny_dit.latent()},
                                  positive=tiny_dit.conditioning("flux", 1), negative=None, cfg=1.0, steps=4,
                                  scheduler="simple", strength=1.0)
