"""UAM's adaptive mask blending (arXiv 2411.19652) as a mask strategy for the branch sampler.

While t < T_mask, with M the edit region (attention/masks.py adaptive_mask):
    target x0 = M * x0_tgt + (1 - M) * x0_aux            (Algorithm 1 line 17)
    source x0 = M * x0_aux + (1 - M) * x0_src            (line 18, the "red line", on in the official code)
and every branch then steps from its blended x0 with its own predicted noise (the branch sampler:
engine/branches.py). Which latents the branches start from is the recipe's (the Edit Sampler):

- `two_trajectories` (the official code): source and target start from a normal-attention inversion,
  the auxiliary branch (the negative, i.e. unconditional, prompt; uniform attention; no guidance) from
  a uniform-attention inversion; nothing is pinned.
- `uniform_pinned` (this pack's earlier recipe): one uniform-attention inversion for every branch, the
  source and the auxiliary branch (the source prompt) pinned to it: exact, and replayable.
"""

from __future__ import annotations

import torch

from ..attention.layout import AUX, SOURCE, TARGET
from ..attention.masks import DILATE_EDIT, DILATIONS, adaptive_mask, blend, quantile_schedule

RECIPE_TWO_TRAJECTORIES = "two_trajectories"
RECIPE_UNIFORM_PINNED = "uniform_pinned"
RECIPES = (RECIPE_TWO_TRAJECTORIES, RECIPE_UNIFORM_PINNED)


class AdaptiveMaskStrategy:
    """UAM's adaptive mask: the target keeps the auxiliary branch's x0 outside the edit while t < T_mask."""

    needs_aux = True
    reads_source_prediction = True  # the mask is the difference of the target's and the source's x0

    def __init__(self, lam: float = 0.5, t_mask: float = 200.0, dilation: str = DILATE_EDIT,
                 blend_source: bool = True, recipe: str = RECIPE_TWO_TRAJECTORIES):
        if dilation not in DILATIONS:
            raise ValueError(f"unknown dilation '{dilation}', expected one of {DILATIONS}")
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe '{recipe}', expected one of {RECIPES}")
        self.lam, self.t_mask, self.dilation, self.blend_source = lam, t_mask, dilation, blend_source
        self.recipe = recipe

    @property
    def two_trajectories(self) -> bool:
        return self.recipe == RECIPE_TWO_TRAJECTORIES

    def prepare(self, model):
        return model

    def start(self, layout, sigmas, trajectory, model_sampling) -> AdaptiveMaskRun:
        sigma_mask = mask_sigma(model_sampling, self.t_mask)
        return AdaptiveMaskRun(self, layout, sigmas, sigma_mask)


def mask_sigma(model_sampling, t_mask: float) -> float:
    """T_mask, a timestep of the 1000-step training schedule, as a sigma of this model (compared with
    ComfyUI's sigmas). The UNets' and SD3's model samplings count time on those 1000 steps
    (timestep(sigma_max) = 999 or 1000); Flux's counts it on [0, 1] (timestep(sigma) = sigma), so there
    T_mask is taken as the same fraction of the schedule's time, t_mask / 1000."""
    scale = float(model_sampling.timestep(torch.as_tensor(model_sampling.sigma_max)))
    t = float(t_mask) / 1000.0 if scale <= 1.0 + 1e-6 else float(t_mask)
    return float(model_sampling.sigma(torch.tensor(t)))


class AdaptiveMaskRun:
    keeps_noise = True  # the sampler steps each branch from its (blended) x0 with its own predicted noise

    def __init__(self, strategy: AdaptiveMaskStrategy, layout, sigmas, sigma_mask: float):
        self.strategy, self.layout, self.sigmas, self.sigma_mask = strategy, layout, sigmas, sigma_mask
        self.steps = len(sigmas) - 1
        self.mask = None  # the edit region of the last blended step: what the MASK output shows

    def blend_denoised(self, i: int, x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        """The blended x0 of every row while t < T_mask (a new tensor), else `denoised` itself."""
        if float(self.sigmas[i]) >= self.sigma_mask:
            return denoised
        s = self.strategy
        rows = {b: self.layout.rows(b, denoised.shape[0]) for b in (SOURCE, TARGET, AUX)}
        src, tgt, aux = denoised[rows[SOURCE]], denoised[rows[TARGET]], denoised[rows[AUX]]
        mask = adaptive_mask(tgt, src, quantile_schedule(i, self.steps, s.lam), s.dilation)
        denoised = denoised.clone()
        denoised[rows[TARGET]] = blend(mask, tgt, aux)  # outside the edit: the auxiliary reconstruction
        if s.blend_source:  # the red line: inside the edit the source takes the auxiliary x0
            denoised[rows[SOURCE]] = blend(mask, aux, src)
        self.mask = mask
        return denoised

    def after_step(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return x

    def final_mask(self) -> torch.Tensor | None:
        # The mask the last blended step used, per pixel: the share of its latent channels in the edit region
        # (the blend is per latent element), so 1 where every channel was edited.
        return None if self.mask is None else self.mask.mean(dim=1)
