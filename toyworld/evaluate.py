"""How good a toy-world model is at its world: generation attribute accuracy and attention concentration.

    python -m toyworld.evaluate --model models/toyworld.safetensors [--n 64] [--steps 20] [--cfg 5]
                                [--attention-n 32] [--json out.json] [--save-images DIR]

* **Generation attribute accuracy.** Held-out captions (``scenes.make_dataset(seed, n, "test")``:
  caption combinations the training never saw) are generated through ComfyUI's own path:
  ``nodes.CLIPTextEncode`` for the caption and the empty negative, ``comfy.sample.sample`` (the
  KSampler's sampler and scheduler, CFG) from seeded noise, ``nodes.VAEDecode``. The classifier
  (`toyworld.classifier`) reads each image back; ``gen_attribute_accuracy`` is the mean of
  `classifier.scene_attribute_accuracy` (background plus shape, colour, size and position of every
  object); ``object_attribute_rate`` is the fraction of prompted objects whose four attributes are
  all right, and per-attribute rates are reported too. Captions are generated in batches of
  `--batch` (each with its own conditioning and its own seeded noise, so the result does not
  depend on the batching beyond float rounding).
* **Cross-attention concentration.** For held-out scenes, the rendered image is encoded with the
  model's VAE, noised to a few timesteps of the training schedule and run through the UNet with its
  caption (``BaseModel.apply_model``, the call every ComfyUI sampler makes) while an attn2 replace
  patch (``ModelPatcher.set_model_attn2_replace`` on every transformer block) records the
  cross-attention probabilities. For each object's size, colour and shape word the head-averaged
  map of each layer is upsampled to the image, averaged over layers and timesteps, normalised, and
  the fraction of its mass inside the object's ground-truth mask is measured
  (``mass_in_mask``); ``chance`` is the mask's share of the image (what a uniform map would give).
  For two-object scenes ``own_object_rate`` is how often a word puts more mass on its own object
  than on the other one. Per-resolution numbers are reported as well.
"""

# ruff: noqa: E402 (run as a program, the host is set up before the imports that need it)

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

if __name__ == "__main__":  # python -m toyworld.evaluate; imported, this module sets nothing up (see toyworld.host)
    from .host import setup_host

    setup_host()

import comfy.sample
import numpy as np
import torch
import torch.nn.functional as F

import comfy_host
from attention_edit.attention.heads import head_probabilities
from attention_edit.engine.conditioning import stack_conditionings
from attention_edit.engine.patching import unet_transformer_blocks
from attention_edit.toyworld import model as toymodel

from . import classifier, scenes
from .training.attention import attend
from .training.files import DEFAULT_OUT
from .training.tokens import CaptionTokens

log = logging.getLogger("attention_edit.toyworld.evaluate")

WORD_KINDS = ("size", "colour", "shape")
DEFAULT_TIMESTEPS = (100, 300, 500, 700)


@dataclasses.dataclass
class GenerationSettings:
    steps: int = 20
    cfg: float = 5.0
    sampler: str = "euler"
    scheduler: str = "normal"
    seed: int = 0
    batch: int = 8


def _comfy_nodes():
    """ComfyUI's own `nodes` module (CLIPTextEncode, VAEDecode, ...). Loaded from the host by path: with
    the pack's folder first on sys.path (``python -m toyworld...`` from the repository), a plain
    ``import nodes`` would find the pack's nodes/ package instead."""
    module = sys.modules.get("nodes")
    if module is not None and hasattr(module, "CLIPTextEncode"):
        return module
    spec = importlib.util.spec_from_file_location("nodes", comfy_host.HOST_DIR / "nodes.py")
    module = importlib.util.module_from_spec(spec)
    if "nodes" not in sys.modules:
        sys.modules["nodes"] = module  # as in a ComfyUI process, where `nodes` is the host's module
    spec.loader.exec_module(module)
    return module


comfy_nodes = _comfy_nodes()


Generator = Callable[[Sequence[scenes.Scene]], np.ndarray]
"""Anything that turns scenes (their captions) into uint8 images (N, H, W, 3): the model, or a fake."""


