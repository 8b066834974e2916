"""Tiny SD1.x (eps), SD2.x (v-prediction) and SDXL-shaped models built through ComfyUI's own classes.

Same block structure and code paths as the real models, tiny widths, seeded weights (the host's ops
skip initialisation, so uninitialised weights would make outputs garbage).
"""

from __future__ import annotations

import math

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
import torch

CONTEXT_DIM = {"sd15": 32, "sd2v": 48, "sdxl": 48, "sd15_full": 768}
POOLED_DIM = 32  # SDXL: adm = pooled + 6 size embeddings of 256

CONFIGS = {
    # SD1.x shape: attention at the three top levels, none at the deepest, 16 -> 8 -> 4 -> 2.
    "sd15": dict(model_channels=32, channel_mult=[1, 2, 2, 2], num_res_blocks=[1, 1, 1, 1],
                 transformer_depth=[1, 1, 1, 0], transformer_depth_output=[0, 0, 1, 1, 1, 1, 1, 1],
                 transformer_depth_middle=1, context_dim=CONTEXT_DIM["sd15"], use_linear_in_transformer=False),
    "sd2v": dict(model_channels=32, channel_mult=[1, 2, 2, 2], num_res_blocks=[1, 1, 1, 1],
                 transformer_depth=[1, 1, 1, 0], transformer_depth_output=[0, 0, 1, 1, 1, 1, 1, 1],
                 transformer_depth_middle=1, context_dim=CONTEXT_DIM["sd2v"], use_linear_in_transformer=True),
    # SDXL shape: no attention at the top level, depth 1 then 2 below, middle depth 2.
    "sdxl": dict(model_channels=32, channel_mult=[1, 2, 2], num_res_blocks=[1, 1, 1],
                 transformer_depth=[0, 1, 2], transformer_depth_output=[2, 2, 1, 1, 0, 0],
                 transformer_depth_middle=2, context_dim=CONTEXT_DIM["sdxl"], use_linear_in_transformer=True,
                 adm_in_channels=POOLED_DIM + 6 * 256, num_classes="sequential"),
}

FAMILIES = tuple(CONFIGS)

# The real SD1.5 UNet (860 M parameters): benchmarks only, it costs exactly what the real model costs.
SD15_FULL = dict(model_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
                 transformer_depth_middle=1, context_dim=768, use_linear_in_transformer=False)
OUTPUT_GAIN = 0.03


def _unet_config(family: str) -> dict:
    cfg = dict(SD15_FULL if family == "sd15_full" else CONFIGS[family])
    cfg.update(in_channels=4, out_channels=4, use_spatial_transformer=True, legacy=False, image_size=32,
               use_temporal_attention=False, use_temporal_resblock=False)
    cfg.setdefault("adm_in_channels", None)
    return cfg


