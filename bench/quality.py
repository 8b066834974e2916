"""Edit quality on the toy world (models/toyworld.safetensors), measured the way PIE-Bench measures SD.

Every method runs through the pack's own nodes with the defaults a user gets (`run_node` fills every
input a call does not set from the node's schema); images come from ComfyUI's VAEEncode/VAEDecode
and conditioning from CLIPTextEncode, as in a graph (`World`, `run_node`, the image metrics and the
methods' wiring are in fixtures/toy_graph.py, shared with the tests). The world gives exact answers:
held-out scenes and edit pairs (captions the training never saw) with ground-truth edit masks, and a
classifier that reads attributes back (`toyworld.classifier`).

* Reconstruction (held-out scenes): PSNR / SSIM of the decoded reconstruction against the rendered
  input, per inversion variant: ``ddim_cfg1`` and ``ddim_cfg7_5`` (DDIM inversion and reconstruction
  with the caption at that cfg, as the reconstruction workflow compares), ``uniform`` (inversion and
  reconstruction through AttnEdit_UniformAttention with the empty prompt, no cfg: UAM's official
  inversion and its reconstruction branch), ``pinned``
  (InversionReconstruct with the source pinned), and ``vae`` (encode and decode only: the ceiling
  every variant shares).
* Edits (held-out edit pairs, every kind), each scored by `toyworld.edit_score.score_edit`: per method
  (and per kind) the **in-place** success rate ``edit_success_rate`` (the target attributes where the
  source object was, position and size within half a latent cell, every kept object in place, the
  right object count) and beside it the lenient rate ``edit_success_rate_lenient`` (the earlier test:
  the target attributes on the edited object wherever it is; for "remove" the object count, for
  "background" the background colour); the median drift and size error of the edited object (px,
  recolour/reshape/replace) and the median drift of the kept objects; the background PSNR and SSIM
  outside the ground-truth edit mask against the source image (``background_psnr_db``,
  ``background_ssim``) and against the source's VAE round trip (``..._vs_vae``: what an edit that
  changes nothing else can reach), with the round trip's own background PSNR/SSIM against the source
  (``background_psnr_db.vae_round_trip``); and a structure score (IoU of the classifier's foreground
  masks of the edit and of the ground-truth target rendering). Methods, wired as their example workflows wire them (see
  `edit_methods`): ``ddim`` (the target prompt from the caption inversion, no attention control),
  ``fpe`` (Free-Prompt-Editing, empty-prompt inversion and source prompt: the source is replayed),
  ``masactrl`` (caption inversion), ``uam``
  (UAM's official recipe, workflow 1: two empty-prompt inversions, normal attention for source and
  target, uniform attention for the auxiliary branch; MasaCtrl + adaptive mask with the red line, nothing
  pinned), ``uam_pinned`` (the pack's earlier recipe: one uniform-attention inversion, source and
  auxiliary branch pinned to it), ``uam_unchanged`` (the official recipe with the paper's dilation of
  the unchanged region), ``instdiffedit``
  (instant mask on the edited words, empty-prompt inversion at strength 0.5), ``instdiffedit_fine_maps`` (the same,
  the mask read from 1/2-side maps and thresholded at 0.05: a variant for small latents), ``ground_truth_mask`` (the same
  masked edit with the true edit region as ``edit_mask``: a perfect mask, which separates the mask's errors from
  the masked sampling's).
* Masks: IoU of the final MASK (> 0.5) with the ground-truth edit mask, on the object edits
  (recolour, reshape, replace), for the instant and the adaptive mask, with its precision (the share of the mask
  inside the edit region) and recall (the share of the region it covers); on the one-object scenes among
  them, how often the mask is empty and how often it is inverted (its complement fits the edit region
  better than it does); and the IoU a perfect mask keeps on the latent grid and on the 1/4-side attention-map
  grid (``mask_iou.ground_truth_on_<side>x<side>``: the region averaged onto the grid, back bilinearly,
  thresholded), what resolution alone allows; and the background PSNR of the true target's latent pasted into
  the source's on the cells the edit region touches (``background_psnr_db.latent_composite``): what a perfect
  latent-space mask keeps once the VAE decodes it.
* Generation: attribute accuracy of images generated from held-out captions; object-word
  cross-attention mass inside the object; on two-object prompts with and without
  AttnEdit_AttentionRegulation, how often both objects are drawn (each matched by a detection of
  its colour), how often both with their shape too, and, on the prompts where plain sampling left
  an object out (if any), how often regulation brings it back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from fixtures.toy_graph import (
    EDIT_CFG,
    World,
    aux_invert_for,
    edit_methods,
    inversion_key,
    invert_for,
    iou,
    paste_into_source,
    psnr,
    run_edit,
    run_node,
    ssim,
)

log = logging.getLogger("attention_edit.bench.quality")

OBJECT_EDITS = ("recolour", "reshape", "replace")
MASK_THRESHOLD = 0.5
LATENT_FACTOR = 8  # the toy VAE's (and SD's) pixels per latent cell
VAE_ROUND_TRIP = "vae_round_trip"
"""The method name of the rows that score the source's VAE round trip (background ceiling)."""
PASTES = {"_pasted": 0, "_pasted_grown": LATENT_FACTOR}
"""Each masked method is also scored finished in pixel space, as a graph can finish it with stock nodes after
VAEDecode (`paste_into_source`: ImageCompositeMasked over the source image through the edit's MASK): method +
"_pasted" with the MASK as it is, + "_pasted_grown" with it grown by one latent cell (GrowMask), which takes in the
pixels the decoder spreads an edited cell's change into. The latent-space mask's background stays below the VAE
round trip (the decoder mixes neighbouring cells; `latent_composite`): pasting is how a graph keeps the rest of the
image as it was."""


