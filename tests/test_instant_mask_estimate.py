"""AttnEdit_InstantMaskEstimate: InstDiffEdit's SDEdit-style mask on the toy-world model (a real CLIP
tokenizer, lone objects with known masks), the stock inpainting wiring it feeds, progress and Cancel, and
bad input refused before compute. The estimate's computation itself is checked against the official
algorithm in tests/reference/test_instant_mask_reference.py."""

from __future__ import annotations

import pathlib

import comfy.model_management
import nodes as comfy_nodes
import numpy as np
import pytest
import torch

from attention_edit.engine.instant_mask_estimate import MaskSettings, capture_layers, estimate_instant_mask
from attention_edit.nodes.instant_mask_estimate import InstantMaskEstimate
from fixtures import tiny
from fixtures.toy_graph import World, iou, run_node

MODEL_FILE = pathlib.Path(__file__).resolve().parents[1] / "models" / "toyworld.safetensors"
STEPS = 20  # strength 0.5: 10 steps of 3 samples


@pytest.fixture(scope="module")
def world():
    return World(MODEL_FILE, steps=STEPS)


@pytest.fixture(scope="module")
def scenes_():
    from toyworld import scenes

    rng = np.random.default_rng(11)
    out = []
    for _ in range(4):
        scene = scenes.sample_scene(rng, n_objects=1)
        image, coverage = scenes.render_with_coverage(scene)
        out.append((scene, image, coverage[0] >= 0.5))
    return out


def encode(world, image):
    with torch.inference_mode():  # as the host runs VAEEncode
        return world.encode(image)


def estimate(world, scene, latent, **inputs):
    with torch.inference_mode():
        return run_node(InstantMaskEstimate, model=world.model, latent=latent, positive=world.cond(scene.caption),
                        negative=world.cond(""), clip=world.clip, target_prompt=scene.caption, steps=STEPS,
                        **inputs)[0]


def test_defaults_are_the_papers():
    schema = InstantMaskEstimate.define_schema()
    defaults = {i.id: getattr(i, "default", None) for i in schema.inputs}
    assert (defaults["strength"], defaults["samples"], defaults["steps"], defaults["cfg"]) == (0.5, 3, 50, 7.5)
    assert (defaults["sampler_name"], defaults["scheduler"], defaults["map_side"]) == ("lms", "normal", 0.25)
    assert (defaults["object_similarity"], defaults["background_similarity"]) == (0.9, 0.6)
    assert (defaults["blur_passes"], defaults["threshold"], defaults["start_map"], defaults["words"]) == (2, 0.2, "inverted", "")
    assert schema.category == "attention_edit/masks" and [o.io_type for o in schema.outputs] == ["MASK"]


def test_a_named_word_finds_the_lone_object(world, scenes_):
    """The edited word as the index word: never an empty mask, the object inside it, little else."""
    for scene, image, truth in scenes_:
        mask = estimate(world, scene, encode(world, image), words=scene.objects[0].colour)
        assert mask.shape == (1, 128, 128) and set(mask.unique().tolist()) <= {0.0, 1.0}
        m = mask[0].numpy() > 0.5
        assert m.any(), f"empty mask for {scene.caption!r}"
        assert (m & truth).sum() / truth.sum() >= 0.5, scene.caption  # most of the object
        assert m.mean() <= 0.3, scene.caption  # not the background


def test_no_word_on_the_toy_model_inverted_marks_the_background_and_direct_the_object(world, scenes_):
    """The toy model's start token attends to the object (SD's to the background): the paper's inverted
    start-token map then indexes a background word. `direct` is the variant for such a model."""
    inverted, direct = [], []
    for scene, image, truth in scenes_:
        latent = encode(world, image)
        inverted.append(iou(estimate(world, scene, latent)[0].numpy() > 0.5, truth))
        direct.append(iou(estimate(world, scene, latent, start_map="direct")[0].numpy() > 0.5, truth))
    assert max(inverted) < 0.15 and np.mean(direct) > 0.2, (inverted, direct)


def test_the_mask_drives_the_stock_inpainting_wiring(world, scenes_):
    """SetLatentNoiseMask + KSampler (the stock inpainting wiring; the toy world has no inpainting checkpoint):
    outside the estimated mask the result is the image's latent, inside it the target prompt repaints. The
    example workflow's InpaintModelConditioning on this (non-inpainting) model is the same latent mask."""
    scene, image, _ = scenes_[0]
    latent = encode(world, image)
    mask = estimate(world, scene, latent, words=scene.objects[0].colour)
    target = scene.caption.replace(scene.objects[0].colour, "blue" if scene.objects[0].colour != "blue" else "red")
    with torch.inference_mode():
        masked = comfy_nodes.SetLatentNoiseMask().set_mask(latent, mask)[0]
        out = comfy_nodes.KSampler().sample(world.model, 1, STEPS, 7.5, "euler", "normal", world.cond(target),
                                            world.cond(""), masked, denoise=1.0)[0]["samples"]
        conditioned = comfy_nodes.InpaintModelConditioning().encode(world.cond(target), world.cond(""),
                                                                    torch.from_numpy(image[None] / 255.0).float(),
                                                                    world.vae, mask, True)
        out2 = comfy_nodes.KSampler().sample(world.model, 1, STEPS, 7.5, "euler", "normal", conditioned[0],
                                             conditioned[1], conditioned[2], denoise=1.0)[0]["samples"]
    keep = torch.nn.functional.interpolate(mask[:, None], size=latent["samples"].shape[-2:], mode="area") == 0
    keep = keep.expand_as(out)
    assert keep.any() and (~keep).any()
    assert (out - latent["samples"])[keep].abs().max() <= 1e-4
    assert (out - latent["samples"])[~keep].abs().max() > 0.1
    edge = torch.nn.functional.interpolate(conditioned[2]["noise_mask"], size=out2.shape[-2:], mode="area") == 0
    assert (out2 - conditioned[2]["samples"])[edge.expand_as(out2)].abs().max() <= 1e-4


