"""InstDiffEdit's own path on the toy world (the instant_mask_edit workflow's nodes): the mask estimated at
strength 0.5 over three noise samples, then a stock masked inpainting pass. The toy world has no inpainting
model, so the pass runs on the base model through the same stock nodes (InpaintModelConditioning with
noise_mask, KSampler): what it must do there is sample inside the mask only."""

import pytest
import torch
import torch.nn.functional as F

from attention_edit.nodes.toy_loader import MODELS_DIR
from attention_edit.toyworld import model as toymodel
from fixtures import toy_graph
from toyworld import scenes


@pytest.fixture(scope="module")
def world():
    return toy_graph.World(MODELS_DIR / toymodel.TRAINED_FILE_NAME, steps=10)


def test_the_paper_path_changes_the_latent_inside_its_mask_only(world):
    pair = next(p for p in scenes.make_edit_pairs(0, 1, split="test", kinds=("recolour",)))
    spec = toy_graph.edit_methods(world)["instdiffedit_paper"]
    out, source, mask = toy_graph.estimate_and_inpaint_latents(world, spec, pair)
    coverage = float(mask.float().mean())
    assert 0.0 < coverage < 0.5, f"a recolour's mask covers {coverage:.1%} of the image"
    latent, original = out["samples"].float(), source["samples"].float()
    # The noise mask at latent size as the host's sampler makes it (bilinear): where it is 0 the sampler keeps the
    # source latent itself, up to the float32 rounding of the latent scale factor's round trip (in and out of the
    # model's latent space: a few ulps, relative 1e-6).
    at_latent = F.interpolate(mask.reshape(1, 1, *mask.shape[-2:]).float(), size=latent.shape[-2:], mode="bilinear")
    outside = (at_latent == 0).expand_as(latent)
    inside = (at_latent > 0.5).expand_as(latent)
    assert outside.any() and inside.any()
    torch.testing.assert_close(latent[outside], original[outside], rtol=1e-6, atol=1e-6)
    assert float((latent[inside] - original[inside]).abs().mean()) > 0.05 * float(original.abs().mean())
