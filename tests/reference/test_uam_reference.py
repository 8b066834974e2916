"""UAM's adaptive-mask edit against the official algorithm, written out plainly.

Official code (Mowenyii/Uniform-Attention-Maps, models/masactrl/diffuser_utils.py, MasaCtrlPipeline.invert
and __call__; run_editing_masactrl.py), the semantics re-derived here without the pack's attention/ or
engine/ code:

- inversion keeps two trajectories of the empty prompt, one with normal cross-attention and one with
  uniform cross-attention (probabilities 1/T over the T text tokens), no guidance;
- the edit runs three branches: source (empty prompt) and target (target prompt), both guided at cfg 7.5,
  from the normal trajectory's noisiest latent; the auxiliary "UAM reconstruction" branch (the
  unconditional, i.e. empty, prompt, uniform attention, no guidance) from the uniform trajectory's; nothing
  is pinned (MasaCtrl on the target is left out: the edit model here has no injection);
- while t < T_mask, with delta = x0_src - x0_tgt and Q its q_i-quantile (|delta| over every latent element
  of the image; q_i = linspace(0, lambda, N)[i]), delta is soft-thresholded by Q (delta - clamp(delta, -Q,
  Q)) and the edit region is where the result still exceeds Q, dilated by a 3x3 max-pool per channel;
  target x0 = x0_tgt - (x0_tgt - x0_uam) * (1 - M), source x0 = x0_src - (x0_src - x0_uam) * M (the red
  line); every branch then steps with its own predicted noise: sqrt(a') x0 + sqrt(1 - a') eps, which in
  ComfyUI's sigma space (x = x0 + sigma eps) is x' = x0 + sigma' eps.

Uniform attention is computed here without any attention patch: the output of probabilities 1/T is
(1/T) sum_j W_v c_j = W_v mean_j(c_j), which is what normal attention gives for a context of T copies of
the mean token (equal keys: equal probabilities, equal values). So the uniform rows simply get the
mean-token context, through the host's own attention.

The DDIM inversion follows the pack's convention shared by every method (each step reads eps at the
current, less noisy latent; the clean latent at the model's smallest sigma), written out below; the
trajectories are compared with the pack's handles too. Tolerances: the host's float32 kernels in another
batch drift by ~1e-5 of an effect (fixtures/tiny.py), so results are compared relative to what the blend
changes (SAME_COMPUTATION_REL). The masks are binary: the pack's mask of every blended step must be the
reference's exactly, except where |delta| lies within float error of the threshold 2 Q (TIE), where
either answer is right; there the reference goes on with the pack's answer, so that one float-noise
decision does not make the rest of the comparison meaningless.
"""

from __future__ import annotations

import comfy.samplers
import pytest
import torch

from attention_edit.nodes.adaptive_mask import AdaptiveMask
from attention_edit.nodes.edit_sampler import EditSampler
from attention_edit.nodes.inversion import DDIMInversion
from attention_edit.nodes.uniform_attention import UniformAttention
from fixtures import tiny

STEPS = 10  # ddim_uniform: t = 901, 801, ..., 101, 1
CFG = 7.5
LAMBDA = 0.5
# |delta| within this fraction of 2 Q may be decided either way by float error. Measured between the pack and this
# reference at the blended steps: the first is bitwise the same (the same host batch of the same latents), the
# later ones differ by 1e-6 to 6e-6 of max |delta| (the auxiliary row's uniform attention computed another way,
# the blend written another way); TIE sits 20 to 100 times above that.
TIE = 1e-4


# ---------------------------------------------------------------- host-level helpers (no pack code)

def stacked(conds: list, pooled: list | None) -> list:
    """One host CONDITIONING whose row r is conds[r] (contexts (1, T, D)), pooled outputs alike (SDXL)."""
    options = {} if pooled is None else {"pooled_output": torch.cat(pooled)}
    return [[torch.cat(conds), options]]


def mean_token(context: torch.Tensor) -> torch.Tensor:
    """T copies of the context's mean token: normal attention over it is uniform attention over the context."""
    return context.mean(dim=1, keepdim=True).expand_as(context).contiguous()


