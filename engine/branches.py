"""The multi-branch sampler: source, target (and auxiliary) branches in one batched call per step.

Rows are branch-major (branch b, image i -> row b * images + i) and the layout is published in
transformer_options, so every attention patch knows which rows to read from and which to change.
The update is DDIM with eta = 0, i.e. an Euler step in sigma space.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import comfy.model_management
import comfy.samplers
import torch

from ..attention.layout import SOURCE, TARGET, BranchLayout
from .conditioning import stack_conditionings
from .inversion import with_run_options


@dataclass
class Branch:
    name: str
    positive: list
    negative: list


@dataclass
class BranchRun:
    """What a run produced: each branch's final latent (VAE latent space) and what strategies left."""

    latents: dict[str, torch.Tensor]
    mask: torch.Tensor | None = None
    info: dict = field(default_factory=dict)


def sample_branches(model, branches: list[Branch], cfg: float, sigmas: torch.Tensor, full_schedule: torch.Tensor,
                    images: int, trajectory: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                    pin: str | None = None, strategy=None, callback=None) -> BranchRun:
    """Run the branches together from the start of `sigmas`.

    trajectory: an inversion's latents (model space, one per sigma): every branch starts from its
    first entry, and the branch named by `pin` is replaced by the stored latent at every step, which
    makes its reconstruction exact and gives the others an exact source to read attention from.
    noise: for generated images instead: the same noise starts every branch.
    """
    names = tuple(b.name for b in branches)
    layout = BranchLayout(names, images)
    m = with_run_options(model, layout, full_schedule)
    positive = stack_conditionings([b.positive for b in branches], images)
    negative = stack_conditionings([b.negative for b in branches], images)
    pin_rows = layout.rows(pin, layout.rows_per_chunk) if pin else []
    preview_rows = layout.rows(TARGET if TARGET in names else names[-1], layout.rows_per_chunk)
    if strategy is not None:
        strategy.begin(layout, sigmas, trajectory, model.get_model_object("model_sampling"))

    def branch_sampler(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        n = len(sigmas) - 1
        if trajectory is not None:
            x = trajectory[0].to(x).repeat(len(names), 1, 1, 1)
        s_in = x.new_ones([x.shape[0]])
        for i in range(n):
            if pin_rows:
                x[pin_rows] = trajectory[i].to(x)
            sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
            denoised = model_k(x, sigma * s_in, **(extra_args or {}))
            if strategy is not None:
                denoised = strategy.blend_denoised(i, x, denoised)
            x = x + (sigma_next - sigma) * (x - denoised) / sigma
            if strategy is not None:
                x = strategy.after_step(i, x)
            if callback is not None:
                callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised[preview_rows]})
        if pin_rows:
            x[pin_rows] = trajectory[n].to(x)
        return x

    if noise is None:
        noise = torch.zeros((images * len(names),) + tuple(trajectory.shape[2:]), dtype=trajectory.dtype)
    else:
        noise = noise.repeat(len(names), 1, 1, 1)
    guider = comfy.samplers.CFGGuider(m)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    out = guider.sample(noise, torch.zeros_like(noise), comfy.samplers.KSAMPLER(branch_sampler), sigmas,
                        callback=callback, disable_pbar=True, seed=0)
    out = out.to(comfy.model_management.intermediate_device())
    latents = {name: out[layout.rows(name, layout.rows_per_chunk)] for name in names}
    mask = strategy.final_mask() if strategy is not None else None
    return BranchRun(latents=latents, mask=mask)


__all__ = ["Branch", "BranchRun", "sample_branches", "SOURCE", "TARGET"]
