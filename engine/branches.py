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

from ..attention.layout import AUX, SOURCE, TARGET, BranchLayout
from .conditioning import conditioning_key, stack_conditionings
from .inversion import with_run_options
from .replay import REPLAY_KEY, ReplayPlan, ReplayStore, plan_replay

REPLAYABLE = (SOURCE, AUX)  # branches that can be the inversion's own computation


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
                    pin: tuple[str, ...] = (), strategy=None, callback=None, handle=None) -> BranchRun:
    """Run the branches together from the start of `sigmas`.

    trajectory: an inversion's latents (model space, one per sigma): every branch starts from its
    first entry, and the branches named in `pin` are replaced by the stored latent at every step,
    which makes their reconstruction exact and gives the others an exact source to read attention from.
    noise: for generated images instead: the same noise starts every branch.
    handle: the inversion, to replay the pinned branches it already computed (engine.replay) instead
    of running them, and to skip a pinned source nothing reads; the plan is in the run's info.
    """
    names = tuple(b.name for b in branches)
    layout = BranchLayout(names, images)  # every branch: what strategies and callbacks see
    plan = ReplayPlan()
    if handle is not None:
        candidates = {b.name: (conditioning_key(b.positive), conditioning_key(b.negative))
                      for b in branches if b.name in REPLAYABLE}
        plan = plan_replay(model, handle, candidates, cfg, pinned=set(pin),
                           source_prediction_read=getattr(strategy, "reads_source_prediction", False))
    live = [b for b in branches if b.name not in plan.skipped]
    live_layout = BranchLayout(tuple(b.name for b in live), images)  # the rows the model runs
    run_objects = {}
    store = None
    if SOURCE in plan.branches:
        store = ReplayStore(handle.record, plan.kind_map, live_layout.rows_per_chunk)
        run_objects[REPLAY_KEY] = store
    m = with_run_options(model, live_layout, full_schedule, **run_objects)
    positive = stack_conditionings([b.positive for b in live], images) if live else None
    negative = stack_conditionings([b.negative for b in live], images) if live else None
    rows = {name: layout.rows(name, layout.rows_per_chunk) for name in names}
    live_rows = [r for b in live for r in rows[b.name]]
    pinned = [name for name in pin if name in names]
    pin_rows = [r for name in pinned for r in rows[name]]
    preview_rows = rows[TARGET if TARGET in names else names[-1]]
    offset = len(full_schedule) - len(sigmas)  # full-schedule index of sigmas[0]
    if strategy is not None:
        strategy.begin(layout, sigmas, trajectory, model.get_model_object("model_sampling"))

    def branch_sampler(model_k, x_live, sigmas, extra_args=None, callback=None, disable=None, **kwargs):
        # (kwargs: sampler options a later host may pass; a fixed DDIM step takes none)
        n = len(sigmas) - 1
        if trajectory is not None:
            x = trajectory[0].to(x_live).repeat(len(names), 1, 1, 1)
        else:
            x = x_live.new_zeros((layout.rows_per_chunk,) + tuple(x_live.shape[1:]))
            x[live_rows] = x_live
        s_in = x.new_ones([len(live_rows)])
        for i in range(n):
            # Cancel takes effect here, every step, whatever the host's progress throttling sends.
            comfy.model_management.throw_exception_if_processing_interrupted()
            if pin_rows:  # every pinned branch's images, branch-major
                x[pin_rows] = trajectory[i].to(x).repeat(len(pinned), 1, 1, 1)
            sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
            if store is not None:
                store.step = offset + i
            denoised = torch.empty_like(x)
            denoised[live_rows] = model_k(x[live_rows], sigma * s_in, **(extra_args or {}))
            if plan.branches:  # a pinned branch's prediction is the inversion's own
                inverted = (trajectory[i] - sigma * handle.eps[i]).to(x)
                for name in plan.branches:
                    denoised[rows[name]] = inverted
            for name in plan.unused:  # read by nothing and pinned again next step: stand still
                denoised[rows[name]] = x[rows[name]]
            if strategy is not None:
                denoised = strategy.blend_denoised(i, x, denoised)
            x = x + (sigma_next - sigma) * (x - denoised) / sigma
            if strategy is not None:
                x = strategy.after_step(i, x)
            if callback is not None:
                callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised[preview_rows]})
        if pin_rows:
            x[pin_rows] = trajectory[n].to(x).repeat(len(pinned), 1, 1, 1)
        final[0] = x
        return x[live_rows]

    final = [None]
    if not live:  # every branch pinned and replayed or unused (a pinned reconstruction): nothing to run
        final[0] = trajectory[-1].to(comfy.model_management.intermediate_device()).repeat(len(names), 1, 1, 1)
    elif noise is None:
        noise = torch.zeros((images * len(live),) + tuple(trajectory.shape[2:]), dtype=trajectory.dtype)
    else:
        noise = noise.repeat(len(live), 1, 1, 1)
    if live:
        guider = comfy.samplers.CFGGuider(m)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        guider.sample(noise, torch.zeros_like(noise), comfy.samplers.KSAMPLER(branch_sampler), sigmas,
                      callback=callback, disable_pbar=True, seed=0)
    # Every branch's final latent, replayed ones included, out of the model's sampling space.
    x = model.get_model_object("model_sampling").inverse_noise_scaling(sigmas[-1], final[0])
    out = model.model.process_latent_out(x).to(comfy.model_management.intermediate_device())
    latents = {name: out[rows[name]] for name in names}
    mask = strategy.final_mask() if strategy is not None else None
    return BranchRun(latents=latents, mask=mask,
                     info={"replayed": plan.branches, "unused": plan.unused, "recomputed": plan.reasons})


__all__ = ["Branch", "BranchRun", "sample_branches", "SOURCE", "TARGET"]
