"""Train the toy-world text-to-image model (engine/toymodel.py) on rendered toy-world scenes.

    python -m toyworld.train --out models/toyworld.safetensors [--minutes 90] [--device cpu|cuda]
                             [--stage all|vae|unet] [--vae-steps N] [--unet-steps N] [--seed 0]

Two stages, both on scenes of the "train" split only (captions of the held-out "test" split are
never seen; see `toyworld.scenes.caption_split`):

1. **VAE** (`--stage vae`): ComfyUI's `AutoencoderKL` learns to reconstruct rendered scenes (pixels in
   [-1, 1], as ComfyUI's VAE wrapper feeds it): MSE plus a small KL term on the posterior, a sampled
   latent during training; object pixels weigh ``1 + --vae-object-weight`` in the MSE (colours of
   small objects are what the classifier reads, and they are few pixels). Most steps see whole scenes
   rendered at ``--vae-render`` pixels (64: a quarter of the cost of 128, and, unlike crops, the same
   content statistics: ComfyUI's VAE normalises over the whole image), the last
   ``--vae-full-fraction`` of the budget full-size images. Then the std of the latent means of fresh
   scenes sets ``ToyConfig.latent_scale_factor = 1 / std`` (the SD15 latent format's ``process_in``
   scale). The VAE is `TRAIN_VAE`-shaped (64 channels at every level, see there for why).
2. **UNet + text encoder** (`--stage unet`), jointly, with the VAE frozen: eps-prediction MSE over
   ComfyUI's own discrete 1000-step schedule, computed the way `comfy.model_base.BaseModel`
   computes a prediction (``model_sampling.calculate_input`` scales the noisy latent,
   ``model_sampling.timestep(sigma)`` is the timestep the UNet sees, ``noise_scaling`` makes the
   noisy latent), so that ComfyUI's samplers run exactly the model that was trained. The text
   encoder runs through `SDClipModel.forward` on the real CLIP tokenizer's 77 tokens, as
   `CLIPTextEncode` does. Caption dropout to the empty prompt (classifier-free guidance), min-SNR
   loss weighting, AdamW, warm-up then cosine learning rate, gradient clipping, an EMA of the
   weights (the EMA weights are what gets saved), and a token-grounding loss on the
   cross-attention (below).

Data: an unbounded, seeded stream of train-split scenes (`train_scenes`, the same stream as
``scenes.make_dataset(seed, n, "train")``). Rendering is cheap (about 1 ms per scene), encoding
with the VAE is not (15 to 40 ms per image on 2 shared CPU cores), so stage 2 keeps a pool of
encoded scenes (`LatentPool`, `--pool` scenes) and replaces `--refresh` random pool entries with
fresh scenes every step: every batch is drawn from the pool, the pool keeps changing, and over a
run the model sees well over ten thousand distinct scenes for a few percent of the step time.

Grounding loss (`--attn-loss`, TokenCompose-style, Wang et al. 2024): for every caption that was
not dropped, the cross-attention of each object's size, colour and shape tokens in every
cross-attention layer (16x16, 8x8 and 4x4 maps; head-averaged, normalised over pixels) should fall
inside that object's ground-truth coverage; the loss is the mean of ``(1 - mass inside)**2``. The
world gives exact
masks for free, the loss binds attribute words to their object (what two-object captions need) and
makes the object-word attention that the pack's masks read concentrate on the object. Set it to 0
to train on the diffusion loss alone.

Budget: ``--minutes`` is the wall-clock budget of the whole invocation (model building and file
writing aside): with ``--stage all`` the VAE stage's training gets ``--vae-fraction`` of it (its
latent-scale measurement and reconstruction check add about half a minute) and the UNet stage the
rest (its pool encoding included); with a single stage
it is that stage's budget. ``--vae-steps`` / ``--unet-steps`` cap the steps. The learning-rate
schedule follows the progress ``max(step / steps, training time / training budget)`` (the UNet
stage's pool encoding does not count as training time), so a time-limited run still ends on a
decayed learning rate; with step caps that the time budget does not cut short (give a generous
``--minutes``) the run is deterministic for a given seed, device and thread count. CPU threads:
torch's default (all cores), with ``OMP_WAIT_POLICY=PASSIVE`` unless set: on shared cores spinning
OpenMP threads cost up to 10x (``--threads 1`` is the better choice when other jobs keep the
cores busy).

Files: ``--out`` is (re)written as a loadable toy model (fp16, `toymodel.save_toy`) after the VAE
stage and every ``--checkpoint-minutes`` of the UNet stage, so an interrupted run leaves a usable
file; the metadata ``attention_edit_toy_info`` holds the training record (seed, steps, minutes,
losses, latent scale, command). ``--state`` (default ``out/toyworld-train/state.pt``, git-ignored)
holds the fp32 training state for ``--resume`` (``--stage unet --resume``: the weights, EMA,
optimiser, step count and time used; the pool is rebuilt, so a resumed run continues but is not
bit-identical to an uninterrupted one, and ``--minutes`` counts the time already used).
``--stage unet`` takes the VAE (and latent scale) from ``--init`` (default: ``--out``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import pathlib
import platform
import sys
import time
import types
from collections.abc import Iterator, Sequence
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]

# OpenMP threads that spin while waiting stall badly when other processes share the cores (measured
# here: a 20-step test 35 s with spinning, 3.5 s passive, on 2 busy cores). Only effective when this
# module is the first to load torch (the CLI); set OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _setup_host() -> None:
    """The ComfyUI host importable and the pack registered as `attention_edit` (as tests and bench do)."""
    scripts = str(REPO / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    import comfy_host

    comfy_host.add_host_to_path()
    comfy_host.register_pack()


_setup_host()

import comfy.clip_model  # noqa: E402
import comfy.ldm.modules.attention as comfy_attention  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from attention_edit.engine import toymodel  # noqa: E402

from . import scenes  # noqa: E402

log = logging.getLogger("attention_edit.toyworld.train")

DEFAULT_OUT = REPO / "models" / toymodel.TRAINED_FILE_NAME
DEFAULT_STATE = REPO / "out" / "toyworld-train" / "state.pt"
TRAIN_STREAM = 0  # the stream id scenes.make_dataset uses for the "train" split
ATTN_LOSS_MIN_SIDE = 0.25  # the grounding loss reads cross-attention maps down to 1/4 of the latent side (16, 8, 4)
OBJECT_WORD_SLOTS = 3  # size, colour, shape: the words of an object phrase the grounding loss ties to it
MAX_OBJECTS = 2


# --------------------------------------------------------------------------------------------------
# Settings

# The VAE the trainer builds: `toymodel.DEFAULT_VAE` with ch 64 at every level instead of ch 32 at the
# first. ComfyUI's VAE normalises with GroupNorm(32 groups): at 32 channels every group is a single
# channel, so the decoder's last norm_out is an instance norm that erases each channel's spatial mean,
# and a flat-coloured scene's background colour (most of the image) cannot pass through it. Measured
# here, 200 steps at batch 4: held-out reconstruction 15.6 dB / classifier accuracy 0.56 with ch 32,
# 20.4 dB / 0.75 with this. 1.45 M parameters (+0.2 M); the whole file stays under 25 MB.
TRAIN_VAE: dict[str, Any] = {"ch": 64, "ch_mult": [1, 1, 1, 1]}


def training_config() -> toymodel.ToyConfig:
    """The toy model the trainer makes: `toymodel.default_config()` with the `TRAIN_VAE` changes."""
    config = toymodel.default_config()
    config.vae.update(copy.deepcopy(TRAIN_VAE))
    config.validate()
    return config



@dataclasses.dataclass
class TrainSettings:
    """Everything that shapes a run (recorded in the file's info). Defaults are the committed recipe."""

    seed: int = 0
    # stage 1: VAE
    vae_batch: int = 8  # at --vae-render pixels; the full-size phase uses half
    vae_render: int = 64  # pixel size scenes are rendered at for the first part of the VAE steps
    vae_object_weight: float = 4.0  # extra MSE weight of object pixels (by coverage)
    vae_full_fraction: float = 0.25  # the last part of the VAE budget trains on full images
    vae_lr: float = 2e-3
    vae_kl: float = 1e-4  # weight of the mean per-element KL against the mean per-pixel MSE
    vae_scale_samples: int = 256  # scenes whose latent std sets latent_scale_factor
    # stage 2: UNet + text encoder
    batch: int = 32
    lr: float = 5e-4
    clip_lr: float | None = None  # None: same as lr
    weight_decay: float = 0.01
    warmup_steps: int = 200
    min_lr_fraction: float = 0.05  # the cosine ends at lr * this
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    min_snr_gamma: float | None = 5.0  # None: plain eps MSE
    attn_loss: float = 0.02  # weight of the grounding loss; 0 turns it off
    pool: int = 4096  # encoded scenes kept for stage 2
    refresh: int = 2  # pool entries replaced by fresh scenes each step
    zero_init: bool = True  # zero the UNet's residual output layers at the start (openaimodel's zero_module)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# Data


def train_scenes(seed: int) -> Iterator[scenes.Scene]:
    """The unbounded stream of train-split scenes; its first n are ``scenes.make_dataset(seed, n, "train")``."""
    rng = np.random.default_rng([seed, TRAIN_STREAM])
    while True:
        scene = scenes.sample_scene(rng)
        if scenes.caption_split(scene.caption) == "train":
            yield scene


def take(stream: Iterator[scenes.Scene], n: int) -> list[scenes.Scene]:
    return [next(stream) for _ in range(n)]


def render_batch(batch: Sequence[scenes.Scene], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, size, size, 3), coverage float32 (N, MAX_OBJECTS, size, size) in [0, 1])."""
    images = np.empty((len(batch), size, size, 3), dtype=np.uint8)
    coverage = np.zeros((len(batch), MAX_OBJECTS, size, size), dtype=np.float32)
    for i, scene in enumerate(batch):
        image, covers = scenes.render_with_coverage(scene, size)
        images[i] = image
        for j, c in enumerate(covers):
            coverage[i, j] = c.astype(np.float32) / 255.0
    return images, coverage


def to_vae_input(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], what ComfyUI's VAE wrapper feeds AutoencoderKL."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


# --------------------------------------------------------------------------------------------------
# Captions and tokens


class CaptionTokens:
    """Token ids of captions as `CLIPTextEncode` feeds the text encoder, and the positions of object words.

    Cached per caption (the world has about 10^4 captions). ``object_tokens(caption)`` lists, for each
    object of the caption in order, the token positions of its size, colour and shape words.
    """

    def __init__(self, clip):
        self.clip = clip
        self._tokens: dict[str, list[int]] = {}
        self._objects: dict[str, list[list[int]]] = {}
        self._word_tokens: dict[str, int] = {}

    def tokens(self, caption: str) -> list[int]:
        if caption not in self._tokens:
            batches = self.clip.tokenize(caption)[toymodel.CLIP_NAME]
            if len(batches) != 1:
                raise ValueError(f"caption longer than one 77-token chunk: {caption!r}")
            self._tokens[caption] = [int(t) for t, _ in batches[0]]
        return self._tokens[caption]

    def _word_length(self, word: str) -> int:
        if word not in self._word_tokens:
            ids = [int(t) for t, _ in self.clip.tokenize(word)[toymodel.CLIP_NAME][0]]
            self._word_tokens[word] = ids.index(toymodel.CLIP_END) - 1  # between the start and end tokens
        return self._word_tokens[word]

    def object_tokens(self, caption: str) -> list[list[int]]:
        if caption not in self._objects:
            words = caption.split()
            starts, position = [], 1  # token 0 is the start token
            for word in words:
                starts.append(position)
                position += self._word_length(word)
            ids = self.tokens(caption)
            if ids[position] != toymodel.CLIP_END:
                raise ValueError(f"word-by-word tokenisation does not match the caption's: {caption!r}")
            objects = []
            for i in range(len(words) - 3):
                if words[i] == "a" and words[i + 1] in scenes.SIZES and words[i + 2] in scenes.COLOURS \
                        and words[i + 3] in scenes.SHAPES:
                    positions = []
                    for w in (i + 1, i + 2, i + 3):
                        positions += list(range(starts[w], starts[w] + self._word_length(words[w])))
                    objects.append(positions)
            self._objects[caption] = objects
        return self._objects[caption]


# --------------------------------------------------------------------------------------------------
# Models in training form


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
    with torch.no_grad():
        for t in targets:
            t.weight.zero_()
            if t.bias is not None:
                t.bias.zero_()
    return len(targets)


def _sdpa_override(func, *args, **kwargs):
    """transformer_options["optimized_attention_override"]: torch's SDPA in place of the host's CPU
    default (sub-quadratic attention, about 5x slower forward + backward here); the same attention."""
    return comfy_attention.attention_pytorch(*args, **kwargs)


def unet_transformer_keys(unet: torch.nn.Module) -> list[tuple[str, int, int]]:
    """(block name, number, transformer index) of every transformer block, the keys of attn2 replace patches."""
    keys = []
    for name, blocks in (("input", unet.input_blocks), ("middle", [unet.middle_block]), ("output", unet.output_blocks)):
        for number, block in enumerate(blocks):
            for layer in block:
                if hasattr(layer, "transformer_blocks"):
                    keys += [(name, number, j) for j in range(len(layer.transformer_blocks))]
    return keys


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) per head: (B, heads, Nq, Nk) from projected (B, N, heads * d) q and k."""
    b, nq, inner = q.shape
    d = inner // heads
    qh = q.view(b, nq, heads, d).transpose(1, 2)
    kh = k.view(b, -1, heads, d).transpose(1, 2)
    return torch.softmax((qh @ kh.transpose(-1, -2)) * d ** -0.5, dim=-1)


