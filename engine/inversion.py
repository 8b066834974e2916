"""DDIM inversion in ComfyUI's sigma space.

With x = x0 + sigma * eps, a deterministic DDIM step is an Euler step x' = x + (sigma' - sigma) eps,
so inversion runs it backwards from the clean latent (InversionStepper). The host's model wrapper
turns eps- and v-prediction and SDXL into the same `denoised`, so eps = (x - denoised) / sigma serves
every family alike.

Flow-matching models (Flux, SD3.5: x = (1 - sigma) x0 + sigma eps) take the same step: the host's
samplers use the derivative (x - denoised) / sigma = eps - x0 for them too, which is the flow ODE's
velocity, so the Euler step backwards is the flow ODE's inversion step. What differs is the host's
start: it scales the latent it hands a sampler by (1 - sigma_max) (zero at a full flow schedule), so
the stepper starts from the clean latent itself.
"""

from __future__ import annotations

import logging

import comfy.model_management
import comfy.samplers
import torch

from ..attention.layout import INVERSION, BranchLayout
from .conditioning import conditioning_key
from .contract import EditRunContext, is_unguided, with_run
from .handle import InversionHandle, model_identity
from .patching import UNET, model_family, source_readers, unet_of
from .replay import SourceRecorder, inversion_signatures

log = logging.getLogger("attention_edit")


