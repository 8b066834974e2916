"""What the stages share: the optimiser, the learning-rate schedule, the EMA of the weights and the stage budget."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

import torch


def adamw(params, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW, fused where this torch supports it (CPU included since torch 2.4: about 10x faster
    here than the per-parameter loop, which matters with the text encoder's 3.2 M-entry embedding)."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)


def lr_at(progress: float, step: int, peak: float, warmup: int, min_fraction: float,
          warmup_progress: float = 0.05) -> float:
    """Linear warm-up, then a cosine from `peak` to ``peak * min_fraction`` over progress 0..1. The
    warm-up ends after `warmup` steps or at `warmup_progress` of the budget, whichever comes first
    (so a short run still reaches the peak)."""
    warm = min(1.0, max((step + 1) / max(1, warmup), progress / warmup_progress if warmup_progress else 0.0))
    cosine = min_fraction + (1.0 - min_fraction) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))
    return peak * warm * cosine


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], live: Mapping[str, torch.Tensor], decay: float, step: int) -> None:
    """Move the EMA towards the live tensors (same names), with the usual warm-up: the decay is
    ``min(decay, (1 + step) / (10 + step))``, so the first steps' weights do not linger."""
    decay = min(decay, (1.0 + step) / (10.0 + step))
    names = list(ema)
    torch._foreach_lerp_([ema[n] for n in names], [live[n].detach() for n in names], 1.0 - decay)


@torch.no_grad()
def ema_swap(ema: dict[str, torch.Tensor], live: Mapping[str, torch.Tensor]) -> None:
    """Exchange the live tensors' values and the EMA's (a second call undoes it): the trainers save the EMA."""
    for name, shadow in ema.items():
        kept = live[name].detach().clone()
        live[name].detach().copy_(shadow)
        shadow.copy_(kept)


@torch.no_grad()
def zero_layers(layers) -> int:
    """Zero the weights and biases of `layers` (the zero-initialised outputs of openaimodel and adaLN-zero);
    returns how many."""
    layers = list(layers)
    for layer in layers:
        layer.weight.zero_()
        if layer.bias is not None:
            layer.bias.zero_()
    return len(layers)


class Budget:
    """Progress of a stage: the larger of steps done / step cap and time used / time budget."""

    def __init__(self, seconds: float | None, steps: int | None):
        if seconds is None and steps is None:
            raise ValueError("a stage needs a time budget or a step count")
        self.seconds, self.steps = seconds, steps
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def progress(self, step: int) -> float:
        p = 0.0
        if self.steps is not None:
            p = max(p, step / self.steps if self.steps else 1.0)  # a cap of 0 steps: nothing to do
        if self.seconds:
            p = max(p, self.elapsed() / self.seconds)
        return p

    def done(self, step: int) -> bool:
        return self.progress(step) >= 1.0

    def restart(self) -> float:
        """Start the clock again with what is left of the time budget (after a set-up); returns the seconds used."""
        used = self.elapsed()
        if self.seconds is not None:
            self.seconds = max(1.0, self.seconds - used)
        self.start = time.perf_counter()
        return used
