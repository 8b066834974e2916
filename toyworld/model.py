"""The toy-world model: a tiny SD1.x-style text-to-image model built from ComfyUI's own classes.

Three parts, each the stock ComfyUI class an SD1.x checkpoint loads into, only narrower:

* UNet: `comfy.supported_models.SD15` + `comfy.model_base.BaseModel` (eps prediction) over the
  openaimodel `UNetModel` with cross-attention (`use_linear_in_transformer` False, like SD1.x);
* text encoder: `comfy.sd.CLIP` over `comfy.sd1_clip.SD1ClipModel` / `SDClipModel` /
  `comfy.clip_model.CLIPTextModel`, fed by the real CLIP tokenizer shipped in `comfy/sd1_tokenizer`
  (so the vocabulary is 49408 and the context 77 tokens, as on SD);
* VAE: `comfy.sd.VAE` over `comfy.ldm.models.autoencoder.AutoencoderKL` (8x downsampling, 4 latent
  channels, SD's pixel range and latent layout).

So every node and workflow of the pack, and every stock node (CLIPTextEncode, KSampler, VAEEncode,
VAEDecode, ...), runs on it exactly as on SD1.x; only the widths differ.

File format: one safetensors file. Tensors are prefixed ``unet.`` (the UNetModel's state dict),
``clip.`` (the SD1ClipModel's, i.e. ``clip.clip_l.transformer...``) and ``vae.`` (the
AutoencoderKL's), stored in float16 by default. The metadata key ``attention_edit_toy`` holds the
`ToyConfig` as JSON; the optional key ``attention_edit_toy_info`` holds free-form JSON (training
provenance, ``{"random": true, "seed": 0}`` for the random demo file). Models are rebuilt from the
config and run in float32 after loading.

Part of the pack (nodes/toy_loader.py imports it relative): it imports only the host and third-party
packages. Elsewhere import it as ``attention_edit.toyworld.model`` (see toyworld/__init__.py).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import comfy.latent_formats
import comfy.ldm.flux.model
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
import torch
from comfy.ldm.models.autoencoder import AutoencoderKL
from safetensors import safe_open
from safetensors.torch import save_file

TRAINED_FILE_NAME = "toyworld.safetensors"  # the trained model, committed in the pack's models/ folder
TRAINED_FLOW_FILE_NAME = "toyflow.safetensors"  # the trained toy flow world (a Flux-shaped DiT), also in models/
TRAINED_256_FILE_NAME = "toyworld256.safetensors"  # the toy world drawn at 256 px (32x32 latents), also in models/
RANDOM_FILE_NAME = "toyworld-random.safetensors"  # the seeded random stand-in `make demo` writes (git-ignored)
METADATA_KEY = "attention_edit_toy"
INFO_METADATA_KEY = "attention_edit_toy_info"
FORMAT_VERSION = 1
PREFIXES = {"unet": "unet.", "dit": "dit.", "clip": "clip.", "vae": "vae."}
UNET, FLUX, SD3 = "unet", "flux", "sd3"  # ToyConfig.family: the diffusion model (weights "unet." / "dit." / "dit.")
OUTPUT_GAIN = 0.03  # random models: a calm UNet output layer (as in fixtures/tiny.py)
DTYPE = torch.float32  # the toy model always computes in float32 (it is tiny)
CLIP_NAME = "l"  # the SD1ClipModel slot: state-dict keys "clip_l....", tokens under "l"
CLIP_START, CLIP_END = 49406, 49407  # the real CLIP tokenizer's special tokens

DEFAULT_UNET: dict[str, Any] = {
    "image_size": 16,  # informational for UNetModel; latents of any size multiple of 4 work
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 64,
    "channel_mult": [1, 2, 2],
    "num_res_blocks": [1, 1, 1],
    "transformer_depth": [1, 1, 1],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "context_dim": 64,
    "num_heads": -1,
    "num_head_channels": 32,
    "use_linear_in_transformer": False,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}

# The toy flow world's diffusion model: a Flux.1-schnell-shaped MM-DiT (double blocks with joint attention over
# [txt, img], then single blocks; RoPE; velocity prediction on the rectified-flow path, no distilled guidance), as
# `comfy.ldm.flux.model.Flux` FluxParams. Patch size 2 on the 4-channel 16x16 latents, as on the real Flux: 64 image
# tokens, so its attention maps are 8x8 (patch size 1 gives 16x16 maps but trains 3x slower per step, measured
# here: 3.0 against 1.0 s per batch of 32 on 2 cores). Heads of 32 channels, RoPE axes 8 + 12 + 12.
DEFAULT_FLUX: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "vec_in_dim": 64,  # the toy CLIP's pooled output (hidden 64, unprojected)
    "context_in_dim": 64,
    "hidden_size": 128,
    "mlp_ratio": 4.0,
    "num_heads": 4,
    "depth": 3,
    "depth_single_blocks": 3,
    "axes_dim": [8, 12, 12],
    "theta": 10000,
    "patch_size": 2,
    "qkv_bias": True,
    "guidance_embed": False,
}

# An SD3.5-medium-shaped MMDiT (`comfy.ldm.modules.diffusionmodules.mmdit.MMDiT`: joint blocks, RMS q/k norm, an
# image-only second self-attention in the first block like MMDiT-X) over the toy text encoder: depth d gives hidden
# 64 d and d heads of 64. Seeded random weights only (the SD3.5 workflow's smoke runs and the host tests use it).
DEFAULT_SD3: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "patch_size": 2,
    "depth": 2,
    "input_size": None,
    "adm_in_channels": 64,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 64, "out_features": 128}},
    "num_patches": 32 * 32,
    "pos_embed_max_size": 32,
    "qk_norm": "rms",
    "pos_embed_scaling_factor": None,
    "x_block_self_attn_layers": [0],
}
SD3_RANDOM_FILE_NAME = "toysd3-random.safetensors"  # the seeded random SD3.5-shaped toy model (git-ignored)

DEFAULT_CLIP: dict[str, Any] = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "bos_token_id": CLIP_START,
    "eos_token_id": CLIP_END,
    "pad_token_id": 1,
    "hidden_act": "quick_gelu",
    "hidden_size": 64,
    "intermediate_size": 256,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "projection_dim": 64,
    "vocab_size": 49408,
}

# ch_mult [1, 2, 2, 2] rather than SD's [1, 2, 4, 4]-style growth: with [1, 2, 2, 4] the VAE alone is
# 3.0 M parameters and the whole model's float16 file 26.3 MB, over the 25 MB budget.
DEFAULT_VAE: dict[str, Any] = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 128,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 2, 2, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "dropout": 0.0,
}


@dataclasses.dataclass
class ToyConfig:
    """Everything needed to rebuild the toy model; JSON-serialisable (`to_dict` / `from_dict`).

    family: "unet" (the SD1.x-shaped toy world) or "flux" (the toy flow world: a Flux-schnell-shaped MM-DiT over
        the same text encoder and VAE).
    unet: keyword arguments of ComfyUI's openaimodel `UNetModel` (without dtype/device/operations); family "unet".
    flux: `comfy.ldm.flux.model.FluxParams` fields; family "flux".
    sd3: `MMDiT` keyword arguments; family "sd3" (an SD3.5-medium-shaped DiT, rectified flow, shift 3).
    clip: a HF-style CLIPTextModel config, `SDClipModel`'s ``textmodel_json_config``.
    vae: the AutoencoderKL ``ddconfig``; its ``embed_dim`` is ``z_channels``.
    latent_scale_factor: the SD15 latent format's scale (SD uses 0.18215); a trainer sets it to
        about 1 / std of its VAE's latents.
    image_size: the pixel size the model is made for (latent = image_size / 8).
    """

    unet: dict[str, Any] = dataclasses.field(default_factory=lambda: copy.deepcopy(DEFAULT_UNET))
    clip: dict[str, Any] = dataclasses.field(default_factory=lambda: copy.deepcopy(DEFAULT_CLIP))
    vae: dict[str, Any] = dataclasses.field(default_factory=lambda: copy.deepcopy(DEFAULT_VAE))
    latent_scale_factor: float = 0.18215
    image_size: int = 128
    format_version: int = FORMAT_VERSION
    family: str = UNET
    flux: dict[str, Any] = dataclasses.field(default_factory=lambda: copy.deepcopy(DEFAULT_FLUX))
    sd3: dict[str, Any] = dataclasses.field(default_factory=lambda: copy.deepcopy(DEFAULT_SD3))

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ToyConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown toy-model config keys: {sorted(unknown)}")
        config = cls(**copy.deepcopy(dict(data)))
        config.validate()
        return config

    @classmethod
    def from_json(cls, text: str) -> ToyConfig:
        return cls.from_dict(json.loads(text))

    def validate(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"toy-model format version {self.format_version} is not supported (expected {FORMAT_VERSION})")
        if self.family not in (UNET, FLUX, SD3):
            raise ValueError(f"toy-model family {self.family!r} is not one of {UNET!r}, {FLUX!r}, {SD3!r}")
        hidden, z = self.clip.get("hidden_size"), self.vae.get("z_channels")
        if self.family == UNET:
            if self.unet.get("context_dim") != hidden:
                raise ValueError(f"unet context_dim {self.unet.get('context_dim')} must equal the clip hidden_size {hidden}")
            if not (self.unet.get("in_channels") == self.unet.get("out_channels") == z == 4):
                raise ValueError("the toy model is SD1.x-shaped: the UNet's in/out channels and the VAE's z_channels must be 4")
        elif self.family == SD3:
            embedder = self.sd3.get("context_embedder_config", {}).get("params", {})
            if not (embedder.get("in_features") == self.sd3.get("adm_in_channels") == hidden):
                raise ValueError(f"sd3 context_embedder in_features and adm_in_channels must equal the clip hidden_size "
                                 f"{hidden}")
            if embedder.get("out_features") != 64 * self.sd3.get("depth", 0):
                raise ValueError("sd3 context_embedder out_features must be the DiT's hidden size, 64 * depth")
            if not (self.sd3.get("in_channels") == self.sd3.get("out_channels") == z == 4):
                raise ValueError("the toy SD3 model's in/out channels and the VAE's z_channels must be 4")
        else:
            if not (self.flux.get("context_in_dim") == self.flux.get("vec_in_dim") == hidden):
                raise ValueError(f"flux context_in_dim and vec_in_dim must equal the clip hidden_size {hidden}")
            if not (self.flux.get("in_channels") == self.flux.get("out_channels") == z == 4):
                raise ValueError("the toy flow model's in/out channels and the VAE's z_channels must be 4")
            head = self.flux.get("hidden_size", 0) // max(1, self.flux.get("num_heads", 1))
            if sum(self.flux.get("axes_dim", [])) != head:
                raise ValueError(f"flux axes_dim must sum to the head size {head}")
        if len(self.vae.get("ch_mult", [])) != 4:
            raise ValueError("the VAE must downsample 8x: ch_mult needs 4 levels (3 downsamples)")
        if self.clip.get("max_position_embeddings") != 77 or self.clip.get("vocab_size") != 49408:
            raise ValueError("the text encoder must match the real CLIP tokenizer: vocab_size 49408, 77 positions")


def default_config() -> ToyConfig:
    return ToyConfig()


def _as_config(config: ToyConfig | Mapping[str, Any] | None) -> ToyConfig:
    if config is None:
        return default_config()
    if isinstance(config, ToyConfig):
        config.validate()
        return copy.deepcopy(config)
    return ToyConfig.from_dict(config)


# --- construction -----------------------------------------------------------------------------------------


def init_weights(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Seeded init for modules built through ComfyUI's ops (which leave weights uninitialised).

    Matrices and kernels ~ N(0, 1/fan_in) (embeddings: N(0, 1/dim)), norm weights 1, other vectors
    (biases) N(0, 0.02^2). Scalars (CLIP's logit_scale) keep their constructor value.
    """
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=generator)
            elif p.dim() == 1 and name.endswith("weight"):
                p.fill_(1.0)
            elif p.dim() == 1:
                p.normal_(0.0, 0.02, generator=generator)


