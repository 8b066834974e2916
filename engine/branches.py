"""The multi-branch sampler: source, target (and auxiliary) branches in one batched call per step.

Rows are branch-major (branch b, image i -> row b * images + i) and the layout is published to every
model call (engine/contract.py), so each attention patch knows which rows to read from and change.
The update is DDIM with eta = 0, i.e. an Euler step in sigma space: x' = x + (sigma' - sigma) * eps with
eps = (x - x0) / sigma, which is x' = x0 + sigma' * eps. A mask run that `keeps_noise` (UAM's adaptive
mask) steps in that second form: each branch keeps the noise it predicted itself and only its x0 is the
blended one, x' = x0_blended + sigma' * eps (the official UAM update, sqrt(a') x0_blended + sqrt(1 - a')
eps in DDPM space), the plain step wherever nothing is blended.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import comfy.model_management
import comfy.samplers
import torch

from ..attention.layout import AUX, SOURCE, TARGET, BranchLayout
from .conditioning import conditioning_key, stack_conditionings
from .contract import EditRunContext, with_run
from .replay import ReplayPlan, ReplayStore, plan_replay

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


class BranchStepper:
    """One DDIM (Euler in sigma space) step of every branch at a time: pin, predict (run the live rows,
    replay the rest), blend, step. Used as the host's sampler function; the full batch of every branch
    (replayed rows included) stays in `x` for `finish`."""

    def __init__(self, layout: BranchLayout, live: list[str], plan: ReplayPlan, pinned: list[str],
                 trajectory: torch.Tensor | None, handle, mask_run, starts: dict | None = None):
        self.layout, self.plan, self.pinned, self.trajectory, self.handle = layout, plan, pinned, trajectory, handle
        self.mask_run = mask_run
        self.starts = starts or {}
        per = layout.rows_per_chunk
        self.rows = {name: layout.rows(name, per) for name in layout.branches}
        self.live_rows = [r for name in live for r in self.rows[name]]
        self.pin_rows = [r for name in pinned for r in self.rows[name]]
        self.preview_rows = self.rows[TARGET if TARGET in layout.branches else layout.branches[-1]]
        self.x: torch.Tensor | None = None

    def start(self, x_live: torch.Tensor) -> torch.Tensor:
        if self.trajectory is not None:  # every branch starts at the noisiest inverted latent
            x = self.trajectory[0].to(x_live).repeat(len(self.layout.branches), 1, 1, 1)
        else:
            x = x_live.new_zeros((self.layout.rows_per_chunk,) + tuple(x_live.shape[1:]))
            x[self.live_rows] = x_live
        for name, latent in self.starts.items():  # a branch with a start of its own (UAM's auxiliary branch)
            x[self.rows[name]] = latent.to(x)
        return x

    def pin(self, x: torch.Tensor, i: int) -> None:
        if self.pin_rows:  # every pinned branch's images, branch-major
            x[self.pin_rows] = self.trajectory[i].to(x).repeat(len(self.pinned), 1, 1, 1)

    def predict(self, model_k, x: torch.Tensor, i: int, sigma: float, extra_args: dict) -> torch.Tensor:
        denoised = torch.empty_like(x)
        s_in = x.new_ones([len(self.live_rows)])
        denoised[self.live_rows] = model_k(x[self.live_rows], sigma * s_in, **extra_args)
        if self.plan.branches:  # a pinned branch's prediction is the inversion's own
            inverted = (self.trajectory[i] - sigma * self.handle.eps[i]).to(x)
            for name in self.plan.branches:
                denoised[self.rows[name]] = inverted
        for name in self.plan.unused:  # read by nothing and pinned again next step: stand still
            denoised[self.rows[name]] = x[self.rows[name]]
        return denoised

    def __call__(self, model_k, x_live, sigmas, extra_args=None, callback=None, disable=None, **kwargs):
        # kwargs: sampler options a later host may pass; a fixed DDIM step takes none.
        x = self.start(x_live)
        n = len(sigmas) - 1
        for i in range(n):
            # Cancel takes effect here, every step, whatever the host's progress throttling sends.
            comfy.model_management.throw_exception_if_processing_interrupted()
            self.pin(x, i)
            sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
            denoised = self.predict(model_k, x, i, sigma, extra_args or {})
            blended = denoised if self.mask_run is None else self.mask_run.blend_denoised(i, x, denoised)
            if getattr(self.mask_run, "keeps_noise", False):  # each branch keeps its own predicted noise
                x = blended + sigma_next * ((x - denoised) / sigma)
            else:
                x = x + (sigma_next - sigma) * (x - blended) / sigma
            denoised = blended
            if self.mask_run is not None:
                x = self.mask_run.after_step(i, x)
            if callback is not None:  # the host's sampler callback (previews, progress)
                callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
                               "denoised": denoised[self.preview_rows]})
        self.pin(x, n)
        self.x = x
        return x[self.live_rows]


def sample_branches(model, branches: list[Branch], cfg: float, sigmas: torch.Tensor, full_schedule: torch.Tensor,
                    images: int, trajectory: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                    pin: tuple[str, ...] = (), strategy=None, callback=None, handle=None,
                    starts: dict[str, torch.Tensor] | None = None) -> BranchRun:
    """Run the branches together from the start of `sigmas`.

    trajectory: an inversion's latents (model space, one per sigma): every branch starts from its
    first entry, and the branches named in `pin` are replaced by the stored latent at every step,
    which makes their reconstruction exact and gives the others an exact source to read attention from.
    noise: for generated images instead: the same noise starts every branch.
    handle: the inversion, to replay the pinned branches it already computed (engine.replay) instead
    of running them, and to skip a pinned source nothing reads; the plan is in the run's info.
    strategy: a mask strategy (engine.masks), already prepared on `model`.
    starts: branch name -> the latent (model space, one per image) that branch starts from instead, e.g.
    UAM's auxiliary branch at the noisiest latent of a uniform-attention inversion; such a branch must
    not be pinned.
    """
    names = tuple(b.name for b in branches)
    starts = {name: latent for name, latent in (starts or {}).items() if name in names}
    if set(starts) & set(pin):
        raise ValueError(f"the {' and '.join(sorted(set(starts) & set(pin)))} branch cannot both start from a latent "
                         f"of its own and be pinned to the trajectory")
    layout = BranchLayout(names, images)  # every branch: what strategies and callbacks see
    plan = ReplayPlan()
    if handle is not None:
        candidates = {b.name: (conditioning_key(b.positive), conditioning_key(b.negative))
                      for b in branches if b.name in REPLAYABLE}
        plan = plan_replay(model, handle, candidates, cfg, pinned=set(pin),
                           source_prediction_read=getattr(strategy, "reads_source_prediction", False))
    live = [b for b in branches if b.name not in plan.skipped]
    live_layout = BranchLayout(tuple(b.name for b in live), images)  # the rows the model runs
    mask_run = None
    if strategy is not None:
        mask_run = strategy.start(layout, sigmas, trajectory, model.get_model_object("model_sampling"))
    store = None
    if SOURCE in plan.branches:
        store = ReplayStore(handle.record, plan.kind_map, live_layout.rows_per_chunk)
    run = EditRunContext(live_layout, full_schedule, replay=store, mask_run=mask_run)
    stepper = BranchStepper(layout, [b.name for b in live], plan, [n for n in pin if n in names], trajectory,
                            handle, mask_run, starts)
    if live:
        if noise is None:
            noise = torch.zeros((images * len(live),) + tuple(trajectory.shape[2:]), dtype=trajectory.dtype)
        else:
            noise = noise.repeat(len(live), 1, 1, 1)
        guider = comfy.samplers.CFGGuider(with_run(model, run))
        guider.set_conds(stack_conditionings([b.positive for b in live], images),
                         stack_conditionings([b.negative for b in live], images))
        guider.set_cfg(cfg)
        guider.sample(noise, torch.zeros_like(noise), comfy.samplers.KSAMPLER(stepper), sigmas,
                      callback=callback, disable_pbar=True, seed=0)
        final = stepper.x
    else:  # every branch pinned and replayed or unused (a pinned reconstruction): nothing to run
        final = trajectory[-1].to(comfy.model_management.intermediate_device()).repeat(len(names), 1, 1, 1)
    return finish(model, layout, stepper.rows, sigmas, final, mask_run, plan)


def finish(model, layout: BranchLayout, rows: dict, sigmas: torch.Tensor, final: torch.Tensor, mask_run,
           plan: ReplayPlan) -> BranchRun:
    """Every branch's final latent, replayed ones included, out of the model's sampling space."""
    x = model.get_model_object("model_sampling").inverse_noise_scaling(sigmas[-1], final)
    out = model.model.process_latent_out(x).to(comfy.model_management.intermediate_device())
    return BranchRun(latents={name: out[rows[name]] for name in layout.branches},
                     mask=mask_run.final_mask() if mask_run is not None else None,
                     info={"replayed": plan.branches, "unused": plan.unused, "recomputed": plan.reasons,
                           # for the Edit Sampler's report: the word classes an instant mask decided
                           "mask_classes": getattr(mask_run, "classes", None),
                           "mask_word_names": getattr(mask_run, "word_names", None)})


__all__ = ["Branch", "BranchRun", "BranchStepper", "sample_branches", "SOURCE", "TARGET"]