def attend(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """probs (B, heads, Nq, Nk) applied to projected v (B, Nk, heads * d) -> (B, Nq, heads * d)."""
    b, heads, nq, nk = probs.shape
    d = v.shape[-1] // heads
    out = probs @ v.view(b, nk, heads, d).transpose(1, 2)
    return out.transpose(1, 2).reshape(b, nq, heads * d)


class AttentionRecorder:
    """attn2 replace patches that compute cross-attention explicitly and keep the head-averaged
    probabilities (with gradients) of the layers whose maps are at least `min_side` of the latent
    side (all three levels of the toy UNet: 16x16, 8x8, 4x4 at 128 px; the pack's instant mask reads
    1/4 by default), for the grounding loss. Other layers run torch's SDPA."""

    def __init__(self, unet: torch.nn.Module, min_side: float = ATTN_LOSS_MIN_SIDE):
        self.maps: list[torch.Tensor] = []  # (B, h*w, 77) each
        self.keys = unet_transformer_keys(unet)
        self.min_side = min_side

    def patch(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        side, full = extra_options["activations_shape"][-1], extra_options["original_shape"][-1]
        if side < self.min_side * full - 1e-6:
            return comfy_attention.attention_pytorch(q, k, v, heads)
        probs = attention_probabilities(q, k, heads)
        self.maps.append(probs.mean(dim=1))
        return attend(probs, v)

    def patches(self) -> dict:
        return {"attn2": {key: self.patch for key in self.keys}}


def grounding_loss(maps: Sequence[torch.Tensor], coverage: torch.Tensor, token_index: torch.Tensor,
                   token_valid: torch.Tensor) -> torch.Tensor:
    """Mean over layers and valid object words of ``(1 - fraction of the word's attention inside its object)**2``.

    maps: (B, h*w, 77) per layer; coverage: (B, MAX_OBJECTS, H, W) soft masks at latent resolution;
    token_index / token_valid: (B, MAX_OBJECTS, K) token positions and which of them count.
    """
    if not maps or not bool(token_valid.any()):
        return coverage.new_zeros(())
    b, n_obj, k = token_index.shape
    losses = []
    for attn in maps:
        side = int(round(math.sqrt(attn.shape[1])))
        cover = F.adaptive_avg_pool2d(coverage, side).flatten(2)  # (B, n_obj, h*w)
        idx = token_index.reshape(b, 1, n_obj * k).expand(b, attn.shape[1], n_obj * k)
        word_maps = torch.gather(attn, 2, idx).reshape(b, attn.shape[1], n_obj, k).permute(0, 2, 3, 1)  # (B, n_obj, K, hw)
        inside = (word_maps * cover[:, :, None, :]).sum(-1) / word_maps.sum(-1).clamp_min(1e-8)
        losses.append(((1.0 - inside) ** 2)[token_valid])
    return torch.cat(losses).mean()


# --------------------------------------------------------------------------------------------------
# Stage 1: VAE


def vae_posterior(ae: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, logvar) of AutoencoderKL's diagonal Gaussian posterior for x in [-1, 1]."""
    moments = ae.quant_conv(ae.encoder(x))
    mean, logvar = moments.chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)


def vae_decode(ae: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    return ae.decoder(ae.post_quant_conv(z))


def adamw(params, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW, fused where this torch supports it (CPU included since torch 2.4: about 10x faster
    here than the per-parameter loop, which matters with the text encoder's 3.2 M-entry embedding)."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)


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
    from . import classifier

    images, _ = render_batch(scene_list, size)
    latents = vae.encode(torch.from_numpy(images).float() / 255.0)
    decoded = vae.decode(latents).clamp(0, 1)
    rec = (decoded.numpy() * 255.0).round().astype(np.uint8)
    mse = float(np.mean((rec.astype(np.float64) - images.astype(np.float64)) ** 2))
    acc = float(np.mean([classifier.scene_attribute_accuracy(s, r) for s, r in zip(scene_list, rec)]))
    return {"psnr_db": 10.0 * math.log10(255.0 ** 2 / max(mse, 1e-12)), "attribute_accuracy": acc}


# --------------------------------------------------------------------------------------------------
# Stage 2: UNet + text encoder


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
        transformer_options: dict[str, Any] = {"optimized_attention_override": _sdpa_override}
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

    @torch.no_grad()
    def update_ema(self) -> None:
        decay = min(self.settings.ema_decay, (1.0 + self.steps) / (10.0 + self.steps))
        names, live = zip(*[(name, t.detach()) for name, t in self._trained_tensors()])
        torch._foreach_lerp_([self.ema[n] for n in names], list(live), 1.0 - decay)

    @torch.no_grad()
    def swap_ema(self) -> None:
        """Exchange the live weights and the EMA weights (call twice to undo)."""
        for name, t in self._trained_tensors():
            live = t.detach().clone()
            t.data.copy_(self.ema[name])
            self.ema[name].copy_(live)

    def state(self) -> dict[str, Any]:
        return {"unet": self.unet.state_dict(), "text": self.text.state_dict(), "ema": self.ema,
                "optimizer": self.optimizer.state_dict(), "steps": self.steps}

    def load_state(self, state: dict[str, Any]) -> None:
        self.unet.load_state_dict(state["unet"])
        self.text.load_state_dict(state["text"])
        self.ema = {k: v.to(self.device) for k, v in state["ema"].items()}
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = state["steps"]


# --------------------------------------------------------------------------------------------------
# Schedules, budget, files


def lr_at(progress: float, step: int, peak: float, warmup: int, min_fraction: float,
          warmup_progress: float = 0.05) -> float:
    """Linear warm-up, then a cosine from `peak` to ``peak * min_fraction`` over progress 0..1. The
    warm-up ends after `warmup` steps or at `warmup_progress` of the budget, whichever comes first
    (so a short run still reaches the peak)."""
    warm = min(1.0, max((step + 1) / max(1, warmup), progress / warmup_progress if warmup_progress else 0.0))
    cosine = min_fraction + (1.0 - min_fraction) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))
    return peak * warm * cosine


class Budget:
    """Progress of a stage: the larger of steps done / step cap and time used / time budget."""

    def __init__(self, seconds: float | None, steps: int | None):
        if seconds is None and steps is None:
            raise ValueError("a stage needs a time budget or a step count")
        self.seconds, self.steps = seconds, steps
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def progress(self, step: int) -> float:
        p = 0.0
        if self.steps:
            p = max(p, step / self.steps)
        if self.seconds:
            p = max(p, self.elapsed() / self.seconds)
        return p

    def done(self, step: int) -> bool:
        return self.progress(step) >= 1.0

    def restart(self) -> float:
        """Start the clock again with what is left of the time budget (after a set-up); returns the seconds used."""
        used = self.elapsed()
        if self.seconds is not None:
            self.seconds = max(1.0, self.seconds - used)
        self.start = time.perf_counter()
        return used


MAX_FILE_BYTES = 25_000_000  # the repository's budget for models/toyworld.safetensors (issue 8)


def save_model(path, config: toymodel.ToyConfig, model, clip, vae, info: dict[str, Any]) -> None:
    toymodel.save_toy(path, config, model, clip, vae, dtype=torch.float16, info=info)
    size = os.path.getsize(path)
    log.info("wrote %s (%.1f MB)", path, size / 1e6)
    if size > MAX_FILE_BYTES:
        log.warning("%s is %.1f MB, over the %.0f MB budget", path, size / 1e6, MAX_FILE_BYTES / 1e6)


def _environment(device: torch.device) -> dict[str, Any]:
    env = {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
           "machine": platform.machine(), "python": platform.python_version()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


# --------------------------------------------------------------------------------------------------
# Stages


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
            mean = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
            history.append({"step": step, "minutes": round(budget.elapsed() / 60, 2),
                            **{k: round(v, 6) for k, v in mean.items()}})
            log.info("vae step %d  loss %.5f  mse %.5f  kl %.3f  psnr %.1f dB  lr %.2e  %.2f s/step  (%.1f min)",
                     step, mean["loss"], mean["mse"], mean["kl"], mean["psnr_db"], lr, (now - t_last) / len(window),
                     budget.elapsed() / 60)
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


def run_unet_stage(config: toymodel.ToyConfig, model, clip, vae, settings: TrainSettings, budget: Budget,
                   device: torch.device, out: pathlib.Path, info: dict[str, Any], state_path: pathlib.Path | None,
                   resume: bool = False, checkpoint_minutes: float = 10.0, log_every: int = 20) -> dict[str, Any]:
    """Train UNet + text encoder on the frozen VAE's latents; writes `out` periodically and at the end."""
    vae.first_stage_model.to(device)
    for p in vae.first_stage_model.parameters():
        p.requires_grad_(False)
    model.model.latent_format.scale_factor = config.latent_scale_factor
    tokens = CaptionTokens(clip)
    if settings.zero_init and not resume:
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
        state = torch.load(state_path, map_location=device, weights_only=False)
        trainer.load_state(state["trainer"])
        generator.set_state(state["generator"])
        history = state["history"]
        budget.start -= state["seconds"]
        for _ in range(state["scenes_seen"] - pool.scenes_seen):  # the stream where the run left it
            next(pool.stream)
        pool.scenes_seen = state["scenes_seen"]
        log.info("resumed at step %d (%.1f min used)", trainer.steps, state["seconds"] / 60)

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
            state_path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"trainer": trainer.state(), "generator": generator.get_state(), "history": history,
                        "seconds": budget.elapsed(), "scenes_seen": pool.scenes_seen, "config": config.to_dict(),
                        "settings": settings.to_dict()}, str(state_path) + ".tmp")
            os.replace(str(state_path) + ".tmp", state_path)

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
            mean = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
            rate = (now - t_last) / len(window)
            history.append({"step": trainer.steps, "minutes": round(budget.elapsed() / 60, 2), "lr": lr,
                            "s_per_step": round(rate, 4), **{k: round(v, 6) for k, v in mean.items()}})
            log.info("unet step %d  loss %.4f  diffusion %.4f  mse %.4f%s  |g| %.2f  lr %.2e  %.3f s/step (data %.3f)  "
                     "%.1f min, progress %.0f%%", trainer.steps, mean["loss"], mean["diffusion"], mean["mse"],
                     f"  attn {mean['attn']:.4f}" if "attn" in mean else "", mean["grad_norm"], lr, rate,
                     data_seconds / len(window), budget.elapsed() / 60, 100 * budget.progress(trainer.steps))
            window, t_last, data_seconds = [], now, 0.0
        if checkpoint_minutes and time.perf_counter() - t_checkpoint > checkpoint_minutes * 60:
            checkpoint(final=False)
            t_checkpoint = time.perf_counter()
    checkpoint(final=True)
    return info["unet"]


# --------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m toyworld.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TrainSettings()
    p.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="model file (default models/toyworld.safetensors)")
    p.add_argument("--minutes", type=float, default=90.0, help="wall-clock budget of this invocation (see above)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--stage", default="all", choices=("all", "vae", "unet"))
    p.add_argument("--vae-fraction", type=float, default=0.12, help="share of --minutes for the VAE with --stage all")
    p.add_argument("--vae-steps", type=int, default=None, help="cap on VAE steps")
    p.add_argument("--unet-steps", type=int, default=None, help="cap on UNet steps")
    p.add_argument("--init", type=pathlib.Path, default=None, help="--stage unet: file with the trained VAE (default --out)")
    p.add_argument("--state", type=pathlib.Path, default=DEFAULT_STATE, help="fp32 training state for --resume")
    p.add_argument("--resume", action="store_true", help="--stage unet: continue from --state")
    p.add_argument("--checkpoint-minutes", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--log-every", type=int, default=20)
    g = p.add_argument_group("recipe (TrainSettings)")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--vae-batch", type=int, default=d.vae_batch)
    g.add_argument("--vae-render", type=int, default=d.vae_render, help="render size of most VAE steps")
    g.add_argument("--vae-object-weight", type=float, default=d.vae_object_weight)
    g.add_argument("--vae-full-fraction", type=float, default=d.vae_full_fraction)
    g.add_argument("--vae-lr", type=float, default=d.vae_lr)
    g.add_argument("--vae-kl", type=float, default=d.vae_kl)
    g.add_argument("--batch", type=int, default=d.batch)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--clip-lr", type=float, default=d.clip_lr, help="text encoder lr (default: --lr)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    g.add_argument("--ema-decay", type=float, default=d.ema_decay)
    g.add_argument("--caption-dropout", type=float, default=d.caption_dropout)
    g.add_argument("--min-snr-gamma", type=float, default=d.min_snr_gamma, help="0: plain eps MSE")
    g.add_argument("--attn-loss", type=float, default=d.attn_loss, help="grounding-loss weight; 0: off")
    g.add_argument("--pool", type=int, default=d.pool)
    g.add_argument("--refresh", type=int, default=d.refresh)
    g.add_argument("--no-zero-init", action="store_true")
    return p


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainSettings) if hasattr(args, f.name)}
    values["zero_init"] = not args.no_zero_init
    values["min_snr_gamma"] = values.get("min_snr_gamma") or None
    return TrainSettings(**values)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    settings = settings_from_args(args)
    torch.manual_seed(settings.seed)
    total = args.minutes * 60.0
    started = time.perf_counter()
    info: dict[str, Any] = {"trained": True, "seed": settings.seed, "settings": settings.to_dict(),
                            "command": "python -m toyworld.train " + " ".join(sys.argv[1:] if argv is None else argv),
                            "stage": args.stage, "minutes_budget": args.minutes, "environment": _environment(device)}
    log.info("toy-world training: stage %s, %.1f min budget, %s, %d threads", args.stage, args.minutes, device,
             torch.get_num_threads())

    if args.stage in ("all", "vae"):
        config = training_config()
        model, clip, vae = toymodel.build_toy(config, seed=settings.seed)
        vae_seconds = total * (args.vae_fraction if args.stage == "all" else 1.0)
        info["vae"] = run_vae_stage(config, vae, settings, Budget(vae_seconds, args.vae_steps), device, args.log_every)
        info["latent_scale_factor"] = config.latent_scale_factor
        save_model(args.out, config, model, clip, vae, info)  # usable (VAE trained) even if the UNet stage stops
    else:
        init = args.init or args.out
        if not pathlib.Path(init).is_file():
            raise SystemExit(f"--stage unet needs a file with the trained VAE: {init} does not exist (run --stage vae)")
        config, state_dict = toymodel.load_toy_state_dict(init)
        _, init_info = toymodel.read_toy_metadata(init)
        model, clip, vae = toymodel.build_toy(config, seed=settings.seed)
        trained = toymodel.build_toy(config, state_dict)
        vae = trained[2]
        if args.resume:
            model, clip = trained[0], trained[1]
        if "vae" in init_info:
            info["vae"] = init_info["vae"]
        info["latent_scale_factor"] = config.latent_scale_factor
        info["init"] = str(init)

    if args.stage in ("all", "unet"):
        remaining = total - (time.perf_counter() - started)
        if remaining <= 0 and args.unet_steps is None:
            log.warning("no time left for the UNet stage")
            return 0
        budget = Budget(max(remaining, 1.0), args.unet_steps)
        run_unet_stage(config, model, clip, vae, settings, budget, device, args.out, info, args.state,
                       resume=args.resume, checkpoint_minutes=args.checkpoint_minutes, log_every=args.log_every)
    log.info("done in %.1f min -> %s", (time.perf_counter() - started) / 60, args.out)
    print(json.dumps({k: info[k] for k in ("latent_scale_factor",) if k in info}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

