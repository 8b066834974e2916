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
# Comfy-Org's all-in-one files (the model, its text encoders and VAE in one checkpoint, for Load Checkpoint).
FLUX_DEV = "flux1-dev-fp8.safetensors"
SD35_MEDIUM = "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors"
EXAMPLE_IMAGE = "example.png"
SOURCE_PROMPT = "a large red circle in the center on a white background"
TARGET_PROMPT = "a large blue circle in the center on a white background"


def photo_inputs(checkpoint=SD15):
    """Loader, photo, its latent and the inversion's empty prompt (nothing typed): nodes 1-4 of the real-image
    workflows, in their first group."""
    return {
        1: ("CheckpointLoaderSimple", {"ckpt_name": checkpoint}),
        2: ("LoadImage", {"image": EXAMPLE_IMAGE}),
        3: ("VAEEncode", {"pixels": (2, 0), "vae": (1, 2)}),
        4: ("CLIPTextEncode", {"text": "", "clip": (1, 1)}, "Inversion prompt (empty)"),
    }


def edit_prompts(node_id=6, source="", target=TARGET_PROMPT, negative=""):
    """The one place the edit's prompts are typed (AttnEdit_EditPrompts): outputs source, target, negative,
    prompts."""
    return {node_id: ("AttnEdit_EditPrompts", {"clip": (1, 1), "source": source, "target": target,
                                               "negative": negative}, "Prompts (type them here)")}


def decode(node_id, latent, title=None):
    return {node_id: ("VAEDecode", {"samples": latent, "vae": (1, 2)}, title)}


def save(node_id, image, prefix, title):
    return {node_id: ("SaveImage", {"images": image, "filename_prefix": prefix}, title)}


REAL_EDIT_NOTE = ("Change first: the image in Load Image and the checkpoint in Load Checkpoint, then the target "
                  "prompt in 'Prompts (type them here)'. Every prompt is typed there once: the mask and the sampler "
                  "read it from that node. After a run the Edit Sampler shows its edit report (what ran, the "
                  "mask, how far the edit moved, hints when it did nothing).")


def real_edit_uam(checkpoint=SD15, prefix="uam", steps=50, cfg=7.5, scheduler="ddim_uniform", note=None):
    """UAM, its official recipe: two empty-prompt inversions (normal attention for the source and target
    branches, uniform attention for the auxiliary one), MasaCtrl mutual self-attention in the edit, adaptive
    mask blending with the auxiliary uniform-attention branch (red line on), nothing pinned."""
    g = photo_inputs(checkpoint)
    schedule = {"steps": steps, "scheduler": scheduler}
    g.update({
        7: ("AttnEdit_UniformAttention", {"model": (1, 0), "scope": "inversion_and_aux"}),
        8: ("AttnEdit_DDIMInversion", {"model": (1, 0), "latent": (3, 0), "positive": (4, 0), **schedule},
            "Inversion, normal attention (source, target)"),
        18: ("AttnEdit_DDIMInversion", {"model": (7, 0), "latent": (3, 0), "positive": (4, 0), **schedule},
             "Inversion, uniform attention (auxiliary branch)"),
        **edit_prompts(),
        9: ("AttnEdit_SelfAttentionInjection", {"model": (7, 0), "mode": "masactrl"}),
        15: ("AttnEdit_AdaptiveMask", {"recipe": "two_trajectories"}),
        10: ("AttnEdit_EditSampler", {"model": (9, 0), "source": (6, 0), "target": (6, 1), "negative": (6, 2),
                                      "inversion": (8, 1), "aux_inversion": (18, 1), **schedule, "cfg": cfg,
                                      "pin_source": False, "mask_strategy": (15, 0)}),
        **decode(11, (10, 0), "Decode: edited"),
        **decode(13, (10, 1), "Decode: source branch"),
        16: ("MaskToImage", {"mask": (10, 2)}),
        **save(14, (13, 0), f"attention-edit/{prefix}_source", "Source (reconstructed)"),
        **save(12, (11, 0), f"attention-edit/{prefix}_edited", "Edited"),
        17: ("PreviewImage", {"images": (16, 0)}, "Final mask"),
    })
    # The two inversions side by side at the top, so the links they send to the sampler pass above group 2.
    layout = [("1 invert the photo", [[1, 2], [7, 3, 4], [8], [18]]), ("2 describe the edit", [6]),
              ("3 edit", [9, 15, 10, 11, 13, 16]), ("4 compare", [14, 12, 17])]
    return g, layout, note or REAL_EDIT_NOTE


