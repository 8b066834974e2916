"""Mask strategies for the branch sampler: what to blend each step, and the final mask.

A strategy is a node's output (ComfyUI caches it), so it holds settings only. The sampler calls
`prepare(model)` for the patches it needs, then `start(...)` once per run, which returns the run's own
state (a `MaskRun`): after every model call it gets the CFG-combined x0 predictions of all rows
(`blend_denoised`), after every step the new latents (`after_step`), and at the end `final_mask`.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from ..attention.instant_mask import MapAccumulator, attention_probabilities, instant_mask
from ..attention.layout import AUX, SOURCE, TARGET, BranchLayout
from ..attention.masks import DILATE_EDIT, adaptive_mask, blend, quantile_schedule
from .contract import AttentionCall
from .patching import add_attention_replace


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


class InstantMaskStrategy:
    """InstDiffEdit's instant mask from the target branch's own cross-attention, made on the fly.

    A capture patch reads the conditional target rows' attention probabilities in the selected
    low-resolution layers into the run's fixed-size running sum; the mask is recomputed from it each step.
    """

    needs_aux = False
    reads_source_prediction = False

    def __init__(self, words: list[list[int]], edit_words: list[int] | None, map_side: float = 0.25,
                 object_similarity: float = 0.9, background_similarity: float = 0.6, blur_passes: int = 2,
                 threshold: float = 0.2):
        self.words, self.edit_words, self.map_side = words, edit_words, map_side
        self.settings = dict(object_similarity=object_similarity, background_similarity=background_similarity,
                             blur_passes=blur_passes, threshold=threshold)

    def prepare(self, model):
        m = model.clone()

        def capture_cross_attention(call: AttentionCall, q, k, v, previous, source):
            run = call.run.mask_run if call.run is not None else None
            if isinstance(run, InstantMaskRun) and run.strategy is self:
                run.capture(call, q, k)
            return previous(q, k, v)

        add_attention_replace(m, "attn2", "instant mask capture", capture_cross_attention,
                              lambda key: key[0] in ("input", "output"), effect=lambda branch: None)  # reads only
        return m

    def start(self, layout, sigmas, trajectory, model_sampling) -> InstantMaskRun:
        return InstantMaskRun(self, layout, trajectory)


class InstantMaskRun(LatentReplaceRun):
    def __init__(self, strategy: InstantMaskStrategy, layout, trajectory):
        super().__init__(layout, trajectory, self.current_mask)
        self.strategy = strategy
        self.accumulator = MapAccumulator()
        self.peak_stored = 0  # the largest the running sum got (elements): it never grows with steps

    def capture(self, call: AttentionCall, q, k) -> None:
        s = self.strategy
        if call.map_side is None or abs(call.map_side - s.map_side) > 1e-6:
            return
        rows = call.cond_rows(TARGET)
        if not rows:
            return
        self.accumulator.add(attention_probabilities(q[rows], k[rows], call.heads), call.map_hw)
        self.peak_stored = max(self.peak_stored, self.accumulator.stored_elements())

    def current_mask(self, like: torch.Tensor) -> torch.Tensor | None:
        maps = self.accumulator.mean()
        if maps is None:
            return None
        s = self.strategy
        return instant_mask(maps, s.words, tuple(like.shape[-2:]), edit_words=s.edit_words, **s.settings).to(like)
