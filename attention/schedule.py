"""Where in the sampling schedule a model call is, so patches gate by step, not by call count."""

from __future__ import annotations

import torch


def position_in_schedule(schedule, sigma) -> tuple[int, int, bool] | None:
    """(step index, number of steps, exact) of a call at `sigma` in a descending schedule of sigmas.

    The index is that of the nearest schedule sigma; `exact` says the call's sigma is that sigma (the
    inversion's call at the clean latent, made at the model's smallest sigma, is not a schedule step).
    None outside sampling (no schedule or sigma known).
    """
    if schedule is None or sigma is None:
        return None
    schedule = torch.as_tensor(schedule, dtype=torch.float64).flatten().cpu()
    current = float(torch.as_tensor(sigma).flatten().max())
    steps = len(schedule) - 1
    if steps < 1:
        return None
    distance = (schedule[:steps] - current).abs()
    index = int(torch.argmin(distance))
    exact = float(distance[index]) <= 1e-5 * max(1.0, abs(current))
    return index, steps, exact
