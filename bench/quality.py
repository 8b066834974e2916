"""Edit quality on the toy world (models/toyworld.safetensors), measured the way PIE-Bench measures SD.

Every method runs through the pack's own nodes with the defaults a user gets (`run_node` fills every
input a call does not set from the node's schema); images come from ComfyUI's VAEEncode/VAEDecode
and conditioning from CLIPTextEncode, as in a graph. The world gives exact answers: held-out scenes
and edit pairs (captions the training never saw) with ground-truth edit masks, and a classifier
that reads attributes back (`toyworld.classifier`).

* Reconstruction (held-out scenes): PSNR / SSIM of the decoded reconstruction against the rendered
  input, per inversion variant: ``ddim_cfg1`` and ``ddim_cfg7_5`` (DDIM inversion and reconstruction
  with the caption at that cfg, as the reconstruction workflow compares), ``uniform`` (inversion and
  reconstruction through AttnEdit_UniformAttention with the empty prompt, no cfg: UAM's official
  inversion and its reconstruction branch), ``pinned``
  (InversionReconstruct with the source pinned), and ``vae`` (encode and decode only: the ceiling
  every variant shares).
* Edits (held-out edit pairs, every kind): per method, the edit success rate (the classifier finds
  the target attributes on the edited object; for "remove" the object count, for "background" the
  background colour), the background PSNR (against the source image, outside the ground-truth edit
  mask), and a structure score (IoU of the classifier's foreground masks of the edit and of the
  ground-truth target rendering). Methods, wired as their example workflows wire them (see
  `edit_methods`): ``ddim`` (the target prompt from the caption inversion, no attention control),
  ``fpe`` (Free-Prompt-Editing, empty-prompt inversion and source prompt: the source is replayed),
  ``masactrl`` (caption inversion), ``uam``
  (uniform-attention inversion + MasaCtrl + adaptive mask, empty source prompt: workflow 1),
  ``uam_unchanged`` (the same with the paper's dilation of the unchanged region), ``instdiffedit``
  (instant mask on the edited words, empty-prompt inversion at strength 0.5).
* Masks: IoU of the final MASK (> 0.5) with the ground-truth edit mask, on the object edits
  (recolour, reshape, replace), for the instant and the adaptive mask.
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

log = logging.getLogger("attention_edit.bench.quality")

OBJECT_EDITS = ("recolour", "reshape", "replace")
EDIT_CFG = 7.5
MASK_THRESHOLD = 0.5


def run_node(node, **inputs):
    """`node.execute` with every input not given taken from the node's schema default (what a user gets)."""
    values = {}
    for spec in node.define_schema().inputs:
        if spec.id in inputs:
            values[spec.id] = inputs.pop(spec.id)
        elif getattr(spec, "default", None) is not None:
            values[spec.id] = spec.default
    if inputs:
        raise TypeError(f"{node.__name__} has no inputs {sorted(inputs)}")
    return node.execute(**values).args


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB of uint8 images, over the pixels where mask is True (all without a mask)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    if mask is not None:
        a, b = a[mask], b[mask]
    mse = float(np.mean((a - b) ** 2)) if a.size else 0.0
    return 10.0 * np.log10(255.0 ** 2 / max(mse, 1e-10))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, channel_axis=-1, data_range=255))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def edit_succeeded(pair, image: np.ndarray) -> bool:
    """Whether `image` shows what the edit asked for (see the module docstring)."""
    from toyworld import classifier

    report = classifier.scene_attribute_report(pair.target, image)
    if pair.kind == "background":
        return bool(report["background"])
    if pair.kind == "remove":
        return report["n_detected"] == len(pair.target.objects)
    return all(report["objects"][pair.edited_object_index].values())


def structure_iou(image: np.ndarray, reference: np.ndarray) -> float:
    from toyworld import classifier

    return iou(classifier.foreground_mask(image), classifier.foreground_mask(reference))


class World:
    """The loaded toy model and the ComfyUI node calls every measurement shares."""

    def __init__(self, model_path, steps: int):
        import nodes as comfy_nodes

        from attention_edit.engine import toymodel

        self.comfy = comfy_nodes
        self.model, self.clip, self.vae = toymodel.load_toy(model_path)
        self.steps = steps
        self._conds: dict[str, Any] = {}

    def cond(self, text: str):
        if text not in self._conds:
            self._conds[text] = self.comfy.CLIPTextEncode().encode(self.clip, text)[0]
        return self._conds[text]

    def encode(self, image: np.ndarray) -> dict:
        import torch

        pixels = torch.from_numpy(image[None].astype(np.float32) / 255.0)
        return self.comfy.VAEEncode().encode(self.vae, pixels)[0]

    def decode(self, latent: dict) -> np.ndarray:
        images = self.comfy.VAEDecode().decode(self.vae, latent)[0]
        return (images[0].clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)

    def invert(self, model, latent: dict, prompt: str, strength: float = 1.0, cfg: float = 1.0):
        from attention_edit.nodes.inversion import DDIMInversion

        return run_node(DDIMInversion, model=model, latent=latent, positive=self.cond(prompt), negative=self.cond(""),
                        cfg=cfg, steps=self.steps, strength=strength)[1]


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
        image = scenes.render(scene)[0]
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