def test_seed_and_samples_change_the_mask_and_repeat_exactly(world, scenes_):
    scene, image, _ = scenes_[1]
    latent = encode(world, image)
    settings = dict(words=scene.objects[0].colour)
    a = estimate(world, scene, latent, seed=3, **settings)
    assert torch.equal(a, estimate(world, scene, latent, seed=3, **settings))
    with torch.inference_mode():
        from attention_edit.nodes.instant_mask import prompt_word_groups

        groups, edit_words = prompt_word_groups(world.clip, scene.caption, scene.objects[0].colour)
        cond = world.cond(scene.caption), world.cond("")
        maps = [estimate_instant_mask(world.model, latent["samples"], *cond, MaskSettings(groups, edit_words),
                                      samples=n, seed=3, steps=STEPS).maps for n in (1, 3)]
    assert not torch.allclose(maps[0], maps[1])  # three noise samples are not one


def test_progress_advances_every_step_and_cancel_stops_within_one_step(world, scenes_):
    scene, image, _ = scenes_[0]
    latent = encode(world, image)
    with tiny.ProgressWatch() as watch:
        model = watch.wrap(world.model)
        with torch.inference_mode():
            run_node(InstantMaskEstimate, model=model, latent=latent, positive=world.cond(scene.caption),
                     negative=world.cond(""), clip=world.clip, target_prompt=scene.caption, steps=10, samples=1)
        assert watch.ticks == [(i, 5) for i in range(1, 6)]
        watch.cancel_after(2)
        with pytest.raises(comfy.model_management.InterruptProcessingException), torch.inference_mode():
            run_node(InstantMaskEstimate, model=watch.wrap(world.model), latent=latent,
                     positive=world.cond(scene.caption), negative=world.cond(""), clip=world.clip,
                     target_prompt=scene.caption, steps=10, samples=1)
        assert 2 <= watch.steps <= 3 and len(watch.ticks) <= 3


def test_bad_input_is_refused_before_compute(world, scenes_):
    scene, image, _ = scenes_[0]
    latent = encode(world, image)
    ok = dict(strength=0.5, cfg=7.5, sampler_name="lms", scheduler="normal", map_side=0.25, object_similarity=0.9,
              background_similarity=0.6, threshold=0.2)
    assert InstantMaskEstimate.validate_inputs(**ok) is True
    for bad in (dict(strength=0.0), dict(strength=float("nan")), dict(sampler_name="dpmpp_2m"),
                dict(threshold=1.5), dict(start_map="upside down")):
        assert isinstance(InstantMaskEstimate.validate_inputs(**{**ok, **bad}), str), bad
    calls = []
    model = world.model.clone()
    model.set_model_unet_function_wrapper(lambda apply, args: calls.append(1) or apply(args["input"], args["timestep"],
                                                                                          **args["c"]))
    with pytest.raises(ValueError, match="'zebra' is not in the prompt"):
        estimate(world, scene, latent, words="zebra")
    with pytest.raises(ValueError, match="target_prompt is empty"):
        run_node(InstantMaskEstimate, model=model, latent=latent, positive=world.cond(""), negative=world.cond(""),
                 clip=world.clip, target_prompt="  ")
    with pytest.raises(ValueError, match="latent side"):
        run_node(InstantMaskEstimate, model=model, latent=latent, positive=world.cond(scene.caption),
                 negative=world.cond(""), clip=world.clip, target_prompt=scene.caption, map_side=0.03125)
    with pytest.raises(ValueError, match="NaN"):
        run_node(InstantMaskEstimate, model=model, latent={"samples": latent["samples"] * float("nan")},
                 positive=world.cond(scene.caption), negative=world.cond(""), clip=world.clip,
                 target_prompt=scene.caption)
    area = [[world.cond(scene.caption)[0][0], {**world.cond(scene.caption)[0][1], "area": (8, 8, 0, 0)}]]
    with pytest.raises(ValueError, match="area"):
        run_node(InstantMaskEstimate, model=model, latent=latent, positive=area, negative=world.cond(""),
                 clip=world.clip, target_prompt=scene.caption)
    assert not calls


@pytest.mark.parametrize("name", tiny.FAMILIES)
def test_capture_layers_are_the_down_and_up_blocks_at_a_quarter_side(name):
    model = tiny.build(name)
    layers = capture_layers(model, 0.25)
    assert layers and all(key[0] in ("input", "output") for key in layers)
    with pytest.raises(ValueError, match="this model's are at"):
        capture_layers(model, 0.0625)
