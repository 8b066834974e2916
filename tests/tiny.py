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


def assert_same_computation(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float error for the same math run in a different batch (e.g. two branches stacked
    vs one alone): summation order changes, and cfg 7.5 over several steps multiplies the difference."""
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
