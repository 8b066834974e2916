"""Source replay: an edit reuses what the inversion computed instead of running the source again.

With the source pinned to the inversion trajectory, the source branch at step i is evaluated at the
stored (latent, sigma). Where its conditioning and its attention are those of the inversion pass,
it computes exactly what the inversion computed there, so the inversion keeps it: the prediction
(already in the handle) and the attention inputs the pack's readers take from the source
(self-attention injection, only at their own layers and steps). The edit then runs the target
branch alone. The same holds for UAM's auxiliary branch (uniform attention, the inversion's
prompt, no guidance), which is the uniform-attention inversion's own prediction.

Where the math does not give the same result (another prompt, attention patched differently, other
model options), the plan says why and the branch is recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import comfy.model_management
import torch

from ..attention.layout import INVERSION, SOURCE
from .contract import RUN_KEY, AttentionCall, is_unguided
from .dit import TOKENS_KEY
from .patching import branch_attention_signature, options_signature, source_readers

RUN_KEYS = (RUN_KEY, TOKENS_KEY)  # per-run data (the run wrapper, the DiT token layout), not part of the model


def _chunk_kinds(call: AttentionCall, rows_per_chunk: int) -> tuple[int, ...]:
    if len(call.chunks) * rows_per_chunk != call.batch:
        raise RuntimeError(f"attention-edit: a batch of {call.batch} rows does not split into {len(call.chunks)} "
                           f"chunks of {rows_per_chunk}")
    return call.chunks


@dataclass
class SourceRecord:
    """What the inversion kept for replay; part of the handle.

    inputs[(reader, block, step, kind)] = {name: tensor (images, tokens, channels)}, kept on the
    intermediate device (the CPU unless ComfyUI runs --gpu-only).
    """

    inputs: dict = field(default_factory=dict)
    readers: set = field(default_factory=set)
    attention_signature: tuple = ()
    options_signature: tuple = ()
    chunk_keys: dict = field(default_factory=dict)  # inversion chunk kind -> conditioning key

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for kept in self.inputs.values() for t in kept.values())


class SourceRecorder:
    """An inversion's run context holds it; readers hand it their source inputs (engine/contract.py)."""

    def __init__(self, images: int):
        self.images = images
        self.record = SourceRecord()
        self.device = comfy.model_management.intermediate_device()

    def keep(self, reader: str, call: AttentionCall, inputs: dict[str, torch.Tensor]) -> None:
        self.record.readers.add(reader)
        if not call.exact_step or not inputs:  # e.g. the clean latent's call, which no edit step makes
            return
        for c, kind in enumerate(_chunk_kinds(call, self.images)):
            rows = slice(c * self.images, (c + 1) * self.images)
            key = (reader, call.block, call.step[0], kind)
            self.record.inputs[key] = {name: t[rows].to(self.device, copy=True) for name, t in inputs.items()}


class ReplayStore:
    """An edit's run context holds it when the source branch is replayed."""

    def __init__(self, record: SourceRecord, kind_map: dict[int, int], rows_per_chunk: int):
        self.record, self.kind_map, self.rows_per_chunk = record, kind_map, rows_per_chunk

    def source_inputs(self, reader: str, call: AttentionCall, names, like: torch.Tensor):
        """The source's inputs for every target row of this call (chunk by chunk, image by image)."""
        parts = []
        for kind in _chunk_kinds(call, self.rows_per_chunk):
            key = (reader, call.block, call.step[0], self.kind_map[kind])
            kept = self.record.inputs.get(key)
            if kept is None:
                raise RuntimeError(f"attention-edit: the inversion kept no source attention for {key}; "
                                   f"this is a bug, please report it")
            parts.append(kept)
        return {name: torch.cat([p[name] for p in parts]).to(like.device, like.dtype, non_blocking=True)
                for name in names}


@dataclass
class ReplayPlan:
    branches: tuple[str, ...] = ()  # replayed, not run
    unused: tuple[str, ...] = ()  # pinned and read by nothing: not run, nothing to replay
    kind_map: dict = field(default_factory=dict)  # edit chunk kind -> inversion chunk kind (source)
    reasons: dict = field(default_factory=dict)  # branch -> why it is recomputed

    @property
    def skipped(self) -> tuple[str, ...]:
        return self.branches + self.unused


def plan_replay(model, handle, branches: dict[str, tuple[str, str]], cfg: float, pinned: set[str],
                source_prediction_read: bool = False) -> ReplayPlan:
    """Which branches an edit may replay from `handle` instead of running them.

    branches: branch name -> (conditioning key of its positive, of its negative), for the branches
    that could be replayed (source, aux); pinned: the branches pinned to the trajectory. `model` is
    the model the edit samples with; source_prediction_read: a mask strategy reads the source's x0.
    """
    plan = ReplayPlan()
    record = getattr(handle, "record", None)
    branches = dict(branches)
    readers = source_readers(model)
    for name in [b for b in branches if b not in pinned]:
        plan.reasons[name] = f"the {name} branch is not pinned to the inversion trajectory"
        del branches[name]
    if SOURCE in branches and not readers and not source_prediction_read:
        # A pinned source nothing reads from: its result would be thrown away, whatever its prompt.
        plan.unused += (SOURCE,)
        del branches[SOURCE]
    if record is None or not torch.isfinite(handle.eps[0]).all():
        plan.reasons.update({b: "the inversion was made with an unpatched model, which keeps nothing for replay: "
                                "invert with the patched MODEL you edit with" for b in branches})
        return plan
    if options_signature(model, RUN_KEYS) != record.options_signature:
        plan.reasons.update({b: "the model options (wrappers, cfg functions, patches) differ from the inversion's"
                             for b in branches})
        return plan
    inversion_cfg1 = is_unguided(handle.cfg)
    # The chunks each branch evaluates: conditional always; unconditional unless the host skips it at cfg 1.
    cond_only = is_unguided(cfg) and not model.model_options.get("disable_cfg1_optimization", False)
    for name, (positive, negative) in branches.items():
        if branch_attention_signature(model, name) != record.attention_signature:
            plan.reasons[name] = f"the {name} branch's attention is patched differently from the inversion's"
            continue
        wanted = {0: positive} if cond_only else {0: positive, 1: negative}
        if inversion_cfg1:
            ok = all(key == record.chunk_keys.get(0) for key in wanted.values())
            kind_map = {0: 0, 1: 0}
        else:  # the inversion's prediction is guided: only the same guidance on the same prompts matches
            # (UAM's aux branch is unguided, so it never matches a guided inversion).
            ok = (name == SOURCE and abs(cfg - handle.cfg) < 1e-9 and wanted.get(0) == record.chunk_keys.get(0)
                  and wanted.get(1) == record.chunk_keys.get(1))
            kind_map = {0: 0, 1: 1}
        if not ok:
            plan.reasons[name] = (f"the {name} branch's prompts or cfg differ from the inversion's (exact replay "
                                  f"needs the inversion's prompt, and at cfg above 1 the same negative)")
            continue
        if name == SOURCE:
            missing = readers - record.readers
            if missing:
                plan.reasons[name] = ("the inversion was made without this model's self-attention injection: "
                                      "invert with the same patched MODEL to replay the source")
                continue
            plan.kind_map = kind_map
        plan.branches += (name,)
    return plan


def inversion_signatures(model) -> tuple[tuple, tuple]:
    return branch_attention_signature(model, INVERSION), options_signature(model, RUN_KEYS)
