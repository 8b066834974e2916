"""The committed 256-px toy world (models/toyworld256.safetensors): the toy world's model fine-tuned to draw its
scenes at 256 px, so that its latents are 32x32 and the attention maps the papers read at 1/4 of the latent side
are 8x8 (issue 17). It loads through the pack's loader, keeps the toy world's VAE and tokenizer, and draws
held-out captions at 256 px."""

import numpy as np
import pytest
import torch

from attention_edit.engine.patching import default_attention, transformer_blocks
from attention_edit.nodes.toy_loader import MODELS_DIR, ToyModelLoader
from attention_edit.toyworld import model as toymodel
from fixtures import toy_graph
from toyworld import evaluate, scenes

MODEL_FILE = MODELS_DIR / toymodel.TRAINED_256_FILE_NAME
MAX_FILE_BYTES = 25_000_000  # the per-file budget of models/
SIZE = 256
# Measured on 16 held-out captions (20 steps, cfg 5) at the end of its run: 1.0 (every attribute
# of every object, models/README.md); the 128-px model's test asks 0.9 of its 8, and so does this one.
GEN_AT_LEAST = 0.9


@pytest.fixture(scope="module")
def world():
    return toy_graph.World(MODEL_FILE, steps=50)


def test_the_256px_world_is_committed_within_budget_and_records_its_training():
    assert MODEL_FILE.is_file(), "models/toyworld256.safetensors must ship with the pack"
    assert MODEL_FILE.stat().st_size <= MAX_FILE_BYTES
    config, info = toymodel.read_toy_metadata(MODEL_FILE)
    assert config.family == toymodel.UNET and config.image_size == SIZE
    assert info["trained"] is True and info["unet"]["finished"] is True
    assert "--finetune" in info["command"] and "--image-size 256" in info["command"]
    assert info["finetuned_from"]["file"].endswith(toymodel.TRAINED_FILE_NAME)
    assert info["finetuned_from"]["image_size"] == scenes.REFERENCE_SIZE
    assert info["unet"]["minutes"] <= 90.0


def test_the_loader_gives_32x32_latents_over_the_toy_worlds_own_vae():
    model, clip, vae = ToyModelLoader.execute(model_name=toymodel.TRAINED_256_FILE_NAME).args
    _, fine = toymodel.load_toy_state_dict(MODEL_FILE)
    _, base = toymodel.load_toy_state_dict(MODELS_DIR / toymodel.TRAINED_FILE_NAME)
    vae_keys = [k for k in fine if k.startswith("vae.")]
    assert vae_keys and all(torch.equal(fine[k], base[k]) for k in vae_keys)  # the VAE stayed frozen
    image = scenes.render(scenes.make_dataset(3, 1, "test")[0], SIZE)[0]
    with torch.inference_mode():
        latent = vae.encode(torch.from_numpy(image[None].astype(np.float32) / 255.0))
        decoded = (vae.decode(latent)[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    assert latent.shape == (1, 4, 32, 32)
    assert toy_graph.psnr(decoded, image) > 30.0  # measured 35.2 dB on 16 held-out scenes


def test_attention_maps_at_a_quarter_of_the_latent_side_are_8x8(world):
    sides = {}
    probe = world.model.clone()

    def recorder(key):
        def attn(q, k, v, extra_options):
            sides[key] = tuple(extra_options["activations_shape"][-2:])
            return default_attention(q, k, v, extra_options)
        return attn

    for key in transformer_blocks(probe):
        probe.set_model_attn1_replace(recorder(key), *key)
    latent = torch.zeros(1, 4, SIZE // 8, SIZE // 8)
    with torch.inference_mode():
        probe.model.apply_model(latent, torch.ones(1), c_crossattn=world.cond("")[0][0],
                                transformer_options=probe.model_options["transformer_options"])
    assert set(sides.values()) == {(32, 32), (16, 16), (8, 8)}


def test_generates_held_out_captions_at_256px(world):
    held_out = evaluate.held_out_scenes(8, seed=5)
    with torch.inference_mode():
        images = evaluate.generate(world.model, world.clip, world.vae, [s.caption for s in held_out], image_size=SIZE)
    assert images.shape == (8, SIZE, SIZE, 3)
    result = evaluate.score(held_out, images)
    assert result["gen_attribute_accuracy"] >= GEN_AT_LEAST, result
