"""Every edit method on the two DiT toy models through the live host: API-format graphs queued over HTTP.

The toy flow world (Flux-schnell-shaped DiT, toy CLIP text encoder over the CLIP-L tokenizer, toy VAE) and the
SD3.5-medium-shaped random toy, both loaded by AttnEdit_ToyModelLoader. Each graph is LoadImage (a rendered
toy-world scene in the host's input folder) -> VAEEncode -> AttnEdit_DDIMInversion -> AttnEdit_EditSampler (or
AttnEdit_InversionReconstruct), wired per method as the example workflows wire it (fixtures/toy_graph.py
edit_methods), with every widget the graph does not set at the default /object_info gives (what a user gets).
The latents come back through SaveLatent files and the masks through MaskToImage -> SaveImage, so each
behavioural check reads only what the host wrote.
"""

from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest
import torch

# Five steps: a divisor of 1000, so ddim_uniform gives exactly STEPS (it adds one otherwise). MasaCtrl starts at
# step 4 by default (of 50 in its paper): here at step 2, so that it acts on 3 of the 5 steps.
STEPS = 5
MASACTRL_START = 2
# Relative RMS differences of float32 latents (each written by SaveLatent in float32). SAME: the same values up to
# rounding (the pinned or kept latent goes through process_latent_in/out and a few float32 blends, each ~1e-7
# relative; a hundred of them stay below). MOVED: a change a hundred times that, which no rounding makes.
SAME = 1e-5
MOVED = 1e-3
SCENE_IMAGE = "attn_edit_dit_source.png"
MASK_IMAGE = "attn_edit_dit_left_half.png"
SOURCE_TEXT = "a large red circle in the center on a white background"
TARGET_TEXT = "a large blue circle in the center on a white background"
LATENT_SIDE, IMAGE_SIDE = 16, 128
SAMPLER = "20"
FAMILIES = {"flux": "toy_flux_model", "sd3": "toy_sd3_model"}


# --------------------------------------------------------------------------------------------------
# Inputs and outputs on the host


