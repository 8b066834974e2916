"""Toy-world training and evaluation: data determinism, ComfyUI-exact objectives, a few-step smoke
run on a shrunken model, the saved file's round trip through ComfyUI's sampling path, and the
scoring on rendered ground truth."""

import numpy as np
import pytest
import torch

from attention_edit.engine.patching import unet_transformer_blocks
from attention_edit.toyworld import model as toymodel
from toyworld import evaluate, scenes
from toyworld.training.attention import sdpa_override
from toyworld.training.data import render_batch, take, train_scenes
from toyworld.training.files import MAX_FILE_BYTES
from toyworld.training.optim import Budget, lr_at
from toyworld.training.settings import TrainSettings, training_config
from toyworld.training.tokens import CaptionTokens
from toyworld.training.unet import LatentPool, UNetTrainer, run_unet_stage, zero_init_residual_outputs
from toyworld.training.vae import VAETrainer, encode_means, run_vae_stage

IMAGE = 64  # the shrunken model works on 64 px images (8x8 latents) to keep the tests fast


def small_config() -> toymodel.ToyConfig:
    config = toymodel.default_config()
    config.image_size = IMAGE
    config.unet.update(image_size=IMAGE // 8, model_channels=32, channel_mult=[1, 2], num_res_blocks=[1, 1],
                       transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1], context_dim=32)
    config.clip.update(hidden_size=32, intermediate_size=64, num_attention_heads=2, projection_dim=32)
    config.vae.update(resolution=IMAGE, ch=32, ch_mult=[1, 1, 1, 1])
    config.validate()
    return config


def small_settings(**overrides) -> TrainSettings:
    values = dict(vae_batch=4, vae_render=32, batch=8, lr=1e-3, warmup_steps=1, pool=16, refresh=2, vae_scale_samples=16)
    values.update(overrides)
    return TrainSettings(**values)


@pytest.fixture(scope="module")
def config():
    return small_config()


@pytest.fixture(scope="module")
def trained_file(tmp_path_factory, config):
    """Both stages for a few steps through the real stage functions; the file they write."""
    out = tmp_path_factory.mktemp("toy") / "toy.safetensors"
    config = small_config()
    settings = small_settings()
    model, clip, vae = toymodel.build_toy(config, seed=0)
    info = {"trained": True, "seed": settings.seed}
    # 4 VAE steps: 3 on 32 px scenes, the last (vae_full_fraction 0.25) on full-size ones.
    info["vae"] = run_vae_stage(config, vae, settings, Budget(None, 4), torch.device("cpu"), log_every=1)
    info["latent_scale_factor"] = config.latent_scale_factor
    run_unet_stage(config, model, clip, vae, settings, Budget(None, 3), torch.device("cpu"), out, info,
                         state_path=out.with_suffix(".state.pt"), log_every=1)
    return out


def test_data_stream_is_deterministic_and_is_the_train_split():
    first = take(train_scenes(3), 25)
    assert first == scenes.make_dataset(3, 25, "train")
    assert all(scenes.caption_split(s.caption) == "train" for s in first)
    assert take(train_scenes(4), 25) != first

    config = small_config()
    _, clip, vae = toymodel.build_toy(config, seed=0)
    tokens = CaptionTokens(clip)

    def draw():
        pool = LatentPool(vae, tokens, train_scenes(5), 6, IMAGE, 0.5, batch=4)
        g = torch.Generator().manual_seed(9)
        pool.refresh(3, g)
        return pool, pool.sample(5, g)

    (pool_a, a), (pool_b, b) = draw(), draw()
    assert pool_a.captions == pool_b.captions and pool_a.scenes_seen == 9
    assert a["captions"] == b["captions"]
    for key in ("latents", "token_ids", "word_index", "word_valid", "coverage"):
        assert torch.equal(a[key], b[key]), key


