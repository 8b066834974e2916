"""The FPE paper's probes on the toy world: where self-attention carries the layout, where cross-attention
carries the words (`python -m bench.run --only probes`).

* **Self-attention layout, per layer.** For held-out object edits (recolour, reshape, replace), the
  source is inverted with the empty prompt and edited to the target caption three ways: with no
  attention control (the plain model: the *baseline*), and with Free-Prompt-Editing's self-attention
  replacement (the pack's `engine.injection.apply_injection`, mode fpe, its default ratio 0.8, every map
  size allowed) kept on **one** transformer block only (the other blocks' attn1 patches removed), for
  each block in turn; and with it on every block, and at the pack's default (map side at most 1/2).
  Each edit goes through the Edit Sampler as the FPE workflow wires it (replayed source). What the
  swap restores is measured against the source layout on two readings:

  - structure: 1 - IoU of the classifier's foreground mask of the edit with that of the ground-truth
    target rendering (whose layout is the source's); restored share ``1 - sum(miss_layer) /
    sum(miss_baseline)`` over the pairs;
  - drift: the edited object's centroid drift (toyworld.edit_score), restored share
    ``1 - sum(drift_layer) / sum(drift_baseline)`` over the pairs where both edits show the object.

  0 = like no injection, 1 = the source layout exactly; negative = further from it than no injection.
* **Cross-attention per word.** `toyworld.evaluate.attention_concentration` on held-out scenes: for each
  object's size, colour and shape word, the share of its cross-attention mass inside its object's
  ground-truth mask, per map resolution and over all, against chance (the mask's share of the image).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from fixtures.toy_graph import World, run_edit

from .quality import open_world, structure_iou

log = logging.getLogger("attention_edit.bench.probes")

OBJECT_EDITS = ("recolour", "reshape", "replace")
ALL_LAYERS = "all_layers"
FPE_DEFAULT = "fpe_default"


def layer_name(key: tuple[str, int, int]) -> str:
    """A block key as a metric-name part: ("output", 3, 0) -> "output3" (the index only when not 0)."""
    name, number, index = key
    return f"{name}{number}" + (f"_{index}" if index else "")


def map_sides(world: World, image_size: int) -> dict[tuple[str, int, int], int]:
    """Each transformer block's self-attention map side (tokens per side), from one forward pass."""
    import torch

    from attention_edit.engine.patching import default_attention, transformer_blocks

    sides: dict[tuple[str, int, int], int] = {}
    probe = world.model.clone()

    def recorder(key):
        def attn(q, k, v, extra_options):
            sides[key] = int(extra_options["activations_shape"][-2])
            return default_attention(q, k, v, extra_options)
        return attn

    for key in transformer_blocks(probe):
        probe.set_model_attn1_replace(recorder(key), *key)
    latent = world.encode(np.zeros((image_size, image_size, 3), dtype=np.uint8))["samples"]
    probe.model.apply_model(torch.zeros_like(latent), torch.ones(1), c_crossattn=world.cond("")[0][0],
                            transformer_options=probe.model_options["transformer_options"])
    return sides


def fpe_on(model, keys: set[tuple[str, int, int]] | None, max_map_side: float = 1.0):
    """The pack's FPE injection (mode fpe, default ratio), kept on the blocks `keys` only (None: all it selects)."""
    from attention_edit.engine.injection import apply_injection

    patched = apply_injection(model, "fpe", fpe_max_map_side=max_map_side)
    if keys is not None:
        replaces = patched.model_options["transformer_options"]["patches_replace"]["attn1"]
        for key in [k for k in replaces if k not in keys]:
            del replaces[key]
    return patched


def layout_runs(world: World, pairs: Sequence) -> list[dict[str, Any]]:
    """One row per (pair, variant): the edited object's drift and the structure IoU (see the module docstring)."""
    from attention_edit.engine.patching import transformer_blocks
    from toyworld import edit_score, scenes

    keys = transformer_blocks(world.model)
    variants = {"baseline": world.model, **{layer_name(k): fpe_on(world.model, {k}) for k in keys},
                ALL_LAYERS: fpe_on(world.model, None), FPE_DEFAULT: fpe_on(world.model, None, 0.5)}
    rows = []
    for n, pair in enumerate(pairs):
        source_image, target_image = scenes.render(pair.source, pair.size)[0], scenes.render(pair.target, pair.size)[0]
        latent = world.encode(source_image)
        for variant, model in variants.items():
            spec = {"model": model, "invert": "empty", "strength": 1.0, "source": "empty"}
            handle = world.invert(model, latent, "")  # each variant reads its own layers' source inputs
            image, _ = run_edit(world, spec, pair, handle)
            score = edit_score.score_edit(pair, image)
            rows.append({"pair": n, "kind": pair.kind, "variant": variant, "drift_px": score["drift_px"],
                         "structure": structure_iou(image, target_image), "success": score["success"]})
        log.info("probe pair %d/%d (%s) done", n + 1, len(pairs), pair.kind)
    return rows