def grid_iou(edit_mask: np.ndarray, side: int) -> float:
    """IoU with the ground-truth edit region of that region itself put on a side x side grid (area average),
    brought back bilinearly and thresholded: what a perfect mask made at that resolution reaches (the latent
    grid; the 1/4-side attention maps the instant mask is made from)."""
    import torch
    import torch.nn.functional as F

    region = torch.from_numpy(edit_mask.astype(np.float32))[None, None]
    coarse = F.interpolate(region, size=(side, side), mode="area")
    back = F.interpolate(coarse, size=edit_mask.shape, mode="bilinear", align_corners=False)[0, 0].numpy()
    return iou(back > MASK_THRESHOLD, edit_mask)


def latent_composite(source: dict, target: dict, edit_mask: np.ndarray) -> dict:
    """The target's latent in every latent cell the edit region touches, the source's elsewhere: the best any edit
    masked in latent space can do, its background limited only by the VAE decoder mixing neighbouring cells."""
    import torch
    import torch.nn.functional as F

    region = torch.from_numpy(edit_mask.astype(np.float32))[None, None]
    cells = F.max_pool2d(region, LATENT_FACTOR) > 0
    return {"samples": torch.where(cells, target["samples"], source["samples"])}


def structure_iou(image: np.ndarray, reference: np.ndarray) -> float:
    from toyworld import classifier

    return iou(classifier.foreground_mask(image), classifier.foreground_mask(reference))


