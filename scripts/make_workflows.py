"""Writes workflows/*.json (UI format) from the compact graphs below. Run after changing a node's inputs:

    .venv/bin/python scripts/make_workflows.py

Model names are the files users have; `make demo` and the browser test swap the checkpoint loader for
the embedded toy-world model (same outputs: MODEL, CLIP, VAE).
"""

from __future__ import annotations

import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
SD15 = "v1-5-pruned-emaonly.safetensors"
SDXL = "sd_xl_base_1.0.safetensors"
EXAMPLE_IMAGE = "example.png"
SOURCE_PROMPT = "a large red circle in the center on a white background"
TARGET_PROMPT = "a large blue circle in the center on a white background"


def real_image_inputs(checkpoint=SD15):
    """Loader, image, prompts: nodes 1-6 shared by the real-image workflows."""
    return {
        1: ("CheckpointLoaderSimple", {"ckpt_name": checkpoint}),
        2: ("LoadImage", {"image": EXAMPLE_IMAGE}),
        3: ("VAEEncode", {"pixels": (2, 0), "vae": (1, 2)}),
        4: ("CLIPTextEncode", {"text": "", "clip": (1, 1)}, "Empty prompt (inversion, source)"),
        5: ("CLIPTextEncode", {"text": SOURCE_PROMPT, "clip": (1, 1)}, "Source prompt"),
        6: ("CLIPTextEncode", {"text": TARGET_PROMPT, "clip": (1, 1)}, "Target prompt"),
    }


def decode_and_save(first_id, latent, prefix):
    return {first_id: ("VAEDecode", {"samples": latent, "vae": (1, 2)}),
            first_id + 1: ("SaveImage", {"images": (first_id, 0), "filename_prefix": prefix})}


def real_edit_uam(checkpoint=SD15, prefix="uam"):
    """UAM, its official recipe: two empty-prompt inversions (normal attention for the source and target
    branches, uniform attention for the auxiliary one), MasaCtrl mutual self-attention in the edit, adaptive
    mask blending with the auxiliary uniform-attention branch (red line on), nothing pinned."""
    g = real_image_inputs(checkpoint)
    g.update({
        7: ("AttnEdit_UniformAttention", {"model": (1, 0), "scope": "inversion_and_aux"}),
        8: ("AttnEdit_DDIMInversion", {"model": (1, 0), "latent": (3, 0), "positive": (4, 0), "steps": 50},
            "Inversion, normal attention (source, target)"),
        18: ("AttnEdit_DDIMInversion", {"model": (7, 0), "latent": (3, 0), "positive": (4, 0), "steps": 50},
             "Inversion, uniform attention (auxiliary branch)"),
        9: ("AttnEdit_SelfAttentionInjection", {"model": (7, 0), "mode": "masactrl"}),
        15: ("AttnEdit_AdaptiveMask", {"recipe": "two_trajectories"}),
        10: ("AttnEdit_EditSampler", {"model": (9, 0), "source": (4, 0), "target": (6, 0), "negative": (4, 0),
                                      "inversion": (8, 1), "aux_inversion": (18, 1), "steps": 50, "cfg": 7.5,
                                      "pin_source": False, "mask_strategy": (15, 0)}),
    })
    g.update(decode_and_save(11, (10, 0), f"attention-edit/{prefix}_edited"))
    g.update(decode_and_save(13, (10, 1), f"attention-edit/{prefix}_source"))
    g.update({16: ("MaskToImage", {"mask": (10, 2)}), 17: ("PreviewImage", {"images": (16, 0)}, "Final mask")})
    return g


def real_edit_fpe():
    """Free-Prompt-Editing on a real image: empty-prompt DDIM inversion, source pinned, r = 0.8. The injected
    model inverts and the source prompt is the inversion's, so the edit replays the source branch."""
    g = real_image_inputs()
    del g[5]  # the source is the empty prompt
    g.update({
        9: ("AttnEdit_SelfAttentionInjection", {"model": (1, 0), "mode": "fpe", "fpe_ratio": 0.8}),
        8: ("AttnEdit_DDIMInversion", {"model": (9, 0), "latent": (3, 0), "positive": (4, 0), "steps": 50}),
        10: ("AttnEdit_EditSampler", {"model": (9, 0), "source": (4, 0), "target": (6, 0), "negative": (4, 0),
                                      "inversion": (8, 1), "steps": 50, "cfg": 7.5}),
    })
    g.update(decode_and_save(11, (10, 0), "attention-edit/fpe_edited"))
    return g


