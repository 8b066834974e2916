"""The Edit Sampler's report: what an edit did and why it may have done nothing.

Facts come from three places, all read, never changed: the model's attention patches (engine/contract.py
AttentionPatch: method, the blocks it is on, where a source reader is `active`), the branch sampler's run
(engine/branches.py BranchRun: which branches ran, were replayed or were not needed, the final mask, the
mask run's word classes) and the final latents. `EditReport.text()` is what the node shows in the UI and
writes to the log; `hints` are the likely reasons for an edit that changes little or nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..attention.layout import AUX, SOURCE, TARGET
from .contract import AttentionCall, AttentionPatch
from .dit import JOINT, DitCall, Tag, dit_blocks, dit_family, dit_patches
from .patching import block_map_sides, transformer_blocks

# An edited latent closer than this to the source (relative RMS difference) is reported as "almost the source".
NO_CHANGE = 0.02
# A latent pixel counts as changed where target and source differ by more than this share of the source's
# typical per-pixel magnitude (RMS over the channels, averaged over the image).
CHANGED_PIXEL = 0.1
INJECTION_PREFIX = "injection:"


@dataclass
class Injection:
    """One self-attention injection found on the model: where and when it reads the source."""

    method: str  # "fpe" or "masactrl"
    layers: int  # blocks it is registered on
    of_layers: int  # transformer blocks of the model
    active_steps: list[int]  # steps of this run (indices into the full schedule) where it reads the source
    run_steps: list[int]  # every step of this run
    layers_active: int  # blocks where it reads at some step of the run
    # On a DiT: the blocks it is registered on, (kind, index) in execution order ("double"/"single"; SD3's
    # joint blocks are "double", as the host's `dit` replace names them). None on a UNet.
    blocks: tuple[tuple[str, int], ...] | None = None

    def blocks_text(self) -> str:
        """'double 0-1, single 0-3': the DiT blocks by kind, runs of indices joined."""
        parts = []
        for kind in dict.fromkeys(k for k, _ in self.blocks or ()):
            idx = sorted(i for k, i in self.blocks if k == kind)
            runs, first = [], idx[0]
            for a, b in zip(idx, idx[1:] + [None]):
                if b != a + 1:
                    runs.append(str(first) if first == a else f"{first}-{a}")
                    first = b
            parts.append(f"{kind} {', '.join(runs)}")
        return ", ".join(parts)


@dataclass
class EditReport:
    steps: int
    run_steps: int
    cfg: float
    real_image: bool
    branches: tuple[str, ...] = ()
    ran: tuple[str, ...] = ()
    replayed: tuple[str, ...] = ()
    not_needed: tuple[str, ...] = ()
    recomputed: dict = field(default_factory=dict)
    pinned: tuple[str, ...] = ()
    injections: list[Injection] | None = field(default_factory=list)  # None: not read on this model family
    uniform: tuple[str, ...] = ()  # branches with the pack's uniform cross-attention
    mask_kind: str | None = None
    mask_coverage: float | None = None  # share of the image the final mask lets change (None: no mask)
    mask_words: str | None = None
    moved: float = 0.0  # ||target - source|| / ||source|| of the final latents
    changed_area: float = 0.0
    same_prompts: bool = False
    warnings: list[str] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)
    sampler: str = "DDIM"  # the branch sampler's ODE step: DDIM on the UNets, Euler on the flow models

    def text(self) -> str:
        lines = ["Edit report", f"steps: {self.run_steps} of {self.steps} ({self.sampler}), cfg {self.cfg:g}, "
                 f"{'real image (inversion)' if self.real_image else 'generated image (seed)'}"]
        parts = [f"{b} ran" for b in self.ran]
        parts += [f"{b} replayed from the inversion (not run)" for b in self.replayed]
        parts += [f"{b} pinned and read by nothing (not run)" for b in self.not_needed]
        lines.append("branches: " + "; ".join(parts))
        for branch, reason in self.recomputed.items():
            lines.append(f"  {branch} recomputed, not replayed: {reason}")
        if self.pinned:
            lines.append(f"pinned to the inversion: {', '.join(self.pinned)}")
        for inj in self.injections or []:
            where = (f"{inj.layers_active} of {inj.of_layers} layers" if inj.blocks is None else
                     f"{inj.layers_active} of {inj.of_layers} blocks ({inj.blocks_text()})")
            lines.append(f"injection: {inj.method} at {where}, {_steps_text(inj.active_steps, inj.run_steps)}")
        if self.injections is None:
            lines.append("injection: not reported on this model family")
        elif not self.injections:
            lines.append("injection: none")
        if self.uniform:
            lines.append(f"uniform cross-attention: {', '.join(self.uniform)}")
        if self.mask_kind is None:
            lines.append("mask: none (the whole image may change)")
        else:
            coverage = "never applied" if self.mask_coverage is None else f"covers {self.mask_coverage:.1%} of the image"
            lines.append(f"mask: {self.mask_kind}, {coverage}")
            if self.mask_words:
                lines.append(f"  {self.mask_words}")
        lines.append(f"target vs source: differs by {self.moved:.1%} (RMS, latent), changed area "
                     f"{self.changed_area:.1%}")
        lines += [f"WARNING: {w}" for w in self.warnings]
        lines += [f"HINT: {h}" for h in self.hints]
        if not self.warnings and not self.hints:
            lines.append("no warnings")
        return "\n".join(lines)


def _steps_text(active: list[int], run: list[int]) -> str:
    if not active:
        return f"no step of {len(run)}"
    if len(active) == len(run):
        return f"every step ({len(run)} of {len(run)})"
    span = f"steps {active[0]}-{active[-1]}" if active == list(range(active[0], active[-1] + 1)) else "steps"
    return f"{span} ({len(active)} of {len(run)})"


def _probe(key: tuple[str, int, int], step: int, steps: int, side: float | None) -> AttentionCall:
    """An attention call as a patch sees it at `step` in block `key`, for asking its `active`."""
    return AttentionCall(options={}, batch=2, heads=1, chunks=(0,), run=None, step=(step, steps), exact_step=True,
                         block=key, map_hw=None, map_side=side)


def _dit_probe(block, step: int, steps: int) -> DitCall:
    """A joint-attention call in DiT block `block` at `step`, for asking a DiT patch's `active`."""
    return DitCall(options={}, batch=2, heads=1, chunks=(0,), run=None, step=(step, steps), exact_step=True,
                   block=(block.kind, block.index, JOINT), map_hw=None, map_side=None, txt=slice(0, 0),
                   img=slice(0, 0), joint=True, tag=Tag(block, None))