def _build_unet(config: ToyConfig) -> comfy.model_base.BaseModel:
    unet = dict(config.unet)
    model_config = comfy.supported_models.SD15(unet)
    # SD15 forces its own head layout (unet_extra_config: 8 heads); the toy config's wins.
    model_config.unet_config.update(num_heads=unet["num_heads"], num_head_channels=unet["num_head_channels"])
    model_config.latent_format = comfy.latent_formats.SD15(scale_factor=config.latent_scale_factor)
    model_config.set_inference_dtype(DTYPE, None)
    model = comfy.model_base.BaseModel(model_config, model_type=comfy.model_base.ModelType.EPS,
                                       device=torch.device("cpu"))
    model.eval()
    return model


def _build_flux(config: ToyConfig) -> comfy.model_base.Flux:
    params = copy.deepcopy(config.flux)
    params["image_model"] = "flux"
    fields = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    if "txt_ids_dims" in fields:  # 0.33.0 asks for it (no default); Flux.1 has none
        params.setdefault("txt_ids_dims", [])
    model_config = comfy.supported_models.FluxSchnell(params)  # rectified flow, shift 1, no guidance embedding
    model_config.latent_format = comfy.latent_formats.SD15(scale_factor=config.latent_scale_factor)
    model_config.set_inference_dtype(DTYPE, None)
    model = comfy.model_base.Flux(model_config, model_type=comfy.model_base.ModelType.FLOW, device=torch.device("cpu"))
    model.eval()
    return model