def edit_methods(world: World) -> dict[str, dict[str, Any]]:
    """Per method, as its example workflow wires it: the patched model (also the model that inverts),
    the inversion's prompt ("caption" or "empty") and strength, the source branch's prompt, the mask."""
    from attention_edit.nodes.injection import SelfAttentionInjection
    from attention_edit.nodes.uniform_attention import UniformAttention

    fpe = run_node(SelfAttentionInjection, model=world.model, mode="fpe")[0]
    masactrl = run_node(SelfAttentionInjection, model=world.model, mode="masactrl")[0]
    # UAM (official code): uniform attention in the inversion and the auxiliary branch, empty prompt for both
    # and for the source branch; MasaCtrl on the target.
    uam = run_node(SelfAttentionInjection, model=run_node(UniformAttention, model=world.model,
                                                          scope="inversion_and_aux")[0], mode="masactrl")[0]
    plain = {"invert": "caption", "strength": 1.0, "source": "caption"}
    return {
        "ddim": {"model": world.model, **plain},
        "fpe": {"model": fpe, **plain, "invert": "empty", "source": "empty"},  # replayed source
        "masactrl": {"model": masactrl, **plain},
        "uam": {"model": uam, "invert": "empty", "strength": 1.0, "source": "empty", "mask": "adaptive"},
        "uam_unchanged": {"model": uam, "invert": "empty", "strength": 1.0, "source": "empty",
                          "mask": "adaptive_unchanged"},
        "instdiffedit": {"model": world.model, "invert": "empty", "strength": 0.5, "source": "caption",
                         "mask": "instant"},
    }


def mask_strategy(world: World, kind: str | None, pair):
    from attention_edit.attention.masks import DILATE_UNCHANGED
    from attention_edit.nodes.masks import AdaptiveMask, InstantMask

    if kind is None:
        return None
    if kind == "adaptive":
        return run_node(AdaptiveMask)[0]
    if kind == "adaptive_unchanged":
        return run_node(AdaptiveMask, dilation=DILATE_UNCHANGED)[0]
    # The edited words of the target prompt; "remove" names nothing there: the object is found by the start token.
    return run_node(InstantMask, clip=world.clip, target_prompt=pair.target_caption, words=pair.target_word)[0]


def edits(world: World, pairs: Sequence, methods: Sequence[str] | None = None,
          keep_images: bool = False) -> list[dict[str, Any]]:
    """One row of scores per (pair, method); with keep_images the edited image too (row["image"])."""
    from attention_edit.nodes.edit_sampler import EditSampler
    from toyworld import scenes

    table = edit_methods(world)
    methods = list(table) if methods is None else list(methods)
    empty = world.cond("")
    rows = []
    for n, pair in enumerate(pairs):
        source_image = scenes.render(pair.source)[0]
        target_image = scenes.render(pair.target)[0]
        latent = world.encode(source_image)
        prompts = {"caption": pair.source_caption, "empty": ""}
        handles: dict[tuple, Any] = {}  # one inversion per (model, prompt, strength), shared by the methods
        for method in methods:
            spec = table[method]
            key = (id(spec["model"]), spec["invert"], spec["strength"])
            if key not in handles:
                handles[key] = world.invert(spec["model"], latent, prompts[spec["invert"]], spec["strength"])
        keep = ~pair.edit_mask
        for method in methods:
            spec = table[method]
            started = time.perf_counter()
            handle = handles[(id(spec["model"]), spec["invert"], spec["strength"])]
            edited, _, mask = run_node(EditSampler, model=spec["model"], source=world.cond(prompts[spec["source"]]),
                                       target=world.cond(pair.target_caption), negative=empty, cfg=EDIT_CFG,
                                       steps=world.steps, inversion=handle,
                                       mask_strategy=mask_strategy(world, spec.get("mask"), pair))
            image = world.decode(edited)
            row = {"pair": n, "kind": pair.kind, "method": method, "success": edit_succeeded(pair, image),
                   "background_psnr": psnr(image, source_image, keep) if keep.any() else None,
                   "structure": structure_iou(image, target_image), "seconds": time.perf_counter() - started}
            if keep_images:
                row["image"] = image
            if spec.get("mask") is not None and pair.kind in OBJECT_EDITS:
                row["mask_iou"] = iou(mask[0].cpu().numpy() > MASK_THRESHOLD, pair.edit_mask)
            rows.append(row)
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
        plain.append(objects_drawn(scene, evaluate.generate(world.model, world.clip, world.vae, [scene.caption], settings)[0]))
        regulated.append(objects_drawn(scene, evaluate.generate(model, world.clip, world.vae, [scene.caption], settings)[0]))
    dropped = [r[0] for p, r in zip(plain, regulated) if not p[0]]  # prompts where plain sampling left an object out
    return {"plain": _mean([p[0] for p in plain]), "regulated": _mean([r[0] for r in regulated]),
            "plain_exact": _mean([p[1] for p in plain]), "regulated_exact": _mean([r[1] for r in regulated]),
            "dropped": len(dropped), "rescued": _mean(dropped)}


