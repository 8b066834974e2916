"""What the nodes share: socket types, category names and input checks."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import comfy.model_patcher
import comfy.samplers
import torch
from comfy_api.latest import io

from ..attention.blocks import parse_block_spec
from ..engine.handle import InversionHandle

CATEGORY = "attention_edit"
SCHEDULERS = list(comfy.samplers.SCHEDULER_NAMES)
DEFAULT_SCHEDULER = "ddim_uniform"  # DDIM's evenly spaced timesteps (t = 1, 21, ..., 981 at 50 steps)
Inversion = io.Custom("ATTN_EDIT_INVERSION")
MaskStrategy = io.Custom("ATTN_EDIT_MASK_STRATEGY")
Prompts = io.Custom("ATTN_EDIT_PROMPTS")


@dataclass(frozen=True, eq=False)
class PromptTexts:
    """What AttnEdit_EditPrompts carries to the nodes that read a prompt's words: the texts it encoded and
    the CLIP it encoded them with (the mask and regulation nodes find words through its tokenizer)."""

    clip: object
    source: str
    target: str
    negative: str

    def __repr__(self):  # shown in ComfyUI's logs and cache keys: keep it short
        return f"PromptTexts(source={self.source[:40]!r}, target={self.target[:40]!r})"


def _folded(text: str) -> str:
    return " ".join(text.split())


def prompt_from(prompts, clip, text: str, input_name: str, node: str, which: str = "target") -> tuple[object, str]:
    """The CLIP and the text a word-reading node uses: those of the connected 'prompts' (its `which` text),
    else its own 'clip' and text input. A text typed here that differs from the connected one is refused
    (two copies of one prompt are what 'prompts' is there to avoid)."""
    if prompts is not None:
        if not isinstance(prompts, PromptTexts):
            raise ValueError(f"{node}: 'prompts' must be connected to AttnEdit_EditPrompts' prompts output, got "
                             f"{type(prompts).__name__}")
        chosen = getattr(prompts, which)
        if text.strip() and _folded(text) != _folded(chosen):
            raise ValueError(f"{node}: '{input_name}' says \"{text.strip()[:60]}\" but the connected prompts' "
                             f"{which} is \"{chosen.strip()[:60]}\": clear '{input_name}' (the prompt is typed "
                             f"once, in Edit Prompts)")
        return prompts.clip, chosen
    if clip is None:
        raise ValueError(f"{node}: connect 'prompts' (from AttnEdit_EditPrompts), or 'clip' and type "
                         f"'{input_name}'")
    check_socket(clip, "CLIP", "clip", node)
    return clip, text


def block_spec_error(blocks: str) -> bool | str:
    """validate_inputs helper: True or the parse error, shown before the graph runs."""
    try:
        parse_block_spec(blocks)
    except ValueError as e:
        return str(e)
    return True


# Conditioning extras that restrict a prompt to part of the image: a branch's rows cannot carry them.
REGIONAL_KEYS = ("area", "mask")


def check_conditioning(cond, name: str) -> None:
    """A plain prompt (CLIPTextEncode's output), finite; area and mask conditioning refused."""
    if not isinstance(cond, list) or not all(isinstance(c, (list, tuple)) and len(c) == 2 for c in cond):
        raise ValueError(f"'{name}' must be connected to a CONDITIONING output (e.g. CLIPTextEncode), "
                         f"got {type(cond).__name__}")
    if not cond:
        raise ValueError(f"'{name}' is empty: connect a CLIPTextEncode (the empty prompt is fine)")
    for t, options in cond:
        if not isinstance(t, torch.Tensor) or not isinstance(options, dict):
            raise ValueError(f"'{name}' is not a CONDITIONING: connect a CLIPTextEncode")
        if not torch.isfinite(t).all():
            raise ValueError(f"'{name}' contains NaN or infinite values")
        regional = [k for k in REGIONAL_KEYS if options.get(k) is not None]
        if regional:
            raise ValueError(f"'{name}' has {' and '.join(regional)} conditioning (ConditioningSetArea / SetMask), "
                             f"which the edit branches cannot carry: connect the plain CLIPTextEncode output; to "
                             f"confine the edit, use a mask strategy or the Edit Sampler's edit_mask")


def latent_output(samples: torch.Tensor) -> dict:
    """A LATENT; a result with NaN or infinite values is an error, never an image."""
    if not torch.isfinite(samples).all():
        raise ValueError("the result contains NaN or infinite values (the model's predictions overflowed): "
                         "check cfg and the inputs")
    return {"samples": samples}


@functools.cache
def _widgets(node_cls) -> tuple[str, dict[str, dict]]:
    """The node's display name and, per widget input, its kind and limits, from its own schema."""
    schema = node_cls.define_schema()
    widgets = {}
    for inp in schema.inputs:
        kind = next((k for k, t in (("Float", io.Float), ("Int", io.Int), ("Combo", io.Combo))
                     if isinstance(inp, t.Input)), None)
        if kind is not None:
            widgets[inp.id] = {"kind": kind, "min": getattr(inp, "min", None), "max": getattr(inp, "max", None),
                               "options": list(getattr(inp, "options", None) or [])}
    return schema.display_name, widgets


def check_widgets(node_cls, **values) -> bool | str:
    """validate_inputs helper: every given widget value is of its kind, finite, within the schema's min and
    max, and one of its options; True, or a message naming the node, the input and the fix.

    The host checks none of this for an input the node's validate_inputs takes, JSON's NaN passes its
    range checks (every comparison with NaN is false), and 0.3.75 does not check V3 combo values: so each
    node passes its number and choice inputs through here, and the graph is refused before any node runs.
    """
    name, widgets = _widgets(node_cls)
    for input_name, value in values.items():
        spec = widgets[input_name]
        if spec["kind"] == "Combo":
            if value not in spec["options"]:
                choices = ", ".join(repr(o) for o in spec["options"][:12])
                return f"{name}: {input_name} '{value}' is not a choice; pick one of {choices}"
            continue
        number = (int,) if spec["kind"] == "Int" else (int, float)
        if isinstance(value, bool) or not isinstance(value, number):
            return f"{name}: {input_name} must be a number, got {value!r}"
        if not math.isfinite(value):
            return f"{name}: {input_name} is {value}; give a finite number"
        low, high = spec["min"], spec["max"]
        if (low is not None and value < low) or (high is not None and value > high):
            return f"{name}: {input_name} is {value}, outside [{low}, {high}]; give a value in that range"
    return True


def check_socket(value, kind: str, input_name: str, node: str) -> None:
    """A clear error when an input that must be a connection holds something else (a literal in an API
    prompt where a link belongs), before the node uses it."""
    expected = {"MODEL": comfy.model_patcher.ModelPatcher, "ATTN_EDIT_INVERSION": InversionHandle}.get(kind)
    ok = isinstance(value, expected) if expected is not None else hasattr(value, "tokenize")
    if not ok:
        raise ValueError(f"{node}: '{input_name}' must be connected to a {kind} output, got {type(value).__name__} "
                         f"{str(value)[:40]!r}")


def image_mask(latent: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A MASK (batch, height, width) at image resolution from a latent-resolution mask or all ones."""
    b, _, h, w = latent.shape
    if mask is None:
        return torch.ones(b, h * 8, w * 8)
    mask = mask.float().reshape(b, 1, *mask.shape[-2:])
    return torch.nn.functional.interpolate(mask, size=(h * 8, w * 8), mode="nearest").reshape(b, h * 8, w * 8)
