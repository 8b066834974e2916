"""UAM's adaptive mask blending (arXiv 2411.19652) as a mask strategy for the branch sampler."""

from __future__ import annotations

import torch

from ..attention.layout import AUX, SOURCE, TARGET
from ..attention.masks import DILATE_EDIT, adaptive_mask, blend, quantile_schedule


class AdaptiveMaskStrategy:
    """UAM's adaptive mask: target x0 = M * x0_tgt + (1 - M) * x0_aux while t < T_mask."""

    needs_aux = True
    reads_source_prediction = True  # the mask is the difference of the target's and the source's x0

    def __init__(self, lam: float = 0.5, t_mask: float = 200.0, dilation: str = DILATE_EDIT,
                 blend_source: bool = False):
        self.lam, self.t_mask, self.dilation, self.blend_source = lam, t_mask, dilation, blend_source

    def prepare(self, model):
        return model

    def start(self, layout, sigmas, trajectory, model_sampling) -> AdaptiveMaskRun:
        # T_mask is a timestep of the 1000-step training schedule; compare on ComfyUI's sigmas.
        sigma_mask = float(model_sampling.sigma(torch.tensor(float(self.t_mask))))
        return AdaptiveMaskRun(self, layout, sigmas, sigma_mask)


class AdaptiveMaskRun:
    def __init__(self, strategy: AdaptiveMaskStrategy, layout, sigmas, sigma_mask: float):
        self.strategy, self.layout, self.sigmas, self.sigma_mask = strategy, layout, sigmas, sigma_mask
        self.steps = len(sigmas) - 1
        self.mask = None

    def blend_denoised(self, i: int, x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        if float(self.sigmas[i]) >= self.sigma_mask:
            return denoised
        s = self.strategy
        rows = {b: self.layout.rows(b, denoised.shape[0]) for b in (SOURCE, TARGET, AUX)}
        src, tgt, aux = denoised[rows[SOURCE]], denoised[rows[TARGET]], denoised[rows[AUX]]
        mask = adaptive_mask(tgt, src, quantile_schedule(i, self.steps, s.lam), s.dilation)
        denoised = denoised.clone()
        denoised[rows[TARGET]] = blend(mask, tgt, aux)
        if s.blend_source:  # the paper's "red line": the source keeps the aux outside the edit too
            denoised[rows[SOURCE]] = blend(mask, src, aux)
        self.mask = mask
        return denoised

    def after_step(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return x

    def final_mask(self) -> torch.Tensor | None:
        # The share of latent channels in the edit region: a soft [0, 1] mask per pixel.
        return None if self.mask is None else self.mask.mean(dim=1)