def find_dit_injections(model, steps: int, run_steps: int) -> list[Injection]:
    """The pack's injections on a DiT (Flux, SD3): the `DitAttentionPatch`es of the attention-override chain
    whose method is an injection, with the blocks each is on and the steps of this run it reads the source."""
    blocks = dit_blocks(model)
    run = list(range(steps - run_steps, steps))
    found: dict = {}
    for link in reversed(dit_patches(model)):  # innermost (installed first) first
        if not link.method.startswith(INJECTION_PREFIX):
            continue
        entry = found.setdefault(link.reader or id(link), {"method": link.method[len(INJECTION_PREFIX):],
                                                           "blocks": [], "steps": set(), "active": 0})
        for block in blocks:
            if (block.kind, block.index) not in link.blocks:
                continue
            entry["blocks"].append((block.kind, block.index))
            active = [i for i in run if link.active(_dit_probe(block, i, steps))]
            entry["steps"] |= set(active)
            entry["active"] += bool(active)
    return [Injection(e["method"], len(e["blocks"]), len(blocks), sorted(e["steps"]), run, e["active"],
                      blocks=tuple(e["blocks"])) for e in found.values()]


def find_injections(model, steps: int, run_steps: int) -> list[Injection] | None:
    """The pack's self-attention injections on `model` and where in this run they read the source: on a
    UNet from the attn1 replace table, on a DiT from the attention override (find_dit_injections); None on
    a model of neither kind."""
    if dit_family(model) is not None:
        return find_dit_injections(model, steps, run_steps)
    table = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    try:
        keys = transformer_blocks(model)
        sides = block_map_sides(model)
    except (ValueError, AttributeError):  # neither a UNet nor a supported DiT: nothing to read
        return None
    run = list(range(steps - run_steps, steps))
    found: dict[str, dict] = {}
    for key in keys:
        fn = table.get(key, table.get(key[:2]))
        links = fn.chain() if isinstance(fn, AttentionPatch) else []
        for link in links:
            if not (isinstance(link, AttentionPatch) and link.method.startswith(INJECTION_PREFIX)):
                continue
            entry = found.setdefault(link.reader or id(link), {"method": link.method[len(INJECTION_PREFIX):],
                                                               "layers": 0, "steps": set(), "active_layers": 0})
            entry["layers"] += 1
            side = sides.get(key)
            active = [i for i in run if link.active(_probe(key, i, steps, side))]
            entry["steps"] |= set(active)
            entry["active_layers"] += bool(active)
    return [Injection(e["method"], e["layers"], len(keys), sorted(e["steps"]), run, e["active_layers"])
            for e in found.values()]


