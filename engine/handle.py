"""The inversion handle: the whole DDIM inversion trajectory, reusable by every later edit."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from .patching import model_family
from .replay import SourceRecord


@dataclass(frozen=True)
class ModelIdentity:
    """What must be the same for an inversion's trajectory and predictions to be a model's own, so that
    pinning and replaying the source are exact (other model options, e.g. FreeU or a wrapper, only make
    the edit recompute the source: engine.replay says which).

    weights: the loaded diffusion model object (another checkpoint, or one differing in any layer, is
    another object); weight_patches: the ModelPatcher's patch set (LoRA, merges, any weight patch renews
    it); sampling: the model sampling's class and sigmas (ModelSamplingDiscrete, v-prediction, zsnr).
    """

    weights: weakref.ref
    weight_patches: str
    sampling: tuple
    family: tuple

    def differences(self, other: ModelIdentity) -> list[str]:
        found = []
        if self.family != other.family:
            found.append(f"the model family ({'/'.join(other.family)} here, {'/'.join(self.family)} inverted)")
        elif self.weights() is None or self.weights() is not other.weights():
            found.append("the checkpoint (another model file, or the inverted one was unloaded and loaded again)")
        if self.weight_patches != other.weight_patches:
            found.append("the weight patches (a LoRA, a model merge or another weight patch added or removed)")
        if self.sampling != other.sampling:
            found.append("the model sampling (e.g. ModelSamplingDiscrete: prediction type, zsnr, sigmas)")
        return found


def model_identity(model) -> ModelIdentity:
    model_family(model)
    base = model.model
    sampling = model.get_model_object("model_sampling")
    sigmas = getattr(sampling, "sigmas", None)
    sigma_key = None if sigmas is None else (len(sigmas), float(sigmas.double().sum()), float(sigmas[0]), float(sigmas[-1]))
    return ModelIdentity(
        weights=weakref.ref(base),
        weight_patches=str(getattr(model, "patches_uuid", "")),
        sampling=(tuple(c.__name__ for c in type(sampling).__mro__), sigma_key),
        family=(type(base).__name__, str(getattr(base, "model_type", "")), type(base.latent_format).__name__))


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
    cfg: float
    model_key: ModelIdentity
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
        differs = self.model_key.differences(model_identity(model))
        if differs:
            raise ValueError(f"this inversion was made with another model; what differs: {'; '.join(differs)}. "
                             f"Invert the image again with the MODEL you sample with (clones of it patched by "
                             f"this pack's attention nodes are fine)")

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
