"""The attention-patch contract: what every attention method of this pack registers on a model, and the
call context each patch reads.

A method is an `AttentionPatch` per selected block: what it computes (`compute`), the replace it wraps
(`previous`: another pack's, or the host's default kernel), what it reads from the source branch
(`reads_source`, with `active` saying where) and what it changes (`effect`, per branch). Source replay
(engine/replay.py) and composition read these fields; nothing travels as attributes on functions.

Per run, the pack's samplers publish one `EditRunContext` (branch layout, full schedule, the inversion's
recorder or the edit's replay store, the mask strategy's run) to every model call through a per-run
APPLY_MODEL wrapper (`with_run`): the run lives in that wrapper's closure, never in a model's options.
Each attention call then builds one `AttentionCall` from the host's extra_options.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import comfy.patcher_extension
import torch

from ..attention.blocks import map_size
from ..attention.layout import SOURCE, TARGET, BranchLayout
from ..attention.schedule import position_in_schedule

RUN_KEY = "attn_edit_run"  # the run context in a model call's transformer_options, and its wrapper's key
SOURCE_INPUT_NAMES = ("q", "k", "v")


def is_unguided(cfg: float) -> bool:
    """cfg 1: the guided prediction is the conditional one (the host then skips the unconditional)."""
    return abs(cfg - 1.0) < 1e-9


@dataclass
class EditRunContext:
    """What one sampling run of the pack tells its attention patches."""

    layout: BranchLayout
    schedule: torch.Tensor  # the full schedule's sigmas: steps keep their meaning in a partial run
    recorder: object | None = None  # engine.replay.SourceRecorder, during an inversion
    replay: object | None = None  # engine.replay.ReplayStore, during an edit that replays its source
    mask_run: object | None = None  # the mask strategy's state for this run (engine.masks)


def with_run(model, run: EditRunContext):
    """A clone whose every model call carries `run` (published for the call, removed after it)."""

    def publish_run(executor, *args, **kwargs):
        options = kwargs.get("transformer_options")
        if options is None:  # apply_model(x, t, c_concat, c_crossattn, control, transformer_options, ...)
            options = args[5]
        options[RUN_KEY] = run
        try:
            return executor(*args, **kwargs)
        finally:
            options.pop(RUN_KEY, None)

    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, RUN_KEY, publish_run)
    return m


@dataclass(frozen=True)
class AttentionCall:
    """One attention call as the patches see it, built once from the host's extra_options.

    Rows: ComfyUI stacks one latent batch per cond chunk (`chunks`: 0 = conditional, 1 = unconditional)
    and may split chunks over calls, so rows are derived from this call's batch, never assumed.
    """

    options: dict
    batch: int
    heads: int
    chunks: tuple[int, ...]
    run: EditRunContext | None
    step: tuple[int, int] | None  # (index in the full schedule, steps); None outside sampling
    exact_step: bool  # the call's sigma is a schedule sigma (the clean latent's call at sigma_min is not)
    block: tuple[str, int, int] | None  # (block name, number, transformer index)
    map_hw: tuple[int, int] | None  # this layer's map size, from the latent size
    map_side: float | None  # its side relative to the latent side (1, 1/2, 1/4, ...)

    @classmethod
    def from_options(cls, q: torch.Tensor, extra_options: dict) -> AttentionCall:
        run = extra_options.get(RUN_KEY)
        schedule = run.schedule if run is not None else extra_options.get("sample_sigmas")
        position = position_in_schedule(schedule, extra_options.get("sigmas"))
        block = extra_options.get("block")
        shape = extra_options.get("original_shape")
        hw = map_size(q.shape[1], shape[-2], shape[-1]) if shape is not None else None
        return cls(options=extra_options, batch=q.shape[0], heads=extra_options.get("n_heads", 1),
                   chunks=tuple(extra_options.get("cond_or_uncond", [0])), run=run,
                   step=None if position is None else position[:2],
                   exact_step=position is not None and position[2],
                   block=(block[0], block[1], extra_options.get("block_index", 0)) if block is not None else None,
                   map_hw=hw, map_side=None if hw is None else hw[0] / int(shape[-2]))

    @property
    def layout(self) -> BranchLayout | None:
        return self.run.layout if self.run is not None else None

    @property
    def rows_per_chunk(self) -> int:
        return self.batch // len(self.chunks)

    def rows(self, branch: str) -> list[int]:
        """Rows of `branch` in this call; [] under a stock sampler or when the branch is absent."""
        return self.layout.rows(branch, self.batch) if self.layout is not None else []

    def cond_rows(self, branch: str | None = None) -> list[int]:
        """Rows of the conditional chunks (of one branch, or all rows)."""
        per = self.rows_per_chunk
        rows = self.rows(branch) if branch is not None else range(self.batch)
        return [r for r in rows if self.chunks[r // per] == 0]

    def target_rows_read(self, cond_only: bool, source: dict[str, torch.Tensor]) -> tuple[list[int], dict]:
        """The target rows an injection changes (the conditional ones only, or all) and the source inputs
        for those rows: `source` holds one row per target row, in the order of rows(TARGET)."""
        every = self.rows(TARGET)
        chosen = self.cond_rows(TARGET) if cond_only else every
        if len(chosen) != len(every):
            keep = set(chosen)
            pick = [j for j, r in enumerate(every) if r in keep]
            source = {name: t[pick] for name, t in source.items()}
        return chosen, source

    def in_window(self, start: float, end: float) -> bool:
        """start <= i / N < end for the call's step i; outside sampling the window counts as open."""
        if self.step is None:
            return True
        i, n = self.step
        return start * n <= i < end * n

    def source_inputs(self, patch: AttentionPatch, q, k, v) -> dict[str, torch.Tensor] | None:
        """What `patch` reads from the source branch for this call's target rows: the same call's source
        rows, or what the inversion kept (replay); None when neither is there."""
        inputs = dict(zip(SOURCE_INPUT_NAMES, (q, k, v)))
        src = self.rows(SOURCE)
        if src:
            return {name: inputs[name][src] for name in patch.reads_source}
        if self.run is not None and self.run.replay is not None:
            return self.run.replay.source_inputs(patch.reader, self, patch.reads_source, q)
        return None


