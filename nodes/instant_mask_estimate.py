"""AttnEdit_InstantMaskEstimate: InstDiffEdit's mask as the paper makes it (SDEdit-style, noise samples
averaged), a MASK for a stock inpainting pass."""

import comfy.samplers
import latent_preview
import torch
from comfy_api.latest import io

from ..engine.instant_mask_estimate import SAMPLERS, MaskSettings, estimate_instant_mask, partial_schedule
from ..engine.inversion import schedule
from .common import CATEGORY, check_conditioning, check_socket, check_widgets, prompt_from
from .instant_mask import prompt_word_groups, prompts_input, rule_inputs, start_map_input, word_inputs

SCHEDULERS = list(comfy.samplers.KSampler.SCHEDULERS)
DEFAULT_SAMPLER = "lms"  # the official code's LMSDiscreteScheduler (order 4)
DEFAULT_SCHEDULER = "normal"  # its timesteps, evenly spaced from 999 to 0


def image_resolution(mask: torch.Tensor) -> torch.Tensor:
    """(images, 1, h, w) latent-resolution binary mask -> MASK (images, 8h, 8w): resized bicubically and
    binarised at 0.5, as the official code hands its 64x64 mask to the 512 px inpainting pipeline."""
    b, _, h, w = mask.shape
    up = torch.nn.functional.interpolate(mask.float(), size=(h * 8, w * 8), mode="bicubic", align_corners=False)
    return (up >= 0.5).float().reshape(b, h * 8, w * 8)


class InstantMaskEstimate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnEdit_InstantMaskEstimate",
            display_name="Instant Mask Estimate (InstDiffEdit)",
            category=f"{CATEGORY}/masks",
            description="InstDiffEdit's edit mask as the paper makes it (arXiv 2401.07709): the image latent is "
                        "noised with random noise to `strength` (0.5) several times (`samples`, 3) and denoised "
                        "with the target prompt by the host's sampler; the target's cross-attention at the "
                        "low-resolution layers, averaged over the samples, gives the mask (index word by the "
                        "inverted start token, similarity to it, blur, threshold 0.2), the latent outside it kept "
                        "at the noised original each step. Feed the MASK to a stock inpainting pass (an "
                        "inpainting checkpoint with InpaintModelConditioning, or SetLatentNoiseMask + KSampler) "
                        "with the target prompt: that pass makes the edited image.",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x, SD2.x or SDXL model whose cross-attention makes the "
                                                "mask (the paper: SD1.4, not the inpainting model)."),
                io.Latent.Input("latent", tooltip="The image latent(s) from VAEEncode."),
                io.Conditioning.Input("positive", tooltip="The target prompt (CLIPTextEncode of target_prompt, or "
                                                          "AttnEdit_EditPrompts' target)."),
                io.Conditioning.Input("negative", tooltip="The negative prompt (the paper: the empty prompt)."),
                *word_inputs(),
                io.Float.Input("strength", default=0.5, min=0.01, max=1.0, step=0.01,
                               tooltip="Noise strength r: the image is noised to the sigma of the last "
                                       "int(r x steps) steps, which then run (the paper: 0.5)."),
                io.Int.Input("samples", default=3, min=1, max=16,
                             tooltip="Noise samples whose attention maps are averaged (the paper: 3), run as "
                                     "one batch."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="The seed of the noise samples."),
                io.Int.Input("steps", default=50, min=1, max=1000,
                             tooltip="Steps of the full schedule (the paper: 50, of which strength 0.5 runs 25)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=30.0, step=0.1,
                               tooltip="Classifier-free guidance while estimating (the paper: 7.5)."),
                io.Combo.Input("sampler_name", options=list(SAMPLERS), default=DEFAULT_SAMPLER,
                               tooltip="How each step is taken: lms (the paper: linear multistep, order 4) or "
                                       "euler (deterministic DDIM). The latent outside the mask is reset to "
                                       "the noised image after every step."),
                io.Combo.Input("scheduler", options=SCHEDULERS, default=DEFAULT_SCHEDULER,
                               tooltip="The schedule (normal: timesteps evenly spaced, as the paper's LMS)."),
                *rule_inputs(),
                start_map_input(),
                prompts_input(),
            ],
            outputs=[io.Mask.Output("mask", display_name="mask",
                                    tooltip="The final binary mask at image resolution (1 = edit): connect it to "
                                            "a stock inpainting pass.")],
        )

    @classmethod
    def validate_inputs(cls, strength, cfg, sampler_name, scheduler, map_side, object_similarity,
                        background_similarity, threshold, start_map="inverted"):
        return check_widgets(cls, strength=strength, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler,
                             map_side=map_side, object_similarity=object_similarity,
                             background_similarity=background_similarity, threshold=threshold, start_map=start_map)

    @classmethod
    def execute(cls, model, latent, positive, negative, target_prompt, words, strength, samples, seed, steps,
                cfg, sampler_name, scheduler, map_side, object_similarity, background_similarity, blur_passes,
                threshold, start_map="inverted", clip=None, prompts=None) -> io.NodeOutput:
        name = "Instant Mask Estimate"
        check_socket(model, "MODEL", "model", name)
        clip, target_prompt = prompt_from(prompts, clip, target_prompt, "target_prompt", name)
        check_conditioning(positive, "positive")
        check_conditioning(negative, "negative")
        groups, edit_words = prompt_word_groups(clip, target_prompt, words)
        settings = MaskSettings(groups, edit_words, map_side, object_similarity, background_similarity, blur_passes,
                                threshold, invert_start=start_map == "inverted")
        run_steps = len(partial_schedule(schedule(model, scheduler, steps), strength)) - 1
        callback = latent_preview.prepare_callback(model, run_steps)
        estimate = estimate_instant_mask(model, latent["samples"], positive, negative, settings, strength, samples,
                                         seed, steps, cfg, sampler_name, scheduler, callback)
        return io.NodeOutput(image_resolution(estimate.mask))
