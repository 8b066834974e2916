"""Mask strategies for the branch sampler: what to blend each step, and the final mask.

A strategy gets the branch layout at the start, then after every model call the CFG-combined x0
predictions of all rows (`blend_denoised`) and after every step the new latents (`after_step`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention.layout import AUX, SOURCE, TARGET
from ..attention.masks import DILATE_EDIT, adaptive_mask, blend, quantile_schedule


class AdaptiveMaskStrategy:
    """UAM's adaptive mask: target x0 = M * x0_tgt + (1 - M) * x0_aux while t < T_mask."""

    needs_aux = True

    def __init__(self, lam: float = 0.5, t_mask: float = 200.0, dilation: str = DILATE_EDIT,
                 blend_source: bool = False):
        self.lam, self.t_mask, self.dilation, self.blend_source = lam, t_mask, dilation, blend_source

    def begin(self, layout, sigmas, trajectory, model_sampling) -> None:
        self.layout, self.steps = layout, len(sigmas) - 1
        self.sigmas = sigmas
        # T_mask is a timestep of the 1000-step training schedule; compare on ComfyUI's sigmas.
        self.sigma_mask = float(model_sampling.sigma(torch.tensor(float(self.t_mask))))
        self.mask = None

    def blend_denoised(self, i: int, x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        if float(self.sigmas[i]) >= self.sigma_mask:
            return denoised
        rows = {b: self.layout.rows(b, denoised.shape[0]) for b in (SOURCE, TARGET, AUX)}
        src, tgt, aux = denoised[rows[SOURCE]], denoised[rows[TARGET]], denoised[rows[AUX]]
        mask = adaptive_mask(tgt, src, quantile_schedule(i, self.steps, self.lam), self.dilation)
        denoised = denoised.clone()
        denoised[rows[TARGET]] = blend(mask, tgt, aux)
        if self.blend_source:  # the paper's "red line": the source keeps the aux outside the edit too
            denoised[rows[SOURCE]] = blend(mask, src, aux)
        self.mask = mask
        return denoised

    def after_step(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return x

    def final_mask(self) -> torch.Tensor | None:
        # The share of latent channels in the edit region: a soft [0, 1] mask per pixel.
        return None if self.mask is None else self.mask.mean(dim=1)


class FixedMaskStrategy:
    """A given mask (e.g. any ComfyUI MASK): outside it the target latent is the source's, every step.

    With an inversion the source is the stored trajectory, so the unedited region comes back exactly.
    """

    needs_aux = False

    def __init__(self, mask: torch.Tensor):
        self.user_mask = mask

    def begin(self, layout, sigmas, trajectory, model_sampling) -> None:
        self.layout, self.trajectory = layout, trajectory
        self.mask = None

    def _latent_mask(self, like: torch.Tensor) -> torch.Tensor:
        m = self.user_mask.float()
        m = m.reshape(-1, 1, *m.shape[-2:])
        m = F.interpolate(m, size=like.shape[-2:], mode="area").to(like)
        if m.shape[0] not in (1, like.shape[0]):
            raise ValueError(f"the mask has a batch of {m.shape[0]} but there are {like.shape[0]} images")
        return m.expand(like.shape[0], -1, -1, -1)

    def blend_denoised(self, i: int, x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        return denoised

    def after_step(self, i: int, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        src, tgt = self.layout.rows(SOURCE, batch), self.layout.rows(TARGET, batch)
        background = self.trajectory[i + 1].to(x) if self.trajectory is not None else x[src]
        self.mask = self._latent_mask(x[tgt])
        x = x.clone()
        x[tgt] = blend(self.mask, x[tgt], background)
        return x

    def final_mask(self) -> torch.Tensor | None:
        return None if self.mask is None else self.mask[:, 0]
