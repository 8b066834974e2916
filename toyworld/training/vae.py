"""Stage 1: the VAE (ComfyUI's AutoencoderKL) learns to reconstruct rendered scenes; then the latent scale."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from attention_edit.toyworld import model as toymodel

from .. import scenes
from .data import render_batch, take, to_vae_input, train_scenes
from .optim import Budget, adamw, lr_at
from .settings import TrainSettings

log = logging.getLogger("attention_edit.toyworld.train")  # one logger for the whole trainer, as before the split


def vae_posterior(ae: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, logvar) of AutoencoderKL's diagonal Gaussian posterior for x in [-1, 1]."""
    moments = ae.quant_conv(ae.encoder(x))
    mean, logvar = moments.chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)


def vae_decode(ae: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    return ae.decoder(ae.post_quant_conv(z))


def init_vae_for_training(ae: torch.nn.Module) -> None:
    """Start from a near-deterministic, local autoencoder: every ResnetBlock's conv2 and the attention
    blocks' proj_out zeroed (residual branches start as identities) and the posterior's log-variance
    bias at -8 (std 0.02), so the decoder is not first swamped by unit-variance sampling noise."""
    from comfy.ldm.modules.diffusionmodules.model import AttnBlock, ResnetBlock

    with torch.no_grad():
        for m in ae.modules():
            if isinstance(m, ResnetBlock):
                m.conv2.weight.zero_()
                m.conv2.bias.zero_()
            elif isinstance(m, AttnBlock):
                m.proj_out.weight.zero_()
                m.proj_out.bias.zero_()
        z = ae.quant_conv.bias.shape[0] // 2
        ae.quant_conv.bias[z:] = -8.0


class VAETrainer:
    """Reconstruction + small-KL training of ComfyUI's AutoencoderKL (the comfy.sd.VAE's first_stage_model)."""

    def __init__(self, vae, settings: TrainSettings, device: torch.device | str = "cpu"):
        self.vae = vae
        self.ae = vae.first_stage_model.to(device)
        self.device = torch.device(device)
        self.settings = settings
        for p in self.ae.parameters():
            p.requires_grad_(True)
        self.optimizer = adamw(list(self.ae.parameters()), lr=settings.vae_lr, weight_decay=0.0, betas=(0.9, 0.99))

    def step(self, images: np.ndarray, generator: torch.Generator, lr: float | None = None,
             objects: np.ndarray | None = None) -> dict[str, float]:
        """One optimiser step on uint8 images (N, H, W, 3); `objects` (N, H, W): object coverage, weighted
        by ``settings.vae_object_weight`` in the reconstruction loss. Returns the losses."""
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        self.ae.train()
        x = to_vae_input(images, self.device)
        mean, logvar = vae_posterior(self.ae, x)
        noise = torch.randn(mean.shape, generator=generator).to(self.device)
        z = mean + torch.exp(0.5 * logvar) * noise
        rec = vae_decode(self.ae, z)
        error = (rec - x).pow(2)
        mse = error.mean()
        if objects is not None and self.settings.vae_object_weight:
            weight = 1.0 + self.settings.vae_object_weight * torch.from_numpy(objects).to(self.device).clamp(0, 1)[:, None]
            reconstruction = (error * weight).mean() / weight.mean()
        else:
            reconstruction = mse
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        loss = reconstruction + self.settings.vae_kl * kl
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.ae.parameters(), 1.0)
        self.optimizer.step()
        self.ae.eval()
        psnr = 10.0 * math.log10(4.0 / max(mse.item(), 1e-12))  # x spans [-1, 1]: peak-to-peak 2
        return {"loss": loss.item(), "mse": mse.item(), "kl": kl.item(), "psnr_db": psnr}


@torch.no_grad()
def encode_means(vae, images: np.ndarray, batch: int = 64) -> torch.Tensor:
    """Latent means (N, 4, h, w) of uint8 images, as ComfyUI's VAE.encode computes them (the posterior's mode)."""
    ae = vae.first_stage_model
    device = next(ae.parameters()).device
    out = []
    for i in range(0, len(images), batch):
        mean, _ = vae_posterior(ae, to_vae_input(images[i:i + batch], device))
        out.append(mean.float().cpu())
    return torch.cat(out)