def run_host(model, positive, negative, cfg, rows_like, sampler_fn):
    """Run `sampler_fn(model_k, sigmas, extra_args)` through the host's CFGGuider (the host's model wrapper,
    cfg, latent processing): returns what it returns, out of the model's latent space."""
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)

    def function(model_k, x, sigmas, extra_args=None, callback=None, disable=None, **kwargs):
        return sampler_fn(model_k, sigmas, extra_args or {})

    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform", STEPS).cpu()
    zeros = torch.zeros_like(rows_like)
    return guider.sample(zeros, zeros, comfy.samplers.KSAMPLER(function), sigmas, disable_pbar=True, seed=0)


# ---------------------------------------------------------------- the reference, written plainly

def reference_inversion(model, latent: torch.Tensor, context: torch.Tensor, pooled) -> torch.Tensor:
    """DDIM inversion of one image latent (VAE space) with `context`, no guidance: the trajectory in model
    space, index i at sigma_i (descending; the last entry is the clean latent)."""
    sampling = model.get_model_object("model_sampling")
    clean = model.model.process_latent_in(latent)
    cond = stacked([context], None if pooled is None else [pooled])
    kept = {}

    def invert(model_k, sigmas, extra_args):
        n = len(sigmas) - 1
        x = clean.clone()
        trajectory = [None] * (n + 1)
        trajectory[n] = x
        for j in range(n, 0, -1):
            sigma = float(sigmas[j]) if float(sigmas[j]) > 0 else float(sampling.sigma_min)
            denoised = model_k(x, sigma * x.new_ones([1]), **extra_args)
            eps = (x - denoised) / sigma
            x = x + (float(sigmas[j - 1]) - float(sigmas[j])) * eps
            trajectory[j - 1] = x
        kept["trajectory"] = torch.stack(trajectory)
        return x

    run_host(model, cond, cond, 1.0, latent, invert)
    return kept["trajectory"]


def dilate_3x3(mask: torch.Tensor) -> torch.Tensor:
    """(C, H, W) binary mask: an element is set when any of its 3x3 neighbours (same channel) is."""
    channels, h, w = mask.shape
    padded = torch.zeros(channels, h + 2, w + 2, dtype=mask.dtype)
    padded[:, 1:h + 1, 1:w + 1] = mask
    out = torch.zeros_like(mask)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            out = torch.maximum(out, padded[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w])
    return out


