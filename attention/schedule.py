"""Where in the sampling schedule a model call is, so patches gate by step, not by call count."""

from __future__ import annotations

import torch

SCHEDULE_KEY = "attn_edit_schedule"  # full-schedule sigmas published by the pack's samplers


def step_position(options: dict) -> tuple[int, int] | None:
    """(step index, number of steps) of the current call, from transformer_options.

    Uses the full schedule the pack's samplers publish (so a partial, SDEdit-style run keeps the
    step meaning of the whole schedule), else ComfyUI's `sample_sigmas`. None outside sampling.
    """
    schedule = options.get(SCHEDULE_KEY)
    if schedule is None:
        schedule = options.get("sample_sigmas")
    sigma = options.get("sigmas")
    if schedule is None or sigma is None:
        return None
    schedule = torch.as_tensor(schedule, dtype=torch.float64).flatten().cpu()
    current = float(torch.as_tensor(sigma).flatten().max())
    steps = len(schedule) - 1
    if steps < 1:
        return None
    index = int(torch.argmin((schedule[:steps] - current).abs()))
    return index, steps


def in_step_window(options: dict, start: float, end: float) -> bool:
    """True when the call's step i satisfies start <= i / N < end (fractions of the schedule).

    Outside sampling (no schedule known) the window counts as open.
    """
    pos = step_position(options)
    if pos is None:
        return True
    i, n = pos
    return start * n <= i < end * n
