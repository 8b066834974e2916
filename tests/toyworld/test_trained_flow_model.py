"""The committed toy flow world (models/toyflow.safetensors): a trained Flux-shaped DiT that loads through the pack's
loader on this host, draws its world's colours and backgrounds from held-out captions, and edits a real image
through the pack's DiT paths."""

import numpy as np
import pytest
import torch

from attention_edit.engine.dit import FLUX, dit_family
from attention_edit.nodes.toy_loader import MODELS_DIR, ToyModelLoader
from attention_edit.toyworld import model as toymodel
from fixtures import toy_graph
from toyworld import classifier, evaluate, scenes

MODEL_FILE = MODELS_DIR / toymodel.TRAINED_FLOW_FILE_NAME
MAX_FILE_BYTES = 25_000_000  # the per-file budget of models/ (the toy world's is the same)
# What the toy flow world reliably draws (measured on 16 held-out captions at the end of its 55-minute run: colour
# 1.0, background 1.0, position 1.0, size 0.88, shape 0.25, i.e. chance: see models/README.md): at least 7 of 8.
COLOUR_AT_LEAST = BACKGROUND_AT_LEAST = 7 / 8


@pytest.fixture(scope="module")
def world():
    return toy_graph.World(MODEL_FILE, steps=50)


def test_the_trained_flow_world_is_committed_within_budget_and_records_its_training():
    assert MODEL_FILE.is_file(), "models/toyflow.safetensors must ship with the pack"
    assert MODEL_FILE.stat().st_size <= MAX_FILE_BYTES
    config, info = toymodel.read_toy_metadata(MODEL_FILE)
    assert config.family == toymodel.FLUX
    assert info["trained"] is True and info["flow"]["finished"] is True
    assert info["command"].startswith("python -m toyworld.train") and "--stage flow" in info["command"]
    assert info["flow"]["minutes"] <= 90.0  # the training budget of these 2 cores


def test_the_loader_gives_a_flux_model_over_the_toy_worlds_text_encoder_and_vae():
    model, clip, vae = ToyModelLoader.execute(model_name=toymodel.TRAINED_FLOW_FILE_NAME).args
    assert dit_family(model) == FLUX
    _, flow_state = toymodel.load_toy_state_dict(MODEL_FILE)
    _, unet_state = toymodel.load_toy_state_dict(MODELS_DIR / toymodel.TRAINED_FILE_NAME)
    shared = [k for k in flow_state if k.startswith(("clip.", "vae."))]
    assert shared and all(torch.equal(flow_state[k], unet_state[k]) for k in shared)  # frozen, copied
    scene = scenes.make_dataset(3, 1, "test")[0]
    image = scenes.render(scene)[0]
    with torch.inference_mode():
        latent = vae.encode(torch.from_numpy(image[None].astype(np.float32) / 255.0))
    assert latent.shape == (1, 4, 16, 16)


def test_generates_the_colours_and_backgrounds_of_held_out_captions(world):
    held_out = evaluate.held_out_scenes(8, seed=5)
    with torch.inference_mode():
        images = evaluate.generate(world.model, world.clip, world.vae, [s.caption for s in held_out])
    result = evaluate.score(held_out, images)
    assert result["per_attribute"]["colour"] >= COLOUR_AT_LEAST, result
    assert result["per_attribute"]["background"] >= BACKGROUND_AT_LEAST, result


def test_one_real_image_recolour_through_the_pack_nodes(world):
    """A held-out two-object recolour with FPE (the empty-prompt rectified-flow inversion, source replayed): the
    edited object takes the target colour and the other object keeps every attribute. (The world's shapes are
    beyond this model, see models/README.md: the edited object's shape is not asked for.)"""
    pair = scenes.make_edit_pairs(0, 1, split="test", kinds=("recolour",))[0]
    assert len(pair.target.objects) == 2
    with torch.inference_mode():
        image, _ = toy_graph.edit(world, pair, "fpe")
    report = classifier.scene_attribute_report(pair.target, image)
    edited, kept = report["objects"][pair.edited_object_index], report["objects"][1 - pair.edited_object_index]
    assert edited["colour"] and all(kept.values()) and report["background"], report
