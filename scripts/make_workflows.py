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
EXAMPLE_IMAGE = "example.png"
SOURCE_PROMPT = "a large red circle in the center on a white background"
TARGET_PROMPT = "a large blue circle in the center on a white background"


def real_image_inputs(model_source=None):
    """Loader, image, prompts: nodes 1-6 shared by the real-image workflows."""
    return {
        1: ("CheckpointLoaderSimple", {"ckpt_name": SD15}),
        2: ("LoadImage", {"image": EXAMPLE_IMAGE}),
        3: ("VAEEncode", {"pixels": (2, 0), "vae": (1, 2)}),
        4: ("CLIPTextEncode", {"text": "", "clip": (1, 1)}, "Empty prompt (inversion, source)"),
        5: ("CLIPTextEncode", {"text": SOURCE_PROMPT, "clip": (1, 1)}, "Source prompt"),
        6: ("CLIPTextEncode", {"text": TARGET_PROMPT, "clip": (1, 1)}, "Target prompt"),
    }


def decode_and_save(first_id, latent, prefix):
    return {first_id: ("VAEDecode", {"samples": latent, "vae": (1, 2)}),
            first_id + 1: ("SaveImage", {"images": (first_id, 0), "filename_prefix": prefix})}


def real_edit_uam():
    """UAM: uniform-attention inversion with the empty prompt, MasaCtrl mutual self-attention in the edit."""
    g = real_image_inputs()
    g.update({
        7: ("AttnEdit_UniformAttention", {"model": (1, 0), "scope": "inversion_and_aux"}),
        8: ("AttnEdit_DDIMInversion", {"model": (7, 0), "latent": (3, 0), "positive": (4, 0), "steps": 50}),
        9: ("AttnEdit_SelfAttentionInjection", {"model": (7, 0), "mode": "masactrl"}),
        10: ("AttnEdit_EditSampler", {"model": (9, 0), "source": (4, 0), "target": (6, 0), "negative": (4, 0),
                                      "inversion": (8, 1), "steps": 50, "cfg": 7.5}),
    })
    g.update(decode_and_save(11, (10, 0), "attention-edit/uam_edited"))
    g.update(decode_and_save(13, (10, 1), "attention-edit/uam_source"))
    return g


def real_edit_fpe():
    """Free-Prompt-Editing on a real image: empty-prompt DDIM inversion, source pinned, r = 0.8."""
    g = real_image_inputs()
    g.update({
        8: ("AttnEdit_DDIMInversion", {"model": (1, 0), "latent": (3, 0), "positive": (4, 0), "steps": 50}),
        9: ("AttnEdit_SelfAttentionInjection", {"model": (1, 0), "mode": "fpe", "fpe_ratio": 0.8}),
        10: ("AttnEdit_EditSampler", {"model": (9, 0), "source": (5, 0), "target": (6, 0), "negative": (4, 0),
                                      "inversion": (8, 1), "steps": 50, "cfg": 7.5}),
    })
    g.update(decode_and_save(11, (10, 0), "attention-edit/fpe_edited"))
    return g


WORKFLOWS = {
    "real_edit_uam_masactrl": real_edit_uam,
    "real_edit_fpe": real_edit_fpe,
}
DEMO_WORKFLOW = "real_edit_uam_masactrl"


def main() -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    import workflow_tools

    import comfy_host

    comfy_host.add_host_to_path()
    comfy_host.register_pack()
    import nodes
    from attention_edit.nodes import NODES

    ours = {n.define_schema().node_id: n for n in NODES}
    out = REPO / "workflows"
    out.mkdir(exist_ok=True)
    for name, make in WORKFLOWS.items():
        workflow = workflow_tools.build_ui_workflow(make(), nodes.NODE_CLASS_MAPPINGS, ours)
        workflow_tools.write(out / f"{name}.json", workflow)
        print(out / f"{name}.json")


if __name__ == "__main__":
    main()
