"""The inversion handle: the whole DDIM inversion trajectory, reusable by every later edit."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .patching import unet_of
from .replay import SourceRecord


def model_fingerprint(model) -> tuple:
    """What identifies the denoiser a handle was made with: family, prediction type, weights."""
    unet = unet_of(model)
    base = model.model
    first = unet.input_blocks[0][0].weight
    last = unet.out[-1].weight
    weights = tuple(round(float(w.detach().double().abs().sum()), 4) for w in (first, last))
    return (type(base).__name__, str(getattr(base, "model_type", "")), type(base.latent_format).__name__, weights)


@dataclass
class InversionHandle:
    """Index i of `latents` is the latent at `sigmas[i]` (descending; the last is 0, the input image).

    `eps[i]` is the noise the model predicted at (latents[i], sigmas[i]) (at the model's smallest sigma
    for the clean latent); eps[0] is only evaluated for a model patched for editing, else NaN.
    Latents are in the model's sampling space (after process_latent_in).
    `record` is what the inversion kept for edits to replay their source branch (engine.replay).
    """

    latents: torch.Tensor
    sigmas: torch.Tensor
    eps: torch.Tensor
    steps: int  # steps of the full schedule; a partial inversion covers its last len(sigmas) - 1
    scheduler: str
    strength: float
    cfg: float
    model_key: tuple
    conditioning_key: str
    record: SourceRecord | None = None

    @property
    def inverted_steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def latent_shape(self) -> tuple:
        return tuple(self.latents.shape[1:])

    @property
    def images(self) -> int:
        return self.latents.shape[1]

    def check_model(self, model) -> None:
        if model_fingerprint(model) != self.model_key:
            raise ValueError("this inversion was made with another model: invert the image again with the MODEL "
                             "you sample with (patched clones of the same checkpoint are fine)")

    def check_latent(self, shape) -> None:
        if tuple(shape) != self.latent_shape:
            raise ValueError(f"this inversion is of a latent of shape {self.latent_shape} but the edit has "
                             f"{tuple(shape)}: invert the same image, or use its inversion")

    def check_steps(self, steps: int) -> None:
        if steps != self.steps:
            raise ValueError(f"this inversion used {self.steps} steps but {steps} were asked for: "
                             f"use the same step count (or invert again)")

    def __repr__(self):  # shown in ComfyUI's logs and cache keys: keep it short
        return (f"InversionHandle(images={self.images}, shape={self.latent_shape}, steps={self.steps}, "
                f"inverted={self.inverted_steps}, scheduler={self.scheduler}, cfg={self.cfg}, "
                f"kept={0 if self.record is None else self.record.nbytes / 2**20:.1f} MB)")