def held_out_scenes(n: int, seed: int = 0) -> list[scenes.Scene]:
    return scenes.make_dataset(seed, n, "test")


# --------------------------------------------------------------------------------------------------
# Generation through ComfyUI


def encode_prompt(clip, text: str):
    """CONDITIONING for `text`, exactly as the CLIPTextEncode node makes it."""
    return comfy_nodes.CLIPTextEncode().encode(clip, text)[0]


@torch.no_grad()
def generate(model, clip, vae, captions: Sequence[str], settings: GenerationSettings | None = None,
             image_size: int = scenes.REFERENCE_SIZE) -> np.ndarray:
    """uint8 images (N, H, W, 3) for `captions`: CLIPTextEncode -> comfy.sample.sample -> VAEDecode.

    Caption i gets the noise of ``torch.Generator().manual_seed(settings.seed + i)``.
    """
    settings = settings or GenerationSettings()
    side = image_size // 8
    negative_one = encode_prompt(clip, "")
    out = []
    for start in range(0, len(captions), settings.batch):
        chunk = list(captions[start:start + settings.batch])
        # Row i of the batch is caption i (the edit sampler's branch stacking, one image per branch).
        positive = stack_conditionings([encode_prompt(clip, c) for c in chunk], 1)
        negative = stack_conditionings([negative_one] * len(chunk), 1)
        latent = torch.zeros(len(chunk), 4, side, side)
        noise = torch.cat([torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(settings.seed + start + i))
                           for i in range(len(chunk))])
        samples = comfy.sample.sample(model, noise, settings.steps, settings.cfg, settings.sampler, settings.scheduler,
                                      positive, negative, latent, seed=settings.seed + start, disable_pbar=True)
        images = comfy_nodes.VAEDecode().decode(vae, {"samples": samples})[0]
        out.append((images.clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8))
    return np.concatenate(out) if out else np.zeros((0, image_size, image_size, 3), dtype=np.uint8)


def model_generator(model, clip, vae, settings: GenerationSettings | None = None, image_size: int = 128) -> Generator:
    def run(scene_list: Sequence[scenes.Scene]) -> np.ndarray:
        return generate(model, clip, vae, [s.caption for s in scene_list], settings, image_size)
    return run


def rendered_generator(image_size: int = scenes.REFERENCE_SIZE) -> Generator:
    """A perfect "generator" that renders the ground truth (the score's upper bound, used by the tests)."""
    def run(scene_list: Sequence[scenes.Scene]) -> np.ndarray:
        return np.stack([scenes.render(s, image_size)[0] for s in scene_list])
    return run


# --------------------------------------------------------------------------------------------------
# Scoring


def score(scene_list: Sequence[scenes.Scene], images: np.ndarray) -> dict[str, Any]:
    """Attribute accuracy of `images` against the scenes they were prompted with (see the module docstring)."""
    if len(scene_list) != len(images):
        raise ValueError(f"{len(scene_list)} scenes but {len(images)} images")
    reports = [classifier.scene_attribute_report(s, img) for s, img in zip(scene_list, images)]
    objects = [obj for r in reports for obj in r["objects"]]
    per_attribute = {name: float(np.mean([o[name] for o in objects])) for name in classifier.ATTRIBUTES}
    per_attribute["background"] = float(np.mean([r["background"] for r in reports]))
    by_count: dict[str, float] = {}
    for count in (1, 2):
        chosen = [r["accuracy"] for s, r in zip(scene_list, reports) if len(s.objects) == count]
        if chosen:
            by_count[f"{count}_object"] = float(np.mean(chosen))
    return {
        "n": len(reports),
        "gen_attribute_accuracy": float(np.mean([r["accuracy"] for r in reports])),
        "object_attribute_rate": float(np.mean([all(o.values()) for o in objects])),
        "scene_exact_rate": float(np.mean([r["correct"] == r["total"] for r in reports])),
        "object_count_rate": float(np.mean([r["n_detected"] == len(s.objects) for s, r in zip(scene_list, reports)])),
        "per_attribute": per_attribute,
        "by_object_count": by_count,
    }


