"""Stage 2: UNet and text encoder, jointly, on the frozen VAE's latents (ComfyUI's eps objective)."""

from __future__ import annotations

import logging
import os
import pathlib
import time
import types
from collections.abc import Iterator, Sequence
from typing import Any

import comfy.clip_model
import numpy as np
import torch
import torch.nn.functional as F

from attention_edit.toyworld import model as toymodel

from .. import scenes
from .attention import AttentionRecorder, grounding_loss, sdpa_override
from .data import MAX_OBJECTS, render_batch, take, train_scenes
from .files import save_model
from .optim import Budget, adamw, ema_swap, ema_update, lr_at, zero_layers
from .settings import TrainSettings
from .tokens import OBJECT_WORD_SLOTS, CaptionTokens
from .vae import encode_means

log = logging.getLogger("attention_edit.toyworld.train")  # one logger for the whole trainer, as before the split


def _clip_layer_forward(self, x, mask=None, optimized_attention=None):
    # comfy.clip_model.CLIPLayer.forward adds in place (x += ...), which autograd cannot differentiate
    # through; this is the same computation out of place.
    x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
    return x + self.mlp(self.layer_norm2(x))


def make_clip_trainable(clip) -> torch.nn.Module:
    """The SDClipModel inside a comfy.sd.CLIP, with gradients on and its layers made autograd-safe."""
    module = getattr(clip.cond_stage_model, f"clip_{toymodel.CLIP_NAME}")
    for m in module.modules():
        if isinstance(m, comfy.clip_model.CLIPLayer):
            m.forward = types.MethodType(_clip_layer_forward, m)
    for p in module.parameters():
        p.requires_grad_(True)
    return module


def zero_init_residual_outputs(unet: torch.nn.Module) -> int:
    """Zero what openaimodel's reference init zeroes (ComfyUI builds without it): every ResBlock's last
    conv, every SpatialTransformer's proj_out and the UNet's output conv. Returns the module count."""
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    targets = [unet.out[-1]]
    for m in unet.modules():
        if isinstance(m, ResBlock):
            targets.append(m.out_layers[-1])
        elif isinstance(m, SpatialTransformer):
            targets.append(m.proj_out)
    return zero_layers(targets)


class LatentPool:
    """Encoded train scenes for the UNet stage: latents already scaled into the model's space
    (``latent_format.process_in``), token ids, object-word token positions and latent-size coverage.

    Deterministic: the scenes come from `train_scenes(seed)` in order, the refresh slots from `generator`.
    """

    def __init__(self, vae, tokens: CaptionTokens, stream: Iterator[scenes.Scene], size: int, image_size: int,
                 scale: float, batch: int = 256):
        self.vae, self.tokens, self.stream = vae, tokens, stream
        self.image_size, self.scale = image_size, scale
        self.latent_size = image_size // 8
        self.captions: list[str] = []
        self.latents = torch.empty(size, 4, self.latent_size, self.latent_size)
        self.token_ids = torch.empty(size, 77, dtype=torch.long)
        self.word_index = torch.zeros(size, MAX_OBJECTS, OBJECT_WORD_SLOTS, dtype=torch.long)
        self.word_valid = torch.zeros(size, MAX_OBJECTS, OBJECT_WORD_SLOTS, dtype=torch.bool)
        self.coverage = torch.zeros(size, MAX_OBJECTS, self.latent_size, self.latent_size)
        self.scenes_seen = 0
        for start in range(0, size, batch):
            self._fill(list(range(start, min(size, start + batch))))

    def __len__(self) -> int:
        return self.latents.shape[0]

    def _fill(self, slots: Sequence[int]) -> None:
        batch = take(self.stream, len(slots))
        self.scenes_seen += len(batch)
        images, coverage = render_batch(batch, self.image_size)
        latents = encode_means(self.vae, images) * self.scale
        coverage = F.adaptive_avg_pool2d(torch.from_numpy(coverage), self.latent_size)
        for j, (slot, scene) in enumerate(zip(slots, batch)):
            if slot < len(self.captions):
                self.captions[slot] = scene.caption
            else:
                self.captions.append(scene.caption)
            self.latents[slot] = latents[j]
            self.token_ids[slot] = torch.tensor(self.tokens.tokens(scene.caption))
            self.coverage[slot] = coverage[j]
            self.word_index[slot] = 0
            self.word_valid[slot] = False
            for o, positions in enumerate(self.tokens.object_tokens(scene.caption)[:MAX_OBJECTS]):
                positions = positions[:OBJECT_WORD_SLOTS]
                self.word_index[slot, o, :len(positions)] = torch.tensor(positions)
                self.word_valid[slot, o, :len(positions)] = True

    def refresh(self, n: int, generator: torch.Generator) -> None:
        if n > 0:
            self._fill(torch.randperm(len(self), generator=generator)[:n].tolist())

    def sample(self, n: int, generator: torch.Generator) -> dict[str, Any]:
        idx = torch.randint(0, len(self), (n,), generator=generator)
        return {"latents": self.latents[idx], "token_ids": self.token_ids[idx], "captions": [self.captions[i] for i in idx],
                "word_index": self.word_index[idx], "word_valid": self.word_valid[idx], "coverage": self.coverage[idx]}