def schedule(model, scheduler: str, steps: int) -> torch.Tensor:
    """The full sampling schedule (steps + 1 sigmas, descending, ending at 0)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if scheduler not in comfy.samplers.SCHEDULER_NAMES:
        raise ValueError(f"unknown scheduler '{scheduler}', expected one of {comfy.samplers.SCHEDULER_NAMES}")
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu().float()


def inverted_part(sigmas: torch.Tensor, strength: float) -> torch.Tensor:
    """The tail of the schedule a partial (SDEdit-style) inversion covers: round(strength * N) steps.

    N counts the schedule's actual steps (ddim_uniform can give one more than asked when 1000 is not a
    multiple of the step count, as in stock samplers).
    """
    steps = len(sigmas) - 1
    k = max(1, min(steps, round(strength * steps)))
    return sigmas[steps - k:]


# VAE latents of real images stay within a few tens; past this the input is no image latent (and float32
# attention overflows into a flat image long before 1e30).
LATENT_LIMIT = 1e4


def check_latent_fits(model, samples: torch.Tensor) -> None:
    """Channels and size must fit the model, and the latent must be finite and of image scale, before any
    compute."""
    family = model_family(model)
    if not isinstance(samples, torch.Tensor):
        raise ValueError(f"expected a LATENT from VAEEncode or EmptyLatentImage, got {type(samples).__name__}")
    channels = model.model.latent_format.latent_channels
    if samples.dim() != 4:
        raise ValueError(f"expected an image latent of shape (batch, channels, height, width), got {tuple(samples.shape)}")
    if samples.shape[1] != channels:
        raise ValueError(f"the latent has {samples.shape[1]} channels but this model expects {channels}: "
                         f"encode the image with this model's VAE")
    if family == UNET:
        factor = 2 ** (len(getattr(unet_of(model), "channel_mult", [1, 1, 1, 1])) - 1)
    else:  # a DiT's patches
        factor = int(getattr(model.model.diffusion_model, "patch_size", 2))
    h, w = samples.shape[-2:]
    if samples.shape[0] == 0 or h == 0 or w == 0:
        raise ValueError(f"the latent is empty (shape {tuple(samples.shape)}): encode an image with VAEEncode")
    if h % factor or w % factor:
        raise ValueError(f"the latent is {h}x{w} but this model needs sides divisible by {factor} "
                         f"({factor * 8} px): resize or crop the image")
    if not torch.isfinite(samples).all():
        raise ValueError("the latent contains NaN or infinite values")
    peak = float(samples.abs().max())
    if peak > LATENT_LIMIT:
        raise ValueError(f"the latent has values up to {peak:.3g}, far beyond an image latent's (a few tens): "
                         f"connect the LATENT of a VAEEncode or EmptyLatentImage")


class InversionStepper:
    """DDIM run backwards as the host's sampler function; keeps each step's latent and prediction.

    eps at the current point stands in for eps at the next (the usual eps(x_{t+1}) ~ eps(x_t)).
    """

    def __init__(self, sigma_floor: float, predict_noisiest: bool, clean: torch.Tensor | None = None):
        self.sigma_floor, self.predict_noisiest = sigma_floor, predict_noisiest
        self.clean = clean  # the clean latent in model space: where the inversion starts
        self.latents: torch.Tensor | None = None  # (steps + 1, batch, ...), index i at sigmas[i]
        self.eps: torch.Tensor | None = None

    def __call__(self, model_k, x, sigmas, extra_args=None, callback=None, disable=None, **kwargs):
        # kwargs: sampler options a later host may pass; a fixed DDIM step takes none.
        extra_args = extra_args or {}
        n = len(sigmas) - 1
        latents, eps_at = [None] * (n + 1), [None] * (n + 1)
        if self.clean is not None:  # the host scaled it by its noise scaling at sigmas[0] (flow: 1 - sigma)
            x = self.clean.to(x)
        latents[n] = x
        s_in = x.new_ones([x.shape[0]])
        for step, j in enumerate(range(n, 0, -1)):
            # Cancel takes effect here, every step, whatever the host's progress throttling sends.
            comfy.model_management.throw_exception_if_processing_interrupted()
            # The clean latent sits at sigma 0, where eps is undefined: read it at the model's smallest sigma
            # (no edit step evaluates there, so nothing is kept for replay).
            sigma = float(sigmas[j]) if float(sigmas[j]) > 0 else self.sigma_floor
            denoised = model_k(x, sigma * s_in, **extra_args)
            eps_at[j] = (x - denoised) / sigma
            x = x + (float(sigmas[j - 1]) - float(sigmas[j])) * eps_at[j]
            latents[j - 1] = x
            if callback is not None:
                callback({"x": x, "i": step, "sigma": sigmas[j - 1], "sigma_hat": sigmas[j - 1], "denoised": denoised})
        if self.predict_noisiest:
            # One more call at the noisiest latent, where every edit starts: with it the handle holds every
            # prediction a pinned source makes, so edits replay their source from step 0.
            eps_at[0] = (x - model_k(x, float(sigmas[0]) * s_in, **extra_args)) / float(sigmas[0])
        else:
            eps_at[0] = torch.full_like(x, float("nan"))
        device = comfy.model_management.intermediate_device()
        self.latents, self.eps = torch.stack(latents).to(device), torch.stack(eps_at).to(device)
        return x


def invert(model, samples: torch.Tensor, positive: list, negative: list, cfg: float, steps: int, scheduler: str,
           strength: float, callback=None) -> tuple[torch.Tensor, InversionHandle]:
    """Invert a batch of image latents; returns the noisiest latent (VAE latent space) and the handle."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    full = schedule(model, scheduler, steps)
    sigmas = inverted_part(full, strength)
    recorder = SourceRecorder(samples.shape[0])
    attention_signature, options = inversion_signatures(model)
    # A model carrying attention patches (injection, uniform attention) is being set up for edits: keep
    # what they replay. A plain model's inversion costs exactly the stock sampler's model calls.
    stepper = InversionStepper(float(model.get_model_object("model_sampling").sigma_min),
                               predict_noisiest=bool(source_readers(model) or attention_signature),
                               clean=model.model.process_latent_in(samples))
    run = EditRunContext(BranchLayout((INVERSION,), samples.shape[0]), full, recorder=recorder)
    guider = comfy.samplers.CFGGuider(with_run(model, run))
    guider.set_conds(positive, negative if negative is not None else positive)
    guider.set_cfg(cfg)
    noisy = guider.sample(torch.zeros_like(samples), samples, comfy.samplers.KSAMPLER(stepper), sigmas,
                          callback=callback, disable_pbar=True, seed=0)
    kept = recorder.record
    kept.attention_signature, kept.options_signature = attention_signature, options
    kept.chunk_keys = {0: conditioning_key(positive)}
    if not is_unguided(cfg):
        kept.chunk_keys[1] = conditioning_key(negative if negative is not None else positive)
    handle = InversionHandle(latents=stepper.latents, sigmas=sigmas.clone(), eps=stepper.eps, steps=steps,
                             scheduler=scheduler, cfg=cfg, model_key=model_identity(model), record=kept)
    if kept.inputs:
        log.info("inversion kept %.1f MB of source attention inputs for edits to replay", kept.nbytes / 2**20)
    return noisy.to(comfy.model_management.intermediate_device()), handle
