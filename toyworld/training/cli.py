"""The trainer's command line, run by `python -m toyworld.train` (whose docstring is the --help text): both stages or one.

Importing this needs the ComfyUI host importable and the pack registered (`toyworld.host.setup_host`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from attention_edit.toyworld import model as toymodel

from .files import DEFAULT_OUT, DEFAULT_STATE, environment, save_model
from .flow import DEFAULT_FLOW_INIT, DEFAULT_FLOW_OUT, run_flow_stage
from .optim import Budget
from .settings import TrainSettings, training_config
from .unet import run_unet_stage
from .vae import run_vae_stage

log = logging.getLogger("attention_edit.toyworld.train")  # one logger for the whole trainer, as before the split


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m toyworld.train", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TrainSettings()
    p.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="model file (default models/toyworld.safetensors)")
    p.add_argument("--minutes", type=float, default=90.0, help="wall-clock budget of this invocation (see above)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--stage", default="all", choices=("all", "vae", "unet", "flow"),
                   help="flow: the toy flow world's DiT over --init's text encoder and VAE (default --out "
                        "models/toyflow.safetensors, --init models/toyworld.safetensors)")
    p.add_argument("--vae-fraction", type=float, default=0.12, help="share of --minutes for the VAE with --stage all")
    p.add_argument("--vae-steps", type=int, default=None, help="cap on VAE steps")
    p.add_argument("--unet-steps", type=int, default=None, help="cap on UNet steps")
    p.add_argument("--init", type=pathlib.Path, default=None, help="--stage unet: file with the trained VAE (default --out)")
    p.add_argument("--state", type=pathlib.Path, default=DEFAULT_STATE, help="fp32 training state for --resume")
    p.add_argument("--resume", action="store_true", help="--stage unet: continue from --state")
    p.add_argument("--finetune", action="store_true",
                   help="--stage unet: start the UNet and text encoder from --init's weights too (not only its VAE)")
    p.add_argument("--image-size", type=int, default=None,
                   help="--stage unet: pixel size of the scenes (default: --init's; 256 gives 32x32 latents)")
    p.add_argument("--checkpoint-minutes", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--log-every", type=int, default=20)
    g = p.add_argument_group("recipe (TrainSettings)")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--vae-batch", type=int, default=d.vae_batch)
    g.add_argument("--vae-render", type=int, default=d.vae_render, help="render size of most VAE steps")
    g.add_argument("--vae-object-weight", type=float, default=d.vae_object_weight)
    g.add_argument("--vae-full-fraction", type=float, default=d.vae_full_fraction)
    g.add_argument("--vae-lr", type=float, default=d.vae_lr)
    g.add_argument("--vae-kl", type=float, default=d.vae_kl)
    g.add_argument("--batch", type=int, default=d.batch)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--clip-lr", type=float, default=d.clip_lr, help="text encoder lr (default: --lr)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    g.add_argument("--ema-decay", type=float, default=d.ema_decay)
    g.add_argument("--caption-dropout", type=float, default=d.caption_dropout)
    g.add_argument("--min-snr-gamma", type=float, default=d.min_snr_gamma, help="0: plain eps MSE")
    g.add_argument("--attn-loss", type=float, default=d.attn_loss, help="grounding-loss weight; 0: off")
    g.add_argument("--pool", type=int, default=d.pool)
    g.add_argument("--refresh", type=int, default=d.refresh)
    g.add_argument("--no-zero-init", action="store_true")
    return p


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainSettings) if hasattr(args, f.name)}
    values["zero_init"] = not args.no_zero_init
    values["min_snr_gamma"] = values.get("min_snr_gamma") or None
    return TrainSettings(**values)


def _train_vae_first(args: argparse.Namespace, settings: TrainSettings, total: float, device: torch.device,
                     info: dict[str, Any]) -> tuple[toymodel.ToyConfig, Any, Any, Any]:
    """--stage all / vae: a fresh model whose VAE is trained (and written to --out). Returns (config, model, clip, vae)."""
    config = training_config()
    model, clip, vae = toymodel.build_toy(config, seed=settings.seed)
    vae_seconds = total * (args.vae_fraction if args.stage == "all" else 1.0)
    info["vae"] = run_vae_stage(config, vae, settings, Budget(vae_seconds, args.vae_steps), device, args.log_every)
    info["latent_scale_factor"] = config.latent_scale_factor
    save_model(args.out, config, model, clip, vae, info)  # usable (VAE trained) even if the UNet stage stops
    return config, model, clip, vae


def _from_init(args: argparse.Namespace, settings: TrainSettings,
               info: dict[str, Any]) -> tuple[toymodel.ToyConfig, Any, Any, Any]:
    """--stage unet: the trained VAE (and latent scale) from --init; with --resume its UNet and text encoder too."""
    init = args.init or args.out
    if not pathlib.Path(init).is_file():
        raise SystemExit(f"--stage unet needs a file with the trained VAE: {init} does not exist (run --stage vae)")
    config, state_dict = toymodel.load_toy_state_dict(init)
    _, init_info = toymodel.read_toy_metadata(init)
    init_size = config.image_size
    if args.image_size is not None:
        if args.image_size % 32:  # 8x the VAE's factor, so that the UNet's three levels divide evenly
            raise SystemExit(f"--image-size {args.image_size} must be a multiple of 32")
        config.image_size = args.image_size
        config.vae["resolution"] = args.image_size  # informational, as in the default config
        config.unet["image_size"] = args.image_size // 8
    model, clip, vae = toymodel.build_toy(config, seed=settings.seed)
    trained = toymodel.build_toy(config, state_dict)
    vae = trained[2]
    if args.resume or args.finetune:
        model, clip = trained[0], trained[1]
    if "vae" in init_info:
        info["vae"] = init_info["vae"]
    info["latent_scale_factor"] = config.latent_scale_factor
    info["init"] = str(init)
    if args.finetune:
        info["finetuned_from"] = {"file": str(init), "image_size": init_size,
                                  "unet": init_info.get("unet", {}).get("steps")}
    return config, model, clip, vae


def main(argv: Sequence[str] | None = None, description: str | None = None) -> int:
    args = build_parser(description).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    settings = settings_from_args(args)
    torch.manual_seed(settings.seed)
    total = args.minutes * 60.0
    started = time.perf_counter()
    info: dict[str, Any] = {"trained": True, "seed": settings.seed, "settings": settings.to_dict(),
                            "command": "python -m toyworld.train " + " ".join(sys.argv[1:] if argv is None else argv),
                            "stage": args.stage, "minutes_budget": args.minutes, "environment": environment(device)}
    log.info("toy-world training: stage %s, %.1f min budget, %s, %d threads", args.stage, args.minutes, device,
             torch.get_num_threads())

    if args.stage == "flow":
        out = args.out if args.out != DEFAULT_OUT else DEFAULT_FLOW_OUT
        init = args.init or DEFAULT_FLOW_INIT
        run_flow_stage(init, out, settings, Budget(total, args.unet_steps), device, info,
                       checkpoint_minutes=args.checkpoint_minutes, log_every=args.log_every)
        log.info("done in %.1f min -> %s", (time.perf_counter() - started) / 60, out)
        return 0
    if args.stage in ("all", "vae"):
        config, model, clip, vae = _train_vae_first(args, settings, total, device, info)
    else:
        config, model, clip, vae = _from_init(args, settings, info)

    if args.stage in ("all", "unet"):
        remaining = total - (time.perf_counter() - started)
        if remaining <= 0 and args.unet_steps is None:
            log.warning("no time left for the UNet stage")
            return 0
        budget = Budget(max(remaining, 1.0), args.unet_steps)
        run_unet_stage(config, model, clip, vae, settings, budget, device, args.out, info, args.state,
                       resume=args.resume, checkpoint_minutes=args.checkpoint_minutes, log_every=args.log_every,
                       finetune=args.finetune)
    log.info("done in %.1f min -> %s", (time.perf_counter() - started) / 60, args.out)
    print(json.dumps({k: info[k] for k in ("latent_scale_factor",) if k in info}))
    return 0
