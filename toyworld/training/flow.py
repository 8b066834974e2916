"""The toy flow world: a Flux-schnell-shaped MM-DiT (`toymodel.FLUX`) trained by rectified flow on the toy
world's latents, over the toy world's frozen text encoder and VAE.

The objective is the one ComfyUI's FLOW sampling inverts: the noisy latent is
``x_sigma = (1 - sigma) x0 + sigma eps`` (`ModelSamplingDiscreteFlow.noise_scaling`), the DiT sees
``timestep(sigma) = sigma`` (shift 1, multiplier 1, as FluxSchnell) and predicts the velocity ``eps - x0``
(``denoised = x - sigma * output``). Sigmas are drawn logit-normal (SD3's recipe, Esser et al. 2024, sec. 3.1).
Captions drop to the empty prompt for classifier-free guidance; EMA weights are saved; a grounding loss on the
double blocks' image->text attention (the same loss as the UNet's, `attention.grounding_loss`) ties each
object's words to the object.
"""

from __future__ import annotations

import contextlib
import logging
import math
import pathlib
import time
from typing import Any

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_management
import torch

from attention_edit.toyworld import model as toymodel

from .attention import grounding_loss
from .data import train_scenes
from .files import save_model
from .optim import Budget, adamw, ema_swap, ema_update, lr_at, zero_layers
from .settings import TrainSettings
from .tokens import CaptionTokens
from .unet import LatentPool

log = logging.getLogger("attention_edit.toyworld.train")

REPO = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_FLOW_OUT = REPO / "models" / toymodel.TRAINED_FLOW_FILE_NAME
DEFAULT_FLOW_INIT = REPO / "models" / toymodel.TRAINED_FILE_NAME


def flow_config(base: toymodel.ToyConfig) -> toymodel.ToyConfig:
    """The toy flow world's config: the toy world's text encoder, VAE and latent scale, a Flux DiT."""
    config = toymodel.ToyConfig.from_dict({**base.to_dict(), "family": toymodel.FLUX})
    config.validate()
    return config


def zero_init_modulations(dit: torch.nn.Module) -> int:
    """adaLN-zero (Peebles & Xie 2023): every modulation and the final layer start at zero, so each block
    starts as the identity. Returns the number of layers zeroed."""
    targets = [dit.final_layer.linear, dit.final_layer.adaLN_modulation[-1]]
    for name, m in dit.named_modules():
        if name.endswith(("_mod.lin", "modulation.lin")):
            targets.append(m)
    return zero_layers(targets)


class JointAttentionRecorder:
    """optimized_attention_override for training: double blocks compute the joint attention explicitly and
    keep the head-averaged image->text probabilities (B, h*w, text tokens) with gradients; the other
    attentions run torch's SDPA."""

    def __init__(self, text_tokens: int):
        self.text_tokens = text_tokens
        self.maps: list[torch.Tensor] = []
        self.recording = False

    def __call__(self, func, q, k, v, heads, *args, transformer_options=None, **kwargs):
        options = transformer_options or {}
        if not (self.recording and options.get("block_type") == "double" and kwargs.get("skip_reshape")):
            return comfy_attention.attention_pytorch(q, k, v, heads, *args, transformer_options=transformer_options,
                                                     **kwargs)
        b, h, n, d = q.shape  # skip_reshape: (batch, heads, tokens, head dim), [txt, img]
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        self.maps.append(probs[:, :, self.text_tokens:, :self.text_tokens].mean(dim=1))
        return (probs @ v).transpose(1, 2).reshape(b, n, h * d)


def _clone_saved(t: torch.Tensor) -> torch.Tensor:
    # The host's Flux blocks add residuals in place (`img += ...`), which autograd rejects once the tensor was
    # saved for backward; a copy of every saved activation keeps the blocks as they are.
    return t if t.is_leaf else t.clone()