def evaluate_generation(generator: Generator, scene_list: Sequence[scenes.Scene]) -> dict[str, Any]:
    started = time.perf_counter()
    images = generator(scene_list)
    result = score(scene_list, images)
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


# --------------------------------------------------------------------------------------------------
# Cross-attention concentration


class _CrossAttentionCapture:
    """The attn2 replace patch: explicit attention (same result as the default kernel), probabilities kept."""

    def __init__(self):
        self.maps: list[torch.Tensor] = []  # (B, h, w, 77), head-averaged, conditional rows only

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        probs = head_probabilities(q, k, heads)
        h, w = extra_options["activations_shape"][-2:]
        self.maps.append(probs.mean(dim=1).reshape(q.shape[0], h, w, -1).float().cpu())
        return attend(probs, v)


def _patched(model, capture: _CrossAttentionCapture):
    patched = model.clone()
    for key in unet_transformer_blocks(patched.model.diffusion_model):
        patched.set_model_attn2_replace(capture, *key)
    return patched


@torch.no_grad()
def attention_concentration(model, clip, vae, scene_list: Sequence[scenes.Scene],
                            timesteps: Sequence[int] = DEFAULT_TIMESTEPS, seed: int = 0,
                            image_size: int = scenes.REFERENCE_SIZE) -> dict[str, Any]:
    """Where the cross-attention of object words goes on rendered held-out scenes (see the module docstring)."""
    capture = _CrossAttentionCapture()
    patched = _patched(model, capture)
    base = patched.model
    transformer_options = patched.model_options["transformer_options"]
    tokens = CaptionTokens(clip)
    sigmas_all = base.model_sampling.sigmas
    rows: list[dict[str, Any]] = []
    generator = torch.Generator().manual_seed(seed)
    for scene in scene_list:
        image, masks = scenes.render(scene, image_size)
        size = image.shape[0]
        latent = vae.encode(torch.from_numpy(image[None]).float() / 255.0)
        x0 = base.process_latent_in(latent)
        context = encode_prompt(clip, scene.caption)[0][0]
        word_positions = tokens.object_tokens(scene.caption)
        per_side: dict[int, list[torch.Tensor]] = {}
        for t in timesteps:
            sigma = sigmas_all[int(t)].reshape(1)
            noise = torch.randn(x0.shape, generator=generator)
            x = base.model_sampling.noise_scaling(sigma, noise, x0)
            capture.maps = []
            base.apply_model(x, sigma, c_crossattn=context, transformer_options=transformer_options)
            for m in capture.maps:
                per_side.setdefault(m.shape[1], []).append(m[0])
        # Average per resolution first (each map upsampled to the image), then over resolutions.
        upsampled = {}
        for side, maps in per_side.items():
            mean = torch.stack(maps).mean(0).permute(2, 0, 1)[None]  # (1, 77, h, w)
            upsampled[side] = F.interpolate(mean, size=(size, size), mode="bilinear", align_corners=False)[0].clamp_min(0)
        overall = torch.stack(list(upsampled.values())).mean(0)
        views = {"all": overall, **{f"{side}x{side}": m for side, m in upsampled.items()}}
        masks_t = [torch.from_numpy(m) for m in masks]
        for o, positions in enumerate(word_positions):
            for kind, token in zip(WORD_KINDS, positions):
                row = {"kind": kind, "n_objects": len(scene.objects), "chance": float(masks_t[o].float().mean())}
                for view, maps in views.items():
                    a = maps[token]
                    total = float(a.sum()) or 1e-12
                    row[view] = float(a[masks_t[o]].sum()) / total
                    if len(masks_t) == 2:
                        row[view + "_other"] = float(a[masks_t[1 - o]].sum()) / total
                rows.append(row)
    return _summarise_concentration(rows, list(views))


