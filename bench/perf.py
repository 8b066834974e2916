"""Speed benchmarks on the full-size SD1.5 UNet with seeded random weights (the real model's cost).

Every figure is a ratio of wall times measured interleaved in one process, median of the repeats.
"""

from __future__ import annotations

MODEL = "SD1.5 architecture (seeded random weights)"


def run(rec, device: str, steps: int = 4, latent_side: int = 24, edit_latent_side: int = 16,
        repeats: int = 5, family: str = "sd15_full") -> None:
    import nodes as comfy_nodes

    from attention_edit.engine.adaptive_mask import AdaptiveMaskStrategy
    from attention_edit.engine.instant_mask import InstantMaskStrategy
    from attention_edit.nodes.edit_sampler import EditSampler
    from attention_edit.nodes.injection import SelfAttentionInjection
    from attention_edit.nodes.inversion import DDIMInversion, InversionReconstruct
    from attention_edit.nodes.uniform_attention import UniformAttention
    from fixtures import tiny

    from .common import interleaved, ratio

    model = tiny.build(family)
    model_name = MODEL if family == "sd15_full" else f"tiny {family} (smoke run)"
    resolution = f"{latent_side * 8}px (latent {latent_side}x{latent_side})"
    latent = tiny.latent(size=latent_side)
    empty, source, target = (tiny.conditioning(family, s) for s in (1, 2, 3))

    def stock(m, cond, cfg, samples):
        return comfy_nodes.common_ksampler(m, 0, steps, cfg, "euler", "ddim_uniform", cond, empty,
                                           {"samples": samples}, disable_noise=True)[0]["samples"]

    def invert(m, samples=latent):
        return DDIMInversion.execute(model=m, latent={"samples": samples}, positive=empty, negative=empty, cfg=1.0,
                                     steps=steps, scheduler="ddim_uniform", strength=1.0).args

    # Inversion against a stock KSampler run of the same steps at cfg 1; and the inversion of a model
    # patched for editing, which keeps what edits replay (one more model call, at the noisiest latent).
    fpe = SelfAttentionInjection.execute(model=model, mode="fpe", fpe_ratio=0.8, fpe_max_map_side=0.5,
                                         masactrl_start_step=4, masactrl_start_layer=-1).args[0]
    times = interleaved({"stock": lambda: stock(model, empty, 1.0, latent), "invert": lambda: invert(model),
                         "invert_keeping": lambda: invert(fpe)}, repeats=repeats)
    rec.add("inversion.cost_ratio_vs_stock", ratio(times, "invert", "stock"), "ratio", True, model_name, resolution, steps,
            goal=1.05)
    rec.add("inversion.cost_ratio_vs_stock.keeping_for_replay", ratio(times, "invert_keeping", "stock"), "ratio", True,
            model_name, resolution, steps, note=f"FPE-patched model: {steps} + 1 model calls against {steps}, and "
                                                "the source's Q and K kept (1/N extra: 2 % at 50 steps)")
    noisy, handle = invert(model)
    recon = InversionReconstruct.execute(model=model, inversion=handle, positive=empty, negative=empty, cfg=1.0,
                                         pin_source=True).args[0]["samples"]
    rec.add("inversion.pinned_recon_max_abs_err", float((recon - latent).abs().max()), "latent", True, model_name,
            resolution, steps, goal=1e-4)

    # Uniform attention against stock sampling at cfg 7.5 (the saving is in the cross-attention scores).
    uniform = UniformAttention.execute(model=model, scope="all", start_percent=0.0, end_percent=1.0,
                                       blocks="all").args[0]
    noisy_samples = noisy["samples"]
    times = interleaved({"stock": lambda: stock(model, target, 7.5, noisy_samples),
                         "uniform": lambda: stock(uniform, target, 7.5, noisy_samples)}, repeats=repeats)
    rec.add("uniform.overhead_ratio", ratio(times, "uniform", "stock"), "ratio", True, model_name, resolution, steps, goal=1.0)

    # The edit pass and its options against one stock generation, at a smaller latent (more variants).
    # As the workflows wire them: the patched model also inverts (it keeps what the source branch's
    # injection reads), and the source prompt is the inversion's, so the source branch is replayed.
    side = edit_latent_side
    edit_resolution = f"{side * 8}px (latent {side}x{side})"
    small = tiny.latent(size=side)
    uam = UniformAttention.execute(model=fpe, scope="inversion_and_aux", start_percent=0.0, end_percent=1.0,
                                   blocks="all").args[0]
    fpe_handle, uam_handle = invert(fpe, small)[1], invert(uam, small)[1]
    groups = [[[1]], [[2]], [[3]]]

    def edit(m, handle, strategy=None, source_prompt=empty):
        return EditSampler.execute(model=m, source=source_prompt, target=target, negative=empty, cfg=7.5, steps=steps,
                                   scheduler="ddim_uniform", pin_source=True, seed=0, inversion=handle,
                                   mask_strategy=strategy).args

    times = interleaved({
        "stock": lambda: stock(model, target, 7.5, fpe_handle.latents[0]),
        "edit_plain": lambda: edit(model, fpe_handle),
        "edit_fpe": lambda: edit(fpe, fpe_handle),
        "edit_fpe_recomputed": lambda: edit(fpe, fpe_handle, source_prompt=source),
        "edit_instant": lambda: edit(fpe, fpe_handle, InstantMaskStrategy([g[0] for g in groups], [1])),
        "edit_adaptive": lambda: edit(uam, uam_handle, AdaptiveMaskStrategy(t_mask=1000.0, recipe="uniform_pinned")),
    }, repeats=repeats)
    kept_mb = round(fpe_handle.record.nbytes / 2**20, 2)
    rec.add("injection.overhead_ratio", ratio(times, "edit_fpe", "edit_plain"), "ratio", True, model_name,
            edit_resolution, steps, goal=1.05)
    rec.add("edit.cost_ratio_vs_generation", ratio(times, "edit_fpe", "stock"), "ratio", True, model_name,
            edit_resolution, steps, goal=1.10, replay_cache_mb=kept_mb,
            note="FPE edit, source replayed from the inversion (source prompt = inversion prompt)")
    rec.add("edit.cost_ratio_recomputed_source", ratio(times, "edit_fpe_recomputed", "stock"), "ratio", True,
            model_name, edit_resolution, steps,
            note="the same edit with another source prompt than the inversion's: the source branch runs each step")
    rec.add("replay.cache_mb", kept_mb, "MB", True, model_name, edit_resolution, steps,
            note="what the FPE inversion keeps for replay (Q, K of the source in 11 of 16 self-attention layers, "
                 "steps [0, 0.8 N)), on the CPU")
    rec.add("mask.instant_overhead_ratio", ratio(times, "edit_instant", "edit_fpe"), "ratio", True, model_name,
            edit_resolution, steps, goal=1.05)
    rec.add("mask.adaptive_overhead_ratio", ratio(times, "edit_adaptive", "edit_fpe"), "ratio", True, model_name,
            edit_resolution, steps, note="UAM: the auxiliary branch is replayed, the source (normal attention, "
                                         "unlike the uniform inversion) runs; blending active every step")

    from . import memory

    memory.run(rec, device, model_name, family, steps, side)