@contextlib.contextmanager
def _host_training_mode():
    """0.33.0's `comfy.model_management.in_training`, set while the DiT runs forward: its Flux RoPE then takes the
    differentiable path (the default one is a comfy_kitchen kernel without a backward). 0.3.75 has neither."""
    if not hasattr(comfy.model_management, "in_training"):
        yield
        return
    before = comfy.model_management.in_training
    comfy.model_management.in_training = True
    try:
        yield
    finally:
        comfy.model_management.in_training = before


class FlowTrainer:
    """DiT training on frozen text-encoder outputs, EMA of the DiT weights."""

    def __init__(self, model, clip, settings: TrainSettings, device: torch.device):
        self.model, self.clip, self.settings, self.device = model, clip, settings, device
        self.base = model.model
        self.dit = self.base.diffusion_model.to(device)
        self.model_sampling = self.base.model_sampling.to(device)
        for p in self.dit.parameters():
            p.requires_grad_(True)
        self.text = getattr(clip.cond_stage_model, f"clip_{toymodel.CLIP_NAME}").to(device)
        self.text.requires_grad_(False)
        self.empty_tokens = [int(t) for t, _ in clip.tokenize("")[toymodel.CLIP_NAME][0]]
        self.recorder = JointAttentionRecorder(len(self.empty_tokens))
        decay = [p for p in self.dit.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.dit.parameters() if p.dim() < 2]
        self.optimizer = adamw([{"params": decay, "weight_decay": settings.weight_decay},
                                {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr)
        self.ema = {n: t.detach().clone() for n, t in self.dit.state_dict().items() if t.is_floating_point()}
        self.steps = 0

    @torch.no_grad()
    def encode_text(self, token_lists) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (B, 77, hidden), pooled (B, hidden)) as CLIPTextEncode gives them to the model."""
        context, pooled = self.text([list(t) for t in token_lists])
        return context.float(), pooled.float()

    def loss(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        s = self.settings
        x0 = batch["latents"].to(self.device)
        n = x0.shape[0]
        drop = torch.rand(n, generator=generator) < s.caption_dropout
        tokens = [self.empty_tokens if d else t.tolist() for d, t in zip(drop.tolist(), batch["token_ids"])]
        context, pooled = self.encode_text(tokens)
        sigma = torch.sigmoid(torch.randn(n, generator=generator)).to(self.device)  # logit-normal(0, 1)
        noise = torch.randn(x0.shape, generator=generator).to(self.device)
        x = self.model_sampling.noise_scaling(sigma, noise, x0)
        timestep = self.model_sampling.timestep(sigma).float()
        use_attn = s.attn_loss > 0
        self.recorder.maps, self.recorder.recording = [], use_attn
        options = {"optimized_attention_override": self.recorder}
        with _host_training_mode(), torch.autograd.graph.saved_tensors_hooks(_clone_saved, lambda t: t):
            velocity = self.dit(x, timestep, context, y=pooled, transformer_options=options).float()
        per_sample = (velocity - (noise - x0)).pow(2).mean(dim=(1, 2, 3))
        diffusion = per_sample.mean()
        out = {"diffusion": diffusion, "mse": per_sample.mean().detach()}
        if use_attn:
            valid = batch["word_valid"].to(self.device) & ~drop.to(self.device)[:, None, None]
            out["attn"] = grounding_loss(self.recorder.maps, batch["coverage"].to(self.device),
                                         batch["word_index"].to(self.device), valid)
            out["loss"] = diffusion + s.attn_loss * out["attn"]
        else:
            out["loss"] = diffusion
        self.recorder.maps, self.recorder.recording = [], False
        return out

    def step(self, batch: dict[str, Any], generator: torch.Generator, lr: float) -> dict[str, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.dit.train()
        losses = self.loss(batch, generator)
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.dit.parameters(), self.settings.grad_clip)
        self.optimizer.step()
        self.dit.eval()
        self.steps += 1
        ema_update(self.ema, self.dit.state_dict(), self.settings.ema_decay, self.steps)
        out = {k: float(v.detach()) for k, v in losses.items()}
        out["grad_norm"] = float(grad_norm)
        return out

    def swap_ema(self) -> None:
        ema_swap(self.ema, self.dit.state_dict())


def run_flow_stage(init: pathlib.Path, out: pathlib.Path, settings: TrainSettings, budget: Budget,
                   device: torch.device, info: dict[str, Any], checkpoint_minutes: float = 10.0,
                   log_every: int = 20) -> dict[str, Any]:
    """Train the toy flow world's DiT over the frozen text encoder and VAE of the toy-world file `init`;
    writes `out` periodically and at the end."""
    base_config, state_dict = toymodel.load_toy_state_dict(init)
    if base_config.family != toymodel.UNET:
        raise SystemExit(f"--init {init} must be a toy-world (UNet) file: its text encoder and VAE are reused")
    config = flow_config(base_config)
    parts = toymodel.split_state_dict(state_dict)
    kept = {f"clip.{k}": v for k, v in parts["clip"].items()} | {f"vae.{k}": v for k, v in parts["vae"].items()}
    model, clip, vae = toymodel.build_toy(config, seed=settings.seed)  # a seeded random DiT ...
    dit = {f"dit.{k}": v for k, v in model.model.diffusion_model.state_dict().items()}
    _, clip, vae = toymodel.build_toy(config, {**kept, **dit})  # ... over the trained text encoder and VAE
    if settings.zero_init:
        zero_init_modulations(model.model.diffusion_model)
    vae.first_stage_model.to(device).requires_grad_(False)
    trainer = FlowTrainer(model, clip, settings, device)
    generator = torch.Generator().manual_seed(settings.seed * 1000 + 3)
    t0 = time.perf_counter()
    pool = LatentPool(vae, CaptionTokens(clip), train_scenes(settings.seed), settings.pool, config.image_size,
                      config.latent_scale_factor)
    setup_seconds = budget.restart()
    log.info("pool of %d encoded scenes in %.1f s; DiT %.2f M parameters", len(pool), time.perf_counter() - t0,
             sum(p.numel() for p in trainer.dit.parameters()) / 1e6)
    history: list[dict[str, Any]] = []
    info.update({"family": toymodel.FLUX, "init": str(init), "latent_scale_factor": config.latent_scale_factor})

    def checkpoint(final: bool) -> None:
        info["flow"] = {"steps": trainer.steps, "minutes": round(budget.elapsed() / 60, 2),
                        "setup_minutes": round(setup_seconds / 60, 2), "scenes_seen": pool.scenes_seen,
                        "final": history[-1] if history else None, "history": history[-60:], "finished": final}
        trainer.swap_ema()
        try:
            save_model(out, config, model, clip, vae, info)
        finally:
            trainer.swap_ema()

    window: list[dict[str, float]] = []
    t_last = t_checkpoint = time.perf_counter()
    while not budget.done(trainer.steps):
        lr = lr_at(budget.progress(trainer.steps), trainer.steps, settings.lr, settings.warmup_steps,
                   settings.min_lr_fraction)
        pool.refresh(settings.refresh, generator)
        window.append(trainer.step(pool.sample(settings.batch, generator), generator, lr))
        if trainer.steps % log_every == 0 or budget.done(trainer.steps):
            now = time.perf_counter()
            mean = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
            history.append({"step": trainer.steps, "minutes": round(budget.elapsed() / 60, 2), "lr": lr,
                            "s_per_step": round((now - t_last) / len(window), 4),
                            **{k: round(v, 6) for k, v in mean.items()}})
            log.info("flow step %d  loss %.4f  mse %.4f%s  |g| %.2f  lr %.2e  %.3f s/step  %.1f min",
                     trainer.steps, mean["loss"], mean["mse"],
                     f"  attn {mean['attn']:.4f}" if "attn" in mean else "", mean["grad_norm"], lr,
                     (now - t_last) / len(window), budget.elapsed() / 60)
            window, t_last = [], now
        if checkpoint_minutes and time.perf_counter() - t_checkpoint > checkpoint_minutes * 60:
            checkpoint(final=False)
            t_checkpoint = time.perf_counter()
    checkpoint(final=True)
    return info["flow"]
