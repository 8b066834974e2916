"""Instant attention masks (InstDiffEdit, arXiv 2401.07709), as pure tensor math.

Cross-attention probabilities at low resolution (the conditional rows), averaged over heads, layers and
steps, are summed on the fly (a fixed-size buffer: nothing grows with the step count). The mask rule of
the paper and its official code:

1. per-word maps: a word's tokens merged by their mean; every map (the start token's too) scaled by its
   maximum and resized to the latent size; the start token's map inverted; each min-max normalised;
2. the index word: the word whose map is most similar (cosine) to the inverted start-token map, or the
   user's word(s) when named;
3. words whose map has cosine >= 0.9 to the index word's map are object, <= 0.6 background (the index
   word itself is object); these classes are decided once, at the first step, and kept after;
4. refined map = normalise(mean of object maps) - normalise(mean of background maps), clamped at 0
   (just the normalised object mean when no word is background, and, a guard of the pack's, when the
   subtraction leaves nothing: the official code then returns an empty mask);
5. a 5x5 Gaussian blur twice (sigma 1.1, what OpenCV derives for a 5x5 kernel), min-max normalisation,
   and the mask is where the map exceeds phi = 0.2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .heads import head_probabilities

START_TOKEN = 0
CHUNK_TOKENS = 77  # word positions index the prompt's first CLIP chunk


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(QK^T / sqrt(d)) averaged over heads, in fp32: (batch, queries, tokens)."""
    return head_probabilities(q, k, heads).mean(dim=1)


class MapAccumulator:
    """Running sum of (images, tokens, h, w) maps at one resolution; its size never depends on steps.

    Only the first CLIP chunk's tokens are kept (the word positions index it), so a context repeated to a
    common length in a batched call (comfy/conds.py) sums into the same buffer."""

    def __init__(self, tokens: int = CHUNK_TOKENS):
        self.tokens = tokens
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, probs: torch.Tensor, side: tuple[int, int]) -> None:
        """probs (images, h*w, tokens) from one layer call."""
        probs = probs[..., :self.tokens]
        maps = probs.transpose(1, 2).reshape(probs.shape[0], probs.shape[2], *side).float()
        if self.total is None or self.total.shape != maps.shape:
            self.total, self.count = torch.zeros_like(maps), 0
        self.total += maps
        self.count += 1

    def mean(self) -> torch.Tensor | None:
        return None if self.total is None else self.total / self.count

    def stored_elements(self) -> int:
        return 0 if self.total is None else self.total.numel()


def opencv_sigma(size: int) -> float:
    """The sigma OpenCV's GaussianBlur uses for a kernel of `size` when given sigma 0."""
    return 0.3 * ((size - 1) * 0.5 - 1) + 0.8


def gaussian_blur(x: torch.Tensor, size: int = 5, sigma: float | None = None) -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, H, W) maps, mirrored at the border without repeating the edge
    (OpenCV's default BORDER_REFLECT_101); sigma None: OpenCV's sigma for the kernel size."""
    sigma = opencv_sigma(size) if sigma is None else sigma
    r = size // 2
    t = torch.arange(size, dtype=x.dtype, device=x.device) - r
    g = torch.exp(-(t ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    x = F.pad(x, (r, r, 0, 0), mode="reflect" if x.shape[-1] > r else "replicate")
    x = F.conv2d(x, g.view(1, 1, 1, size))
    x = F.pad(x, (0, 0, r, r), mode="reflect" if x.shape[-2] > r else "replicate")
    return F.conv2d(x, g.view(1, 1, size, 1))


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Min-max normalisation per map over the last two dims (a flat map becomes 0)."""
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-8)


def word_maps(maps: torch.Tensor, words: list[list[int]]) -> torch.Tensor:
    """(images, words, h, w): each word's tokens merged by their mean."""
    return torch.stack([maps[:, idx].mean(dim=1) for idx in words], dim=1)