class UNetTrainer:
    """Joint UNet + text-encoder training with an EMA of both; the diffusion loss is ComfyUI's eps objective."""

    def __init__(self, model, clip, settings: TrainSettings, device: torch.device | str = "cpu",
                 empty_tokens: Sequence[int] | None = None):
        self.model, self.clip, self.settings = model, clip, settings
        self.device = torch.device(device)
        self.base = model.model  # comfy.model_base.BaseModel
        self.unet = self.base.diffusion_model.to(self.device)
        self.text = make_clip_trainable(clip).to(self.device)
        self.model_sampling = self.base.model_sampling.to(self.device)
        for p in self.unet.parameters():
            p.requires_grad_(True)
        self.empty_tokens = list(empty_tokens) if empty_tokens is not None else \
            [int(t) for t, _ in clip.tokenize("")[toymodel.CLIP_NAME][0]]
        self.recorder = AttentionRecorder(self.unet)
        decay, no_decay = [], []
        for module in (self.unet, self.text):
            for name, p in module.named_parameters():
                (decay if p.dim() >= 2 and "embedding" not in name else no_decay).append(p)
        text_ids = {id(p) for p in self.text.parameters()}
        groups = []
        for params, wd in ((decay, settings.weight_decay), (no_decay, 0.0)):
            for is_text in (False, True):
                chosen = [p for p in params if (id(p) in text_ids) == is_text]
                if chosen:
                    groups.append({"params": chosen, "weight_decay": wd, "text": is_text})
        self.optimizer = adamw(groups, lr=settings.lr)
        self.ema = {name: t.detach().clone() for name, t in self._trained_tensors()}
        self.steps = 0

    def _trained_tensors(self):
        for prefix, module in (("unet.", self.unet), ("text.", self.text)):
            for name, t in module.state_dict(keep_vars=True).items():
                if t.is_floating_point():
                    yield prefix + name, t

    def set_lr(self, lr: float) -> None:
        clip_lr = lr if self.settings.clip_lr is None else lr * self.settings.clip_lr / self.settings.lr
        for group in self.optimizer.param_groups:
            group["lr"] = clip_lr if group["text"] else lr

    def encode_text(self, token_lists: Sequence[Sequence[int]]) -> torch.Tensor:
        """(B, 77, hidden): SDClipModel.forward, as CLIPTextEncode runs it (layer "last", final layer norm)."""
        context, _ = self.text([list(t) for t in token_lists])
        return context

    def loss(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        s = self.settings
        x0 = batch["latents"].to(self.device)
        n = x0.shape[0]
        drop = torch.rand(n, generator=generator) < s.caption_dropout
        token_lists = [self.empty_tokens if d else t.tolist() for d, t in zip(drop.tolist(), batch["token_ids"])]
        context = self.encode_text(token_lists)

        # ComfyUI's discrete schedule: sigma_t = sqrt((1 - abar_t) / abar_t); the noisy latent is
        # x0 + sigma * eps (EPS.noise_scaling), the UNet sees calculate_input(sigma, x) = x / sqrt(sigma^2 + 1)
        # at timestep(sigma) = t, exactly as BaseModel._apply_model feeds it.
        t = torch.randint(0, self.model_sampling.num_timesteps, (n,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator).to(self.device)
        sigma = self.model_sampling.sigmas.to(self.device)[t.to(self.device)]
        x = self.model_sampling.noise_scaling(sigma, noise, x0)
        xc = self.model_sampling.calculate_input(sigma, x)
        timestep = self.model_sampling.timestep(sigma).float()

        use_attn = s.attn_loss > 0
        transformer_options: dict[str, Any] = {"optimized_attention_override": sdpa_override}
        if use_attn:
            self.recorder.maps = []
            transformer_options["patches_replace"] = self.recorder.patches()
        eps = self.unet(xc, timestep, context=context, transformer_options=transformer_options).float()

        per_sample = (eps - noise).pow(2).mean(dim=(1, 2, 3))
        if s.min_snr_gamma:
            snr = sigma.pow(-2)
            weight = snr.clamp(max=s.min_snr_gamma) / snr
        else:
            weight = torch.ones_like(per_sample)
        diffusion = (per_sample * weight).mean()
        out = {"diffusion": diffusion, "mse": per_sample.mean().detach()}
        if use_attn:
            valid = batch["word_valid"].to(self.device) & ~drop.to(self.device)[:, None, None]
            attn = grounding_loss(self.recorder.maps, batch["coverage"].to(self.device),
                                  batch["word_index"].to(self.device), valid)
            self.recorder.maps = []
            out["attn"] = attn
            out["loss"] = diffusion + s.attn_loss * attn
        else:
            out["loss"] = diffusion
        return out

    def step(self, batch: dict[str, Any], generator: torch.Generator, lr: float | None = None) -> dict[str, float]:
        if lr is not None:
            self.set_lr(lr)
        self.unet.train()
        self.text.train()
        losses = self.loss(batch, generator)
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.settings.grad_clip)
        self.optimizer.step()
        self.unet.eval()
        self.text.eval()
        self.steps += 1
        self.update_ema()
        out = {k: float(v.detach()) for k, v in losses.items()}
        out["grad_norm"] = float(grad_norm)
        return out

    def update_ema(self) -> None:
        ema_update(self.ema, dict(self._trained_tensors()), self.settings.ema_decay, self.steps)

    def swap_ema(self) -> None:
        """Exchange the live weights and the EMA weights (call twice to undo)."""
        ema_swap(self.ema, dict(self._trained_tensors()))

    def state(self) -> dict[str, Any]:
        return {"unet": self.unet.state_dict(), "text": self.text.state_dict(), "ema": self.ema,
                "optimizer": self.optimizer.state_dict(), "steps": self.steps}

    def load_state(self, state: dict[str, Any]) -> None:
        self.unet.load_state_dict(state["unet"])
        self.text.load_state_dict(state["text"])
        self.ema = {k: v.to(self.device) for k, v in state["ema"].items()}
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = state["steps"]


def _resume(state_path: pathlib.Path, device: torch.device, trainer: UNetTrainer, generator: torch.Generator,
            budget: Budget, pool: LatentPool) -> list[dict[str, Any]]:
    """Continue from the training state: weights, EMA, optimiser, generator, time used and the scene stream
    where the run left it. Returns the run's history so far."""
    state = torch.load(state_path, map_location=device, weights_only=False)
    trainer.load_state(state["trainer"])
    generator.set_state(state["generator"])
    budget.start -= state["seconds"]
    for _ in range(state["scenes_seen"] - pool.scenes_seen):  # the stream where the run left it
        next(pool.stream)
    pool.scenes_seen = state["scenes_seen"]
    log.info("resumed at step %d (%.1f min used)", trainer.steps, state["seconds"] / 60)
    return state["history"]


def _save_state(state_path: pathlib.Path, trainer: UNetTrainer, generator: torch.Generator, history: list[dict[str, Any]],
                budget: Budget, pool: LatentPool, config: toymodel.ToyConfig, settings: TrainSettings) -> None:
    """The fp32 training state for --resume (written to a temporary file, then moved into place)."""
    state_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"trainer": trainer.state(), "generator": generator.get_state(), "history": history,
                "seconds": budget.elapsed(), "scenes_seen": pool.scenes_seen, "config": config.to_dict(),
                "settings": settings.to_dict()}, str(state_path) + ".tmp")
    os.replace(str(state_path) + ".tmp", state_path)


