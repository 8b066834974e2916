"""Patching self-attention injection (Free-Prompt-Editing, MasaCtrl) onto a model."""

from __future__ import annotations

import uuid

import torch

from ..attention.injection import (
    ALL_ROWS,
    COND_ROWS,
    FPE,
    MASACTRL,
    OFFICIAL_ROWS,
    SOURCE_INPUTS,
    injected_chunks,
    mask_at,
    masked_mutual_attention,
    substitute_inputs,
)
from ..attention.layout import TARGET
from .dit_methods import apply_injection_dit
from .patching import UNET, add_attention_replace, model_family, transformer_blocks


def default_masactrl_layer(model) -> int:
    """MasaCtrl's layer 10 of SD1.5's 16, by meaning: the first decoder block at >= 1/2 the latent side.

    SD1.x/2.x: output 6 (execution index 10); SDXL: output 3 (the 64x64 decoder level at 1024 px).
    """
    keys = transformer_blocks(model)
    unet = model.model.diffusion_model
    levels = len(unet.channel_mult)
    # Output block o sits at level (levels - 1) - o // (res blocks + 1); side ratio 1 / 2**level.
    per_level = len(unet.output_blocks) // levels
    for index, (name, number, _) in enumerate(keys):
        if name == "output" and (levels - 1 - number // per_level) <= 1:
            return index
    return len(keys)


def fpe_steps(steps: int, ratio: float) -> int:
    """FPE injects in steps [0, int(N * ratio)): the official controller floors the step count."""
    return int(steps * ratio)


def _check_mask(mask, name: str) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 3) or mask.numel() == 0:
        raise ValueError(f"{name} must be a MASK (images, height, width), got {type(mask).__name__}")
    if not torch.isfinite(mask).all():
        raise ValueError(f"{name} contains NaN or infinite values: give a MASK with values 0 to 1")
    return mask.detach().float().cpu()


class _ForegroundMasks:
    """The source's and the target's foreground at each map size (resized once per size and device)."""

    def __init__(self, source: torch.Tensor, target: torch.Tensor):
        self.source, self.target = source, target
        self.resized: dict = {}

    def at(self, hw: tuple[int, int], images: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(hw), images, str(device))
        if key not in self.resized:
            pair = []
            for mask, name in ((self.source, "masactrl_mask"), (self.target, "masactrl_target_mask")):
                m = mask_at(mask, hw)
                if m.shape[0] not in (1, images):
                    raise ValueError(f"{name} has a batch of {m.shape[0]} masks but the edit has {images} images: "
                                     f"give one mask or one per image")
                pair.append(m.expand(images, -1).to(device))
            self.resized[key] = tuple(pair)
        return self.resized[key]


def _foreground_masks(mode: str, source, target) -> _ForegroundMasks | None:
    """MasaCtrl's mask-guided variant: the checked source (and target) foreground, or None without a mask."""
    if target is not None and source is None:
        raise ValueError("masactrl_target_mask needs masactrl_mask (the source's foreground) as well")
    if source is None:
        return None
    if mode != MASACTRL:
        raise ValueError("masactrl_mask is MasaCtrl's mask-guided variant: set mode to 'masactrl' or "
                         "disconnect the mask")
    source_mask = _check_mask(source, "masactrl_mask")
    target_mask = source_mask if target is None else _check_mask(target, "masactrl_target_mask")
    return _ForegroundMasks(source_mask, target_mask)


def masked_target_attention(call, q, k, v, previous, source: dict, tgt: list[int], masks: _ForegroundMasks):
    """Mask-guided MasaCtrl on the target rows `tgt` (source[...][j] belongs to tgt[j]): each image's target
    foreground queries the source's foreground keys and values, background the background; every other
    row attends to itself."""
    if call.map_hw is None:
        raise RuntimeError("attention-edit: mask-guided MasaCtrl needs the latent size of the call, which the "
                           "host did not pass (original_shape); this is a bug, please report it")
    source_fg, target_fg = masks.at(call.map_hw, call.layout.images, q.device)
    every = call.rows(TARGET)
    image_of = [every.index(r) % call.layout.images for r in tgt]
    parts = []
    others = [r for r in range(call.batch) if r not in set(tgt)]
    if others:  # the source (and any other branch) attends to itself
        parts.append((others, previous(q[others], k[others], v[others])))
    for image in sorted(set(image_of)):
        at = [j for j, i in enumerate(image_of) if i == image]  # this image's rows, each guidance half
        rows = [tgt[j] for j in at]
        parts.append((rows, masked_mutual_attention(previous, q[rows], source["k"][at].to(k),
                                                    source["v"][at].to(v), source_fg[image], target_fg[image])))
    out = parts[0][1].new_empty((call.batch,) + tuple(parts[0][1].shape[1:]))
    for rows, value in parts:
        out[rows] = value.to(out.dtype)
    return out