def _build_sd3(config: ToyConfig) -> comfy.model_base.SD3:
    model_config = comfy.supported_models.SD3(copy.deepcopy(config.sd3))  # rectified flow, shift 3
    model_config.latent_format = comfy.latent_formats.SD15(scale_factor=config.latent_scale_factor)
    model_config.set_inference_dtype(DTYPE, None)
    model = comfy.model_base.SD3(model_config, device=torch.device("cpu"))
    model.eval()
    return model


BUILDERS = {UNET: _build_unet, FLUX: _build_flux, SD3: _build_sd3}


def diffusion_part(config: ToyConfig) -> str:
    """The state-dict part (and file prefix) of the config's diffusion model: "unet" or "dit"."""
    return "unet" if config.family == UNET else "dit"


def _last_layer(config: ToyConfig, dm: torch.nn.Module) -> torch.nn.Module:
    return dm.out[-1] if config.family == UNET else dm.final_layer.linear


def _clip_target(config: ToyConfig) -> comfy.supported_models_base.ClipTarget:
    hidden = config.clip["hidden_size"]
    tokenizer = functools.partial(comfy.sd1_clip.SD1Tokenizer, clip_name=CLIP_NAME,
                                  tokenizer=functools.partial(comfy.sd1_clip.SDTokenizer, embedding_size=hidden,
                                                              max_length=config.clip["max_position_embeddings"]))
    # SDClipModel writes per-model overrides into the dict it is given: hand it a copy each time.
    clip_model = functools.partial(_ToyClipModel, textmodel_json_config=copy.deepcopy(config.clip))
    clip = functools.partial(comfy.sd1_clip.SD1ClipModel, clip_name=CLIP_NAME, clip_model=clip_model)
    return comfy.supported_models_base.ClipTarget(tokenizer, clip)