# --------------------------------------------------------------------------------------------------


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else float("nan")


def run(rec, model_path, **options) -> None:
    """Measure and record everything (options: see `measure`) under torch.inference_mode, as ComfyUI runs nodes."""
    import torch

    with torch.inference_mode():
        measure(rec, model_path, **options)


def measure(rec, model_path, steps: int = 50, n_recon: int = 16, n_per_kind: int = 4, n_gen: int = 64,
            n_attention: int = 32, n_regulation: int = 32, gen_steps: int = 20, methods: Sequence[str] | None = None,
            kinds: Sequence[str] | None = None) -> None:
    from attention_edit.engine import toymodel
    from toyworld import evaluate, scenes

    world = World(model_path, steps)
    _, info = toymodel.read_toy_metadata(model_path)
    name = f"toy world ({model_path.name}{'' if info.get('trained') else ', untrained'})"
    resolution = "128px (latent 16x16)"

    def add(metric, value, unit, lower_is_better=False, steps_=steps, **extra):
        rec.add(metric, value, unit, lower_is_better, name, resolution, steps_, **extra)

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
    pairs = scenes.make_edit_pairs(0, n_per_kind, split="test", kinds=kinds or scenes.EDIT_KINDS)
    rows = edits(world, pairs, methods)
    add("toyworld.edit_success_rate", _mean([r["success"] for r in rows]), "rate", n=len(rows))
    add("toyworld.background_psnr_db", _mean([r["background_psnr"] for r in rows]), "dB", n=len(rows))
    add("toyworld.structure_iou", _mean([r["structure"] for r in rows]), "iou", n=len(rows))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        add(f"toyworld.edit_success_rate.{method}", _mean([r["success"] for r in mine]), "rate", n=len(mine))
        add(f"toyworld.background_psnr_db.{method}", _mean([r["background_psnr"] for r in mine]), "dB", n=len(mine))
        add(f"toyworld.structure_iou.{method}", _mean([r["structure"] for r in mine]), "iou", n=len(mine))
        for kind in dict.fromkeys(r["kind"] for r in mine):
            chosen = [r for r in mine if r["kind"] == kind]
            add(f"toyworld.edit_success_rate.{method}.{kind}", _mean([r["success"] for r in chosen]), "rate",
                n=len(chosen))
            add(f"toyworld.background_psnr_db.{method}.{kind}", _mean([r["background_psnr"] for r in chosen]), "dB",
                n=len(chosen))
    for metric, method in (("instant", "instdiffedit"), ("adaptive", "uam"), ("adaptive_unchanged", "uam_unchanged")):
        values = [r["mask_iou"] for r in rows if r["method"] == method and "mask_iou" in r]
        if values:
            add(f"toyworld.mask_iou.{metric}", _mean(values), "iou", n=len(values))
    log.info("edits: %d in %.0f s", len(rows), time.perf_counter() - started)

    started = time.perf_counter()
    gen_scenes = evaluate.held_out_scenes(max(n_gen, n_attention), seed=0)
    if n_gen:
        settings = evaluate.GenerationSettings(steps=gen_steps)
        result = evaluate.evaluate_generation(evaluate.model_generator(world.model, world.clip, world.vae, settings),
                                              gen_scenes[:n_gen])
        add("toyworld.gen_attribute_accuracy", result["gen_attribute_accuracy"], "rate", steps_=gen_steps,
            n=result["n"], cfg=settings.cfg)
        add("toyworld.gen_object_attribute_rate", result["object_attribute_rate"], "rate", steps_=gen_steps,
            n=result["n"], cfg=settings.cfg)
    if n_attention:
        att = evaluate.attention_concentration(world.model, world.clip, world.vae, gen_scenes[:n_attention])
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
