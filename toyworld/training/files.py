"""What a run writes: the model file (and where), the training state's default place, the run's environment."""

from __future__ import annotations

import logging
import os
import pathlib
import platform
from typing import Any

import torch

from attention_edit.toyworld import model as toymodel

REPO = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "models" / toymodel.TRAINED_FILE_NAME
DEFAULT_STATE = REPO / "out" / "toyworld-train" / "state.pt"
MAX_FILE_BYTES = 25_000_000  # the repository's budget for models/toyworld.safetensors (issue 8)

log = logging.getLogger("attention_edit.toyworld.train")  # one logger for the whole trainer, as before the split


def save_model(path, config: toymodel.ToyConfig, model, clip, vae, info: dict[str, Any]) -> None:
    toymodel.save_toy(path, config, model, clip, vae, dtype=torch.float16, info=info)
    size = os.path.getsize(path)
    log.info("wrote %s (%.1f MB)", path, size / 1e6)
    if size > MAX_FILE_BYTES:
        log.warning("%s is %.1f MB, over the %.0f MB budget", path, size / 1e6, MAX_FILE_BYTES / 1e6)


def environment(device: torch.device) -> dict[str, Any]:
    env = {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
           "machine": platform.machine(), "python": platform.python_version()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env
