"""InstDiffEdit's mask estimation as the paper runs it (arXiv 2401.07709, official code): SDEdit-style.

The image latent is noised with random noise to the sigma of `strength` (0.5: the last half of the
schedule), `samples` times with different noise (one batch, sample-major rows), and denoised with the
target prompt through the host's sampling (CFGGuider, with an LMS or Euler loop of the pack's that owns the
latent). An attn2 capture patch sums the conditional rows' cross-attention
probabilities at the selected low-resolution layers (heads, layers, steps); the samples' maps are averaged
into one mask per image with the official rule (attention/instant_mask.py). After each step the latent
outside the current mask is replaced by the noised original, DiffEdit-style. The final mask then goes to a
stock inpainting pass; the denoised latents are not kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import comfy.k_diffusion.sampling
import comfy.sample
import comfy.samplers
import comfy.utils
import torch

from ..attention.instant_mask import MapAccumulator, WordClasses, attention_probabilities, instant_mask, mean_over_samples
from .contract import AttentionCall
from .inversion import check_latent_fits, schedule
from .patching import add_attention_replace, block_map_sides


def partial_schedule(sigmas: torch.Tensor, strength: float) -> torch.Tensor:
    """The last int(strength * N) steps of the schedule (at least one), as the official code (diffusers'
    img2img: init_timestep = int(N * strength)) runs them: noise is added at the first of their sigmas."""
    steps = len(sigmas) - 1
    k = max(1, min(steps, int(steps * strength + 1e-6)))
    return sigmas[steps - k:]


def capture_layers(model, map_side: float) -> list[tuple[str, int, int]]:
    """The down- and up-block transformer blocks whose maps are `map_side` of the latent side (the paper's
    16x16 layers at 512 px for 0.25); a clear error when there are none."""
    sides = block_map_sides(model)
    chosen = [key for key, side in sides.items() if key[0] in ("input", "output") and abs(side - map_side) < 1e-6]
    if not chosen:
        have = sorted({side for key, side in sides.items() if key[0] in ("input", "output")}, reverse=True)
        raise ValueError(f"no down- or up-block cross-attention layer has maps at {map_side:g} of the latent side; "
                         f"this model's are at {', '.join(f'{s:g}' for s in have) or 'no size'}")
    return chosen


@dataclass
class MaskSettings:
    words: list[list[int]]  # token positions of each prompt word (first CLIP chunk)
    edit_words: list[int] | None = None  # indices into words: the user's named words, else None
    map_side: float = 0.25
    object_similarity: float = 0.9
    background_similarity: float = 0.6
    blur_passes: int = 2
    threshold: float = 0.2
    invert_start: bool = True
    min_object_left: float = 0.0  # see attention.instant_mask.refined_map: 0 keeps the official rule

    def rule(self) -> dict:
        return dict(edit_words=self.edit_words, object_similarity=self.object_similarity,
                    background_similarity=self.background_similarity, blur_passes=self.blur_passes,
                    threshold=self.threshold, invert_start=self.invert_start, min_object_left=self.min_object_left)


@dataclass
class Estimate:
    mask: torch.Tensor  # (images, 1, H, W) binary, latent resolution
    maps: torch.Tensor  # (images, tokens, h, w) mean maps (heads, layers, steps, samples)
    classes: WordClasses  # the word classes of the first step
    steps: int  # sampling steps run


class EstimateRun:
    """One estimation run's state: the running sum of maps and the classes of the first step."""

    def __init__(self, settings: MaskSettings, samples: int, latent_side: tuple[int, int]):
        self.settings, self.samples, self.latent_side = settings, samples, latent_side
        self.accumulator = MapAccumulator()
        self.classes: WordClasses | None = None

    def capture(self, call: AttentionCall, q, k) -> None:
        per = call.rows_per_chunk
        for c, kind in enumerate(call.chunks):
            if kind == 0:  # the conditional (target prompt) rows only, as the official code reads attn[h // 2:]
                rows = slice(c * per, (c + 1) * per)
                self.accumulator.add(attention_probabilities(q[rows], k[rows], call.heads), call.map_hw)

    def mean_maps(self) -> torch.Tensor | None:
        maps = self.accumulator.mean()
        return None if maps is None else mean_over_samples(maps, self.samples)

    def current_mask(self) -> torch.Tensor | None:
        """(images, 1, H, W) from the maps so far (None before the first step); fixes the classes once."""
        maps = self.mean_maps()
        if maps is None:
            return None
        mask, self.classes = instant_mask(maps, self.settings.words, self.latent_side, classes=self.classes,
                                          **self.settings.rule())
        return mask


