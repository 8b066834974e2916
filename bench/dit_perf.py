"""Speed benchmarks on flow-matching DiTs with seeded random weights: Flux.1 (dev: distilled guidance, cfg 1) and
SD3.5 medium (real CFG), the host's own model classes (fixtures/tiny_dit.py full-size configs).

Three ratios per family, each of wall times measured interleaved in one process (median of the repeats):
* ``<family>.inversion.cost_ratio_vs_stock``: AttnEdit_DDIMInversion (rectified-flow inversion) against a stock
  sampling run of the same steps and cfg;
* ``<family>.edit.cost_ratio_vs_generation``: an FPE edit with the source replayed from the inversion against one
  stock generation at the edit's cfg;
* ``<family>.override.overhead_ratio``: stock sampling of a model carrying the pack's attention override (an FPE
  patch, outside any edit run: no method active) against the unpatched model.

Flux.1's full depth (19 double + 38 single blocks, 12 B parameters) needs 48 GB in float32: on a machine (or, with
--device cuda, a GPU) with less memory the run keeps Flux's block widths and takes fewer blocks (`flux_blocks`), and
says so in the model name.
"""

from __future__ import annotations

FLUX_FULL_BLOCKS = (19, 38)
FLUX_FULL_BYTES = 12e9 * 4 * 1.15  # float32 weights plus activations and the host's copies


def _flux_blocks(requested: tuple[int, int] | None, device: str) -> tuple[int, int]:
    """The Flux blocks to time: the full depth where the memory that holds the weights allows (the system's, and on
    CUDA the GPU's as well: the model is built in system memory, then loaded onto the GPU), else 2 + 4."""
    if requested is not None:
        return requested
    import psutil

    memory = psutil.virtual_memory().total
    if device == "cuda":
        import torch

        memory = min(memory, torch.cuda.get_device_properties(0).total_memory)
    return FLUX_FULL_BLOCKS if memory > FLUX_FULL_BYTES else (2, 4)


def run(rec, device: str, steps: int = 4, latent_side: int = 16, repeats: int = 3, families=("flux", "sd35"),
        flux_blocks: tuple[int, int] | None = None, tokens: int = 32, smoke: bool = False) -> None:
    import gc

    for family in families:
        _run_family(rec, family, steps, latent_side, repeats, _flux_blocks(flux_blocks, device), tokens, smoke)
        gc.collect()


def _run_family(rec, family: str, steps: int, latent_side: int, repeats: int, flux_blocks: tuple[int, int],
                tokens: int, smoke: bool) -> None:
    import nodes as comfy_nodes

    from attention_edit.nodes.edit_sampler import EditSampler
    from attention_edit.nodes.injection import SelfAttentionInjection
    from attention_edit.nodes.inversion import DDIMInversion
    from fixtures import tiny_dit

    from .common import interleaved, ratio

    if smoke:
        arch, name = ("flux" if family == "flux" else "sd35"), f"tiny {family} (smoke run)"
    elif family == "flux":
        arch = "flux_full"
        name = "Flux.1-dev architecture (seeded random weights)" if flux_blocks == FLUX_FULL_BLOCKS else \
            (f"Flux.1-dev block widths, {flux_blocks[0]} double + {flux_blocks[1]} single of 19 + 38 blocks "
             "(seeded random weights; the full depth needs 48 GB in float32)")
    else:
        arch, name = "sd35_full", "SD3.5 medium architecture (seeded random weights)"
    model = tiny_dit.build(arch, blocks=flux_blocks) if arch == "flux_full" else tiny_dit.build(arch)
    cfg = 1.0 if family == "flux" else 4.5  # Flux-dev: distilled guidance in the conditioning, no negative pass
    resolution = f"{latent_side * 8}px (latent {latent_side}x{latent_side}), {tokens} text tokens"
    latent = tiny_dit.latent(size=latent_side)
    empty, source, target = (tiny_dit.conditioning(arch, s, tokens=tokens) for s in (1, 2, 3))
    scheduler = "simple"

    def stock(m, cond, samples):
        return comfy_nodes.common_ksampler(m, 0, steps, cfg, "euler", scheduler, cond, empty, {"samples": samples},
                                           disable_noise=True)[0]["samples"]

    def invert(m, samples=latent):
        return DDIMInversion.execute(model=m, latent={"samples": samples}, positive=source, negative=empty, cfg=cfg,
                                     steps=steps, scheduler=scheduler, strength=1.0).args

    fpe = SelfAttentionInjection.execute(model=model, mode="fpe", fpe_ratio=0.8, fpe_max_map_side=0.5,
                                         masactrl_start_step=4, masactrl_start_layer=-1).args[0]
    times = interleaved({"stock": lambda: stock(model, source, latent), "invert": lambda: invert(model),
                         "stock_patched": lambda: stock(fpe, source, latent)}, repeats=repeats)
    rec.add(f"{family}.inversion.cost_ratio_vs_stock", ratio(times, "invert", "stock"), "ratio", True, name,
            resolution, steps, goal=1.05, cfg=cfg)
    rec.add(f"{family}.override.overhead_ratio", ratio(times, "stock_patched", "stock"), "ratio", True, name,
            resolution, steps, goal=1.05, note="stock sampling of a model with the pack's FPE override installed, "
                                               "outside an edit run (no method active)")

    handle = invert(fpe)[1]

    def edit():
        return EditSampler.execute(model=fpe, source=source, target=target, negative=empty, cfg=cfg, steps=steps,
                                   scheduler=scheduler, pin_source=True, seed=0, inversion=handle).args

    times = interleaved({"stock": lambda: stock(model, target, handle.latents[0]), "edit_fpe": edit}, repeats=repeats)
    rec.add(f"{family}.edit.cost_ratio_vs_generation", ratio(times, "edit_fpe", "stock"), "ratio", True, name,
            resolution, steps, goal=1.10, cfg=cfg,
            note="FPE edit, source replayed from the inversion (source prompt = inversion prompt)")
