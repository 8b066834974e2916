"""Cross-attention in training: the recorder patch and the grounding loss. The explicit attention is the
pack's (attention/heads.py), the block keys the engine's (engine/patching.py)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import comfy.ldm.modules.attention as comfy_attention
import torch
import torch.nn.functional as F

from attention_edit.attention.heads import head_probabilities, heads_output
from attention_edit.engine.patching import unet_transformer_blocks

ATTN_LOSS_MIN_SIDE = 0.25  # the grounding loss reads cross-attention maps down to 1/4 of the latent side (16, 8, 4)


def sdpa_override(func, *args, **kwargs):
    """transformer_options["optimized_attention_override"]: torch's SDPA in place of the host's CPU
    default (sub-quadratic attention, about 5x slower forward + backward here); the same attention."""
    return comfy_attention.attention_pytorch(*args, **kwargs)


def attend(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """probs (B, heads, Nq, Nk) applied to projected v (B, Nk, heads * d) -> (B, Nq, heads * d)."""
    b, heads, nq, nk = probs.shape
    return heads_output(probs.reshape(b * heads, nq, nk), v, heads)


class AttentionRecorder:
    """attn2 replace patches that compute cross-attention explicitly and keep the head-averaged
    probabilities (with gradients) of the layers whose maps are at least `min_side` of the latent
    side (all three levels of the toy UNet: 16x16, 8x8, 4x4 at 128 px; the pack's instant mask reads
    1/4 by default), for the grounding loss. Other layers run torch's SDPA."""

    def __init__(self, unet: torch.nn.Module, min_side: float = ATTN_LOSS_MIN_SIDE):
        self.maps: list[torch.Tensor] = []  # (B, h*w, 77) each
        self.keys = unet_transformer_blocks(unet)
        self.min_side = min_side

    def patch(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        side, full = extra_options["activations_shape"][-1], extra_options["original_shape"][-1]
        if side < self.min_side * full - 1e-6:
            return comfy_attention.attention_pytorch(q, k, v, heads)
        probs = head_probabilities(q, k, heads)
        self.maps.append(probs.mean(dim=1))
        return attend(probs, v)

    def patches(self) -> dict:
        return {"attn2": {key: self.patch for key in self.keys}}


def grounding_loss(maps: Sequence[torch.Tensor], coverage: torch.Tensor, token_index: torch.Tensor,
                   token_valid: torch.Tensor) -> torch.Tensor:
    """Mean over layers and valid object words of ``(1 - fraction of the word's attention inside its object)**2``.

    maps: (B, h*w, 77) per layer; coverage: (B, MAX_OBJECTS, H, W) soft masks at latent resolution;
    token_index / token_valid: (B, MAX_OBJECTS, K) token positions and which of them count.
    """
    if not maps or not bool(token_valid.any()):
        return coverage.new_zeros(())
    b, n_obj, k = token_index.shape
    losses = []
    for attn in maps:
        side = int(round(math.sqrt(attn.shape[1])))
        cover = F.adaptive_avg_pool2d(coverage, side).flatten(2)  # (B, n_obj, h*w)
        idx = token_index.reshape(b, 1, n_obj * k).expand(b, attn.shape[1], n_obj * k)
        word_maps = torch.gather(attn, 2, idx).reshape(b, attn.shape[1], n_obj, k).permute(0, 2, 3, 1)  # (B, n_obj, K, hw)
        inside = (word_maps * cover[:, :, None, :]).sum(-1) / word_maps.sum(-1).clamp_min(1e-8)
        losses.append(((1.0 - inside) ** 2)[token_valid])
    return torch.cat(losses).mean()