SAMPLERS = ("lms", "euler")  # the official code's LMS (order 4), or Euler (= deterministic DDIM in sigma space)
LMS_ORDER = 4


def replacing_sampler(run: EstimateRun, model_sampling, x0: torch.Tensor, noise: torch.Tensor, order: int):
    """A sampler function (comfy.samplers.KSAMPLER) that steps like the host's `lms` / `euler` and, after every
    step, puts the noised original outside the current mask into the latent itself, as the paper and the
    official code do (x <- M x + (1 - M) (x_0 + sigma eps), the start's eps). The host's own latent mask
    only masks the model's input, which differs from this wherever the mask grows."""

    def sample(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = {} if extra_args is None else extra_args
        s_in = x.new_ones([x.shape[0]])
        sigmas_cpu = sigmas.detach().cpu().numpy()
        original, eps = x0.to(x), noise.to(x)
        ds: list[torch.Tensor] = []
        for i in range(len(sigmas) - 1):
            denoised = model_k(x, sigmas[i] * s_in, **extra_args)
            ds = (ds + [(x - denoised) / sigmas[i]])[-order:]
            if callback is not None:
                callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
            if sigmas[i + 1] == 0:
                x = denoised
            else:
                coeffs = [comfy.k_diffusion.sampling.linear_multistep_coeff(len(ds), sigmas_cpu, i, j)
                          for j in range(len(ds))] if len(ds) > 1 else [float(sigmas[i + 1] - sigmas[i])]
                x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
            mask = run.current_mask()
            if mask is not None:
                mask = mask.repeat(run.samples, 1, 1, 1).to(x)
                x = mask * x + (1 - mask) * model_sampling.noise_scaling(sigmas[i + 1], eps, original)
        return x

    return sample


def estimate_instant_mask(model, latent: torch.Tensor, positive, negative, settings: MaskSettings,
                          strength: float = 0.5, samples: int = 3, seed: int = 0, steps: int = 50, cfg: float = 7.5,
                          sampler_name: str = "lms", scheduler: str = "normal", callback=None) -> Estimate:
    """The paper's instant mask of each image of `latent` (images, C, H, W), in the model's latent space as
    VAEEncode gives it."""
    check_latent_fits(model, latent)
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    if sampler_name not in SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler_name}', expected one of {', '.join(SAMPLERS)}")
    sigmas = partial_schedule(schedule(model, scheduler, steps), strength)
    layers = set(capture_layers(model, settings.map_side))
    run = EstimateRun(settings, samples, tuple(latent.shape[-2:]))

    def capture_cross_attention(call: AttentionCall, q, k, v, previous, source):
        if call.map_hw is not None:
            run.capture(call, q, k)
        return previous(q, k, v)

    m = model.clone()
    add_attention_replace(m, "attn2", "instant mask estimate", capture_cross_attention, lambda key: key in layers,
                          effect=lambda branch: None)  # reads only

    batch = latent.repeat(samples, 1, 1, 1)  # row s * images + i: noise sample s of image i
    noise = comfy.sample.prepare_noise(batch, seed)
    model_sampling = m.get_model_object("model_sampling")
    x0 = m.model.process_latent_in(batch)  # the image latent in the model's space, as the sampler noises it
    order = LMS_ORDER if sampler_name == "lms" else 1
    sampler = comfy.samplers.KSAMPLER(replacing_sampler(run, model_sampling, x0, noise, order))
    comfy.sample.sample_custom(m, noise, cfg, sampler, sigmas, positive, negative, batch, callback=callback,
                               disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    mask = run.current_mask()
    if mask is None:
        raise ValueError("the sampler ran no model call that read the selected cross-attention layers")
    return Estimate(mask=mask.cpu(), maps=run.mean_maps().cpu(), classes=run.classes, steps=len(sigmas) - 1)
