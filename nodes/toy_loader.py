"""Loader for the pack's own toy-world model (toyworld/model.py), the embedded default of `make demo`."""

from __future__ import annotations

import pathlib

from comfy_api.latest import io

from ..toyworld.model import RANDOM_FILE_NAME, TRAINED_FILE_NAME, is_toy_file, load_toy
from .common import CATEGORY

MODELS_DIR = pathlib.Path(__file__).resolve().parents[1] / "models"
DEFAULT_MODEL = TRAINED_FILE_NAME


def toy_model_files() -> list[str]:
    """Names of the toy-model files in MODELS_DIR (safetensors carrying the toy metadata), sorted."""
    if not MODELS_DIR.is_dir():
        return []
    return sorted(p.name for p in MODELS_DIR.glob("*.safetensors") if p.is_file() and is_toy_file(p))


def model_options() -> tuple[list[str], str]:
    """The combo's options and default: the default model first if present; a stable placeholder if none."""
    files = toy_model_files()
    if not files:
        return [DEFAULT_MODEL], DEFAULT_MODEL
    return files, DEFAULT_MODEL if DEFAULT_MODEL in files else files[0]


def model_path(model_name: str) -> pathlib.Path:
    if not model_name or pathlib.PurePath(model_name).name != model_name or model_name in (".", ".."):
        raise ValueError(f"model_name must be a file name inside the pack's models folder, got {model_name!r}")
    path = MODELS_DIR / model_name
    if not path.is_file():
        raise FileNotFoundError(
            f"Toy-world model {model_name!r} not found in {MODELS_DIR}. The trained model ships with the pack as "
            f"models/{TRAINED_FILE_NAME}; until it exists, run `make demo` in the attention-edit folder (it writes "
            f"a seeded random-weight models/{RANDOM_FILE_NAME}) or call "
            f"toyworld.model.make_random_toy_file(path) yourself.")
    if not is_toy_file(path):
        raise ValueError(f"{path} is not an attention-edit toy-world model (no 'attention_edit_toy' metadata)")
    return path


class ToyModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        options, default = model_options()
        return io.Schema(
            node_id="AttnEdit_ToyModelLoader",
            display_name="Load Toy-World Model",
            category=f"{CATEGORY}/toyworld",
            description="Loads the pack's own tiny text-to-image model, trained on synthetic toy-world scenes "
                        "(one or two coloured shapes on a plain background, with exact ground-truth masks), from "
                        "the pack's models/ folder. It is built from ComfyUI's SD1.x classes (UNet with "
                        "cross-attention, CLIP text encoder over the real CLIP tokenizer, KL VAE), so every node "
                        "of the pack and every stock node runs on it exactly as on SD1.x, only fast: 128x128 "
                        "images, 16x16 latents. Used by the demo and the quality benchmarks. The same node loads "
                        "the toy flow world (toyflow.safetensors: a Flux-schnell-shaped DiT over the same text "
                        "encoder and VAE, rectified flow) and an SD3.5-shaped random toy, so the pack's DiT paths "
                        "run the same way.",
            inputs=[
                io.Combo.Input("model_name", options=options, default=default,
                               tooltip=f"A toy-world model file in the pack's models/ folder. {TRAINED_FILE_NAME} "
                                       f"is the trained model; {RANDOM_FILE_NAME} (written by `make demo`) has "
                                       "seeded random weights: it runs every node but draws noise. "
                                       "toyflow.safetensors is the trained toy flow world (a Flux-shaped DiT); "
                                       "*-random files are seeded random stand-ins."),
            ],
            outputs=[
                io.Model.Output("MODEL", tooltip="The toy diffusion model: the UNet (SD1.x-style, eps prediction) "
                                                 "or, for a toy flow file, the Flux- or SD3.5-shaped DiT (rectified "
                                                 "flow), for samplers and the pack's attention nodes. Use 128x128 "
                                                 "images (16x16 latents)."),
                io.Clip.Output("CLIP", tooltip="The toy text encoder, for CLIPTextEncode; uses the real CLIP "
                                               "tokenizer, so prompts are tokenized as on SD."),
                io.Vae.Output("VAE", tooltip="The toy VAE (8x downsampling, 4 latent channels), for VAEEncode and "
                                             "VAEDecode."),
            ],
        )

    @classmethod
    def validate_inputs(cls, model_name):
        # The 0.3.75 host does not check V3 combo values against the options: check the file here,
        # so a missing model fails at queue time, before any node runs.
        try:
            model_path(model_name)
        except (OSError, ValueError) as e:
            return str(e)
        return True

    @classmethod
    def fingerprint_inputs(cls, model_name):
        # Reload when the file is replaced (e.g. training finished), not only when the name changes.
        try:
            stat = (MODELS_DIR / model_name).stat()
        except (OSError, ValueError):
            return None
        return f"{model_name}:{stat.st_mtime_ns}:{stat.st_size}"

    @classmethod
    def execute(cls, model_name) -> io.NodeOutput:
        model, clip, vae = load_toy(model_path(model_name))
        return io.NodeOutput(model, clip, vae)