@pytest.fixture(scope="module")
def input_images(comfy_server) -> None:
    """The source scene (a large red circle in the center, white background) and a MASK image in the host's
    input folder: LoadImageMask's alpha channel gives 1 - alpha, so the transparent left half is the mask."""
    from PIL import Image

    from toyworld import scenes

    folder = comfy_server.base / "input"
    folder.mkdir(parents=True, exist_ok=True)
    circle = scenes.ObjectSpec(shape="circle", colour="red", size="large", position="center", cx=64, cy=64, r=24)
    image, _ = scenes.render(scenes.Scene(background="white", objects=(circle,)), size=IMAGE_SIDE)
    Image.fromarray(image).save(folder / SCENE_IMAGE)
    rgba = np.full((IMAGE_SIDE, IMAGE_SIDE, 4), 255, dtype=np.uint8)
    rgba[:, : IMAGE_SIDE // 2, 3] = 0  # transparent left half: mask 1 there
    Image.fromarray(rgba, mode="RGBA").save(folder / MASK_IMAGE)


@pytest.fixture(scope="module")
def defaults(object_info) -> dict:
    """Per node type, the default of every widget input (a combo's default, else its first option)."""
    out = {}
    for class_type, info in object_info.items():
        values = {}
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                kind, options = spec[0], spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if "default" in options:
                    values[name] = options["default"]
                elif isinstance(kind, list) and kind:
                    values[name] = kind[0]
                elif kind == "COMBO" and options.get("options"):
                    values[name] = options["options"][0]
        out[class_type] = values
    return out


@pytest.fixture(scope="module")
def required_inputs(object_info) -> dict:
    return {class_type: set(info["input"].get("required", {})) for class_type, info in object_info.items()}


def saved_latent(server, entry: dict, node_id: str) -> torch.Tensor:
    """The latent a SaveLatent node wrote (its file in the host's output folder)."""
    from safetensors.torch import load_file

    (item,) = entry["outputs"][node_id]["latents"]
    path = server.base / item.get("type", "output") / item.get("subfolder", "") / item["filename"]
    return load_file(str(path))["latent_tensor"].double()


def saved_image(server, entry: dict, node_id: str) -> np.ndarray:
    from PIL import Image

    (item,) = entry["outputs"][node_id]["images"]
    path = pathlib.Path(server.base / item.get("type", "output") / item.get("subfolder", "") / item["filename"])
    return np.asarray(Image.open(path).convert("RGB"))


def report_text(entry: dict) -> str:
    text = "\n".join(entry["outputs"].get(SAMPLER, {}).get("text", []))
    assert text.startswith("Edit report"), f"the Edit Sampler returned no report: {entry['outputs'].get(SAMPLER)}"
    return text


def rms(a: torch.Tensor) -> float:
    return float(a.pow(2).mean().sqrt())


# --------------------------------------------------------------------------------------------------
# The graphs


class Prompt(dict):
    """An API-format prompt built node by node: every required widget not given takes its /object_info default."""

    def __init__(self, defaults: dict, required: dict):
        super().__init__()
        self.defaults, self.required = defaults, required

    def add(self, node_id: str, class_type: str, **inputs) -> None:
        values = {k: v for k, v in self.defaults[class_type].items() if k in self.required[class_type]}
        self[node_id] = {"class_type": class_type, "inputs": {**values, **inputs}}


def base_graph(defaults: dict, required: dict, model_name: str, prefix: str) -> Prompt:
    """Loader, the scene encoded, the three prompts and the input latent saved: the part every method shares."""
    g = Prompt(defaults, required)
    add = g.add
    add("1", "AttnEdit_ToyModelLoader", model_name=model_name)
    add("2", "LoadImage", image=SCENE_IMAGE)
    add("3", "VAEEncode", pixels=["2", 0], vae=["1", 2])
    add("4", "CLIPTextEncode", text=SOURCE_TEXT, clip=["1", 1])
    add("5", "CLIPTextEncode", text=TARGET_TEXT, clip=["1", 1])
    add("6", "CLIPTextEncode", text="", clip=["1", 1])
    add("7", "SaveLatent", samples=["3", 0], filename_prefix=f"{prefix}_input")
    return g


def method_graph(defaults: dict, required: dict, model_name: str, method: str) -> dict:
    """The edit by `method`, wired as fixtures/toy_graph.py edit_methods wires it; node SAMPLER is the Edit
    Sampler, "30"/"31" save its edited and source latents, "33" its mask as an image."""
    prefix = f"dit_{model_name.split('.')[0]}_{method}"
    g = base_graph(defaults, required, model_name, prefix)
    add = g.add
    caption, empty = ["4", 0], ["6", 0]
    model = invert_model = ["1", 0]
    invert_prompt, source_prompt, strength, extra = caption, caption, 1.0, {}
    if method in ("fpe", "masactrl"):
        add("10", "AttnEdit_SelfAttentionInjection", model=["1", 0], mode=method, masactrl_start_step=MASACTRL_START)
        model = invert_model = ["10", 0]
        if method == "fpe":  # replayed source: the empty prompt inverts and is the source
            invert_prompt = source_prompt = empty
    elif method == "uam":  # the official recipe: two empty-prompt inversions, nothing pinned
        add("11", "AttnEdit_UniformAttention", model=["1", 0])
        add("10", "AttnEdit_SelfAttentionInjection", model=["11", 0], mode="masactrl", masactrl_start_step=MASACTRL_START)
        add("12", "AttnEdit_AdaptiveMask")
        add("13", "AttnEdit_DDIMInversion", model=["11", 0], latent=["3", 0], positive=empty, cfg=1.0, steps=STEPS,
            strength=1.0)
        model, invert_prompt, source_prompt = ["10", 0], empty, empty
        extra = {"mask_strategy": ["12", 0], "aux_inversion": ["13", 1]}
    elif method == "uam_pinned":  # the pinned recipe: one uniform-attention inversion, source and aux pinned
        add("11", "AttnEdit_UniformAttention", model=["1", 0])
        add("10", "AttnEdit_SelfAttentionInjection", model=["11", 0], mode="masactrl", masactrl_start_step=MASACTRL_START)
        add("12", "AttnEdit_AdaptiveMask", recipe="uniform_pinned")
        model = invert_model = ["10", 0]
        invert_prompt = source_prompt = empty
        extra = {"mask_strategy": ["12", 0]}
    elif method == "edit_mask":
        add("12", "LoadImageMask", image=MASK_IMAGE, channel="alpha")
        extra = {"edit_mask": ["12", 0]}
    elif method == "instant":  # InstDiffEdit inside the edit: half-strength empty inversion, the word named
        add("12", "AttnEdit_InstantMask", clip=["1", 1], target_prompt=TARGET_TEXT, words="circle")
        invert_prompt, strength = empty, 0.5
        extra = {"mask_strategy": ["12", 0]}
    elif method != "plain":
        raise ValueError(method)
    add("14", "AttnEdit_DDIMInversion", model=invert_model, latent=["3", 0], positive=invert_prompt, cfg=1.0,
        steps=STEPS, strength=strength)
    add(SAMPLER, "AttnEdit_EditSampler", model=model, source=source_prompt, target=["5", 0], negative=empty,
        steps=STEPS, seed=0, inversion=["14", 1], **extra)
    add("30", "SaveLatent", samples=[SAMPLER, 0], filename_prefix=f"{prefix}_edited")
    add("31", "SaveLatent", samples=[SAMPLER, 1], filename_prefix=f"{prefix}_source")
    add("32", "MaskToImage", mask=[SAMPLER, 2])
    add("33", "SaveImage", images=["32", 0], filename_prefix=f"{prefix}_mask")
    add("34", "VAEDecode", samples=[SAMPLER, 0], vae=["1", 2])
    add("35", "SaveImage", images=["34", 0], filename_prefix=f"{prefix}_image")
    return g


@pytest.fixture(scope="module")
def run_method(comfy_server, host_model_files, input_images, defaults, required_inputs):
    """run_method(family, method) -> the outputs of that edit, queued once per module (cached here)."""
    results = {}

    def run(family: str, method: str) -> dict:
        if (family, method) not in results:
            name = host_model_files[FAMILIES[family]]
            entry = comfy_server.run(method_graph(defaults, required_inputs, name, method), timeout=300)
            assert entry["status"]["status_str"] == "success", entry["status"]
            image = saved_image(comfy_server, entry, "35")
            assert image.shape == (IMAGE_SIDE, IMAGE_SIDE, 3), image.shape
            mask = saved_image(comfy_server, entry, "33")[..., 0] / 255.0
            assert mask.shape == (IMAGE_SIDE, IMAGE_SIDE)
            results[family, method] = {
                "entry": entry, "report": report_text(entry), "image": image, "mask": mask,
                "input": saved_latent(comfy_server, entry, "7"), "edited": saved_latent(comfy_server, entry, "30"),
                "source": saved_latent(comfy_server, entry, "31")}
        return results[family, method]

    return run


def latent_cells_outside(mask: np.ndarray) -> torch.Tensor:
    """The latent cells (16x16) whose whole 8x8 image patch is outside the mask (mask 0 there)."""
    patches = mask.reshape(LATENT_SIDE, IMAGE_SIDE // LATENT_SIDE, LATENT_SIDE, IMAGE_SIDE // LATENT_SIDE)
    return torch.from_numpy(patches.max(axis=(1, 3)) < 0.5)


def assert_kept_outside(out: dict) -> None:
    """Where the edit's mask is 0 (whole latent cells), the target ends where the source branch does."""
    outside = latent_cells_outside(out["mask"])
    assert outside.any(), "the mask covers every latent cell: nothing to check outside it"
    edited, source = (out[k][0].permute(1, 2, 0)[outside] for k in ("edited", "source"))
    assert rms(edited - source) < SAME * rms(out["input"]), rms(edited - source) / rms(out["input"])


# --------------------------------------------------------------------------------------------------
# The tests


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_edit_reconstructs_the_source_and_moves_the_target(run_method, family):
    out = run_method(family, "plain")
    assert out["input"].shape == out["edited"].shape == (1, 4, LATENT_SIDE, LATENT_SIDE)
    # The pinned source branch is the inversion's trajectory: it ends at the input latent.
    scale = rms(out["input"])
    assert rms(out["source"] - out["input"]) < SAME * scale, rms(out["source"] - out["input"]) / scale
    assert rms(out["edited"] - out["input"]) > MOVED * scale  # the target prompt moved the target branch
    text = out["report"]
    assert f"steps: {STEPS} of {STEPS} (Euler, rectified flow), cfg 7.5, real image (inversion)" in text, text
    assert "injection: none" in text and "mask: none" in text, text
    assert np.all(out["mask"] == 1.0)  # no mask: all ones


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["fpe", "masactrl"])
def test_self_attention_injection_changes_the_edit(run_method, family, mode):
    out, plain = run_method(family, mode), run_method(family, "plain")
    scale = rms(out["input"])
    assert rms(out["source"] - out["input"]) < SAME * scale
    assert rms(out["edited"] - plain["edited"]) > MOVED * scale, f"{family} {mode}: the injection changed nothing"
    text = out["report"]
    assert f"injection: {mode} at " in text, text
    if mode == "fpe":  # the inversion was made with the FPE model and the source prompt: the source is replayed
        assert "source replayed from the inversion" in text, text


@pytest.mark.parametrize("family", FAMILIES)
def test_the_injection_modes_differ(run_method, family):
    fpe, masactrl = run_method(family, "fpe"), run_method(family, "masactrl")
    assert rms(fpe["edited"] - masactrl["edited"]) > MOVED * rms(fpe["input"])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("recipe", ["uam", "uam_pinned"])
def test_uniform_attention_with_the_adaptive_mask(run_method, family, recipe):
    out, plain = run_method(family, recipe), run_method(family, "plain")
    scale = rms(out["input"])
    assert rms(out["edited"] - plain["edited"]) > MOVED * scale
    text = out["report"]
    assert "uniform cross-attention: aux" in text and "injection: masactrl at " in text, text
    assert f"mask: adaptive mask (UAM, {'uniform_pinned' if recipe == 'uam_pinned' else 'two_trajectories'})" in text
    # The MASK output is the share of latent channels the last blended step edited (UAM blends per element):
    # the coverage the report gives is its mean, up to the PNG's 8 bits and the report's rounding.
    coverage = float(re.search(r"mask: adaptive mask .*, covers ([0-9.]+)% of the image", text).group(1)) / 100
    assert 0 < coverage < 1, text
    assert abs(out["mask"].mean() - coverage) <= 0.5 / 255 + 0.0005, (out["mask"].mean(), coverage)
    if recipe == "uam_pinned":  # one inversion; source pinned to it
        assert rms(out["source"] - out["input"]) < SAME * scale
        assert "\npinned to the inversion: source, aux" in text, text
    else:  # two trajectories: nothing pinned, the auxiliary branch ran from the uniform inversion
        assert "\npinned to the inversion:" not in text and "aux ran" in text, text


@pytest.mark.parametrize("family", FAMILIES)
def test_a_user_mask_keeps_the_latent_outside_it(run_method, family):
    out = run_method(family, "edit_mask")
    left = np.zeros((IMAGE_SIDE, IMAGE_SIDE))
    left[:, : IMAGE_SIDE // 2] = 1.0
    np.testing.assert_array_equal(out["mask"], left)  # the MASK came through as drawn
    outside = latent_cells_outside(out["mask"])
    assert outside.sum() == LATENT_SIDE * LATENT_SIDE // 2
    edited, source, inp = (out[k][0].permute(1, 2, 0)[outside] for k in ("edited", "source", "input"))
    scale = rms(out["input"])
    # Outside the mask the target keeps the source exactly at every step: it ends at the input latent.
    assert rms(edited - source) < SAME * scale and rms(edited - inp) < SAME * scale
    inside = out["edited"][0].permute(1, 2, 0)[~outside] - out["input"][0].permute(1, 2, 0)[~outside]
    assert rms(inside) > MOVED * scale  # and inside it the edit moved
    assert "mask: " in out["report"] and "mask: none" not in out["report"], out["report"]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_instant_mask_confines_the_edit(run_method, family):
    # On the toy Flux the prompt is the toy CLIP's tokens (no T5): the words are read there, start token first.
    out = run_method(family, "instant")
    text = out["report"]
    assert "mask: instant mask (InstDiffEdit), covers" in text, text
    assert set(np.unique(out["mask"])) <= {0.0, 1.0}
    assert rms(out["source"] - out["input"]) < SAME * rms(out["input"])  # pinned
    assert_kept_outside(out)


@pytest.mark.parametrize("family", FAMILIES)
def test_inversion_reconstruct_gives_back_the_input_latent(comfy_server, host_model_files, input_images, defaults,
                                                           required_inputs, family):
    name = host_model_files[FAMILIES[family]]
    prefix = f"dit_{family}_reconstruct"
    g = base_graph(defaults, required_inputs, name, prefix)
    add = g.add
    add("14", "AttnEdit_DDIMInversion", model=["1", 0], latent=["3", 0], positive=["4", 0], cfg=1.0, steps=STEPS,
        strength=1.0)
    add("15", "AttnEdit_InversionReconstruct", model=["1", 0], inversion=["14", 1], positive=["4", 0],
        negative=["6", 0], cfg=1.0, pin_source=True)
    add("16", "SaveLatent", samples=["15", 0], filename_prefix=f"{prefix}_out")
    add("17", "VAEDecode", samples=["15", 0], vae=["1", 2])
    add("18", "SaveImage", images=["17", 0], filename_prefix=f"{prefix}_image")
    entry = comfy_server.run(g, timeout=300)
    assert saved_image(comfy_server, entry, "18").shape == (IMAGE_SIDE, IMAGE_SIDE, 3)
    inp, out = saved_latent(comfy_server, entry, "7"), saved_latent(comfy_server, entry, "16")
    assert out.shape == inp.shape
    assert rms(out - inp) < SAME * rms(inp), rms(out - inp) / rms(inp)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_regulation_changes_a_generation_and_only_while_on(comfy_server, host_model_files, defaults,
                                                                     required_inputs, family):
    """Attention Regulation before a stock KSampler: the same seed draws a different image with it (the window
    covers the first half of the steps), and the same image again when its window is empty (end_percent 0)."""
    name = host_model_files[FAMILIES[family]]
    prompt = "a large red circle on the left and a small blue square on the right on a white background"
    outputs = {}
    for label, end in (("on", 0.5), ("off", 0.0), ("plain", None)):
        g = Prompt(defaults, required_inputs)
        add = g.add
        add("1", "AttnEdit_ToyModelLoader", model_name=name)
        add("2", "CLIPTextEncode", text=prompt, clip=["1", 1])
        add("3", "CLIPTextEncode", text="", clip=["1", 1])
        add("4", "EmptyLatentImage", width=IMAGE_SIDE, height=IMAGE_SIDE, batch_size=1)
        model = ["1", 0]
        if end is not None:
            add("5", "AttnEdit_AttentionRegulation", model=["1", 0], clip=["1", 1], prompt=prompt,
                target_words="circle, square", end_percent=end)
            model = ["5", 0]
        add("6", "KSampler", model=model, positive=["2", 0], negative=["3", 0], latent_image=["4", 0], seed=3,
            steps=STEPS, cfg=4.0, sampler_name="euler", scheduler="simple", denoise=1.0)
        add("7", "SaveLatent", samples=["6", 0], filename_prefix=f"dit_{family}_regulation_{label}")
        entry = comfy_server.run(g, timeout=300)
        outputs[label] = saved_latent(comfy_server, entry, "7")
    scale = rms(outputs["plain"])
    assert rms(outputs["on"] - outputs["plain"]) > MOVED * scale
    assert rms(outputs["off"] - outputs["plain"]) < SAME * scale


def test_instant_mask_estimate_on_flux_is_refused_before_compute(comfy_server, host_model_files, input_images,
                                                                defaults, required_inputs):
    name = host_model_files["toy_flux_model"]
    g = base_graph(defaults, required_inputs, name, "dit_flux_estimate")
    add = g.add
    add("14", "AttnEdit_InstantMaskEstimate", model=["1", 0], latent=["3", 0], positive=["5", 0], negative=["6", 0],
        clip=["1", 1], target_prompt=TARGET_TEXT, words="circle", steps=STEPS)
    add("15", "MaskToImage", mask=["14", 0])
    add("16", "SaveImage", images=["15", 0], filename_prefix="dit_flux_estimate")
    prompt_id = comfy_server.queue(g)
    with pytest.raises(RuntimeError) as err:
        comfy_server.wait(prompt_id, timeout=300)
    message = str(err.value)
    assert "AttnEdit_InstantMaskEstimate" in message, message
    assert "not yet the Flux and SD3 DiTs" in message and "'Flux'" in message, message
    entry = comfy_server.get(f"/history/{prompt_id}")[prompt_id]
    (failure,) = [data for kind, data in entry["status"]["messages"] if kind == "execution_error"]
    assert failure["node_id"] == "14"
    # Refused before any compute: no sampler and no model call in the traceback.
    frames = "".join(failure.get("traceback", []))
    assert "comfy/samplers.py" not in frames and "comfy/ldm" not in frames, frames

