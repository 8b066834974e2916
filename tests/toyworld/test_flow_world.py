"""The toy flow world: a Flux-shaped DiT built through the host's Flux classes over the toy text encoder and VAE,
its file round trip and loader, and its trainer's rectified-flow objective."""

import math

import comfy.latent_formats
import comfy.ldm.modules.attention as comfy_attention
import comfy.model_base
import comfy.model_management
import nodes as comfy_nodes
import pytest
import torch

from attention_edit.engine.dit import FLUX, dit_blocks, dit_family
from attention_edit.nodes import toy_loader
from attention_edit.toyworld import model as toymodel
from attention_edit.toyworld.training import flow
from attention_edit.toyworld.training.settings import TrainSettings, training_config

PROMPT = "a large red circle in the center on a white background"


@pytest.fixture(scope="module")
def config():
    return flow.flow_config(training_config())


@pytest.fixture(scope="module")
def toy(config):
    return toymodel.build_toy(config, seed=0)


def velocity(model, x, sigma, context, pooled):
    with torch.no_grad():
        return model.model.apply_model(x, sigma, c_crossattn=context, y=pooled)


def conditioning(clip, text=PROMPT):
    cond = comfy_nodes.CLIPTextEncode().encode(clip, text)[0]
    return cond[0][0], cond[0][1]["pooled_output"]


def test_the_flow_world_is_a_flux_schnell_shaped_model_on_the_toy_latents(toy, config):
    model, clip, vae = toy
    assert isinstance(model.model, comfy.model_base.Flux) and dit_family(model) == FLUX
    assert model.model.model_type == comfy.model_base.ModelType.FLOW
    assert isinstance(model.model.latent_format, comfy.latent_formats.SD15)
    assert model.model.latent_format.latent_channels == vae.latent_channels == 4
    kinds = [b.kind for b in dit_blocks(model)]
    assert kinds == ["double"] * config.flux["depth"] + ["single"] * config.flux["depth_single_blocks"]
    assert not config.flux["guidance_embed"]  # real cfg, as Flux schnell's family samples without distilled guidance
    context, pooled = conditioning(clip)
    assert context.shape == (1, 77, 64) and pooled.shape == (1, 64)
    out = velocity(model, torch.randn(1, 4, 16, 16), torch.tensor([0.5]), context, pooled)
    assert out.shape == (1, 4, 16, 16) and torch.isfinite(out).all()


def test_a_flow_file_round_trips_and_the_loader_lists_it(toy, config, tmp_path, monkeypatch):
    model, clip, vae = toy
    path = tmp_path / "flow.safetensors"
    toymodel.save_toy(path, config, model, clip, vae, dtype=torch.float32, info={"random": True})
    loaded_config, state = toymodel.load_toy_state_dict(path)
    assert loaded_config.family == toymodel.FLUX
    assert {k.split(".", 1)[0] for k in state} == {"dit", "clip", "vae"}
    again = toymodel.load_toy(path)
    g = torch.Generator().manual_seed(3)
    x, context, pooled = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 64, generator=g), \
        torch.randn(1, 64, generator=g)
    assert torch.equal(velocity(model, x, torch.tensor([0.3]), context, pooled),
                       velocity(again[0], x, torch.tensor([0.3]), context, pooled))
    monkeypatch.setattr(toy_loader, "MODELS_DIR", tmp_path)
    assert toy_loader.toy_model_files() == ["flow.safetensors"]


def test_a_flow_config_rejects_a_text_width_the_dit_does_not_take(config):
    bad = config.to_dict()
    bad["flux"]["context_in_dim"] = 32
    with pytest.raises(ValueError, match="context_in_dim"):
        toymodel.ToyConfig.from_dict(bad)
    bad = config.to_dict()
    bad["flux"]["axes_dim"] = [4, 4, 4]
    with pytest.raises(ValueError, match="axes_dim"):
        toymodel.ToyConfig.from_dict(bad)