def restored_shares(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per variant: the share of the baseline's layout error it removes, on structure and on drift."""
    baseline = {r["pair"]: r for r in rows if r["variant"] == "baseline"}
    out: dict[str, dict[str, float]] = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        miss = sum(1.0 - r["structure"] for r in mine)
        miss_base = sum(1.0 - baseline[r["pair"]]["structure"] for r in mine)
        both = [r for r in mine if r["drift_px"] is not None and baseline[r["pair"]]["drift_px"] is not None]
        drift = sum(r["drift_px"] for r in both)
        drift_base = sum(baseline[r["pair"]]["drift_px"] for r in both)
        found = [r["drift_px"] for r in mine if r["drift_px"] is not None]
        out[variant] = {
            "structure_restored": 1.0 - miss / miss_base if miss_base > 0 else float("nan"),
            "drift_restored": 1.0 - drift / drift_base if drift_base > 0 else float("nan"),
            "median_drift_px": float(np.median(found)) if found else float("nan"),
            "structure_iou": float(np.mean([r["structure"] for r in mine])),
            "success": float(np.mean([r["success"] for r in mine])),
            "n": len(mine), "n_drift": len(both)}
    return out


def run(rec, model_path, **options) -> None:
    """Measure and record the probes (options: see `measure`) under torch.inference_mode."""
    import torch

    with torch.inference_mode():
        measure(rec, model_path, **options)


def measure(rec, model_path, steps: int = 50, n_per_kind: int = 1, n_attention: int = 16,
            kinds: Sequence[str] = OBJECT_EDITS) -> None:
    from attention_edit.engine.patching import transformer_blocks
    from toyworld import evaluate, scenes

    world, add = open_world(rec, model_path, steps)
    started = time.perf_counter()
    sides = map_sides(world, world.size)
    pairs = scenes.make_edit_pairs(0, n_per_kind, world.size, split="test", kinds=kinds)
    shares = restored_shares(layout_runs(world, pairs))
    labels = {layer_name(k): k for k in transformer_blocks(world.model)}
    for variant, entry in shares.items():
        extra = {"n": entry["n"]}
        if variant in labels:
            extra.update(map_side=sides.get(labels[variant]), layer_index=list(labels).index(variant))
        for metric, value, unit, lower in (("structure_restored", entry["structure_restored"], "fraction", False),
                                           ("drift_restored", entry["drift_restored"], "fraction", False),
                                           ("median_drift_px", entry["median_drift_px"], "px", True),
                                           ("structure_iou", entry["structure_iou"], "iou", False),
                                           ("edit_success_rate", entry["success"], "rate", False)):
            if value == value:  # a share over no pair is not recorded
                add(f"toyworld.probe.{metric}.{variant}", value, unit, lower,
                    **(extra | ({"n": entry["n_drift"]} if metric == "drift_restored" else {})))
    log.info("self-attention probe: %d pairs x %d variants in %.0f s", len(pairs), len(shares),
             time.perf_counter() - started)

    started = time.perf_counter()
    if n_attention:
        att = evaluate.attention_concentration(world.model, world.clip, world.vae,
                                               evaluate.held_out_scenes(n_attention, seed=1), image_size=world.size)
        for kind in evaluate.WORD_KINDS:
            entry = att[kind]
            for view, value in entry.items():
                if view in ("n_words", "chance") or view.endswith("_other"):
                    continue
                metric = (f"toyworld.probe.word_mass_in_mask.{kind}" if view == "all" else
                          f"toyworld.probe.word_own_object_rate.{kind}" if view == "own_object_rate" else
                          f"toyworld.probe.word_mass_in_mask.{kind}.{view}")
                add(metric, value, "fraction" if view != "own_object_rate" else "rate", steps_=0, n=entry["n_words"],
                    chance=round(entry["chance"], 4))
        log.info("cross-attention probe: %d scenes in %.0f s", n_attention, time.perf_counter() - started)
