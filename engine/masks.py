"""Mask strategies for the branch sampler: what to blend each step, and the final mask.

A strategy gets the branch layout at the start, then after every model call the CFG-combined x0
predictions of all rows (`blend_denoised`) and after every step the new latents (`after_step`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention.blocks import map_side_ratio
from ..attention.instant_mask import MapAccumulator, attention_probabilities, instant_mask
from ..attention.layout import AUX, SOURCE, TARGET, read_layout
from ..attention.masks import DILATE_EDIT, adaptive_mask, blend, quantile_schedule
from .patching import add_attention_replace


class AdaptiveMaskStrategy:
    """UAM's adaptive mask: target x0 = M * x0_tgt + (1 - M) * x0_aux while t < T_mask."""

    needs_aux = True
    reads_source_prediction = True  # the mask is the difference of the target's and the source's x0

    def __init__(self, lam: float = 0.5, t_mask: float = 200.0, dilation: str = DILATE_EDIT,
                 blend_source: bool = False):
        self.lam, self.t_mask, self.dilation, self.blend_source = lam, t_mask, dilation, blend_source

    def prepare(self, model):
        return model

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


class LatentReplaceStrategy:
    """Outside the mask the target latent is the source's after every step.

    With an inversion the source is the stored trajectory, so the unedited region comes back exactly.
    Subclasses say what the mask is (`current_mask`).
    """

    needs_aux = False
    reads_source_prediction = False  # with an inversion the background is the trajectory

    def prepare(self, model):
        return model

    def begin(self, layout, sigmas, trajectory, model_sampling) -> None:
        self.layout, self.trajectory = layout, trajectory
        self.mask = None

    def current_mask(self, like: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError

    def blend_denoised(self, i: int, x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        return denoised

    def after_step(self, i: int, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        src, tgt = self.layout.rows(SOURCE, batch), self.layout.rows(TARGET, batch)
        mask = self.current_mask(x[tgt])
        if mask is None:
            return x
        self.mask = mask
        background = self.trajectory[i + 1].to(x) if self.trajectory is not None else x[src]
        x = x.clone()
        x[tgt] = blend(mask, x[tgt], background)
        return x

    def final_mask(self) -> torch.Tensor | None:
        return None if self.mask is None else self.mask[:, 0]


class FixedMaskStrategy(LatentReplaceStrategy):
    """A given mask, e.g. any ComfyUI MASK (1 = may change), resized to the latent grid."""

    def __init__(self, mask: torch.Tensor):
        self.user_mask = mask

    def current_mask(self, like: torch.Tensor) -> torch.Tensor:
        m = self.user_mask.float()
        m = m.reshape(-1, 1, *m.shape[-2:])
        m = F.interpolate(m, size=like.shape[-2:], mode="area").to(like)
        if m.shape[0] not in (1, like.shape[0]):
            raise ValueError(f"the mask has a batch of {m.shape[0]} but there are {like.shape[0]} images")
        return m.expand(like.shape[0], -1, -1, -1)


class InstantMaskStrategy(LatentReplaceStrategy):
    """InstDiffEdit's instant mask from the target branch's own cross-attention, made on the fly.

    A capture patch reads the conditional target rows' attention probabilities in the selected
    low-resolution layers into one fixed-size running sum; the mask is recomputed from it each step.
    """

    def __init__(self, words: list[list[int]], edit_words: list[int] | None, map_side: float = 0.25,
                 object_similarity: float = 0.9, background_similarity: float = 0.6, blur_passes: int = 2,
                 threshold: float = 0.2):
        self.words, self.edit_words, self.map_side = words, edit_words, map_side
        self.settings = dict(object_similarity=object_similarity, background_similarity=background_similarity,
                             blur_passes=blur_passes, threshold=threshold)
        self.accumulator = MapAccumulator()
        self.peak_stored = 0

    def prepare(self, model):
        m = model.clone()
        strategy = self

        def make_patch(previous):
            def capture_cross_attention(q, k, v, extra_options, **kwargs):
                strategy.capture(q, k, extra_options)
                return previous(q, k, v, extra_options, **kwargs)
            return capture_cross_attention

        add_attention_replace(m, "attn2", make_patch, lambda key: key[0] in ("input", "output"),
                              effect=lambda branch: None)  # it only reads
        return m

    def begin(self, layout, sigmas, trajectory, model_sampling) -> None:
        super().begin(layout, sigmas, trajectory, model_sampling)
        self.accumulator = MapAccumulator()

    def capture(self, q, k, extra_options) -> None:
        shape = extra_options.get("original_shape")
        layout = read_layout(extra_options)
        if layout is None or shape is None or abs(map_side_ratio(q.shape[1], shape) - self.map_side) > 1e-6:
            return
        chunks = extra_options.get("cond_or_uncond", [0])
        per_chunk = q.shape[0] // len(chunks)
        rows = [r for r in layout.rows(TARGET, q.shape[0]) if chunks[r // per_chunk] == 0]
        if not rows:
            return
        side = (round(shape[-2] * self.map_side), round(shape[-1] * self.map_side))
        self.accumulator.add(attention_probabilities(q[rows], k[rows], extra_options["n_heads"]), side)
        self.peak_stored = max(self.peak_stored, self.accumulator.stored_elements())

    def current_mask(self, like: torch.Tensor) -> torch.Tensor | None:
        maps = self.accumulator.mean()
        if maps is None:
            return None
        return instant_mask(maps, self.words, tuple(like.shape[-2:]), edit_words=self.edit_words,
                            **self.settings).to(like)