# compute(call, q, k, v, previous, source) -> output; previous(q, k, v) runs the wrapped replace;
# source: what the patch reads from the source branch (readers only, else None).
Compute = Callable[..., torch.Tensor]


@dataclass(eq=False)
class AttentionPatch:
    """One attention method on one block. Immutable once registered: model clones share it (as they
    share plain functions), so run state never hides in a copy."""

    method: str
    compute: Compute
    previous: Callable
    effect: Callable[[str], object] | None = None  # None: unknown, counts as changing every branch
    reads_source: tuple[str, ...] = ()  # source inputs it reads; an inversion keeps them for replay
    reader: str | None = None  # the name its kept inputs go under (one per method application)
    active: Callable[[AttentionCall], bool] = field(default=lambda call: True)  # where a reader reads

    def __call__(self, q, k, v, extra_options, **kwargs):
        # kwargs: arguments a later host may pass to attention replaces; handed on unchanged.
        call = AttentionCall.from_options(q, extra_options)

        def previous(q, k, v):
            return self.previous(q, k, v, extra_options, **kwargs)

        if not self.reads_source:
            return self.compute(call, q, k, v, previous, None)
        recorder = call.run.recorder if call.run is not None else None
        if recorder is not None:  # an inversion: keep what the source branch will read here
            inputs = dict(zip(SOURCE_INPUT_NAMES, (q, k, v)))
            kept = {n: inputs[n] for n in self.reads_source} if self.active(call) else {}
            recorder.keep(self.reader, call, kept)
            return previous(q, k, v)
        if call.layout is None or not self.active(call):
            return previous(q, k, v)
        source = call.source_inputs(self, q, k, v)
        if source is None:
            return previous(q, k, v)
        return self.compute(call, q, k, v, previous, source)

    def __deepcopy__(self, memo):
        return self

    def chain(self):
        """This patch and the pack's patches it wraps, outermost first, then the first foreign replace
        (or None when the chain ends at the host's default kernel)."""
        fn = self
        while isinstance(fn, AttentionPatch):
            yield fn
            fn = fn.previous
        yield fn
