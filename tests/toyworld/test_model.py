"""The toy-world model: built from ComfyUI's own classes, runs the stock SD1.x paths, one-file round trip."""

import os

import comfy.latent_formats
import comfy.model_base
import comfy.model_patcher
import comfy.sd
import nodes as comfy_nodes
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTokenizer

from attention_edit.nodes import toy_loader
from attention_edit.nodes.toy_loader import ToyModelLoader
from attention_edit.toyworld import model as toymodel

PROMPT_A = "a large red circle in the center on a white background"
PROMPT_B = "a small blue square on the left on a black background"
MAX_FILE_BYTES = 25_000_000  # the repo budget for models/toyworld.safetensors (issue 8)


@pytest.fixture(scope="module")
def toy():
    return toymodel.build_toy(seed=0)


def encode(clip, text):
    return comfy_nodes.CLIPTextEncode().encode(clip, text)[0]


def unet_out(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, 64, generator=g)
    with torch.no_grad():
        return model.model.apply_model(x, torch.tensor([2.0]), c_crossattn=ctx)


def outputs(model, clip, vae):
    """What each part computes on fixed inputs: UNet prediction, prompt conditioning, decoded image."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        image = vae.decode(torch.randn(1, 4, 8, 8, generator=g))  # small sizes keep the test fast
    return unet_out(model), encode(clip, PROMPT_A)[0][0], image


def test_builds_sd15_shaped_comfy_objects(toy):
    model, clip, vae = toy
    assert isinstance(model, comfy.model_patcher.ModelPatcher)
    assert isinstance(model.model, comfy.model_base.BaseModel)
    assert model.model.model_type == comfy.model_base.ModelType.EPS
    assert isinstance(model.model.latent_format, comfy.latent_formats.SD15)
    assert model.model.latent_format.scale_factor == toymodel.default_config().latent_scale_factor
    assert isinstance(clip, comfy.sd.CLIP) and isinstance(vae, comfy.sd.VAE)
    assert vae.spacial_compression_decode() == 8 and vae.latent_channels == 4
    for module in (model.model, clip.cond_stage_model, vae.first_stage_model):
        assert {p.dtype for p in module.parameters()} == {torch.float32}
        assert all(torch.isfinite(p).all() for p in module.parameters())
    # Every transformer has cross-attention to the 64-wide text context, heads of 32 channels.
    attn2 = [m for n, m in model.model.diffusion_model.named_modules() if n.endswith("attn2")]
    assert len(attn2) == 10  # one per input level (3), the middle (1) and every output block (6)
    assert all(m.to_k.in_features == 64 and m.dim_head == 32 for m in attn2)


def test_parameter_budget(toy):
    counts = toymodel.parameter_counts(*toy)
    assert counts["total"] == counts["unet"] + counts["clip"] + counts["vae"]
    assert counts["clip"] > 49408 * 64  # the full CLIP vocabulary is embedded
    assert 2 * counts["total"] < MAX_FILE_BYTES  # float16 weights fit the file budget


def test_config_json_round_trip_and_validation():
    config = toymodel.default_config()
    again = toymodel.ToyConfig.from_json(config.to_json())
    assert again == config
    bad = config.to_dict()
    bad["unet"]["context_dim"] = 32
    with pytest.raises(ValueError, match="context_dim"):
        toymodel.ToyConfig.from_dict(bad)
    with pytest.raises(ValueError, match="unknown"):
        toymodel.ToyConfig.from_dict({**config.to_dict(), "extra": 1})


def test_clip_uses_the_real_tokenizer_and_encodes_prompts(toy):
    _, clip, _ = toy
    tokens = clip.tokenize(PROMPT_A)["l"][0]
    assert len(tokens) == 77
    reference = CLIPTokenizer.from_pretrained(os.path.join(os.path.dirname(comfy.sd.__file__), "sd1_tokenizer"))
    ids = reference(PROMPT_A)["input_ids"]
    assert [t for t, _ in tokens[:len(ids)]] == ids and ids[0] == 49406 and ids[-1] == 49407

    a, b = encode(clip, PROMPT_A), encode(clip, PROMPT_B)
    assert a[0][0].shape == (1, 77, 64) and a[0][1]["pooled_output"].shape == (1, 64)
    assert torch.isfinite(a[0][0]).all()
    assert (a[0][0] - b[0][0]).abs().max() > 1e-2  # different prompts, different conditioning
    assert torch.equal(a[0][0], encode(clip, PROMPT_A)[0][0])  # deterministic
    # Prompt weighting goes through the host's empty-prompt interpolation path.
    weighted = encode(clip, "a large (red:1.5) circle in the center on a white background")
    assert weighted[0][0].shape == (1, 77, 64) and not torch.equal(weighted[0][0], a[0][0])


def test_vae_round_trip_shapes(toy):
    _, _, vae = toy
    image = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latent = vae.encode(image)
        assert latent.shape == (1, 4, 16, 16) and torch.isfinite(latent).all()
        decoded = vae.decode(latent)
    assert decoded.shape == (1, 128, 128, 3)
    assert torch.isfinite(decoded).all() and decoded.min() >= 0 and decoded.max() <= 1


def test_one_sampling_step_through_stock_ksampler(toy):
    model, clip, _ = toy
    positive, negative = encode(clip, PROMPT_A), encode(clip, "")
    latent = comfy_nodes.EmptyLatentImage().generate(128, 128, 1)[0]
    assert latent["samples"].shape == (1, 4, 16, 16)
    out = comfy_nodes.common_ksampler(model, 0, 1, 3.0, "euler", "normal", positive, negative, latent)[0]["samples"]
    assert out.shape == (1, 4, 16, 16) and torch.isfinite(out).all()
    # A random model predicts small noise (calm output layer): one Euler step to sigma 0 keeps the
    # initial noise, i.e. sigma_max * N(0, 1) in model space, divided by the latent scale factor.
    expected = model.model.model_sampling.sigma_max / model.model.latent_format.scale_factor
    assert 0.5 * expected < out.std() < 1.5 * expected


def test_seeded_random_weights(toy):
    model, _, _ = toy
    again, _, _ = toymodel.build_toy(seed=0)
    other, _, _ = toymodel.build_toy(seed=1)
    assert torch.equal(unet_out(model), unet_out(again))
    assert not torch.equal(unet_out(model), unet_out(other))


def test_save_load_round_trip(toy, tmp_path):
    model, clip, vae = toy
    config = toymodel.default_config()
    original = outputs(model, clip, vae)

    # float32 storage: the loaded model computes exactly what the original did.
    path32 = tmp_path / "toy32.safetensors"
    toymodel.save_toy(path32, config, model, clip, vae, dtype=torch.float32)
    for got, want in zip(outputs(*toymodel.load_toy(path32)), original):
        assert torch.equal(got, want)

    # float16 storage (the default): the loaded weights are exactly the fp16-rounded originals (and,
    # by the float32 case, the same weights compute the same outputs) ...
    path16 = tmp_path / "toy16.safetensors"
    toymodel.save_toy(path16, config, model, clip, vae, info={"note": "test"})
    assert os.path.getsize(path16) <= MAX_FILE_BYTES
    rounded = {k: v.half().float() for k, v in toymodel.toy_state_dict(model, clip, vae).items()}
    loaded = toymodel.load_toy(path16)
    loaded_state = toymodel.toy_state_dict(*loaded)
    assert loaded_state.keys() == rounded.keys()
    assert all(torch.equal(v, rounded[k]) for k, v in loaded_state.items())
    # ... and the outputs are close to the float32 original's: fp16 keeps ~3 significant digits per weight.
    for got, want in zip(outputs(*loaded), original):
        assert (got - want).abs().max() <= 0.02 * want.abs().max()

    read_config, info = toymodel.read_toy_metadata(path16)
    assert read_config == config and info == {"note": "test"}


def test_rejects_foreign_and_mismatched_files(toy, tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, plain)
    assert not toymodel.is_toy_file(plain)
    with pytest.raises(ValueError, match="attention_edit_toy"):
        toymodel.load_toy(plain)
    state = toymodel.toy_state_dict(*toy)
    state.pop("unet.out.2.weight")
    with pytest.raises(ValueError, match="unet weights do not match"):
        toymodel.build_toy(toymodel.default_config(), state)


def test_loader_node(tmp_path, monkeypatch):
    monkeypatch.setattr(toy_loader, "MODELS_DIR", tmp_path)
    trained, random = toymodel.TRAINED_FILE_NAME, toymodel.RANDOM_FILE_NAME

    # Empty folder: a stable schema, and a clear error that says how to make the file.
    combo = ToyModelLoader.INPUT_TYPES()["required"]["model_name"][1]
    assert combo["options"] == [trained] and combo["default"] == trained
    with pytest.raises(FileNotFoundError, match="make demo"):
        ToyModelLoader.execute(model_name=trained)
    assert "make demo" in ToyModelLoader.validate_inputs(model_name=trained)  # fails at queue time too

    # What `make demo` does before trained weights exist: a seeded random stand-in.
    assert toymodel.demo_model_file(tmp_path, seed=3) == random
    assert toymodel.read_toy_metadata(tmp_path / random)[1] == {"random": True, "seed": 3}
    save_file({"w": torch.zeros(2)}, tmp_path / "not_toy.safetensors")
    (tmp_path / "notes.txt").write_text("not a model")
    combo = ToyModelLoader.INPUT_TYPES()["required"]["model_name"][1]
    assert combo["options"] == [random] and combo["default"] == random

    assert ToyModelLoader.validate_inputs(model_name=random) is True
    model, clip, vae = ToyModelLoader.execute(model_name=random).args
    assert isinstance(model, comfy.model_patcher.ModelPatcher)
    assert isinstance(clip, comfy.sd.CLIP) and isinstance(vae, comfy.sd.VAE)
    assert encode(clip, PROMPT_A)[0][0].shape == (1, 77, 64)

    with pytest.raises(ValueError, match="not an attention-edit toy"):
        ToyModelLoader.execute(model_name="not_toy.safetensors")
    assert "not an attention-edit toy" in ToyModelLoader.validate_inputs(model_name="not_toy.safetensors")
    with pytest.raises(ValueError, match="file name"):
        ToyModelLoader.execute(model_name="../" + random)

    # Once the trained file is there it is the default, for the node and for the demo.
    (tmp_path / trained).write_bytes((tmp_path / random).read_bytes())
    combo = ToyModelLoader.INPUT_TYPES()["required"]["model_name"][1]
    assert combo["options"] == [random, trained] and combo["default"] == trained
    assert toymodel.demo_model_file(tmp_path) == trained

    before = ToyModelLoader.fingerprint_inputs(model_name=trained)
    os.utime(tmp_path / trained, ns=(1, 1))
    assert ToyModelLoader.fingerprint_inputs(model_name=trained) != before


def test_the_model_module_loads_as_part_of_the_pack_and_is_one_module():
    """The loader node imports toyworld/model.py relative, so ComfyUI loads it as a subpackage of the pack
    (named after its folder): it and toyworld/__init__.py import nothing by this repository's top-level names
    (`attention_edit`, `toyworld`, `engine`, scripts/ ...). Everything else imports it through the registered
    pack: one module object, one ToyConfig class."""
    import ast
    import pathlib

    from toyworld import evaluate
    from toyworld.training import settings

    repo = pathlib.Path(toymodel.__file__).resolve().parents[1]
    own = {p.name for p in repo.iterdir() if p.is_dir()} | {p.stem for p in (repo / "scripts").glob("*.py")}
    own |= {"attention_edit", "tiny"}
    tree = ast.parse(pathlib.Path(toymodel.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and not node.level}
    assert imported and not imported & own, imported & own
    init = ast.parse((repo / "toyworld" / "__init__.py").read_text())
    assert not [node for node in ast.walk(init) if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert toy_loader.load_toy is toymodel.load_toy and evaluate.toymodel is settings.toymodel is toymodel