def _summarise_concentration(rows: list[dict[str, Any]], views: list[str]) -> dict[str, Any]:
    def summary(chosen: list[dict[str, Any]]) -> dict[str, Any]:
        if not chosen:
            return {}
        out: dict[str, Any] = {"n_words": len(chosen), "chance": float(np.mean([r["chance"] for r in chosen]))}
        for view in views:
            out[view] = float(np.mean([r[view] for r in chosen]))
        two = [r for r in chosen if r["n_objects"] == 2]
        if two:
            out["own_object_rate"] = float(np.mean([r["all"] > r["all_other"] for r in two]))
        return out

    result = {"words": summary(rows)}
    result["mass_in_mask"] = result["words"].get("all")
    result["chance"] = result["words"].get("chance")
    for kind in WORD_KINDS:
        result[kind] = summary([r for r in rows if r["kind"] == kind])
    return result


# --------------------------------------------------------------------------------------------------
# CLI


def evaluate_model(path, n: int = 64, attention_n: int = 32, settings: GenerationSettings | None = None,
                   seed: int = 0, save_images: pathlib.Path | None = None) -> dict[str, Any]:
    settings = settings or GenerationSettings()
    config, info = toymodel.read_toy_metadata(path)
    model, clip, vae = toymodel.load_toy(path)
    held_out = held_out_scenes(max(n, attention_n), seed)
    result: dict[str, Any] = {"model": str(path), "settings": dataclasses.asdict(settings),
                              "trained": {k: info.get(k) for k in ("seed", "latent_scale_factor") if k in info}}
    if "unet" in info:
        result["trained"]["unet_steps"] = info["unet"].get("steps")
        result["trained"]["unet_minutes"] = info["unet"].get("minutes")
    if n:
        started = time.perf_counter()
        images = generate(model, clip, vae, [s.caption for s in held_out[:n]], settings, config.image_size)
        result["generation"] = score(held_out[:n], images)
        result["generation"]["seconds"] = round(time.perf_counter() - started, 1)
        if save_images is not None:
            from PIL import Image

            save_images.mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(images):
                Image.fromarray(img).save(save_images / f"{i:03d}.png")
            (save_images / "captions.txt").write_text("\n".join(s.caption for s in held_out[:n]) + "\n")
    if attention_n:
        started = time.perf_counter()
        result["attention"] = attention_concentration(model, clip, vae, held_out[:attention_n], seed=seed,
                                                      image_size=config.image_size)
        result["attention"]["seconds"] = round(time.perf_counter() - started, 1)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    d = GenerationSettings()
    p = argparse.ArgumentParser(prog="python -m toyworld.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=pathlib.Path, default=DEFAULT_OUT)
    p.add_argument("--n", type=int, default=64, help="held-out captions to generate (0: skip)")
    p.add_argument("--attention-n", type=int, default=32, help="held-out scenes for the attention check (0: skip)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--cfg", type=float, default=d.cfg)
    p.add_argument("--sampler", default=d.sampler)
    p.add_argument("--scheduler", default=d.scheduler)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=pathlib.Path, default=None, help="write the result here too")
    p.add_argument("--save-images", type=pathlib.Path, default=None, help="folder for the generated images")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = GenerationSettings(args.steps, args.cfg, args.sampler, args.scheduler, args.seed, args.batch)
    result = evaluate_model(args.model, args.n, args.attention_n, settings, args.seed, args.save_images)
    text = json.dumps(result, indent=1, sort_keys=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    gen = result.get("generation")
    att = result.get("attention")
    if gen:
        log.info("gen_attribute_accuracy %.3f, object_attribute_rate %.3f (n=%d, %.0f s)", gen["gen_attribute_accuracy"],
                 gen["object_attribute_rate"], gen["n"], gen["seconds"])
    if att and att.get("mass_in_mask") is not None:
        log.info("object-word attention mass in mask %.3f (chance %.3f, ratio %.1f)", att["mass_in_mask"], att["chance"],
                 att["mass_in_mask"] / max(att["chance"], 1e-9))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["GenerationSettings", "generate", "score", "evaluate_generation", "attention_concentration",
           "rendered_generator", "model_generator", "held_out_scenes", "evaluate_model", "main"]
