"""The training data: an unbounded, seeded stream of train-split scenes, rendered into batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from .. import scenes

TRAIN_STREAM = 0  # the stream id scenes.make_dataset uses for the "train" split
MAX_OBJECTS = 2


def train_scenes(seed: int) -> Iterator[scenes.Scene]:
    """The unbounded stream of train-split scenes; its first n are ``scenes.make_dataset(seed, n, "train")``."""
    rng = np.random.default_rng([seed, TRAIN_STREAM])
    while True:
        scene = scenes.sample_scene(rng)
        if scenes.caption_split(scene.caption) == "train":
            yield scene


def take(stream: Iterator[scenes.Scene], n: int) -> list[scenes.Scene]:
    return [next(stream) for _ in range(n)]


def render_batch(batch: Sequence[scenes.Scene], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, size, size, 3), coverage float32 (N, MAX_OBJECTS, size, size) in [0, 1])."""
    images = np.empty((len(batch), size, size, 3), dtype=np.uint8)
    coverage = np.zeros((len(batch), MAX_OBJECTS, size, size), dtype=np.float32)
    for i, scene in enumerate(batch):
        image, covers = scenes.render_with_coverage(scene, size)
        images[i] = image
        for j, c in enumerate(covers):
            coverage[i, j] = c.astype(np.float32) / 255.0
    return images, coverage


def to_vae_input(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], what ComfyUI's VAE wrapper feeds AutoencoderKL."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