def latent_change(target: torch.Tensor, source: torch.Tensor) -> tuple[float, float]:
    """(||target - source|| / ||source||, share of latent pixels that changed) of two (images, C, H, W) latents."""
    t, s = target.double(), source.double()
    moved = float((t - s).norm() / s.norm().clamp_min(1e-12))
    per_pixel = (t - s).pow(2).mean(dim=1).sqrt()
    scale = s.pow(2).mean(dim=1).sqrt().mean().clamp_min(1e-12)
    return moved, float((per_pixel > CHANGED_PIXEL * scale).double().mean())


def add_hints(report: EditReport) -> None:
    """The likely reasons an edit changes little or nothing, from the facts gathered."""
    hints = report.hints
    for inj in report.injections or []:
        every = inj.active_steps == inj.run_steps and inj.run_steps
        if inj.method == "fpe" and every:
            hints.append("FPE injects at every step (fpe_ratio 1.0 or a window covering the whole run): the target "
                         "keeps the source's self-attention maps throughout and the edit is likely to do nothing; "
                         "lower fpe_ratio (0.8 for real images, 0.4 for generated ones)")
        elif inj.method == "masactrl" and every and inj.layers_active == inj.of_layers:
            hints.append("MasaCtrl reads the source from the first step at every layer: the target copies the "
                         "source's content and the edit is likely to do nothing; raise masactrl_start_step (4) "
                         "or leave masactrl_start_layer at -1")
        elif not inj.active_steps:
            hints.append(f"the {inj.method} injection is active at no step of this run (its window lies outside "
                         f"the steps sampled): it has no effect")
    if report.same_prompts:
        hints.append("the source and target prompts are the same: the edit can only reproduce the source; "
                     "change the target prompt")
    if report.mask_kind is not None:
        if report.mask_coverage is None:
            hints.append("the mask was never applied (for the Adaptive Mask: no step below t_mask): nothing "
                         "confines the edit")
        elif report.mask_coverage <= 0.0:
            hints.append("the mask has zero area: outside it the image is the source, so nothing can change; "
                         "check the mask's words (they must name what to edit) or lower its threshold")
        elif report.mask_coverage >= 1.0:
            hints.append("the mask covers the whole image: it keeps nothing of the source")
    if report.moved < NO_CHANGE:
        hints.append(f"the edited image is almost the source (differs by {report.moved:.1%})"
                     + ("" if len(hints) else ": check that the target prompt says what should change"))


def branch_facts(report: EditReport, run) -> None:
    """Which branches ran, were replayed or were not needed, from the branch sampler's run."""
    info = run.info
    report.branches = tuple(run.latents)
    report.replayed = tuple(info.get("replayed", ()))
    report.not_needed = tuple(info.get("unused", ()))
    report.recomputed = dict(info.get("recomputed", {}))
    report.ran = tuple(b for b in report.branches if b not in report.replayed + report.not_needed)


def mask_facts(report: EditReport, run, kind: str | None, words: list[str] | None = None) -> None:
    report.mask_kind = kind
    if kind is None:
        return
    report.mask_coverage = None if run.mask is None else float(run.mask.float().mean())
    classes = run.info.get("mask_classes")
    words = run.info.get("mask_word_names") or words  # the run's own (T5's words on Flux)
    if words and classes is not None:
        obj = [w for w, on in zip(words, classes.is_object[0].tolist()) if on]
        bg = [w for w, on in zip(words, classes.is_background[0].tolist()) if on]
        report.mask_words = f"object words: {', '.join(obj) or 'none'}; background words: {', '.join(bg) or 'none'}"


__all__ = ["EditReport", "Injection", "add_hints", "branch_facts", "find_dit_injections", "find_injections",
           "latent_change", "mask_facts", "SOURCE", "TARGET", "AUX"]