def real_edit_fpe():
    """Free-Prompt-Editing on a real image: empty-prompt DDIM inversion, source pinned, r = 0.8. The injected
    model inverts and the source prompt is the inversion's, so the edit replays the source branch."""
    g = photo_inputs()
    g.update({
        9: ("AttnEdit_SelfAttentionInjection", {"model": (1, 0), "mode": "fpe", "fpe_ratio": 0.8}),
        8: ("AttnEdit_DDIMInversion", {"model": (9, 0), "latent": (3, 0), "positive": (4, 0), "steps": 50}),
        **edit_prompts(),
        10: ("AttnEdit_EditSampler", {"model": (9, 0), "source": (6, 0), "target": (6, 1), "negative": (6, 2),
                                      "inversion": (8, 1), "steps": 50, "cfg": 7.5}),
        **decode(11, (10, 0), "Decode: edited"),
        **save(12, (11, 0), "attention-edit/fpe_edited", "Edited"),
    })
    # The injected model at the top, so its link to the sampler passes above group 2.
    layout = [("1 invert the photo", [[1, 2], [9, 3, 4], [8]]), ("2 describe the edit", [6]), ("3 edit", [10, 11]),
              ("4 compare", [12])]
    return g, layout, REAL_EDIT_NOTE


def generated_edit_fpe():
    """Free-Prompt-Editing on a generated image: both branches from the same seed, r = 0.4."""
    g = {
        1: ("CheckpointLoaderSimple", {"ckpt_name": SD15}),
        7: ("EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}),
        9: ("AttnEdit_SelfAttentionInjection", {"model": (1, 0), "mode": "fpe", "fpe_ratio": 0.4}),
        **edit_prompts(source=SOURCE_PROMPT),
        10: ("AttnEdit_EditSampler", {"model": (9, 0), "source": (6, 0), "target": (6, 1), "negative": (6, 2),
                                      "latent": (7, 0), "seed": 42, "steps": 50, "cfg": 7.5}),
        **decode(11, (10, 0), "Decode: edited"),
        **decode(13, (10, 1), "Decode: source"),
        **save(14, (13, 0), "attention-edit/generated_fpe_source", "Source (generated)"),
        **save(12, (11, 0), "attention-edit/generated_fpe_edited", "Edited"),
    }
    layout = [("1 load the model", [1, 7, 9]), ("2 describe the edit", [6]), ("3 edit", [10, 11, 13]),
              ("4 compare", [14, 12])]
    note = ("Change first: the checkpoint in Load Checkpoint, then the source and target prompts in 'Prompts (type "
            "them here)' (typed once; the sampler reads them there) and the seed in the Edit Sampler. After a run "
            "the Edit Sampler shows its edit report.")
    return g, layout, note


def instant_mask_edit():
    """InstDiffEdit as the paper runs it: the mask estimated from the target prompt's cross-attention over
    three noise samples at strength 0.5 (SD1.5), then a stock inpainting pass inside it (SD1.5 inpainting
    checkpoint, InpaintModelConditioning + KSampler, the target prompt). SD1.x checkpoints share one text
    encoder, so the inpainting pass takes the same encoded prompts."""
    inpainting = "sd-v1-5-inpainting.ckpt"
    g = photo_inputs()
    del g[4]  # no inversion: the estimate noises the photo
    g.update({
        11: ("CheckpointLoaderSimple", {"ckpt_name": inpainting}, "Inpainting checkpoint"),
        **edit_prompts(),
        8: ("AttnEdit_InstantMaskEstimate", {"model": (1, 0), "latent": (3, 0), "positive": (6, 1),
                                             "negative": (6, 2), "prompts": (6, 3), "words": "", "strength": 0.5,
                                             "samples": 3, "seed": 0, "steps": 50, "cfg": 7.5},
            "InstDiffEdit mask (strength 0.5, 3 noise samples)"),
        9: ("MaskToImage", {"mask": (8, 0)}),
        14: ("InpaintModelConditioning", {"positive": (6, 1), "negative": (6, 2), "vae": (11, 2), "pixels": (2, 0),
                                          "mask": (8, 0), "noise_mask": True}),
        15: ("KSampler", {"model": (11, 0), "positive": (14, 0), "negative": (14, 1), "latent_image": (14, 2),
                          "seed": 0, "steps": 50, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal",
                          "denoise": 1.0}, "Inpainting inside the mask"),
        16: ("VAEDecode", {"samples": (15, 0), "vae": (11, 2)}, "Decode: inpainted"),
        10: ("PreviewImage", {"images": (9, 0)}, "Instant mask"),
        17: ("SaveImage", {"images": (16, 0), "filename_prefix": "attention-edit/instdiffedit_inpainted"}, "Edited"),
    })
    # Both checkpoints in the first column, the photo beside them: the links they send on pass above group 2.
    layout = [("1 load the photo", [[1, 11], [2], [3]]), ("2 describe the edit", [6]),
              ("3 mask, then inpaint inside it", [8, 9, 14, 15, 16]), ("4 compare", [10, 17])]
    note = ("Change first: the image in Load Image, the checkpoints (the mask's model and an inpainting one), then "
            "the target prompt in 'Prompts (type them here)': the mask reads its words from there, so it follows "
            "every change. Name the word to edit in the mask's 'words' (empty: the paper's index word).")
    return g, layout, note


def reconstruction_compared():
    """Plain DDIM inversion beside UAM inversion, each reconstructed, with the error images."""
    g = photo_inputs()
    g.update({
        5: ("CLIPTextEncode", {"text": SOURCE_PROMPT, "clip": (1, 1)}, "Caption (plain DDIM inversion)"),
        7: ("AttnEdit_UniformAttention", {"model": (1, 0), "scope": "all"}),
        8: ("AttnEdit_DDIMInversion", {"model": (1, 0), "latent": (3, 0), "positive": (5, 0), "negative": (4, 0),
                                       "cfg": 7.5, "steps": 50}, "Plain DDIM inversion (caption, cfg 7.5)"),
        9: ("AttnEdit_DDIMInversion", {"model": (7, 0), "latent": (3, 0), "positive": (4, 0), "steps": 50},
            "UAM inversion (uniform attention)"),
        10: ("AttnEdit_InversionReconstruct", {"model": (1, 0), "inversion": (8, 1), "positive": (5, 0),
                                               "negative": (4, 0), "cfg": 7.5}),
        11: ("AttnEdit_InversionReconstruct", {"model": (7, 0), "inversion": (9, 1), "positive": (4, 0),
                                               "negative": (4, 0), "cfg": 1.0}),
        12: ("VAEDecode", {"samples": (10, 0), "vae": (1, 2)}, "Decode: plain DDIM"),
        13: ("VAEDecode", {"samples": (11, 0), "vae": (1, 2)}, "Decode: UAM"),
        14: ("ImageBlend", {"image1": (2, 0), "image2": (12, 0), "blend_factor": 1.0, "blend_mode": "difference"},
             "Error: plain DDIM"),
        15: ("ImageBlend", {"image1": (2, 0), "image2": (13, 0), "blend_factor": 1.0, "blend_mode": "difference"},
             "Error: UAM"),
        16: ("SaveImage", {"images": (12, 0), "filename_prefix": "attention-edit/recon_ddim"}, "Plain DDIM"),
        17: ("SaveImage", {"images": (13, 0), "filename_prefix": "attention-edit/recon_uam"}, "UAM"),
        18: ("SaveImage", {"images": (14, 0), "filename_prefix": "attention-edit/recon_ddim_error"},
             "Error: plain DDIM"),
        19: ("SaveImage", {"images": (15, 0), "filename_prefix": "attention-edit/recon_uam_error"}, "Error: UAM"),
    })
    # The prompts first in their column: the links they send past group 2 stay above it.
    layout = [("1 load the photo and its caption", [[1, 2], [5, 4, 3]]), ("2 invert two ways", [7, 8, 9]),
              ("3 reconstruct", [10, 11, 12, 13, 14, 15]), ("4 compare", [16, 17, 18, 19])]
    note = ("Change first: the image in Load Image and the checkpoint, then the caption (typed once, in its CLIP Text "
            "Encode). The plain inversion uses the caption at cfg 7.5; the UAM inversion the empty prompt.")
    return g, layout, note


def regulation_side_by_side():
    """Text-to-image with and without attention regulation, same seed, side by side."""
    prompt = "a small red circle on the left and a large blue square on the right on a white background"
    sampler = {"seed": 7, "steps": 50, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}
    g = {
        1: ("CheckpointLoaderSimple", {"ckpt_name": SD15}),
        4: ("EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}),
        **edit_prompts(node_id=2, target=prompt),
        5: ("AttnEdit_AttentionRegulation", {"model": (1, 0), "prompts": (2, 3), "target_words": "circle, square"}),
        6: ("KSampler", {"model": (1, 0), "positive": (2, 1), "negative": (2, 2), "latent_image": (4, 0), **sampler},
            "Plain"),
        7: ("KSampler", {"model": (5, 0), "positive": (2, 1), "negative": (2, 2), "latent_image": (4, 0), **sampler},
            "Regulated"),
        **decode(8, (6, 0), "Decode: plain"),
        **decode(10, (7, 0), "Decode: regulated"),
        **save(9, (8, 0), "attention-edit/regulation_off", "Plain"),
        **save(11, (10, 0), "attention-edit/regulation_on", "Regulated"),
    }
    layout = [("1 load the model", [1, 4]), ("2 describe the image", [2]),
              ("3 generate with and without regulation", [[6], [5], [7], [10, 8]]), ("4 compare", [9, 11])]
    note = ("Change first: the checkpoint, then the prompt: the target of 'Prompts (type them here)', typed once "
            "(both samplers and the regulation read it there), and the words to regulate in Attention Regulation.")
    return g, layout, note


def sdxl_real_edit():
    """The UAM recipe (official: two inversions, nothing pinned) on SDXL (1024 px images)."""
    return real_edit_uam(SDXL, "sdxl")


# Flow-matching DiTs (web/docs/AttnEdit_DDIMInversion.md, "On Flux and SD3.5"): ComfyUI's `simple` scheduler
# (what the pack's DiT tests measure), inversion at cfg 1.
DIT_SCHEDULER = "simple"
FLUX_STEPS = 28
FLUX_GUIDANCE = 3.5  # FluxGuidance's default, Flux-dev's usual distilled guidance
SD35_STEPS = 40
SD35_CFG = 5.0

FLUX_NOTE = ("Change first: the image in Load Image (about 1024 px: Flux-dev's size) and the checkpoint in Load "
             "Checkpoint (Comfy-Org's all-in-one flux1-dev-fp8, with its text encoders and VAE), then the target "
             "prompt in 'Prompts (type them here)'. Flux-dev has no real CFG: its distilled guidance rides in the "
             "prompt (FluxGuidance), so invert and edit at cfg 1 and keep the three FluxGuidance nodes at one "
             "value (the inversion's prompt is the source's, so the source is replayed). After a run the Edit "
             "Sampler shows its edit report.")


def flux_real_edit():
    """Free-Prompt-Editing on a real image with Flux.1-dev: the injected model inverts the photo (the
    rectified-flow ODE run backwards, empty prompt with Flux-dev's distilled guidance, cfg 1), the source
    pinned and replayed (its prompt and guidance are the inversion's), r = 0.8, the edit at cfg 1."""
    g = photo_inputs(FLUX_DEV)
    schedule = {"steps": FLUX_STEPS, "scheduler": DIT_SCHEDULER}
    g.update({
        5: ("FluxGuidance", {"conditioning": (4, 0), "guidance": FLUX_GUIDANCE}, "Guidance: inversion"),
        9: ("AttnEdit_SelfAttentionInjection", {"model": (1, 0), "mode": "fpe", "fpe_ratio": 0.8}),
        8: ("AttnEdit_DDIMInversion", {"model": (9, 0), "latent": (3, 0), "positive": (5, 0), "cfg": 1.0,
                                       **schedule}, "Inversion (rectified flow, cfg 1)"),
        **edit_prompts(),
        19: ("FluxGuidance", {"conditioning": (6, 0), "guidance": FLUX_GUIDANCE}, "Guidance: source"),
        20: ("FluxGuidance", {"conditioning": (6, 1), "guidance": FLUX_GUIDANCE}, "Guidance: target"),
        10: ("AttnEdit_EditSampler", {"model": (9, 0), "source": (19, 0), "target": (20, 0), "negative": (6, 2),
                                      "inversion": (8, 1), "cfg": 1.0, **schedule}),
        **decode(11, (10, 0), "Decode: edited"),
        **save(12, (11, 0), "attention-edit/flux_fpe_edited", "Edited"),
    })
    # The injected model at the top, so its link to the sampler passes above group 2.
    layout = [("1 invert the photo", [[1, 2], [9, 3, 4], [5], [8]]), ("2 describe the edit", [6, 19, 20]),
              ("3 edit", [10, 11]), ("4 compare", [12])]
    return g, layout, FLUX_NOTE


SD35_NOTE = (f"Change first: the image in Load Image (about 1024 px: SD3.5's size) and the checkpoint in Load "
             "Checkpoint (Comfy-Org's all-in-one SD3.5 medium, with its text encoders), then the target prompt in "
             "'Prompts (type them here)'. SD3.5 has real CFG: both inversions run at cfg 1 (exact; higher drifts), "
             f"the edit at cfg {SD35_CFG:g}. After a run the Edit Sampler shows its edit report (what ran, the mask, how far "
             "the edit moved, hints when it did nothing).")


def sd35_real_edit():
    """The UAM recipe (official: two inversions at cfg 1, MasaCtrl, adaptive mask, nothing pinned) on SD3.5
    medium, at SD3.5's real CFG."""
    return real_edit_uam(SD35_MEDIUM, "sd35", steps=SD35_STEPS, cfg=SD35_CFG, scheduler=DIT_SCHEDULER,
                         note=SD35_NOTE)


WORKFLOWS = {
    "real_edit_uam_masactrl": real_edit_uam,
    "real_edit_fpe": real_edit_fpe,
    "generated_edit_fpe": generated_edit_fpe,
    "instant_mask_edit": instant_mask_edit,
    "reconstruction_compared": reconstruction_compared,
    "regulation_side_by_side": regulation_side_by_side,
    "sdxl_real_edit": sdxl_real_edit,
    "flux_real_edit": flux_real_edit,
    "sd35_real_edit": sd35_real_edit,
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

    if comfy_host.host_version() != GENERATOR_HOST:
        sys.exit(f"write the workflows on ComfyUI {GENERATOR_HOST} (this host is {comfy_host.host_version()})")
    out = REPO / "workflows"
    out.mkdir(exist_ok=True)
    for name in WORKFLOWS:
        workflow_tools.write(out / f"{name}.json", build(name))
        print(out / f"{name}.json")


def build(name: str) -> dict:
    """The UI-format workflow `name` (the host and the pack importable)."""
    import workflow_tools

    from attention_edit.nodes import NODES

    graph, groups, note = WORKFLOWS[name]()
    ours = {n.define_schema().node_id: n for n in NODES}
    return workflow_tools.build_ui_workflow(graph, workflow_tools.host_node_classes(), ours, groups=groups, note=note)


if __name__ == "__main__":
    main()