def masked_ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Mean SSIM (scikit-image's local SSIM map, 7x7 windows, per channel) over the pixels where mask is True."""
    from skimage.metrics import structural_similarity

    _, local = structural_similarity(a, b, channel_axis=-1, data_range=255, full=True)
    return float(local[mask].mean())


def background_scores(image: np.ndarray, source_image: np.ndarray, source_vae: np.ndarray,
                      keep: np.ndarray) -> dict[str, float | None]:
    """Background PSNR and SSIM of `image` outside the edit mask, against the source and its VAE round trip, and the
    mean squared error against the source (pooled over edits: `pooled_psnr`)."""
    if not keep.any():
        return dict.fromkeys(("background_psnr", "background_mse", "background_psnr_vs_vae", "background_ssim",
                              "background_ssim_vs_vae"))
    error = image[keep].astype(np.float64) - source_image[keep].astype(np.float64)
    return {"background_psnr": psnr(image, source_image, keep), "background_mse": float(np.mean(error ** 2)),
            "background_psnr_vs_vae": psnr(image, source_vae, keep),
            "background_ssim": masked_ssim(image, source_image, keep),
            "background_ssim_vs_vae": masked_ssim(image, source_vae, keep)}


# --------------------------------------------------------------------------------------------------
# Reconstruction


def reconstruction(world: World, scene_list: Sequence) -> dict[str, dict[str, list[float]]]:
    from attention_edit.nodes.inversion import InversionReconstruct
    from attention_edit.nodes.uniform_attention import UniformAttention
    from toyworld import scenes

    uniform = run_node(UniformAttention, model=world.model, scope="all")[0]
    empty = world.cond("")
    scores: dict[str, dict[str, list[float]]] = {}

    def add(variant: str, image: np.ndarray, reference: np.ndarray) -> None:
        entry = scores.setdefault(variant, {"psnr": [], "ssim": []})
        entry["psnr"].append(psnr(image, reference))
        entry["ssim"].append(ssim(image, reference))

    for scene in scene_list:
        image = scenes.render(scene, world.size)[0]
        latent = world.encode(image)
        caption = world.cond(scene.caption)
        add("vae", world.decode(latent), image)
        handles = {}
        for variant, cfg in (("ddim_cfg1", 1.0), ("ddim_cfg7_5", EDIT_CFG)):
            handles[variant] = world.invert(world.model, latent, scene.caption, cfg=cfg)
            out = run_node(InversionReconstruct, model=world.model, inversion=handles[variant], positive=caption,
                           negative=empty, cfg=cfg, pin_source=False)[0]
            add(variant, world.decode(out), image)
        out = run_node(InversionReconstruct, model=world.model, inversion=handles["ddim_cfg7_5"], positive=caption,
                       negative=empty, cfg=EDIT_CFG, pin_source=True)[0]
        add("pinned", world.decode(out), image)
        uniform_handle = world.invert(uniform, latent, "")
        out = run_node(InversionReconstruct, model=uniform, inversion=uniform_handle, positive=empty, negative=empty,
                       cfg=1.0, pin_source=False)[0]
        add("uniform", world.decode(out), image)
    return scores


# --------------------------------------------------------------------------------------------------
# Edits


def edit_row(pair, n: int, method: str, image: np.ndarray, seconds: float, references: dict[str, np.ndarray],
             keep_image: bool = False) -> dict[str, Any]:
    """The scores of one edited image of pair number n (references: the "source" image, its VAE round trip
    "source_vae" and the true "target")."""
    from toyworld import edit_score

    score = edit_score.score_edit(pair, image)
    row = {"pair": n, "kind": pair.kind, "method": method, "success": score["success"],
           "success_lenient": score["success_lenient"], "drift_px": score["drift_px"],
           "size_error_px": score["size_error_px"], "kept_drift_px": score["kept_drift_px"],
           **background_scores(image, references["source"], references["source_vae"], ~pair.edit_mask),
           "structure": structure_iou(image, references["target"]), "seconds": seconds}
    if keep_image:
        row["image"] = image
    return row


def edits(world: World, pairs: Sequence, methods: Sequence[str] | None = None,
          keep_images: bool = False) -> list[dict[str, Any]]:
    """One row of scores per (pair, method), and one "vae_round_trip" row per pair (the source's encode and
    decode, scored as an edit that changed nothing: its background scores are the ceiling); with keep_images
    the edited image too (row["image"])."""
    from toyworld import scenes

    table = edit_methods(world)
    methods = list(table) if methods is None else list(methods)
    rows = []
    for n, pair in enumerate(pairs):
        source_image = scenes.render(pair.source, pair.size)[0]
        target_image = scenes.render(pair.target, pair.size)[0]
        latent = world.encode(source_image)
        handles: dict[tuple, Any] = {}  # one inversion per (model, prompt, strength), shared by the methods
        for method in methods:
            spec = table[method]
            if inversion_key(spec) not in handles:
                handles[inversion_key(spec)] = invert_for(world, spec, pair, latent)
            if "aux_model" in spec and inversion_key(spec, aux=True) not in handles:
                handles[inversion_key(spec, aux=True)] = aux_invert_for(world, spec, pair, latent)
        keep = ~pair.edit_mask
        source_vae = world.decode(latent)
        ceiling = {"pair": n, "kind": pair.kind, "method": VAE_ROUND_TRIP,
                   **background_scores(source_vae, source_image, source_vae, keep)}
        if pair.kind in OBJECT_EDITS:
            side = pair.size // LATENT_FACTOR
            ceiling["grid_iou"] = {f"{s}x{s}": grid_iou(pair.edit_mask, s) for s in (side, side // 4)}
            composite = world.decode(latent_composite(latent, world.encode(target_image), pair.edit_mask))
            ceiling["composite_background_psnr"] = psnr(composite, source_image, keep)
        rows.append(ceiling)
        references = {"source": source_image, "source_vae": source_vae, "target": target_image}
        for method in methods:
            spec = table[method]
            started = time.perf_counter()
            handle = handles[inversion_key(spec)]
            aux_handle = handles[inversion_key(spec, aux=True)] if "aux_model" in spec else None
            image, mask = run_edit(world, spec, pair, handle, aux_handle)
            seconds = time.perf_counter() - started
            row = edit_row(pair, n, method, image, seconds, references, keep_images)
            finished = []  # the same edit finished in pixel space (no extra sampling): see PASTES
            if spec.get("mask") is not None or spec.get("edit_mask"):
                for suffix, grow_px in PASTES.items():
                    started = time.perf_counter()
                    pasted = paste_into_source(image, source_image, mask, grow_px)
                    seconds_pasted = seconds + time.perf_counter() - started
                    finished.append(edit_row(pair, n, method + suffix, pasted, seconds_pasted, references, keep_images))
            if spec.get("mask") is not None and pair.kind in OBJECT_EDITS:
                chosen = mask[0].cpu().numpy() > MASK_THRESHOLD
                row["mask_iou"] = iou(chosen, pair.edit_mask)
                # Too wide or too narrow: the share of the mask inside the edit region, and of the region covered.
                overlap = np.logical_and(chosen, pair.edit_mask).sum()
                row["mask_precision"] = float(overlap / chosen.sum()) if chosen.any() else None
                row["mask_recall"] = float(overlap / pair.edit_mask.sum())
                if len(pair.source.objects) == 1:  # the lone-object failures: nothing chosen, or all but the object
                    row["mask_empty"] = not chosen.any()
                    row["mask_inverted"] = iou(~chosen, pair.edit_mask) > row["mask_iou"]
            rows += [row, *finished]
        log.info("edit pair %d/%d (%s) done", n + 1, len(pairs), pair.kind)
    return rows


# --------------------------------------------------------------------------------------------------
# Generation and regulation


def objects_drawn(scene, image: np.ndarray) -> tuple[bool, bool]:
    """(every prompted object is there: matched by a detection of its colour; and with its shape too).

    The first is what attention regulation is for (no object left out); the second also asks for
    the shape, where the toy model's errors are (small objects drawn with soft corners).
    """
    from toyworld import classifier

    report = classifier.scene_attribute_report(scene, image)
    return (all(o["colour"] for o in report["objects"]), all(o["shape"] and o["colour"] for o in report["objects"]))


def regulation_targets(scene) -> str:
    """The regulated words: the two shape words, or the colour-shape phrases when the shapes are equal."""
    a, b = scene.objects
    if a.shape != b.shape:
        return f"{a.shape}, {b.shape}"
    return f"{a.colour} {a.shape}, {b.colour} {b.shape}"


def regulation_rates(world: World, scene_list: Sequence, steps: int) -> dict[str, float]:
    from attention_edit.nodes.regulation import AttentionRegulation
    from toyworld import evaluate

    settings = evaluate.GenerationSettings(steps=steps, cfg=EDIT_CFG, batch=1)
    plain, regulated = [], []
    for i, scene in enumerate(scene_list):
        settings.seed = i
        model = run_node(AttentionRegulation, model=world.model, clip=world.clip, prompt=scene.caption,
                         target_words=regulation_targets(scene))[0]
        for chosen, out in ((world.model, plain), (model, regulated)):
            out.append(objects_drawn(scene, evaluate.generate(chosen, world.clip, world.vae, [scene.caption], settings,
                                                              world.size)[0]))
    dropped = [r[0] for p, r in zip(plain, regulated) if not p[0]]  # prompts where plain sampling left an object out
    return {"plain": _mean([p[0] for p in plain]), "regulated": _mean([r[0] for r in regulated]),
            "plain_exact": _mean([p[1] for p in plain]), "regulated_exact": _mean([r[1] for r in regulated]),
            "dropped": len(dropped), "rescued": _mean(dropped)}


# --------------------------------------------------------------------------------------------------


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else float("nan")


def pooled_psnr(mse: Sequence[float]) -> float:
    """The PSNR (dB, uint8) of the mean squared error over edits. A mean of per-image PSNRs is not defined once an
    edit keeps the background exactly (infinite PSNR), as an edit pasted into the source can."""
    return 10.0 * float(np.log10(255.0 ** 2 / max(float(np.mean(mse)), 1e-10)))


def _median(values) -> float:
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else float("nan")


def record_edits(add, rows: list[dict[str, Any]]) -> None:
    """The edit records of `rows` (see `edits`): overall, per method and per method and kind.

    Medians and means of values an edit may lack (drift of an object not found, background of an edit
    that changes every pixel) are taken over the edits that have them, and not recorded when none has.
    """
    def put(metric, values, unit, reduce=_mean, lower_is_better=False, **extra):
        values = [v for v in values if v is not None]
        if values:
            add(metric, reduce(values), unit, lower_is_better, n=len(values), **extra)

    edited = [r for r in rows if r["method"] != VAE_ROUND_TRIP]
    ceiling = [r for r in rows if r["method"] == VAE_ROUND_TRIP]
    put("toyworld.edit_success_rate", [r["success"] for r in edited], "rate", note="in place")
    put("toyworld.edit_success_rate_lenient", [r["success_lenient"] for r in edited], "rate")
    put("toyworld.background_psnr_db", [r["background_psnr"] for r in edited], "dB")
    put("toyworld.structure_iou", [r["structure"] for r in edited], "iou")
    put(f"toyworld.background_psnr_db.{VAE_ROUND_TRIP}", [r["background_psnr"] for r in ceiling], "dB")
    put(f"toyworld.background_ssim.{VAE_ROUND_TRIP}", [r["background_ssim"] for r in ceiling], "ssim")
    put(f"toyworld.background_psnr_db_pooled.{VAE_ROUND_TRIP}", [r["background_mse"] for r in ceiling], "dB",
        pooled_psnr, note="the PSNR of the mean squared error over the edits")
    for method in dict.fromkeys(r["method"] for r in edited):
        mine = [r for r in edited if r["method"] == method]
        groups = [(method, mine)] + [(f"{method}.{kind}", [r for r in mine if r["kind"] == kind])
                                     for kind in dict.fromkeys(r["kind"] for r in mine)]
        for key, chosen in groups:
            put(f"toyworld.edit_success_rate.{key}", [r["success"] for r in chosen], "rate", note="in place")
            put(f"toyworld.edit_success_rate_lenient.{key}", [r["success_lenient"] for r in chosen], "rate")
            put(f"toyworld.background_psnr_db.{key}", [r["background_psnr"] for r in chosen], "dB")
            put(f"toyworld.edit_drift_px.{key}", [r["drift_px"] for r in chosen], "px", _median, True,
                note="median centroid drift of the edited object (recolour, reshape, replace)")
        put(f"toyworld.edit_size_error_px.{method}", [None if r["size_error_px"] is None else abs(r["size_error_px"])
                                                      for r in mine], "px", _median, True,
            note="median |equivalent-radius error| of the edited object")
        put(f"toyworld.kept_drift_px.{method}", [r["kept_drift_px"] for r in mine], "px", _median, True,
            note="median of the largest drift among the unedited objects")
        put(f"toyworld.background_psnr_db_vs_vae.{method}", [r["background_psnr_vs_vae"] for r in mine], "dB")
        put(f"toyworld.background_psnr_db_pooled.{method}", [r["background_mse"] for r in mine], "dB", pooled_psnr,
            note="the PSNR of the mean squared error over the edits")
        put(f"toyworld.background_exact_rate.{method}", [None if r["background_mse"] is None else r["background_mse"] == 0
                                                        for r in mine], "rate",
            note="edits whose background is the source's, pixel for pixel")
        put(f"toyworld.background_ssim.{method}", [r["background_ssim"] for r in mine], "ssim")
        put(f"toyworld.background_ssim_vs_vae.{method}", [r["background_ssim_vs_vae"] for r in mine], "ssim")
        put(f"toyworld.structure_iou.{method}", [r["structure"] for r in mine], "iou")
        put(f"toyworld.edit_seconds.{method}", [r["seconds"] for r in mine], "s", lower_is_better=True)


def run(rec, model_path, **options) -> None:
    """Measure and record everything (options: see `measure`) under torch.inference_mode, as ComfyUI runs nodes."""
    import torch

    with torch.inference_mode():
        measure(rec, model_path, **options)


# The edit methods that run on the toy flow world's DiT (Flux-shaped): FPE's map-size variant is a UNet layer rule,
# and the paper's InstDiffEdit path (Instant Mask Estimate) is UNet-only.
FLOW_METHODS = ("ddim", "fpe", "masactrl", "uam", "uam_pinned", "uam_unchanged", "instdiffedit", "ground_truth_mask")
FLOW_PREFIX = "toyflow."  # the toy flow world's metrics: the toy world's names under this prefix


def metric_prefix(config) -> str:
    """Where a world's metrics live: "toyworld." (the 128-px toy world), "toyworld256." (the same world drawn at
    256 px, 32x32 latents), "toyflow." (the toy flow world); each under the toy world's metric names."""
    from attention_edit.toyworld import model as toymodel
    from toyworld import scenes

    if config.family == toymodel.FLUX:
        return FLOW_PREFIX
    return "toyworld." if config.image_size == scenes.REFERENCE_SIZE else f"toyworld{config.image_size}."


def is_flow_world(model_path) -> bool:
    from attention_edit.toyworld import model as toymodel

    return toymodel.read_toy_metadata(model_path)[0].family == toymodel.FLUX


def open_world(rec, model_path, steps: int):
    """The toy world, and `add(metric, value, unit, lower_is_better=False, steps_=steps, **extra)` recording a
    metric of it (the model's name, the resolution and the steps filled in). Every "toyworld." metric is recorded
    under the world's `metric_prefix` (on the toy flow world as "toyflow.")."""
    from attention_edit.toyworld import model as toymodel

    world = World(model_path, steps)
    config, info = toymodel.read_toy_metadata(model_path)
    prefix = metric_prefix(config)
    kind = "toy flow world, Flux-shaped DiT" if config.family == toymodel.FLUX else "toy world"
    name = f"{kind} ({model_path.name}{'' if info.get('trained') else ', untrained'})"
    side = config.image_size // 8
    resolution = f"{config.image_size}px (latent {side}x{side})"

    def add(metric, value, unit, lower_is_better=False, steps_=steps, **extra):
        if metric.startswith("toyworld."):
            metric = prefix + metric[len("toyworld."):]
        rec.add(metric, value, unit, lower_is_better, name, resolution, steps_, **extra)

    return world, add


def measure(rec, model_path, steps: int = 50, n_recon: int = 16, n_per_kind: int = 4, n_gen: int = 64,
            n_attention: int = 32, n_regulation: int = 32, gen_steps: int = 20, methods: Sequence[str] | None = None,
            kinds: Sequence[str] | None = None) -> None:
    from toyworld import evaluate, scenes

    world, add = open_world(rec, model_path, steps)
    if is_flow_world(model_path):
        methods = [m for m in (methods or FLOW_METHODS) if m in FLOW_METHODS]
        n_attention = 0  # evaluate.attention_concentration reads the UNet's cross-attention layers
    started = time.perf_counter()
    held_out = scenes.make_dataset(1, n_recon, "test")
    recon = reconstruction(world, held_out)
    for variant, entry in recon.items():
        add(f"toyworld.recon_psnr_db.{variant}", _mean(entry["psnr"]), "dB", n=len(entry["psnr"]))
        add(f"toyworld.recon_ssim.{variant}", _mean(entry["ssim"]), "ssim", n=len(entry["ssim"]))
    add("toyworld.recon_psnr_gain_db.uniform_vs_ddim_cfg7_5",
        _mean(recon["uniform"]["psnr"]) - _mean(recon["ddim_cfg7_5"]["psnr"]), "dB", n=len(held_out))
    log.info("reconstruction: %.0f s", time.perf_counter() - started)

    started = time.perf_counter()
    pairs = scenes.make_edit_pairs(0, n_per_kind, world.size, split="test", kinds=kinds or scenes.EDIT_KINDS)
    rows = edits(world, pairs, methods)
    record_edits(add, rows)
    for metric, method in (("instant", "instdiffedit"), ("instant_fine_maps", "instdiffedit_fine_maps"),
                           ("instant_estimate", "instdiffedit_paper"), ("adaptive", "uam"),
                           ("adaptive_pinned", "uam_pinned"),
                           ("adaptive_unchanged", "uam_unchanged")):
        values = [r["mask_iou"] for r in rows if r["method"] == method and "mask_iou" in r]
        if values:
            add(f"toyworld.mask_iou.{metric}", _mean(values), "iou", n=len(values))
            for part in ("precision", "recall"):
                chosen = [r[f"mask_{part}"] for r in rows if r["method"] == method and r.get(f"mask_{part}") is not None]
                if chosen:
                    add(f"toyworld.mask_{part}.{metric}", _mean(chosen), "fraction", n=len(chosen))
        lone = [r for r in rows if r["method"] == method and "mask_empty" in r]
        if lone:
            add(f"toyworld.mask_empty_rate.{metric}", _mean([r["mask_empty"] for r in lone]), "rate", True,
                n=len(lone), note="one-object scenes, object edits")
            add(f"toyworld.mask_inverted_rate.{metric}", _mean([r["mask_inverted"] for r in lone]), "rate", True,
                n=len(lone), note="one-object scenes: the complement fits the edit region better")
    put_composite = [r["composite_background_psnr"] for r in rows if r.get("composite_background_psnr") is not None]
    if put_composite:
        add("toyworld.background_psnr_db.latent_composite", _mean(put_composite), "dB", n=len(put_composite),
            note="the true target's latent pasted into the source's on the edit region's cells, decoded")
    ceilings = [r["grid_iou"] for r in rows if "grid_iou" in r]
    for grid in dict.fromkeys(g for c in ceilings for g in c):
        add(f"toyworld.mask_iou.ground_truth_on_{grid}", _mean([c[grid] for c in ceilings]), "iou", n=len(ceilings),
            note="the true edit region put on that grid and back: a perfect mask's IoU at that resolution")
    log.info("edits: %d in %.0f s", len([r for r in rows if r["method"] != VAE_ROUND_TRIP]),
             time.perf_counter() - started)

    started = time.perf_counter()
    gen_scenes = evaluate.held_out_scenes(max(n_gen, n_attention), seed=0)
    if n_gen:
        settings = evaluate.GenerationSettings(steps=gen_steps)
        result = evaluate.evaluate_generation(evaluate.model_generator(world.model, world.clip, world.vae, settings, world.size),
                                              gen_scenes[:n_gen])
        add("toyworld.gen_attribute_accuracy", result["gen_attribute_accuracy"], "rate", steps_=gen_steps,
            n=result["n"], cfg=settings.cfg)
        add("toyworld.gen_object_attribute_rate", result["object_attribute_rate"], "rate", steps_=gen_steps,
            n=result["n"], cfg=settings.cfg)
    if n_attention:
        att = evaluate.attention_concentration(world.model, world.clip, world.vae, gen_scenes[:n_attention],
                                               image_size=world.size)
        add("toyworld.attention_mass_in_mask", att["mass_in_mask"], "fraction", steps_=0, n=n_attention,
            chance=round(att["chance"], 4))
    log.info("generation: %.0f s", time.perf_counter() - started)

    if n_regulation:
        started = time.perf_counter()
        two = [s for s in scenes.make_dataset(2, 8 * n_regulation, "test") if len(s.objects) == 2][:n_regulation]
        rates = regulation_rates(world, two, gen_steps)
        add("toyworld.regulation.both_objects_rate", rates["regulated"], "rate", steps_=gen_steps, n=len(two))
        add("toyworld.regulation.both_objects_rate.plain", rates["plain"], "rate", steps_=gen_steps, n=len(two))
        add("toyworld.regulation.both_objects_exact_rate", rates["regulated_exact"], "rate", steps_=gen_steps,
            n=len(two), note="both objects with their colour and shape")
        add("toyworld.regulation.both_objects_exact_rate.plain", rates["plain_exact"], "rate", steps_=gen_steps,
            n=len(two), note="both objects with their colour and shape")
        if rates["dropped"]:
            add("toyworld.regulation.both_objects_rate.where_plain_dropped", rates["rescued"], "rate", steps_=gen_steps,
                n=rates["dropped"], note="regulated, on the prompts where plain sampling left an object out")
        log.info("regulation: %.0f s", time.perf_counter() - started)