def _logged_record(window: list[dict[str, float]], steps: int, lr: float, seconds_per_step: float, data_seconds: float,
                   budget: Budget) -> dict[str, Any]:
    """The history record of the steps since the last one (their mean losses), logged."""
    mean = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
    record = {"step": steps, "minutes": round(budget.elapsed() / 60, 2), "lr": lr,
              "s_per_step": round(seconds_per_step, 4), **{k: round(v, 6) for k, v in mean.items()}}
    log.info("unet step %d  loss %.4f  diffusion %.4f  mse %.4f%s  |g| %.2f  lr %.2e  %.3f s/step (data %.3f)  "
             "%.1f min, progress %.0f%%", steps, mean["loss"], mean["diffusion"], mean["mse"],
             f"  attn {mean['attn']:.4f}" if "attn" in mean else "", mean["grad_norm"], lr, seconds_per_step,
             data_seconds / len(window), budget.elapsed() / 60, 100 * budget.progress(steps))
    return record


def run_unet_stage(config: toymodel.ToyConfig, model, clip, vae, settings: TrainSettings, budget: Budget,
                   device: torch.device, out: pathlib.Path, info: dict[str, Any], state_path: pathlib.Path | None,
                   resume: bool = False, checkpoint_minutes: float = 10.0, log_every: int = 20,
                   finetune: bool = False) -> dict[str, Any]:
    """Train UNet + text encoder on the frozen VAE's latents; writes `out` periodically and at the end."""
    vae.first_stage_model.to(device)
    for p in vae.first_stage_model.parameters():
        p.requires_grad_(False)
    model.model.latent_format.scale_factor = config.latent_scale_factor
    tokens = CaptionTokens(clip)
    if settings.zero_init and not (resume or finetune):  # zeroing trained weights would undo them
        zero_init_residual_outputs(model.model.diffusion_model)
    trainer = UNetTrainer(model, clip, settings, device)
    generator = torch.Generator().manual_seed(settings.seed * 1000 + 2)
    t0 = time.perf_counter()
    pool = LatentPool(vae, tokens, train_scenes(settings.seed), settings.pool, config.image_size, config.latent_scale_factor)
    setup_seconds = budget.restart()  # the schedule's progress counts training time only
    log.info("pool of %d encoded scenes in %.1f s (%d distinct captions); %s left for training", len(pool),
             time.perf_counter() - t0, len(set(pool.captions)),
             "no time limit" if budget.seconds is None else f"{budget.seconds / 60:.1f} min")
    history: list[dict[str, Any]] = []
    if resume and state_path is not None and state_path.exists():
        history = _resume(state_path, device, trainer, generator, budget, pool)

    def checkpoint(final: bool) -> None:
        record = {"steps": trainer.steps, "minutes": round(budget.elapsed() / 60, 2),
                  "setup_minutes": round(setup_seconds / 60, 2), "scenes_seen": pool.scenes_seen,
                  "final": history[-1] if history else None, "history": history[-60:], "finished": final}
        info["unet"] = record
        trainer.swap_ema()
        try:
            save_model(out, config, model, clip, vae, info)
        finally:
            trainer.swap_ema()
        if state_path is not None:
            _save_state(state_path, trainer, generator, history, budget, pool, config, settings)

    window: list[dict[str, float]] = []
    t_last, t_checkpoint = time.perf_counter(), time.perf_counter()
    data_seconds = 0.0
    while not budget.done(trainer.steps):
        progress = budget.progress(trainer.steps)
        lr = lr_at(progress, trainer.steps, settings.lr, settings.warmup_steps, settings.min_lr_fraction)
        t_data = time.perf_counter()
        pool.refresh(settings.refresh, generator)
        batch = pool.sample(settings.batch, generator)
        data_seconds += time.perf_counter() - t_data
        window.append(trainer.step(batch, generator, lr))
        if trainer.steps % log_every == 0 or budget.done(trainer.steps):
            now = time.perf_counter()
            history.append(_logged_record(window, trainer.steps, lr, (now - t_last) / len(window), data_seconds, budget))
            window, t_last, data_seconds = [], now, 0.0
        if checkpoint_minutes and time.perf_counter() - t_checkpoint > checkpoint_minutes * 60:
            checkpoint(final=False)
            t_checkpoint = time.perf_counter()
    checkpoint(final=True)
    return info["unet"]