def init_weights(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def build(family: str = "sd15", seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    unet_config = _unet_config(family)
    if family in ("sd15", "sd15_full"):
        config = comfy.supported_models.SD15(unet_config)
        model_type = comfy.model_base.ModelType.EPS
    elif family == "sd2v":
        config = comfy.supported_models.SD20(unet_config)
        model_type = comfy.model_base.ModelType.V_PREDICTION
    else:
        config = comfy.supported_models.SDXL(unet_config)
        model_type = comfy.model_base.ModelType.EPS
    if family != "sd15_full":  # small heads for small widths (real configs: 8 heads or 64 channels each)
        config.unet_config.update(num_heads=-1, num_head_channels=16)
    config.set_inference_dtype(torch.float32, None)
    cls = comfy.model_base.SDXL if family == "sdxl" else comfy.model_base.BaseModel
    model = cls(config, model_type=model_type, device=torch.device("cpu"))
    init_weights(model.diffusion_model, seed)
    if family == "sd15_full":
        return comfy.model_patcher.ModelPatcher(model.eval().requires_grad_(False),
                                                load_device=comfy.model_management.get_torch_device(),
                                                offload_device=torch.device("cpu"))
    with torch.no_grad():  # a calm output layer: predictions of noise-like size that vary smoothly with x
        model.diffusion_model.out[-1].weight.mul_(OUTPUT_GAIN)
    model.eval()
    model.requires_grad_(False)  # inference only, as under the host's inference_mode
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


def conditioning(family: str, seed: int, tokens: int = 77) -> list:
    """A CONDITIONING like CLIPTextEncode's, from a seeded random text embedding."""
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(1, tokens, CONTEXT_DIM[family], generator=g)
    options = {}
    if family == "sdxl":
        options["pooled_output"] = torch.randn(1, POOLED_DIM, generator=g)
    return [[context, options]]


def latent(batch: int = 1, size: int = 16, seed: int = 0) -> torch.Tensor:
    """An image-like latent in VAE space (unscaled), smooth enough to be a plausible image."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(batch, 4, size // 4, size // 4, generator=g) * 4.0
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


# How far two float32 runs of the same math may drift apart, as a fraction of the effect under test.
# Stacking branches or images changes the kernels' summation order (and which SIMD path a CPU takes), and
# cfg 7.5 over the sampler's steps amplifies it with the values: on an AMD EPYC the tests' pairs differ
# by at most 1.7e-5 of their effect (1.3e-4 absolute, SDXL fixture), an absolute bound tuned on Intel
# failed there. A mistake of the kind these tests look for (a wrong row, prompt, branch or step) moves
# the result by the order of the effect itself; 1e-3 sits 50x above the float drift and far below that.
SAME_COMPUTATION_REL = 1e-3


def assert_same_computation(actual: torch.Tensor, expected: torch.Tensor, effect: torch.Tensor) -> None:
    """Equal up to float error for the same math run in a different batch (e.g. two branches stacked vs one
    alone). `effect` is what a mistake would change: the difference between two results the test tells
    apart (another prompt, the injection on); the tolerance is SAME_COMPUTATION_REL of its largest value."""
    size = float(effect.abs().max())
    assert size > 0, "the effect to compare against is zero: the test cannot tell anything apart"
    diff = float((actual - expected).abs().max())
    assert diff <= SAME_COMPUTATION_REL * size, (
        f"differ by {diff:.3g}, {diff / size:.2g} of the effect {size:.3g} (allowed {SAME_COMPUTATION_REL:g})")

class ProgressWatch:
    """What a user sees of a long node: the progress updates the host sends, and Cancel mid-run.

    `wrap(model)` returns a clone whose sampling steps (model calls at a new sigma; cond and uncond may
    be split over calls) are counted and last at least the host's progress throttle interval (0.33.0
    sends no update less than 0.1 s after the last one; 0.3.75 sends every one), as a real model's steps
    do, so every step's update is due. `cancel_after(k)` presses Cancel (the host's interrupt flag) when
    the k-th step's model call returns. Use as a context manager: it installs
    the host's global progress hook and removes it, and clears the interrupt flag, on exit.
    """

    def __init__(self):
        import comfy.utils

        self.min_call_seconds = float(getattr(comfy.utils, "PROGRESS_THROTTLE_MIN_INTERVAL", 0.0)) * 1.2
        self.ticks: list[tuple[int, int]] = []
        self.steps = 0
        self._sigma = None
        self._cancel_at = None

    def wrap(self, model):
        import time

        def counted(apply_model, args):
            t0 = time.perf_counter()
            out = apply_model(args["input"], args["timestep"], **args["c"])
            sigma = float(args["timestep"].flatten()[0])
            if sigma != self._sigma:
                self.steps, self._sigma = self.steps + 1, sigma
            time.sleep(max(0.0, self.min_call_seconds - (time.perf_counter() - t0)))
            if self.steps == self._cancel_at:
                comfy.model_management.interrupt_current_processing(True)
            return out

        m = model.clone()
        m.set_model_unet_function_wrapper(counted)
        return m

    def cancel_after(self, steps: int) -> None:
        self.ticks.clear()
        self.steps, self._sigma, self._cancel_at = 0, None, steps

    def _hook(self, value, total, preview, node_id=None, **kwargs):
        self.ticks.append((value, total))

    def __enter__(self):
        import comfy.utils

        comfy.utils.set_progress_bar_global_hook(self._hook)
        return self

    def __exit__(self, *exc):
        import comfy.utils

        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)
