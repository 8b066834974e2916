"""Train the toy-world text-to-image model (toyworld/model.py) on rendered toy-world scenes.

    python -m toyworld.train --out models/toyworld.safetensors [--minutes 90] [--device cpu|cuda]
                             [--stage all|vae|unet] [--vae-steps N] [--unet-steps N] [--seed 0]

Two stages, both on scenes of the "train" split only (captions of the held-out "test" split are
never seen; see `toyworld.scenes.caption_split`):

1. **VAE** (`--stage vae`): ComfyUI's `AutoencoderKL` learns to reconstruct rendered scenes (pixels in
   [-1, 1], as ComfyUI's VAE wrapper feeds it): MSE plus a small KL term on the posterior, a sampled
   latent during training; object pixels weigh ``1 + --vae-object-weight`` in the MSE (colours of
   small objects are what the classifier reads, and they are few pixels). Most steps see whole scenes
   rendered at ``--vae-render`` pixels (64: a quarter of the cost of 128, and, unlike crops, the same
   content statistics: ComfyUI's VAE normalises over the whole image), the last
   ``--vae-full-fraction`` of the budget full-size images. Then the std of the latent means of fresh
   scenes sets ``ToyConfig.latent_scale_factor = 1 / std`` (the SD15 latent format's ``process_in``
   scale). The VAE is `TRAIN_VAE`-shaped (64 channels at every level, see there for why).
2. **UNet + text encoder** (`--stage unet`), jointly, with the VAE frozen: eps-prediction MSE over
   ComfyUI's own discrete 1000-step schedule, computed the way `comfy.model_base.BaseModel`
   computes a prediction (``model_sampling.calculate_input`` scales the noisy latent,
   ``model_sampling.timestep(sigma)`` is the timestep the UNet sees, ``noise_scaling`` makes the
   noisy latent), so that ComfyUI's samplers run exactly the model that was trained. The text
   encoder runs through `SDClipModel.forward` on the real CLIP tokenizer's 77 tokens, as
   `CLIPTextEncode` does. Caption dropout to the empty prompt (classifier-free guidance), min-SNR
   loss weighting, AdamW, warm-up then cosine learning rate, gradient clipping, an EMA of the
   weights (the EMA weights are what gets saved), and a token-grounding loss on the
   cross-attention (below).

Data: an unbounded, seeded stream of train-split scenes (`train_scenes`, the same stream as
``scenes.make_dataset(seed, n, "train")``). Rendering is cheap (about 1 ms per scene), encoding
with the VAE is not (15 to 40 ms per image on 2 shared CPU cores), so stage 2 keeps a pool of
encoded scenes (`LatentPool`, `--pool` scenes) and replaces `--refresh` random pool entries with
fresh scenes every step: every batch is drawn from the pool, the pool keeps changing, and over a
run the model sees well over ten thousand distinct scenes for a few percent of the step time.

Grounding loss (`--attn-loss`, TokenCompose-style, Wang et al. 2024): for every caption that was
not dropped, the cross-attention of each object's size, colour and shape tokens in every
cross-attention layer (16x16, 8x8 and 4x4 maps; head-averaged, normalised over pixels) should fall
inside that object's ground-truth coverage; the loss is the mean of ``(1 - mass inside)**2``. The
world gives exact
masks for free, the loss binds attribute words to their object (what two-object captions need) and
makes the object-word attention that the pack's masks read concentrate on the object. Set it to 0
to train on the diffusion loss alone.

Budget: ``--minutes`` is the wall-clock budget of the whole invocation (model building and file
writing aside): with ``--stage all`` the VAE stage's training gets ``--vae-fraction`` of it (its
latent-scale measurement and reconstruction check add about half a minute) and the UNet stage the
rest (its pool encoding included); with a single stage
it is that stage's budget. ``--vae-steps`` / ``--unet-steps`` cap the steps. The learning-rate
schedule follows the progress ``max(step / steps, training time / training budget)`` (the UNet
stage's pool encoding does not count as training time), so a time-limited run still ends on a
decayed learning rate; with step caps that the time budget does not cut short (give a generous
``--minutes``) the run is deterministic for a given seed, device and thread count. CPU threads:
torch's default (all cores), with ``OMP_WAIT_POLICY=PASSIVE`` unless set: on shared cores spinning
OpenMP threads cost up to 10x (``--threads 1`` is the better choice when other jobs keep the
cores busy).

Files: ``--out`` is (re)written as a loadable toy model (fp16, `toymodel.save_toy`) after the VAE
stage and every ``--checkpoint-minutes`` of the UNet stage, so an interrupted run leaves a usable
file; the metadata ``attention_edit_toy_info`` holds the training record (seed, steps, minutes,
losses, latent scale, command). ``--state`` (default ``out/toyworld-train/state.pt``, git-ignored)
holds the fp32 training state for ``--resume`` (``--stage unet --resume``: the weights, EMA,
optimiser, step count and time used; the pool is rebuilt, so a resumed run continues but is not
bit-identical to an uninterrupted one, and ``--minutes`` counts the time already used).
``--stage unet`` takes the VAE (and latent scale) from ``--init`` (default: ``--out``); with ``--finetune`` the
UNet and text encoder too, and ``--image-size`` sets the pixel size of the scenes. The 256-px toy world
(``models/toyworld256.safetensors``: 32x32 latents) is the 128-px model fine-tuned that way::

    python -m toyworld.train --stage unet --finetune --init models/toyworld.safetensors --image-size 256 \
        --out models/toyworld256.safetensors --minutes 55 --batch 8 --lr 2e-4 --warmup-steps 50 \
        --ema-decay 0.998 --pool 1024 --refresh 1 --threads 2

(the VAE is convolutional and was trained at 64 and 128 px: it reconstructs 256-px scenes at 35 dB unchanged).
"""

# The code is in toyworld/training/ (one module per stage, see there). This module only sets up the
# process and hands over: importing it imports nothing of ComfyUI, torch or the pack.

from __future__ import annotations

import sys
from collections.abc import Sequence

from .host import setup_host


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: the host set up first (the trainer imports ComfyUI and the pack), then the run."""
    setup_host()
    from .training import cli

    return cli.main(argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
