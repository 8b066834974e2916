"""Attention regulation's cost: regulated text-to-image over stock, same steps, on the full-size SD1.5 UNet
with seeded random weights (the real model's cost), interleaved in one process, median of the repeats.

The targets are real token positions: the prompt "a photo of a cat and a dog" through the CLIP
tokenizer is [start, a, photo, of, a, cat, and, a, dog, end, ...], so "cat" is token 5, "dog" token 8
and the end token 9. The conditioning is a seeded random text embedding of the same shape as
CLIPTextEncode's; the regulation's cost does not depend on what the embedding says.
"""

from __future__ import annotations

MODEL = "SD1.5 architecture (seeded random weights)"
CAT, DOG, END = 5, 8, 9


def run(rec, device: str, steps: int = 8, latent_side: int = 32, repeats: int = 5, family: str = "sd15_full") -> None:
    import statistics
    import time

    import nodes as comfy_nodes
    import torch

    from attention_edit.attention.regulation import RegulationParams
    from attention_edit.engine import regulation as engine
    from attention_edit.engine.regulation import TokenPlan, apply_attention_regulation, regulation_layers
    from fixtures import tiny

    from .common import interleaved, ratio

    model = tiny.build(family)
    model_name = MODEL if family == "sd15_full" else f"tiny {family} (smoke run)"
    resolution = f"{latent_side * 8}px (latent {latent_side}x{latent_side})"
    positive, negative = tiny.conditioning(family, 2), tiny.conditioning(family, 1)
    plan = TokenPlan.from_positions([[CAT], [DOG]], end=END, words=("cat", "dog"))
    params = RegulationParams()  # the paper's: 20 iterations, lr 100, EMA 0.25, decay 0.99
    end_percent = 0.5  # the paper's 25 of 50 steps
    regulated = apply_attention_regulation(model, plan, end_percent, params)
    layers = regulation_layers(model)
    latent = {"samples": torch.zeros(1, 4, latent_side, latent_side)}

    def generate(m):
        return comfy_nodes.common_ksampler(m, 0, steps, 7.5, "euler", "normal", positive, negative, latent)[0]["samples"]

    # The regulation's own work, timed inside the patch: on a busy machine the wall-time ratio of two
    # whole generations is noisy, this share of the stock generation's time is not.
    inside: list[float] = []
    original = engine.regulate

    def timed_regulate(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            inside.append(time.perf_counter() - start)

    engine.regulate = timed_regulate
    try:
        times = interleaved({"stock": lambda: generate(model), "regulated": lambda: generate(regulated)},
                            repeats=repeats)
    finally:
        engine.regulate = original
    regulated_steps = sum(i < end_percent * steps for i in range(steps))
    runs = repeats + 1  # the warm-up run included
    extra = dict(cfg=7.5, regulated_steps=regulated_steps, iterations=params.iterations,
                 layers=", ".join(f"{name} {number}" for name, number, _ in layers))
    rec.add("regulation.overhead_ratio", ratio(times, "regulated", "stock"), "ratio", True, model_name, resolution, steps,
            goal=1.30, note="paper: 1.488 on SD2 (Attend-and-Excite 5.15)",
            min_ratio=min(times["regulated"]) / min(times["stock"]),
            stock_seconds=[round(t, 3) for t in times["stock"]],
            regulated_seconds=[round(t, 3) for t in times["regulated"]], **extra)
    per_image = sum(inside) / runs
    rec.add("regulation.optimisation_share", per_image / statistics.median(times["stock"]), "ratio", True, model_name,
            resolution, steps, calls_per_image=len(inside) / runs, seconds_per_image=per_image,
            note="time inside the regulated layers' optimisation per image / stock generation time", **extra)
