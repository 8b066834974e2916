"""Instant attention masks (InstDiffEdit, arXiv 2401.07709), as pure tensor math.

Cross-attention probabilities at low resolution, averaged over heads and layers, are summed on the
fly (a fixed-size buffer: nothing grows with the step count). The mask: per-word maps (multi-token
words merged), the start token's map inverted as a foreground cue, tokens whose map is close to it
(cosine >= 0.9) counted as object and far (<= 0.6) as background, objects minus background clamped
at 0, a 5x5 Gaussian blur twice, min-max normalisation and a threshold phi (0.2: a generous mask
with a margin around the object, as the paper wants for editing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .heads import head_probabilities


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(QK^T / sqrt(d)) averaged over heads, in fp32: (batch, queries, tokens)."""
    return head_probabilities(q, k, heads).mean(dim=1)


class MapAccumulator:
    """Running sum of (images, tokens, h, w) maps at one resolution; its size never depends on steps."""

    def __init__(self):
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, probs: torch.Tensor, side: tuple[int, int]) -> None:
        """probs (images, h*w, tokens) from one layer call."""
        maps = probs.transpose(1, 2).reshape(probs.shape[0], probs.shape[2], *side).float()
        if self.total is None or self.total.shape != maps.shape:
            self.total, self.count = torch.zeros_like(maps), 0
        self.total += maps
        self.count += 1

    def mean(self) -> torch.Tensor | None:
        return None if self.total is None else self.total / self.count

    def stored_elements(self) -> int:
        return 0 if self.total is None else self.total.numel()


def gaussian_blur(x: torch.Tensor, size: int = 5, sigma: float = 1.0) -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, H, W) maps with reflect padding."""
    r = size // 2
    t = torch.arange(size, dtype=x.dtype, device=x.device) - r
    g = torch.exp(-(t ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    x = F.pad(x, (r, r, 0, 0), mode="reflect" if x.shape[-1] > r else "replicate")
    x = F.conv2d(x, g.view(1, 1, 1, size))
    x = F.pad(x, (0, 0, r, r), mode="reflect" if x.shape[-2] > r else "replicate")
    return F.conv2d(x, g.view(1, 1, size, 1))


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Min-max normalisation per map over the last two dims."""
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-8)


def word_maps(maps: torch.Tensor, words: list[list[int]]) -> torch.Tensor:
    """(images, words, h, w): each word's tokens merged by their mean."""
    return torch.stack([maps[:, idx].mean(dim=1) for idx in words], dim=1)


def cosine_to(reference: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each map (images, n, h, w) to reference (images, h, w): (images, n)."""
    return F.cosine_similarity(maps.flatten(2), reference.flatten(1).unsqueeze(1), dim=-1)


def refined_map(maps: torch.Tensor, words: list[list[int]], start_index: int = 0, edit_words: list[int] | None = None,
                object_similarity: float = 0.9, background_similarity: float = 0.6) -> torch.Tensor:
    """InstDiffEdit's refined foreground map (images, h, w), before blur and threshold.

    maps: mean attention (images, tokens, h, w). words: token indices of each prompt word. The start
    token's inverted map is the foreground cue; words whose map is that close count as object, words
    that far as background. With `edit_words` (indices into `words`) the user's words are the object.
    """
    foreground = 1.0 - normalise(maps[:, start_index])
    per_word = normalise(word_maps(maps, words))
    similarity = cosine_to(foreground, per_word)
    is_background = similarity <= background_similarity
    if edit_words:
        obj = per_word[:, edit_words].mean(dim=1)
        is_background[:, edit_words] = False
    else:
        is_object = (similarity >= object_similarity).float()
        obj = (foreground + (per_word * is_object[..., None, None]).sum(dim=1)) / (1 + is_object.sum(dim=1))[..., None, None]
    is_background = is_background.float()
    bg = (per_word * is_background[..., None, None]).sum(dim=1) / is_background.sum(dim=1).clamp_min(1)[..., None, None]
    return (obj - bg).clamp_min(0.0)


def instant_mask(maps: torch.Tensor, words: list[list[int]], latent_side: tuple[int, int], start_index: int = 0,
                 edit_words: list[int] | None = None, object_similarity: float = 0.9,
                 background_similarity: float = 0.6, blur_passes: int = 2, threshold: float = 0.2) -> torch.Tensor:
    """The binary edit mask (images, 1, H, W) at latent resolution."""
    refined = refined_map(maps, words, start_index, edit_words, object_similarity, background_similarity)
    # Blur at latent resolution: it smooths the blocky upsampled map instead of widening it by 4x.
    x = F.interpolate(refined.unsqueeze(1), size=latent_side, mode="bilinear", align_corners=False)
    for _ in range(blur_passes):
        x = gaussian_blur(x)
    return (normalise(x) >= threshold).float()
