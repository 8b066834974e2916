"""Speed benchmarks on the full-size SD1.5 UNet with seeded random weights (the real model's cost).

Every figure is a ratio of wall times measured interleaved in one process, median of the repeats.
"""

from __future__ import annotations

MODEL = "SD1.5 architecture (seeded random weights)"


def run(rec, device: str, steps: int = 4, latent_side: int = 32, repeats: int = 5) -> None:
    import nodes as comfy_nodes
    import tiny
    from attention_edit.nodes.edit_sampler import EditSampler
    from attention_edit.nodes.injection import SelfAttentionInjection
    from attention_edit.nodes.inversion import DDIMInversion, InversionReconstruct
    from attention_edit.nodes.uniform_attention import UniformAttention

    from .common import interleaved, ratio

    model = tiny.build("sd15_full")
    resolution = f"{latent_side * 8}px (latent {latent_side}x{latent_side})"
    latent = tiny.latent(size=latent_side)
    empty, source, target = (tiny.conditioning("sd15_full", s) for s in (1, 2, 3))

    def stock(m, cond, cfg, samples):
        return comfy_nodes.common_ksampler(m, 0, steps, cfg, "euler", "ddim_uniform", cond, empty,
                                           {"samples": samples}, disable_noise=True)[0]["samples"]

    def invert(m, cfg=1.0):
        return DDIMInversion.execute(model=m, latent={"samples": latent}, positive=empty, negative=empty, cfg=cfg,
                                     steps=steps, scheduler="ddim_uniform", strength=1.0).args

    # Inversion against a stock KSampler run of the same steps at cfg 1.
    times = interleaved({"stock": lambda: stock(model, empty, 1.0, latent), "invert": lambda: invert(model)},
                        repeats=repeats)
    rec.add("inversion.cost_ratio_vs_stock", ratio(times, "invert", "stock"), "ratio", True, MODEL, resolution, steps,
            goal=1.05)
    noisy, handle = invert(model)
    recon = InversionReconstruct.execute(model=model, inversion=handle, positive=empty, negative=empty, cfg=1.0,
                                         pin_source=True).args[0]["samples"]
    rec.add("inversion.pinned_recon_max_abs_err", float((recon - latent).abs().max()), "latent", True, MODEL,
            resolution, steps, goal=1e-4)

    # Uniform attention, injection and the edit pass against stock generation, all at cfg 7.5.
    uniform = UniformAttention.execute(model=model, scope="all", start_percent=0.0, end_percent=1.0,
                                       blocks="all").args[0]
    fpe = SelfAttentionInjection.execute(model=model, mode="fpe", fpe_ratio=0.8, fpe_max_map_side=0.5,
                                         masactrl_start_step=4, masactrl_start_layer=-1).args[0]

    def edit(m):
        return EditSampler.execute(model=m, source=source, target=target, negative=empty, cfg=7.5, steps=steps,
                                   scheduler="ddim_uniform", pin_source=True, seed=0, inversion=handle).args

    noisy_samples = noisy["samples"]
    times = interleaved({
        "stock": lambda: stock(model, target, 7.5, noisy_samples),
        "uniform": lambda: stock(uniform, target, 7.5, noisy_samples),
        "edit_plain": lambda: edit(model),
        "edit_fpe": lambda: edit(fpe),
    }, repeats=repeats)
    rec.add("uniform.overhead_ratio", ratio(times, "uniform", "stock"), "ratio", True, MODEL, resolution, steps, goal=1.0)
    rec.add("injection.overhead_ratio", ratio(times, "edit_fpe", "edit_plain"), "ratio", True, MODEL, resolution,
            steps, goal=1.05)
    rec.add("edit.cost_ratio_vs_generation", ratio(times, "edit_fpe", "stock"), "ratio", True, MODEL, resolution,
            steps, goal=1.10, note="two branches recomputed each step (no source replay yet)")