def generated_edit_fpe():
    """Free-Prompt-Editing on a generated image: both branches from the same seed, r = 0.4."""
    return {
        1: ("CheckpointLoaderSimple", {"ckpt_name": SD15}),
        4: ("CLIPTextEncode", {"text": "", "clip": (1, 1)}, "Negative prompt"),
        5: ("CLIPTextEncode", {"text": SOURCE_PROMPT, "clip": (1, 1)}, "Source prompt"),
        6: ("CLIPTextEncode", {"text": TARGET_PROMPT, "clip": (1, 1)}, "Target prompt"),
        7: ("EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}),
        9: ("AttnEdit_SelfAttentionInjection", {"model": (1, 0), "mode": "fpe", "fpe_ratio": 0.4}),
        10: ("AttnEdit_EditSampler", {"model": (9, 0), "source": (5, 0), "target": (6, 0), "negative": (4, 0),
                                      "latent": (7, 0), "seed": 42, "steps": 50, "cfg": 7.5}),
        **decode_and_save(11, (10, 0), "attention-edit/generated_fpe_edited"),
        **decode_and_save(13, (10, 1), "attention-edit/generated_fpe_source"),
    }


def instant_mask_edit():
    """InstDiffEdit as the paper runs it: the mask estimated from the target prompt's cross-attention over
    three noise samples at strength 0.5 (SD1.5), then a stock inpainting pass inside it (SD1.5 inpainting
    checkpoint, InpaintModelConditioning + KSampler, the target prompt)."""
    inpainting = "sd-v1-5-inpainting.ckpt"
    g = real_image_inputs()
    del g[5]  # no source prompt: the mask and the inpainting read the target prompt only
    g.update({
        8: ("AttnEdit_InstantMaskEstimate", {"model": (1, 0), "latent": (3, 0), "positive": (6, 0), "negative": (4, 0),
                                             "clip": (1, 1), "target_prompt": TARGET_PROMPT, "words": "",
                                             "strength": 0.5, "samples": 3, "seed": 0, "steps": 50, "cfg": 7.5},
            "InstDiffEdit mask (strength 0.5, 3 noise samples)"),
        9: ("MaskToImage", {"mask": (8, 0)}),
        10: ("PreviewImage", {"images": (9, 0)}, "Instant mask"),
        11: ("CheckpointLoaderSimple", {"ckpt_name": inpainting}, "Inpainting checkpoint"),
        12: ("CLIPTextEncode", {"text": TARGET_PROMPT, "clip": (11, 1)}, "Target prompt (inpainting)"),
        13: ("CLIPTextEncode", {"text": "", "clip": (11, 1)}, "Negative prompt (inpainting)"),
        14: ("InpaintModelConditioning", {"positive": (12, 0), "negative": (13, 0), "vae": (11, 2), "pixels": (2, 0),
                                          "mask": (8, 0), "noise_mask": True}),
        15: ("KSampler", {"model": (11, 0), "positive": (14, 0), "negative": (14, 1), "latent_image": (14, 2),
                          "seed": 0, "steps": 50, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal",
                          "denoise": 1.0}, "Inpainting inside the mask"),
        16: ("VAEDecode", {"samples": (15, 0), "vae": (11, 2)}),
        17: ("SaveImage", {"images": (16, 0), "filename_prefix": "attention-edit/instdiffedit_inpainted"}),
    })
    return g


def reconstruction_compared():
    """Plain DDIM inversion beside UAM inversion, each reconstructed, with the error images."""
    g = real_image_inputs()
    g.update({
        7: ("AttnEdit_UniformAttention", {"model": (1, 0), "scope": "all"}),
        8: ("AttnEdit_DDIMInversion", {"model": (1, 0), "latent": (3, 0), "positive": (5, 0), "negative": (4, 0),
                                       "cfg": 7.5, "steps": 50}, "Plain DDIM inversion (caption, cfg 7.5)"),
        9: ("AttnEdit_DDIMInversion", {"model": (7, 0), "latent": (3, 0), "positive": (4, 0), "steps": 50},
            "UAM inversion (uniform attention)"),
        10: ("AttnEdit_InversionReconstruct", {"model": (1, 0), "inversion": (8, 1), "positive": (5, 0),
                                               "negative": (4, 0), "cfg": 7.5}),
        11: ("AttnEdit_InversionReconstruct", {"model": (7, 0), "inversion": (9, 1), "positive": (4, 0),
                                               "negative": (4, 0), "cfg": 1.0}),
        12: ("VAEDecode", {"samples": (10, 0), "vae": (1, 2)}),
        13: ("VAEDecode", {"samples": (11, 0), "vae": (1, 2)}),
        14: ("ImageBlend", {"image1": (2, 0), "image2": (12, 0), "blend_factor": 1.0, "blend_mode": "difference"},
             "Error: plain DDIM"),
        15: ("ImageBlend", {"image1": (2, 0), "image2": (13, 0), "blend_factor": 1.0, "blend_mode": "difference"},
             "Error: UAM"),
        16: ("SaveImage", {"images": (12, 0), "filename_prefix": "attention-edit/recon_ddim"}),
        17: ("SaveImage", {"images": (13, 0), "filename_prefix": "attention-edit/recon_uam"}),
        18: ("SaveImage", {"images": (14, 0), "filename_prefix": "attention-edit/recon_ddim_error"}),
        19: ("SaveImage", {"images": (15, 0), "filename_prefix": "attention-edit/recon_uam_error"}),
    })
    return g


def regulation_side_by_side():
    """Text-to-image with and without attention regulation, same seed, side by side."""
    prompt = "a small red circle on the left and a large blue square on the right on a white background"
    sampler = {"seed": 7, "steps": 50, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}
    return {
        1: ("CheckpointLoaderSimple", {"ckpt_name": SD15}),
        2: ("CLIPTextEncode", {"text": prompt, "clip": (1, 1)}, "Prompt"),
        3: ("CLIPTextEncode", {"text": "", "clip": (1, 1)}, "Negative prompt"),
        4: ("EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}),
        5: ("AttnEdit_AttentionRegulation", {"model": (1, 0), "clip": (1, 1), "prompt": prompt,
                                             "target_words": "circle, square"}),
        6: ("KSampler", {"model": (1, 0), "positive": (2, 0), "negative": (3, 0), "latent_image": (4, 0), **sampler},
            "Plain"),
        7: ("KSampler", {"model": (5, 0), "positive": (2, 0), "negative": (3, 0), "latent_image": (4, 0), **sampler},
            "Regulated"),
        **decode_and_save(8, (6, 0), "attention-edit/regulation_off"),
        **decode_and_save(10, (7, 0), "attention-edit/regulation_on"),
    }


def sdxl_real_edit():
    """The UAM recipe (official: two inversions, nothing pinned) on SDXL (1024 px images)."""
    return real_edit_uam(SDXL, "sdxl")


WORKFLOWS = {
    "real_edit_uam_masactrl": real_edit_uam,
    "real_edit_fpe": real_edit_fpe,
    "generated_edit_fpe": generated_edit_fpe,
    "instant_mask_edit": instant_mask_edit,
    "reconstruction_compared": reconstruction_compared,
    "regulation_side_by_side": regulation_side_by_side,
    "sdxl_real_edit": sdxl_real_edit,
}
DEMO_WORKFLOW = "real_edit_uam_masactrl"
# The files are written on the development host: a node's output slots are what that host's frontend
# would save (0.33.0 gave SaveImage and PreviewImage an IMAGE output that 0.3.75 lacks).
GENERATOR_HOST = "0.33.0"


def main() -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    import workflow_tools

    import comfy_host

    comfy_host.add_host_to_path()
    comfy_host.register_pack()
    from attention_edit.nodes import NODES

    if comfy_host.host_version() != GENERATOR_HOST:
        sys.exit(f"write the workflows on ComfyUI {GENERATOR_HOST} (this host is {comfy_host.host_version()})")
    ours = {n.define_schema().node_id: n for n in NODES}
    out = REPO / "workflows"
    out.mkdir(exist_ok=True)
    for name, make in WORKFLOWS.items():
        workflow = workflow_tools.build_ui_workflow(make(), workflow_tools.host_node_classes(), ours)
        workflow_tools.write(out / f"{name}.json", workflow)
        print(out / f"{name}.json")


if __name__ == "__main__":
    main()