def reference_edit(model, normal: torch.Tensor, uniform: torch.Tensor, empty, target, t_mask: float,
                   red_line: bool = True, source=None, aux=None, pack_masks: list | None = None) -> dict:
    """The official three-branch edit of one image from its two trajectories (model space); rows source,
    target, aux. `source`: the source prompt (the official code's is the empty one; Algorithm 1's c_src);
    `aux`: the auxiliary branch's prompt (officially the unconditional, empty one: only to measure another).
    pack_masks: the pack's edit mask of every blended step (C, H, W), checked against this one's (see TIE).
    Returns the three final latents (VAE space), the edit masks of the blended steps and how many elements
    were within TIE of the threshold."""
    sampling = model.get_model_object("model_sampling")
    source = empty if source is None else source
    aux = empty if aux is None else aux
    pooled = [c[0][1].get("pooled_output") for c in (empty, source, target, aux)]
    sdxl = pooled[0] is not None
    e_ctx, s_ctx, t_ctx, a_ctx = empty[0][0], source[0][0], target[0][0], aux[0][0]
    # source: source / empty; target: target / empty; aux: uniform attention over the empty (unconditional)
    # prompt, i.e. its mean token, as both halves, so cfg is a no-op: no guidance.
    positive = stacked([s_ctx, t_ctx, mean_token(a_ctx)], [pooled[1], pooled[2], pooled[3]] if sdxl else None)
    negative = stacked([e_ctx, e_ctx, mean_token(a_ctx)], [pooled[0], pooled[0], pooled[3]] if sdxl else None)
    result = {"masks": [], "ties": 0}

    def edit(model_k, sigmas, extra_args):
        n = len(sigmas) - 1
        x = torch.cat([normal[0], normal[0], uniform[0]])  # source and target from the normal trajectory
        for i in range(n):
            sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
            denoised = model_k(x, sigma * x.new_ones([3]), **extra_args)
            eps = (x - denoised) / sigma  # each branch's own predicted noise
            x0 = denoised.clone()
            if float(sampling.timestep(torch.tensor(sigma))) < t_mask:
                q = LAMBDA * i / (n - 1)  # np.linspace(0, lambda, n)[i]
                src, tgt, aux = denoised[0], denoised[1], denoised[2]
                delta = src - tgt
                threshold = torch.quantile(delta.abs().flatten(), q)
                shrunk = delta - delta.clamp(-threshold, threshold)
                edit_region = dilate_3x3((shrunk.abs() > threshold).float())
                if pack_masks is not None:
                    k = len(result["masks"])
                    assert k < len(pack_masks), "the pack blended fewer steps than t < T_mask gives"
                    tie = (delta.abs() - 2 * threshold).abs() <= TIE * 2 * threshold
                    lowest = dilate_3x3(((shrunk.abs() > threshold) & ~tie).float())
                    highest = dilate_3x3(((shrunk.abs() > threshold) | tie).float())
                    pack = pack_masks[k]
                    assert torch.all(lowest <= pack) and torch.all(pack <= highest), (
                        f"blended step {k}: the pack's edit region differs from the official one at "
                        f"{int(((pack < lowest) | (pack > highest)).sum())} elements that are no ties")
                    result["ties"] += int(tie.sum())
                    edit_region = pack
                x0[1] = tgt - (tgt - aux) * (1 - edit_region)
                if red_line:
                    x0[0] = src - (src - aux) * edit_region
                result["masks"].append(edit_region)
            x = x0 + sigma_next * eps
        return x

    out = run_host(model, positive, negative, CFG, torch.zeros(3, *normal.shape[2:]), edit)
    if pack_masks is not None:
        assert len(result["masks"]) == len(pack_masks), "the pack blended other steps than t < T_mask gives"
    result.update(source=out[0:1], target=out[1:2], aux=out[2:3])
    return result


# ---------------------------------------------------------------- the pack

def uniform_model(model):
    return UniformAttention.execute(model=model, scope="inversion_and_aux", start_percent=0.0, end_percent=1.0,
                                    blocks="all").args[0]


def pack_inversion(model, latent, cond):
    return DDIMInversion.execute(model=model, latent={"samples": latent}, positive=cond, negative=None, cfg=1.0,
                                 steps=STEPS, scheduler="ddim_uniform", strength=1.0).args[1]


def recording_masks(strategy) -> list:
    """The edit mask (C, H, W) of every blended step of the strategy's runs (of one image), as they happen."""
    masks, start = [], strategy.start

    def start_recording(*args):
        run = start(*args)
        blend = run.blend_denoised

        def blend_recording(i, x, denoised):
            out = blend(i, x, denoised)
            if out is not denoised:
                masks.append(run.mask[0].clone())
            return out

        run.blend_denoised = blend_recording
        return run

    strategy.start = start_recording
    return masks


def pack_edit(model, handle, aux_handle, empty, target, t_mask, blend_source=True, source=None):
    """The Edit Sampler with the Adaptive Mask's defaults but lambda, T_mask and the red line; pin_source at its
    default (on): the official recipe pins nothing whatever it says. Returns (edited, source, MASK, the masks
    of the blended steps)."""
    strategy = AdaptiveMask.execute(lambda_max=LAMBDA, t_mask=t_mask, dilation="edit_region",
                                    blend_source=blend_source).args[0]
    masks = recording_masks(strategy)
    out = EditSampler.execute(model=model, source=empty if source is None else source, target=target, negative=empty,
                              cfg=CFG, steps=STEPS, scheduler="ddim_uniform", pin_source=True, seed=0, inversion=handle,
                              mask_strategy=strategy, aux_inversion=aux_handle).args
    return out[0]["samples"], out[1]["samples"], out[2], masks


