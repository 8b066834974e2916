"""Mask strategies for the branch sampler: the protocol, the latent-replace run and user MASKs.
The instant mask (InstDiffEdit) is in engine/instant_mask.py, the adaptive mask (UAM) in
engine/adaptive_mask.py.

A strategy is a node's output (ComfyUI caches it), so it holds settings only. The sampler calls
`prepare(model)` for the patches it needs, then `start(...)` once per run, which returns the run's own
state (a `MaskRun`): after every model call it gets the CFG-combined x0 predictions of all rows
(`blend_denoised`), after every step the new latents (`after_step`), and at the end `final_mask`.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from ..attention.layout import SOURCE, TARGET, BranchLayout
from ..attention.masks import blend


class MaskRun(Protocol):
    """One sampling run of a mask strategy."""

    def blend_denoised(self, i: int, x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor: ...

    def after_step(self, i: int, x: torch.Tensor) -> torch.Tensor: ...

    def final_mask(self) -> torch.Tensor | None: ...


class MaskStrategy(Protocol):
    """What the Edit Sampler's mask_strategy input carries."""

    needs_aux: bool  # the sampler adds UAM's auxiliary reconstruction branch
    reads_source_prediction: bool  # the source branch must run (or be replayed), not be skipped

    def prepare(self, model): ...

    def start(self, layout: BranchLayout, sigmas: torch.Tensor, trajectory: torch.Tensor | None,
              model_sampling) -> MaskRun: ...


class LatentReplaceRun:
    """Outside the mask the target latent is the source's after every step.

    With an inversion the source is the stored trajectory, so the unedited region comes back exactly.
    `mask_of(like)` says what the mask is now (None: not known yet, nothing replaced).
    """

    def __init__(self, layout, trajectory, mask_of):
        self.layout, self.trajectory, self.mask_of = layout, trajectory, mask_of
        self.mask = None

    def blend_denoised(self, i: int, x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        return denoised

    def after_step(self, i: int, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        src, tgt = self.layout.rows(SOURCE, batch), self.layout.rows(TARGET, batch)
        mask = self.mask_of(x[tgt])
        if mask is None:
            return x
        self.mask = mask
        background = self.trajectory[i + 1].to(x) if self.trajectory is not None else x[src]
        x = x.clone()
        x[tgt] = blend(mask, x[tgt], background)
        return x

    def final_mask(self) -> torch.Tensor | None:
        return None if self.mask is None else self.mask[:, 0]


class FixedMaskStrategy:
    """A given mask, e.g. any ComfyUI MASK (1 = may change), resized to the latent grid."""

    needs_aux = False
    reads_source_prediction = False  # with an inversion the background is the trajectory

    def __init__(self, mask: torch.Tensor):
        self.user_mask = mask

    def prepare(self, model):
        return model

    def resized(self, like: torch.Tensor) -> torch.Tensor:
        m = self.user_mask.float()
        m = m.reshape(-1, 1, *m.shape[-2:])
        m = F.interpolate(m, size=like.shape[-2:], mode="area").to(like)
        if m.shape[0] not in (1, like.shape[0]):
            raise ValueError(f"the mask has a batch of {m.shape[0]} but there are {like.shape[0]} images")
        return m.expand(like.shape[0], -1, -1, -1)

    def start(self, layout, sigmas, trajectory, model_sampling) -> LatentReplaceRun:
        return LatentReplaceRun(layout, trajectory, self.resized)
