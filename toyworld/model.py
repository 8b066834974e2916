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
RANDOM_FILE_NAME = "toyworld-random.safetensors"  # the seeded random stand-in `make demo` writes (git-ignored)
METADATA_KEY = "attention_edit_toy"
INFO_METADATA_KEY = "attention_edit_toy_info"
FORMAT_VERSION = 1
PREFIXES = {"unet": "unet.", "clip": "clip.", "vae": "vae."}
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

    unet: keyword arguments of ComfyUI's openaimodel `UNetModel` (without dtype/device/operations).
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
        if self.unet.get("context_dim") != self.clip.get("hidden_size"):
            raise ValueError(f"unet context_dim {self.unet.get('context_dim')} must equal the clip hidden_size "
                             f"{self.clip.get('hidden_size')}")
        z = self.vae.get("z_channels")
        if not (self.unet.get("in_channels") == self.unet.get("out_channels") == z == 4):
            raise ValueError("the toy model is SD1.x-shaped: the UNet's in/out channels and the VAE's z_channels must be 4")
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


def _load_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], part: str) -> None:
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

    model = _build_unet(config)
    if parts is None:
        init_weights(model.diffusion_model, generator)
        with torch.no_grad():
            model.diffusion_model.out[-1].weight.mul_(OUTPUT_GAIN)
            model.diffusion_model.out[-1].bias.mul_(OUTPUT_GAIN)
    else:
        _load_strict(model.diffusion_model, parts["unet"], "unet")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())

    clip = _build_clip(config, None if parts is None else parts["clip"], generator)
    vae = _build_vae(config, None if parts is None else parts["vae"], generator)
    return patcher, clip, vae


def toy_state_dict(model, clip, vae) -> dict[str, torch.Tensor]:
    """The prefixed state dict of the three objects `build_toy` returns (tensors on the CPU)."""
    out: dict[str, torch.Tensor] = {}
    diffusion_model = model.model.diffusion_model if hasattr(model, "model") else model.diffusion_model
    for prefix, module in ((PREFIXES["unet"], diffusion_model), (PREFIXES["clip"], clip.cond_stage_model),
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


def parameter_counts(model, clip, vae) -> dict[str, int]:
    """Number of weights per part (as stored in a file) and in total."""
    counts = {name: 0 for name in PREFIXES}
    for k, v in toy_state_dict(model, clip, vae).items():
        counts[k.split(".", 1)[0]] += v.numel()
    counts["total"] = sum(counts.values())
    return counts