@pytest.fixture(scope="module", params=tiny.FAMILIES)
def world(request):
    name = request.param
    model = tiny.build(name)
    latent = tiny.latent()
    empty, target = tiny.conditioning(name, 1), tiny.conditioning(name, 3)
    pooled = empty[0][1].get("pooled_output")
    normal = reference_inversion(model, latent, empty[0][0], pooled)
    uniform = reference_inversion(model, latent, mean_token(empty[0][0]), pooled)
    edit_model = uniform_model(model)
    handles = pack_inversion(model, latent, empty), pack_inversion(edit_model, latent, empty)
    return dict(name=name, model=model, edit_model=edit_model, latent=latent, empty=empty, target=target,
                normal=normal, uniform=uniform, handles=handles)


def test_the_two_inversions_are_the_normal_and_the_uniform_trajectory(world):
    handle, aux_handle = world["handles"]
    normal, uniform = world["normal"], world["uniform"]
    difference = uniform - normal  # what uniform attention changes
    tiny.assert_same_computation(handle.latents[:, :1], normal, effect=difference)
    tiny.assert_same_computation(aux_handle.latents[:, :1], uniform, effect=difference)


def compared(world, t_mask, **options):
    """The pack's edit and the reference's, the reference checking the pack's mask of every blended step."""
    model, empty, target = world["model"], world["empty"], world["target"]
    pack_options = {k: v for k, v in options.items() if k in ("source",)}
    if "red_line" in options:
        pack_options["blend_source"] = options["red_line"]
    edited, source, mask, masks = pack_edit(world["edit_model"], *world["handles"], empty, target, t_mask,
                                            **pack_options)
    ref = reference_edit(model, world["normal"], world["uniform"], empty, target, t_mask, pack_masks=masks,
                         **options)
    return ref, edited, source, mask


def reference(world, t_mask, **options):
    return reference_edit(world["model"], world["normal"], world["uniform"], world["empty"], world["target"], t_mask,
                          **options)


@pytest.mark.parametrize("t_mask", [200.0, 500.0])  # the default: the last 2 of 10 steps; then the last 5
def test_the_edit_sampler_is_the_official_uam_edit(world, t_mask):
    ref, edited, source, mask = compared(world, t_mask)
    plain = reference(world, 0.0)
    assert len(ref["masks"]) == (2 if t_mask == 200.0 else 5)
    tiny.assert_same_computation(edited, ref["target"], effect=ref["target"] - plain["target"])
    tiny.assert_same_computation(source, ref["source"], effect=ref["source"] - plain["source"])
    # The MASK output is the last blended step's edit region: per pixel, the share of its latent channels.
    last = ref["masks"][-1].mean(dim=0)[None, None]
    expected = torch.nn.functional.interpolate(last, scale_factor=8, mode="nearest")[:, 0]
    assert torch.equal(mask, expected)
    assert 0 < float(mask.mean()) < 1


def test_without_the_red_line_only_the_target_is_blended(world):
    ref, edited, source, _ = compared(world, 500.0, red_line=False)
    with_line, plain = reference(world, 500.0), reference(world, 0.0)
    tiny.assert_same_computation(edited, ref["target"], effect=ref["target"] - plain["target"])
    tiny.assert_same_computation(source, plain["source"], effect=with_line["source"] - plain["source"])


def test_with_nothing_blended_every_branch_takes_the_plain_step(world):
    """T_mask 0: never t < T_mask, so the update is plain DDIM for the three branches."""
    plain, edited, source, mask = compared(world, 0.0)
    blended = reference(world, 500.0)
    assert plain["masks"] == []
    tiny.assert_same_computation(edited, plain["target"], effect=blended["target"] - plain["target"])
    tiny.assert_same_computation(source, plain["source"], effect=blended["source"] - plain["source"])
    assert torch.all(mask == 1)


def test_the_auxiliary_branch_keeps_the_empty_prompt_when_the_source_has_a_caption(world):
    """Algorithm 1 with a source prompt c_src: the auxiliary branch still reconstructs with the null prompt
    (the Edit Sampler's negative)."""
    caption = tiny.conditioning(world["name"], 2)
    ref, edited, source, _ = compared(world, 500.0, source=caption)
    with_caption_aux = reference(world, 500.0, source=caption, aux=caption)  # the aux with the source prompt
    tiny.assert_same_computation(edited, ref["target"], effect=with_caption_aux["target"] - ref["target"])
    tiny.assert_same_computation(source, ref["source"], effect=with_caption_aux["source"] - ref["source"])