class _ToyClipModel(comfy.sd1_clip.SDClipModel):
    """SD1's text encoder wrapper (unprojected pooled output, as SD1CheckpointClipModel) over a small config."""

    def __init__(self, device="cpu", dtype=None, model_options={}, textmodel_json_config=None):  # noqa: B006 (host signature)
        super().__init__(device=device, dtype=dtype, model_options=model_options, return_projected_pooled=False,
                         textmodel_json_config=copy.deepcopy(textmodel_json_config),
                         special_tokens={"start": CLIP_START, "end": CLIP_END, "pad": CLIP_END})


def _build_clip(config: ToyConfig, state_dict: Mapping[str, torch.Tensor] | None,
                generator: torch.Generator) -> comfy.sd.CLIP:
    clip = comfy.sd.CLIP(_clip_target(config), model_options={"dtype": DTYPE})
    module = clip.cond_stage_model
    if state_dict is None:
        init_weights(module, generator)
    else:
        _load_strict(module, state_dict, "clip")
    return clip


def _vae_module(config: ToyConfig) -> AutoencoderKL:
    return AutoencoderKL(**_vae_params(config))


def _vae_params(config: ToyConfig) -> dict[str, Any]:
    return {"embed_dim": config.vae["z_channels"], "ddconfig": copy.deepcopy(config.vae)}


def _build_vae(config: ToyConfig, state_dict: Mapping[str, torch.Tensor] | None,
               generator: torch.Generator) -> comfy.sd.VAE:
    if state_dict is None:
        bare = _vae_module(config)
        init_weights(bare, generator)
        state_dict = bare.state_dict()
    else:
        _check_keys(_vae_module(config).state_dict().keys(), state_dict.keys(), "vae")
    return comfy.sd.VAE(sd=dict(state_dict), config={"params": _vae_params(config)}, dtype=DTYPE)


def _check_keys(expected, given, part: str) -> None:
    expected, given = set(expected), set(given)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise ValueError(f"toy-model {part} weights do not match the config: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}")