def apply_injection(model, mode: str, fpe_ratio: float = 0.8, fpe_max_map_side: float = 0.5,
                    masactrl_start_step: int = 4, masactrl_start_layer: int = -1, rows: str = OFFICIAL_ROWS,
                    masactrl_mask: torch.Tensor | None = None, masactrl_target_mask: torch.Tensor | None = None):
    """A clone whose target-branch self-attention reads from the source branch.

    fpe: attention(Q_src, K_src, V_tgt) for steps [0, int(ratio * N)) in layers whose map side is at most
    `fpe_max_map_side` of the latent side. masactrl: attention(Q_tgt, K_src, V_src) from step S and
    layer L (execution order; -1 = the model's equivalent of SD1.5's layer 10).
    rows: the guidance halves changed: 'official' (fpe: conditional only, as its official code; masactrl:
    both, each against the source's same half), 'cond' or 'cond_and_uncond'.
    masactrl_mask: MasaCtrl's mask-guided variant: the source's foreground (also the target's unless
    masactrl_target_mask is given); target foreground queries attend to the source's foreground only,
    background to background.
    """
    if mode not in (FPE, MASACTRL):
        raise ValueError(f"unknown mode '{mode}', expected '{FPE}' or '{MASACTRL}'")
    if not 0.0 <= fpe_ratio <= 1.0:
        raise ValueError(f"fpe_ratio must be in [0, 1], got {fpe_ratio}")
    if masactrl_start_step < 0:
        raise ValueError(f"masactrl_start_step must be >= 0, got {masactrl_start_step}")
    chunks = injected_chunks(mode, rows)
    if model_family(model) != UNET:  # Flux, SD3.5: the image tokens of the joint attention
        if masactrl_mask is not None or masactrl_target_mask is not None:
            raise ValueError("mask-guided MasaCtrl (masactrl_mask) is not supported on Flux and SD3 yet: "
                             "disconnect the mask")
        return apply_injection_dit(model, mode, fpe_ratio, masactrl_start_step, masactrl_start_layer, rows, fpe_steps)
    masks = _foreground_masks(mode, masactrl_mask, masactrl_target_mask)
    keys = transformer_blocks(model)
    start_layer = default_masactrl_layer(model) if masactrl_start_layer < 0 else masactrl_start_layer
    if mode == MASACTRL and start_layer >= len(keys):
        raise ValueError(f"masactrl_start_layer {start_layer} is past the model's {len(keys)} transformer blocks")
    selected = set(keys[start_layer:]) if mode == MASACTRL else set(keys)
    m = model.clone()
    reader = uuid.uuid4().hex  # names this application's source inputs in an inversion's record

    def active(call) -> bool:
        if call.step is None:
            return False
        i, n = call.step
        if mode == FPE:
            return i < fpe_steps(n, fpe_ratio) and call.map_side is not None and call.map_side <= fpe_max_map_side
        return i >= masactrl_start_step

    def injected_self_attention(call, q, k, v, previous, source):
        tgt, source = call.target_rows_read(chunks == COND_ROWS, source)
        if not tgt:
            return previous(q, k, v)
        if masks is None:
            q, k, v = substitute_inputs(q, k, v, mode, tgt, source)
            return previous(q, k, v)
        return masked_target_attention(call, q, k, v, previous, source, tgt, masks)

    # Only the target rows change; the source's inputs are read where `active` says.
    add_attention_replace(m, "attn1", f"injection:{mode}", injected_self_attention, lambda key: key in selected,
                          effect=lambda branch: ("injection", reader) if branch == TARGET else None,
                          reads_source=SOURCE_INPUTS[mode], reader=reader, active=active)
    return m


__all__ = ["apply_injection", "default_masactrl_layer", "fpe_steps", "ALL_ROWS", "COND_ROWS", "OFFICIAL_ROWS"]