def test_the_training_target_is_what_comfyui_turns_into_the_clean_latent(toy):
    # The trainer's noisy latent is the host's FLOW noise_scaling and its target the velocity eps - x0: the
    # host's calculate_denoised (x - sigma * output) must then give back x0 exactly, at every sigma.
    model = toy[0]
    sampling = model.model.model_sampling
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 4, 16, 16, generator=g), torch.randn(4, 4, 16, 16, generator=g)
    sigma = torch.tensor([0.05, 0.3, 0.7, 1.0])
    x = sampling.noise_scaling(sigma, eps, x0)
    assert torch.allclose(x, (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * eps, atol=1e-6)
    assert torch.equal(sampling.timestep(sigma), sigma)  # shift 1, multiplier 1: the DiT sees sigma itself
    denoised = sampling.calculate_denoised(sigma, eps - x0, x)
    assert torch.allclose(denoised, x0, atol=1e-5)


def test_the_recorder_computes_the_host_attention_and_keeps_image_to_text_maps():
    g = torch.Generator().manual_seed(1)
    b, heads, txt, img, d = 2, 4, 5, 9, 8
    q, k, v = (torch.randn(b, heads, txt + img, d, generator=g) for _ in range(3))
    recorder = flow.JointAttentionRecorder(txt)
    recorder.recording = True
    options = {"block_type": "double"}
    out = recorder(None, q, k, v, heads, skip_reshape=True, transformer_options=options)
    expected = comfy_attention.attention_pytorch(q, k, v, heads, skip_reshape=True)
    assert torch.allclose(out, expected, atol=1e-5)
    (maps,) = recorder.maps
    # The same probabilities written plainly: one query row at a time, explicit softmax over all keys.
    q64, k64 = q.double(), k.double()
    for i in range(img):
        row = (q64[:, :, txt + i, None, :] * k64).sum(-1) / math.sqrt(d)  # (b, heads, keys)
        probs = torch.exp(row - row.amax(-1, keepdim=True))
        probs = probs / probs.sum(-1, keepdim=True)
        assert torch.allclose(maps[:, i].double(), probs[..., :txt].mean(1), atol=1e-6)
    recorder.maps, recorder.recording = [], True
    recorder(None, q, k, v, heads, skip_reshape=True, transformer_options={"block_type": "single"})
    assert recorder.maps == []  # single blocks are not recorded


def test_a_few_flow_steps_lower_the_loss_on_a_fixed_batch(config):
    model, clip, vae = toymodel.build_toy(config, seed=0)
    flow.zero_init_modulations(model.model.diffusion_model)
    settings = TrainSettings(batch=4, lr=2e-3, warmup_steps=1, attn_loss=0.02, caption_dropout=0.0)
    trainer = flow.FlowTrainer(model, clip, settings, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    empty = trainer.empty_tokens
    batch = {"latents": torch.randn(4, 4, 16, 16, generator=g), "token_ids": torch.tensor([empty] * 4),
             "word_index": torch.ones(4, 2, 3, dtype=torch.long), "word_valid": torch.ones(4, 2, 3, dtype=torch.bool),
             "coverage": torch.rand(4, 2, 16, 16, generator=g)}

    def fixed_loss():
        with torch.no_grad():
            return float(trainer.loss(batch, torch.Generator().manual_seed(5))["diffusion"])

    before = fixed_loss()
    for _ in range(15):
        record = trainer.step(batch, torch.Generator().manual_seed(5), settings.lr)
        assert math.isfinite(record["loss"]) and "attn" in record
    assert fixed_loss() < 0.9 * before
    assert not getattr(comfy.model_management, "in_training", False)  # the host's flag: only around the forward
    snapshot = {k: v.clone() for k, v in trainer.dit.state_dict().items()}
    trainer.swap_ema()
    trainer.swap_ema()
    assert all(torch.equal(snapshot[k], v) for k, v in trainer.dit.state_dict().items())


def test_a_flow_file_written_by_the_other_host_loads(toy, config, tmp_path):
    # Flux's RMS q/k-norm gain is `...norm.scale` in ComfyUI 0.3.75 and `...norm.weight` in 0.33.0: a file
    # written on either host must load on both (the committed toy flow world was trained on one of them).
    from safetensors import safe_open
    from safetensors.torch import save_file

    model, clip, vae = toy
    path = tmp_path / "here.safetensors"
    toymodel.save_toy(path, config, model, clip, vae, dtype=torch.float32)
    with safe_open(str(path), framework="pt") as f:
        metadata, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    norms = [k for k in state if k.startswith("dit.") and ("query_norm" in k or "key_norm" in k)]
    assert norms and all(k.endswith((".scale", ".weight")) for k in norms)
    other = {}
    for k, v in state.items():
        if k in norms:
            k = k[:-len(".scale")] + ".weight" if k.endswith(".scale") else k[:-len(".weight")] + ".scale"
        other[k] = v
    save_file(other, str(tmp_path / "other.safetensors"), metadata=metadata)
    again = toymodel.load_toy(tmp_path / "other.safetensors")
    g = torch.Generator().manual_seed(4)
    x, context, pooled = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 64, generator=g), \
        torch.randn(1, 64, generator=g)
    assert torch.equal(velocity(model, x, torch.tensor([0.6]), context, pooled),
                       velocity(again[0], x, torch.tensor([0.6]), context, pooled))