def _host_names(own: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights under the names this host's modules give them: Flux's RMS q/k-norm gain is `...norm.scale` in
    ComfyUI 0.3.75 and `...norm.weight` in 0.33.0, so a file written on one host loads on the other."""
    out = {}
    for key, value in state_dict.items():
        if key not in own:
            for a, b in ((".scale", ".weight"), (".weight", ".scale")):
                if key.endswith("norm" + a) and key[:-len(a)] + b in own:
                    key = key[:-len(a)] + b
                    break
        out[key] = value
    return out


def _load_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], part: str) -> None:
    state_dict = _host_names(module.state_dict(), state_dict)
    _check_keys(module.state_dict().keys(), state_dict.keys(), part)
    own = module.state_dict()
    for k, v in state_dict.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"toy-model {part} weight {k} has shape {tuple(v.shape)}, the config needs {tuple(own[k].shape)}")
    module.load_state_dict({k: v.to(DTYPE) for k, v in state_dict.items()}, strict=True)


def split_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{"unet": ..., "clip": ..., "vae": ...} with the prefixes stripped; other keys are an error."""
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in PREFIXES}
    for key, value in state_dict.items():
        for name, prefix in PREFIXES.items():
            if key.startswith(prefix):
                parts[name][key[len(prefix):]] = value
                break
        else:
            raise ValueError(f"toy-model weight {key!r} has none of the prefixes {list(PREFIXES.values())}")
    return parts


def build_toy(config: ToyConfig | Mapping[str, Any] | None = None, state_dict: Mapping[str, torch.Tensor] | None = None,
              seed: int = 0) -> tuple[comfy.model_patcher.ModelPatcher, comfy.sd.CLIP, comfy.sd.VAE]:
    """The toy model as ComfyUI's MODEL, CLIP and VAE objects, float32.

    state_dict: prefixed weights (``unet.``, ``clip.``, ``vae.``) as `toy_state_dict` returns and
    files hold; every key must match the config. None: seeded random weights (N(0, 1/fan_in)
    matrices, unit norms, small biases) with the UNet's output layer scaled by `OUTPUT_GAIN`, so a
    random model predicts small, smooth noise.
    """
    config = _as_config(config)
    generator = torch.Generator().manual_seed(int(seed))
    parts = split_state_dict(state_dict) if state_dict is not None else None

    part = diffusion_part(config)
    model = BUILDERS[config.family](config)
    if parts is None:
        init_weights(model.diffusion_model, generator)
        last = _last_layer(config, model.diffusion_model)
        with torch.no_grad():
            last.weight.mul_(OUTPUT_GAIN)
            last.bias.mul_(OUTPUT_GAIN)
            if config.family == SD3:  # a buffer a checkpoint provides (left uninitialised): seeded positions
                pos = model.diffusion_model.pos_embed
                pos.copy_(torch.randn(pos.shape, generator=generator) * 0.5)
    else:
        extra = sorted(name for name, values in parts.items() if values and name not in (part, "clip", "vae"))
        if extra:
            raise ValueError(f"toy-model file of family {config.family!r} holds {extra} weights")
        _load_strict(model.diffusion_model, parts[part], part)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())

    clip = _build_clip(config, None if parts is None else parts["clip"], generator)
    vae = _build_vae(config, None if parts is None else parts["vae"], generator)
    return patcher, clip, vae


def toy_state_dict(model, clip, vae) -> dict[str, torch.Tensor]:
    """The prefixed state dict of the three objects `build_toy` returns (tensors on the CPU)."""
    out: dict[str, torch.Tensor] = {}
    base = model.model if hasattr(model, "model") else model
    part = "dit" if isinstance(base, (comfy.model_base.Flux, comfy.model_base.SD3)) else "unet"
    for prefix, module in ((PREFIXES[part], base.diffusion_model), (PREFIXES["clip"], clip.cond_stage_model),
                           (PREFIXES["vae"], vae.first_stage_model)):
        for k, v in module.state_dict().items():
            out[prefix + k] = v.detach().to("cpu")
    return out


# --- files ------------------------------------------------------------------------------------------------


def save_toy(path: str | os.PathLike, config: ToyConfig | Mapping[str, Any], model, clip, vae,
             dtype: torch.dtype = torch.float16, info: Mapping[str, Any] | None = None) -> None:
    """Write one safetensors file: prefixed weights in `dtype` (floats only), the config in the metadata."""
    config = _as_config(config)
    tensors = {}
    for k, v in toy_state_dict(model, clip, vae).items():
        if v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous().clone()
    metadata = {METADATA_KEY: config.to_json()}
    if info is not None:
        metadata[INFO_METADATA_KEY] = json.dumps(dict(info), sort_keys=True)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)  # never leave a half-written model where the loader lists files