def test_object_word_tokens_and_coverage_line_up():
    _, clip, _ = toymodel.build_toy(small_config(), seed=0)
    tokens = CaptionTokens(clip)
    caption = "a small blue square on the left and a large green triangle on the right on a beige background"
    ids = tokens.tokens(caption)
    assert len(ids) == 77 and ids[0] == toymodel.CLIP_START
    positions = tokens.object_tokens(caption)
    assert len(positions) == 2
    vocab = {v: k for k, v in clip.tokenizer.clip_l.tokenizer.get_vocab().items()}
    words = [[vocab[ids[p]].replace("</w>", "") for p in obj] for obj in positions]
    assert words == [["small", "blue", "square"], ["large", "green", "triangle"]]


def test_training_objective_is_comfyui_prediction():
    """The trainer's eps prediction is what BaseModel.apply_model (every sampler's call) computes, its text
    context is CLIPTextEncode's, its latents are VAE.encode's."""
    config = small_config()
    model, clip, vae = toymodel.build_toy(config, seed=1)
    trainer = UNetTrainer(model, clip, small_settings())
    caption = scenes.make_dataset(0, 1)[0].caption
    tokens = CaptionTokens(clip)
    with torch.no_grad():
        context = trainer.encode_text([tokens.tokens(caption)])
        reference = evaluate.encode_prompt(clip, caption)[0][0]
        assert torch.allclose(context, reference, atol=1e-5)

        image = scenes.render(scenes.make_dataset(0, 1)[0], IMAGE)[0]
        means = encode_means(vae, image[None])
        assert torch.allclose(means, vae.encode(torch.from_numpy(image[None]).float() / 255.0), atol=1e-5)

        ms = model.model.model_sampling
        x = torch.randn(2, 4, IMAGE // 8, IMAGE // 8, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([10, 700])
        sigma = ms.sigmas[t]
        ctx = context.expand(2, -1, -1)
        eps = trainer.unet(ms.calculate_input(sigma, x), ms.timestep(sigma).float(), context=ctx,
                           transformer_options={"optimized_attention_override": sdpa_override})
        denoised = model.model.apply_model(x, sigma, c_crossattn=ctx)
        assert torch.equal(ms.timestep(sigma), t)
        assert torch.allclose(x - eps * sigma.view(-1, 1, 1, 1), denoised, atol=1e-4)


def test_few_training_steps_reduce_the_losses_on_a_fixed_batch(config):
    model, clip, vae = toymodel.build_toy(config, seed=0)
    zero_init_residual_outputs(model.model.diffusion_model)
    settings = small_settings(caption_dropout=0.0)
    pool = LatentPool(vae, CaptionTokens(clip), train_scenes(0), 4, IMAGE, 1.0)
    batch = pool.sample(4, torch.Generator().manual_seed(0))
    trainer = UNetTrainer(model, clip, settings)
    # The same generator seed every step: the same timesteps and noise, so the batch is fixed.
    losses = [trainer.step(batch, torch.Generator().manual_seed(1), lr=1e-3) for _ in range(20)]
    for key in ("loss", "diffusion", "attn"):
        values = [step[key] for step in losses]
        assert all(np.isfinite(values)), key
        assert np.mean(values[-5:]) < np.mean(values[:5]), (key, values)
    assert trainer.steps == 20

    vae_trainer = VAETrainer(vae, settings)
    images, _ = render_batch(scenes.make_dataset(0, 2), IMAGE)
    images = images[:, 16:48, 16:48]  # fully convolutional: a 32 px crop trains the same way, faster
    vae_losses = [vae_trainer.step(images, torch.Generator().manual_seed(2), lr=1e-3)["mse"] for _ in range(20)]
    assert all(np.isfinite(vae_losses)) and np.mean(vae_losses[-5:]) < np.mean(vae_losses[:5])


def test_ema_swap_round_trips(config):
    model, clip, _ = toymodel.build_toy(config, seed=0)
    trainer = UNetTrainer(model, clip, small_settings())
    live = {k: v.detach().clone() for k, v in trainer._trained_tensors()}
    with torch.no_grad():
        for _, t in trainer._trained_tensors():
            t.add_(1.0)
    trainer.update_ema()
    trainer.swap_ema()
    trainer.swap_ema()
    for name, t in trainer._trained_tensors():
        assert torch.equal(t, live[name] + 1.0)


def test_saved_file_loads_and_generates_through_comfyui(trained_file, config):
    loaded_config, info = toymodel.read_toy_metadata(trained_file)
    assert loaded_config.image_size == IMAGE
    assert loaded_config.latent_scale_factor == pytest.approx(1.0 / info["vae"]["latent_std"])
    assert info["unet"]["steps"] == 3 and info["unet"]["finished"] and info["vae"]["steps"] == 4
    assert np.isfinite(info["unet"]["final"]["loss"]) and np.isfinite(info["vae"]["final"]["loss"])
    model, clip, vae = toymodel.load_toy(trained_file)
    assert model.model.latent_format.scale_factor == pytest.approx(loaded_config.latent_scale_factor)
    settings = evaluate.GenerationSettings(steps=2, batch=2)
    images = evaluate.generate(model, clip, vae, ["a large red circle in the center on a white background"] * 3,
                               settings, IMAGE)
    assert images.shape == (3, IMAGE, IMAGE, 3) and images.dtype == np.uint8
    assert not np.array_equal(images[0], images[1])  # each caption has its own noise
    # Batching does not change a caption's image (beyond float rounding).
    alone = evaluate.generate(model, clip, vae, ["a large red circle in the center on a white background"],
                              evaluate.GenerationSettings(steps=2, batch=1), IMAGE)
    assert np.abs(alone[0].astype(int) - images[0].astype(int)).max() <= 2
    # The model's native size is 64 px here; the full toy size, 128 px (16x16 latents), runs as well.
    full = evaluate.generate(model, clip, vae, ["a small blue square on the left on a black background"],
                             evaluate.GenerationSettings(steps=2), 128)
    assert full.shape == (1, 128, 128, 3)
    assert trained_file.with_suffix(".state.pt").exists()


def test_resume_continues_from_the_state(trained_file, tmp_path):
    config, state_dict = toymodel.load_toy_state_dict(trained_file)
    model, clip, vae = toymodel.build_toy(config, state_dict)
    info = {}
    out = tmp_path / "resumed.safetensors"
    run_unet_stage(config, model, clip, vae, small_settings(), Budget(None, 5), torch.device("cpu"), out, info,
                         state_path=trained_file.with_suffix(".state.pt"), resume=True, log_every=1)
    assert info["unet"]["steps"] == 5  # 3 before, 2 more
    assert toymodel.is_toy_file(out)


def test_scoring_of_rendered_ground_truth_is_perfect():
    held_out = evaluate.held_out_scenes(24)
    assert all(scenes.caption_split(s.caption) == "test" for s in held_out)
    result = evaluate.evaluate_generation(evaluate.rendered_generator(), held_out)
    assert result["gen_attribute_accuracy"] == 1.0
    assert result["object_attribute_rate"] == 1.0 and result["scene_exact_rate"] == 1.0
    assert set(result["per_attribute"]) == {"shape", "colour", "size", "position", "background"}
    # A generator that draws the wrong scenes scores below 1.
    shuffled = evaluate.rendered_generator()(held_out[1:] + held_out[:1])
    assert evaluate.score(held_out, shuffled)["gen_attribute_accuracy"] < 0.8


def test_attention_capture_keeps_the_output_and_measures_concentration(trained_file):
    model, clip, vae = toymodel.load_toy(trained_file)
    capture = evaluate._CrossAttentionCapture()
    patched = evaluate._patched(model, capture)
    x = torch.randn(1, 4, IMAGE // 8, IMAGE // 8, generator=torch.Generator().manual_seed(0))
    sigma = model.model.model_sampling.sigmas[[400]]
    context = evaluate.encode_prompt(clip, "a small red cross on the left on a gray background")[0][0]
    with torch.no_grad():
        plain = model.model.apply_model(x, sigma, c_crossattn=context)
        captured = patched.model.apply_model(x, sigma, c_crossattn=context,
                                             transformer_options=patched.model_options["transformer_options"])
    assert torch.allclose(plain, captured, atol=1e-4)
    assert len(capture.maps) == len(unet_transformer_blocks(model.model.diffusion_model))
    assert all(torch.allclose(m.sum(-1), torch.ones(())) for m in capture.maps)

    result = evaluate.attention_concentration(model, clip, vae, evaluate.held_out_scenes(3), timesteps=(300,),
                                              image_size=IMAGE)
    assert 0.0 <= result["mass_in_mask"] <= 1.0 and 0.0 < result["chance"] < 0.5
    assert {"size", "colour", "shape"} <= set(result)


def test_learning_rate_schedule_and_budget():
    assert lr_at(0.0, 0, 1.0, 10, 0.1) == pytest.approx(0.1)  # warm-up
    assert lr_at(0.0, 20, 1.0, 10, 0.1) == pytest.approx(1.0)
    assert lr_at(0.5, 20, 1.0, 10, 0.1) == pytest.approx(0.55)
    assert lr_at(1.0, 20, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(0.05, 0, 1.0, 1000, 0.0) == pytest.approx(0.5 * (1 + np.cos(np.pi * 0.05)))  # short runs warm up by time
    budget = Budget(None, 10)
    assert budget.progress(5) == 0.5 and not budget.done(9) and budget.done(10)
    timed = Budget(1e-9, None)
    assert timed.done(0)
    timed = Budget(100.0, None)
    timed.start -= 40.0  # 40 s of set-up
    assert timed.restart() >= 40.0 and timed.seconds <= 60.0 and timed.progress(0) < 0.01


def test_training_config_fits_the_file_budget_and_keeps_colour_through_the_vae_norms():
    model, clip, vae = toymodel.build_toy(training_config(), seed=0)
    counts = toymodel.parameter_counts(model, clip, vae)
    assert 2 * counts["total"] + 100_000 < MAX_FILE_BYTES  # float16 weights plus metadata
    # No single-channel GroupNorm groups in the VAE (they would erase flat colours, see TRAIN_VAE).
    norms = [m for m in vae.first_stage_model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_channels // m.num_groups >= 2 for m in norms)


def test_importing_the_trainer_sets_nothing_up():
    """`python -m toyworld.train` sets the host up in its main(); importing toyworld.train (a fresh interpreter)
    loads nothing of ComfyUI, torch or the pack and leaves sys.path and the environment as they were."""
    import os
    import pathlib
    import subprocess
    import sys

    code = ("import os, sys; path, env = list(sys.path), dict(os.environ); import toyworld.train; "
            "assert (sys.path, dict(os.environ)) == (path, env), 'sys.path or the environment changed'; "
            "loaded = {m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'comfy', 'comfy_host', 'attention_edit'}; "
            "assert not loaded, loaded")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    repo = pathlib.Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_finetune_starts_from_the_init_weights_at_a_new_image_size(trained_file, tmp_path):
    """--stage unet --finetune --image-size: the UNet and text encoder are --init's (not re-initialised, not
    zeroed), the VAE too, and the file records the new size; with no steps the weights come back unchanged."""
    from toyworld.training import cli

    out = tmp_path / "fine.safetensors"
    assert cli.main(["--stage", "unet", "--finetune", "--init", str(trained_file), "--image-size", str(2 * IMAGE),
                     "--out", str(out), "--state", str(tmp_path / "state.pt"), "--unet-steps", "0", "--pool", "8",
                     "--refresh", "1", "--minutes", "5"]) == 0
    config, info = toymodel.read_toy_metadata(out)
    assert config.image_size == 2 * IMAGE and config.unet["image_size"] == 2 * IMAGE // 8
    assert info["finetuned_from"] == {"file": str(trained_file), "image_size": IMAGE, "unet": 3}
    _, before = toymodel.load_toy_state_dict(trained_file)
    _, after = toymodel.load_toy_state_dict(out)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(SystemExit, match="multiple of 32"):
        cli.main(["--stage", "unet", "--finetune", "--init", str(trained_file), "--image-size", "100",
                  "--out", str(out), "--unet-steps", "0"])