def measure_latent_std(vae, scene_list: Sequence[scenes.Scene], size: int) -> float:
    images, _ = render_batch(scene_list, size)
    return float(encode_means(vae, images).std())


@torch.no_grad()
def reconstruction_report(vae, scene_list: Sequence[scenes.Scene], size: int) -> dict[str, float]:
    """Through ComfyUI's VAE wrapper (encode -> decode): PSNR and the classifier's attribute accuracy."""
    from .. import classifier

    images, _ = render_batch(scene_list, size)
    latents = vae.encode(torch.from_numpy(images).float() / 255.0)
    decoded = vae.decode(latents).clamp(0, 1)
    rec = (decoded.numpy() * 255.0).round().astype(np.uint8)
    mse = float(np.mean((rec.astype(np.float64) - images.astype(np.float64)) ** 2))
    acc = float(np.mean([classifier.scene_attribute_accuracy(s, r) for s, r in zip(scene_list, rec)]))
    return {"psnr_db": 10.0 * math.log10(255.0 ** 2 / max(mse, 1e-12)), "attribute_accuracy": acc}


def _logged_record(window: list[dict[str, float]], step: int, lr: float, seconds_per_step: float,
                   budget: Budget) -> dict[str, Any]:
    """The history record of the steps since the last one (their mean losses), logged."""
    mean = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
    record = {"step": step, "minutes": round(budget.elapsed() / 60, 2), **{k: round(v, 6) for k, v in mean.items()}}
    log.info("vae step %d  loss %.5f  mse %.5f  kl %.3f  psnr %.1f dB  lr %.2e  %.2f s/step  (%.1f min)",
             step, mean["loss"], mean["mse"], mean["kl"], mean["psnr_db"], lr, seconds_per_step, budget.elapsed() / 60)
    return record


def run_vae_stage(config: toymodel.ToyConfig, vae, settings: TrainSettings, budget: Budget,
                  device: torch.device, log_every: int = 25) -> dict[str, Any]:
    """Train the VAE until the budget is used, then set config.latent_scale_factor. Returns the stage record."""
    init_vae_for_training(vae.first_stage_model)
    trainer = VAETrainer(vae, settings, device)
    generator = torch.Generator().manual_seed(settings.seed * 1000 + 1)
    stream = train_scenes(settings.seed + 1)
    size = config.image_size
    low = min(size, settings.vae_render or size)
    history, window, step, full_phase = [], [], 0, False
    t_last = time.perf_counter()
    while not budget.done(step):
        progress = budget.progress(step)
        if progress < 1.0 - settings.vae_full_fraction or low == size:
            images, coverage = render_batch(take(stream, settings.vae_batch), low)
        else:
            if not full_phase:
                full_phase = True
                log.info("vae: %d px images from step %d; held-out reconstruction so far: %s", size, step,
                         reconstruction_report(vae, scenes.make_dataset(settings.seed, 32, "test"), size))
            images, coverage = render_batch(take(stream, max(1, settings.vae_batch // 2)), size)
        lr = lr_at(progress, step, settings.vae_lr, 20, settings.min_lr_fraction)
        window.append(trainer.step(images, generator, lr, coverage.sum(1)))
        step += 1
        if step % log_every == 0 or budget.done(step):
            now = time.perf_counter()
            history.append(_logged_record(window, step, lr, (now - t_last) / len(window), budget))
            window, t_last = [], now
    for p in trainer.ae.parameters():
        p.requires_grad_(False)
    std = measure_latent_std(vae, take(train_scenes(settings.seed + 2), settings.vae_scale_samples), size)
    config.latent_scale_factor = float(1.0 / std)
    held_out = scenes.make_dataset(settings.seed, 32, "test")
    report = reconstruction_report(vae, held_out, size)
    log.info("vae done: %d steps in %.1f min; latent std %.4f -> latent_scale_factor %.4f; held-out reconstruction "
             "%.1f dB, classifier attribute accuracy %.3f", step, budget.elapsed() / 60, std, config.latent_scale_factor,
             report["psnr_db"], report["attribute_accuracy"])
    return {"steps": step, "minutes": round(budget.elapsed() / 60, 2), "latent_std": std,
            "final": history[-1] if history else None, "history": history[-40:], "held_out_reconstruction": report}