def read_toy_metadata(path: str | os.PathLike) -> tuple[ToyConfig, dict[str, Any]]:
    """(config, info) of a toy-model file without reading its tensors. ValueError if it is not one."""
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error types for a file that is not safetensors
        raise ValueError(f"{path} is not a safetensors file: {e}") from e
    if METADATA_KEY not in metadata:
        raise ValueError(f"{path} is not an attention-edit toy model (no {METADATA_KEY!r} metadata)")
    config = ToyConfig.from_json(metadata[METADATA_KEY])
    info = json.loads(metadata[INFO_METADATA_KEY]) if INFO_METADATA_KEY in metadata else {}
    return config, info


def is_toy_file(path: str | os.PathLike) -> bool:
    try:
        read_toy_metadata(path)
    except (OSError, ValueError):
        return False
    return True


def load_toy_state_dict(path: str | os.PathLike) -> tuple[ToyConfig, dict[str, torch.Tensor]]:
    config, _ = read_toy_metadata(path)
    with safe_open(os.fspath(path), framework="pt") as f:
        state_dict = {k: f.get_tensor(k) for k in f.keys()}
    return config, state_dict


def load_toy(path: str | os.PathLike) -> tuple[comfy.model_patcher.ModelPatcher, comfy.sd.CLIP, comfy.sd.VAE]:
    """MODEL, CLIP and VAE from a toy-model file, float32."""
    config, state_dict = load_toy_state_dict(path)
    return build_toy(config, state_dict)


def make_random_toy_file(path: str | os.PathLike, seed: int = 0,
                         config: ToyConfig | Mapping[str, Any] | None = None) -> str:
    """A seeded random-weight toy model (for `make demo` before trained weights exist). Returns the path."""
    config = _as_config(config)
    model, clip, vae = build_toy(config, seed=seed)
    save_toy(path, config, model, clip, vae, info={"random": True, "seed": int(seed)})
    return os.fspath(path)


def demo_model_file(models_dir: str | os.PathLike, seed: int = 0) -> str:
    """The model file the demo should load: the trained one if present, else the random stand-in,
    written (seeded) if it does not exist yet. Returns the file name inside models_dir."""
    trained = os.path.join(os.fspath(models_dir), TRAINED_FILE_NAME)
    if os.path.isfile(trained):
        return TRAINED_FILE_NAME
    random_path = os.path.join(os.fspath(models_dir), RANDOM_FILE_NAME)
    if not is_toy_file(random_path):
        make_random_toy_file(random_path, seed=seed)
    return RANDOM_FILE_NAME


FLOW_RANDOM_FILE_NAME = "toyflow-random.safetensors"  # the random stand-in of the toy flow world (git-ignored)


def family_config(family: str) -> ToyConfig:
    """The default config of a family, over the default text encoder and VAE."""
    return ToyConfig.from_dict({**default_config().to_dict(), "family": family})


def demo_dit_file(models_dir: str | os.PathLike, family: str, seed: int = 0) -> str:
    """The DiT toy-model file for `family` the demos and host tests load (a file name inside models_dir): on Flux
    the trained toy flow world if present, else a seeded random stand-in; on SD3 always the random one (written
    if it does not exist yet)."""
    models_dir = os.fspath(models_dir)
    if family == FLUX and os.path.isfile(os.path.join(models_dir, TRAINED_FLOW_FILE_NAME)):
        return TRAINED_FLOW_FILE_NAME
    names = {FLUX: FLOW_RANDOM_FILE_NAME, SD3: SD3_RANDOM_FILE_NAME}
    if family not in names:
        raise ValueError(f"no DiT toy model of family {family!r}; expected one of {sorted(names)}")
    path = os.path.join(models_dir, names[family])
    if not is_toy_file(path):
        make_random_toy_file(path, seed=seed, config=family_config(family))
    return names[family]


def parameter_counts(model, clip, vae) -> dict[str, int]:
    """Number of weights per part (as stored in a file) and in total."""
    counts = {name: 0 for name in PREFIXES}
    for k, v in toy_state_dict(model, clip, vae).items():
        counts[k.split(".", 1)[0]] += v.numel()
    counts["total"] = sum(counts.values())
    return counts
