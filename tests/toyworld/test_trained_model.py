"""The committed, trained toy-world model: loads through the pack's loader, draws its world, and one
real-image edit through the pack's nodes does what it is asked (the CI check of issue 8)."""

import numpy as np
import pytest
import torch

from attention_edit.nodes.toy_loader import MODELS_DIR, ToyModelLoader
from attention_edit.toyworld import model as toymodel
from fixtures import toy_graph
from toyworld import classifier, edit_score, evaluate, scenes

MODEL_FILE = MODELS_DIR / toymodel.TRAINED_FILE_NAME
MAX_FILE_BYTES = 25_000_000


@pytest.fixture(scope="module")
def world():
    return toy_graph.World(MODEL_FILE, steps=50)


def test_the_trained_model_is_committed_within_budget_and_records_its_training():
    assert MODEL_FILE.is_file(), "models/toyworld.safetensors must ship with the pack"
    assert MODEL_FILE.stat().st_size <= MAX_FILE_BYTES
    config, info = toymodel.read_toy_metadata(MODEL_FILE)
    assert info["trained"] is True and info["unet"]["finished"] is True
    assert info["command"].startswith("python -m toyworld.train")
    assert config.latent_scale_factor == pytest.approx(info["latent_scale_factor"])


def test_loader_node_returns_comfy_objects_that_round_trip_an_image():
    model, clip, vae = ToyModelLoader.execute(model_name=toymodel.TRAINED_FILE_NAME).args
    scene = scenes.make_dataset(3, 1, "test")[0]
    image = scenes.render(scene)[0]
    with torch.inference_mode():
        latent = vae.encode(torch.from_numpy(image[None].astype(np.float32) / 255.0))
        decoded = (vae.decode(latent)[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    assert latent.shape == (1, 4, 16, 16)
    assert toy_graph.psnr(decoded, image) > 25.0
    assert classifier.scene_attribute_accuracy(scene, decoded) == 1.0
    assert model.model.latent_format.scale_factor == pytest.approx(toymodel.read_toy_metadata(MODEL_FILE)[0].latent_scale_factor)


def test_generates_held_out_captions_with_their_attributes(world):
    held_out = evaluate.held_out_scenes(8, seed=5)
    with torch.inference_mode():
        images = evaluate.generate(world.model, world.clip, world.vae, [s.caption for s in held_out])
    result = evaluate.score(held_out, images)
    assert result["gen_attribute_accuracy"] >= 0.9, result


def test_one_real_image_edit_through_the_pack_nodes(world):
    """A held-out recolour through the UAM recipe of workflow 1 (uniform-attention inversion of the empty
    prompt, MasaCtrl, adaptive mask): the classifier reads the whole target scene back from the edit,
    i.e. the edited object got its new colour and everything else kept its attributes."""
    pair = scenes.make_edit_pairs(0, 1, split="test", kinds=("recolour",))[0]
    with torch.inference_mode():
        image, _ = toy_graph.edit(world, pair, "uam")
    report = classifier.scene_attribute_report(pair.target, image)
    assert edit_score.lenient_success(pair, image) and report["accuracy"] == 1.0, report