def resized(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Each map (images, n, h, w) scaled by its maximum (an 8-bit image in the official code) and resized to
    `size` bicubically, clamped to [0, 1] as an image is."""
    peak = maps.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    x = maps / peak
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
    return x.clamp(0.0, 1.0)


def cue_maps(maps: torch.Tensor, words: list[list[int]], size: tuple[int, int], start_index: int = START_TOKEN,
             invert_start: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(inverted start-token map (images, H, W), per-word maps (images, words, H, W)), each min-max
    normalised at `size` (the latent's). invert_start False: the start-token map as it is (a variant for
    models whose start token attends to the object rather than the background)."""
    start = resized(maps[:, start_index:start_index + 1], size)
    start = normalise(1.0 - start if invert_start else start)[:, 0]
    return start, normalise(resized(word_maps(maps, words), size))


def cosine_to(reference: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each map (images, n, h, w) to reference (images, h, w): (images, n)."""
    return F.cosine_similarity(maps.flatten(2), reference.flatten(1).unsqueeze(1), dim=-1)


@dataclass(frozen=True)
class WordClasses:
    """Which words are object and which background, per image (decided at the first step)."""

    index: torch.Tensor  # (images,) the index word (-1: the user's named words)
    is_object: torch.Tensor  # (images, words) bool
    is_background: torch.Tensor  # (images, words) bool


def classify_words(start_cue: torch.Tensor, per_word: torch.Tensor, edit_words: list[int] | None = None,
                   object_similarity: float = 0.9, background_similarity: float = 0.6) -> WordClasses:
    """The index word (most similar to the inverted start-token map, or the user's words), then object and
    background words by cosine similarity to the index word's map."""
    images, n = per_word.shape[:2]
    index_of = torch.arange(n, device=per_word.device)
    if edit_words:
        reference = per_word[:, edit_words].mean(dim=1)
        index = torch.full((images,), -1, dtype=torch.long, device=per_word.device)
        forced = torch.zeros(images, n, dtype=torch.bool, device=per_word.device)
        forced[:, edit_words] = True
    else:
        index = cosine_to(start_cue, per_word).argmax(dim=1)
        reference = per_word[torch.arange(images, device=per_word.device), index]
        forced = index_of[None] == index[:, None]
    similarity = cosine_to(reference, per_word)
    is_object = (similarity >= object_similarity) | forced
    is_background = (similarity <= background_similarity) & ~is_object
    return WordClasses(index, is_object, is_background)


def refined_map(per_word: torch.Tensor, classes: WordClasses, min_object_left: float = 0.0) -> torch.Tensor:
    """normalise(mean object map) - normalise(mean background map), clamped at 0: (images, H, W).

    When the subtraction leaves at most `min_object_left` anywhere (its peak; the object map's peak is 1),
    the object map alone is used, as where no word is background. With the default 0 this happens only
    where the subtraction leaves nothing at all: the background words' maps cover the object words' map
    everywhere (a lone object that every word attends to), and the official rule would give an empty mask,
    an edit that silently changes nothing. Raise it (e.g. 0.5) to keep the object where the subtraction
    removes most of it."""

    def mean_of(chosen: torch.Tensor) -> torch.Tensor:
        w = chosen.float()[..., None, None]
        return (per_word * w).sum(dim=1) / w.sum(dim=1).clamp_min(1)

    objects = normalise(mean_of(classes.is_object))
    has_background = classes.is_background.any(dim=1)[:, None, None]
    background = normalise(mean_of(classes.is_background))
    subtracted = (objects - background).clamp_min(0.0)
    left = subtracted.amax(dim=(-2, -1), keepdim=True)
    return torch.where(has_background & (left > min_object_left), subtracted, objects)


def binary_mask(refined: torch.Tensor, blur_passes: int = 2, threshold: float = 0.2) -> torch.Tensor:
    """(images, 1, H, W) in {0, 1}: blurred, min-max normalised, above the threshold phi."""
    x = refined.unsqueeze(1)
    for _ in range(blur_passes):
        x = gaussian_blur(x)
    return (normalise(x) > threshold).float()


def instant_mask(maps: torch.Tensor, words: list[list[int]], latent_side: tuple[int, int],
                 start_index: int = START_TOKEN, edit_words: list[int] | None = None,
                 classes: WordClasses | None = None, object_similarity: float = 0.9,
                 background_similarity: float = 0.6, blur_passes: int = 2, threshold: float = 0.2,
                 invert_start: bool = True, min_object_left: float = 0.0) -> tuple[torch.Tensor, WordClasses]:
    """The binary edit mask (images, 1, H, W) at latent resolution from the mean maps (images, tokens, h, w),
    and the word classes it used: `classes` when given (those of the first step), else decided now."""
    start_cue, per_word = cue_maps(maps, words, latent_side, start_index, invert_start)
    if classes is None:
        classes = classify_words(start_cue, per_word, edit_words, object_similarity, background_similarity)
    return binary_mask(refined_map(per_word, classes, min_object_left), blur_passes, threshold), classes


def mean_over_samples(maps: torch.Tensor, samples: int) -> torch.Tensor:
    """Rows laid out sample-major ([sample * images + image]) averaged over the samples: (images, ...)."""
    return maps.reshape(samples, maps.shape[0] // samples, *maps.shape[1:]).mean(dim=0)
