"""Bad input over the live host's HTTP API, with the toy model: the pack's own message reaches the user, and the
host is unharmed by it (the next good prompt runs and gives the same image as a good run before the bad one).

Validation-time refusals come back as HTTP 400 with the pack's message in node_errors[node]["errors"][i]["details"];
execution-time ones as an execution_error in /history naming the node. The same classes as unit tests are in
tests/test_bad_input.py; the inversion node's own validation refusals are in test_host_graphs.py.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from PIL import Image

PROMPT_B = "a large green circle in the center on a white background"
LOADER, EMPTY, TARGET, LATENT, INVERSION, INJECTION, EDIT, DECODE, SAVE = "1", "2", "3", "4", "5", "6", "7", "8", "9"
MASK, UNIFORM, CHANGE, INVERSION_PROMPT = "10", "11", "12", "13"
NAN = float("nan")  # json.dumps writes NaN, which the host's JSON parser accepts


# --- graph builders -----------------------------------------------------------------------------------------------

def edit_graph(toy: str, *, inversion_text: str = "", batch: int = 1, mode: str = "fpe") -> dict:
    """Toy model -> DDIM inversion (of an empty latent, 5 steps) -> injection -> Edit Sampler -> decode -> save."""
    return {
        LOADER: {"class_type": "AttnEdit_ToyModelLoader", "inputs": {"model_name": toy}},
        EMPTY: {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": [LOADER, 1]}},
        TARGET: {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT_B, "clip": [LOADER, 1]}},
        LATENT: {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": batch}},
        INVERSION_PROMPT: {"class_type": "CLIPTextEncode", "inputs": {"text": inversion_text, "clip": [LOADER, 1]}},
        INVERSION: {"class_type": "AttnEdit_DDIMInversion",
                    "inputs": {"model": [LOADER, 0], "latent": [LATENT, 0], "positive": [INVERSION_PROMPT, 0], "cfg": 1.0,
                               "steps": 5, "scheduler": "ddim_uniform", "strength": 1.0}},
        INJECTION: {"class_type": "AttnEdit_SelfAttentionInjection",
                    "inputs": {"model": [LOADER, 0], "mode": mode, "fpe_ratio": 0.8, "fpe_max_map_side": 0.5,
                               "masactrl_start_step": 4, "masactrl_start_layer": -1}},
        EDIT: {"class_type": "AttnEdit_EditSampler",
               "inputs": {"model": [INJECTION, 0], "source": [EMPTY, 0], "target": [TARGET, 0], "negative": [EMPTY, 0],
                          "cfg": 7.5, "steps": 5, "scheduler": "ddim_uniform", "pin_source": True, "seed": 0,
                          "inversion": [INVERSION, 1]}},
        DECODE: {"class_type": "VAEDecode", "inputs": {"samples": [EDIT, 0], "vae": [LOADER, 2]}},
        SAVE: {"class_type": "SaveImage", "inputs": {"images": [DECODE, 0], "filename_prefix": "bad_input"}},
    }


def uam_graph(toy: str, batch: int = 1) -> dict:
    """The UAM recipe: uniform attention (inversion_and_aux) before the inversion, MasaCtrl on the edit model,
    the adaptive mask as the Edit Sampler's mask strategy, source pinned."""
    graph = edit_graph(toy, batch=batch, mode="masactrl")
    graph[UNIFORM] = {"class_type": "AttnEdit_UniformAttention",
                      "inputs": {"model": [LOADER, 0], "scope": "inversion_and_aux", "start_percent": 0.0,
                                 "end_percent": 1.0, "blocks": "all"}}
    graph[INVERSION]["inputs"]["model"] = [UNIFORM, 0]
    graph[INJECTION]["inputs"]["model"] = [UNIFORM, 0]
    graph[MASK] = {"class_type": "AttnEdit_AdaptiveMask",
                   "inputs": {"lambda_max": 0.5, "t_mask": 1000.0, "dilation": "edit_region", "blend_source": False,
                              "recipe": "uniform_pinned"}}
    graph[EDIT]["inputs"]["mask_strategy"] = [MASK, 0]
    return graph


def instant_mask_graph(toy: str, words: str = "green") -> dict:
    """The edit graph with InstDiffEdit's instant mask (on the target prompt) as the mask strategy."""
    graph = edit_graph(toy)
    graph[MASK] = {"class_type": "AttnEdit_InstantMask",
                   "inputs": {"clip": [LOADER, 1], "target_prompt": PROMPT_B, "words": words, "map_side": 0.25,
                              "object_similarity": 0.9, "background_similarity": 0.6, "blur_passes": 2,
                              "threshold": 0.2}}
    graph[EDIT]["inputs"]["mask_strategy"] = [MASK, 0]
    return graph


def area_target_graph(toy: str) -> dict:
    """The edit graph with the target through stock ConditioningSetArea, and an inversion no other test makes."""
    graph = edit_graph(toy, inversion_text="a picture never inverted before")
    graph[CHANGE] = {"class_type": "ConditioningSetArea",
                     "inputs": {"conditioning": [TARGET, 0], "width": 64, "height": 64, "x": 0, "y": 0,
                                "strength": 1.0}}
    graph[EDIT]["inputs"]["target"] = [CHANGE, 0]
    return graph


def changed_model_graph(toy: str, node: dict) -> dict:
    """Invert with the toy model, edit with the same model after a stock node (`node`, fed [LOADER, 0])."""
    graph = edit_graph(toy)
    graph[CHANGE] = node
    graph[INJECTION]["inputs"]["model"] = [CHANGE, 0]
    return graph


def regulation_graph(toy: str) -> dict:
    """Toy model -> Attention Regulation -> stock KSampler (5 steps) -> decode -> save."""
    return {
        LOADER: {"class_type": "AttnEdit_ToyModelLoader", "inputs": {"model_name": toy}},
        EMPTY: {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": [LOADER, 1]}},
        TARGET: {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT_B, "clip": [LOADER, 1]}},
        LATENT: {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        MASK: {"class_type": "AttnEdit_AttentionRegulation",
               "inputs": {"model": [LOADER, 0], "clip": [LOADER, 1], "prompt": PROMPT_B, "target_words": "circle",
                          "end_percent": 0.5, "iterations": 5, "learning_rate": 100.0, "ema": 0.25, "decay": 0.99,
                          "peak_target": 0.9, "share_weight": 80.0, "beta": 0.09, "blocks": "input, output",
                          "map_side": 0.25}},
        EDIT: {"class_type": "KSampler",
               "inputs": {"model": [MASK, 0], "seed": 3, "steps": 5, "cfg": 7.5, "sampler_name": "euler",
                          "scheduler": "normal", "positive": [TARGET, 0], "negative": [EMPTY, 0],
                          "latent_image": [LATENT, 0], "denoise": 1.0}},
        DECODE: {"class_type": "VAEDecode", "inputs": {"samples": [EDIT, 0], "vae": [LOADER, 2]}},
        SAVE: {"class_type": "SaveImage", "inputs": {"images": [DECODE, 0], "filename_prefix": "bad_input_reg"}},
    }


def with_input(graph: dict, node: str, **inputs) -> dict:
    changed = {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in graph.items()}
    changed[node]["inputs"].update(inputs)
    return changed


# --- running prompts ----------------------------------------------------------------------------------------------

_runs = itertools.count()


def saved_as_new(graph: dict) -> dict:
    """The graph with a filename prefix no run has used, so its SaveImage writes new files."""
    graph = with_input(graph, SAVE)
    graph[SAVE]["inputs"]["filename_prefix"] = f"{graph[SAVE]['inputs']['filename_prefix']}_{next(_runs):03d}"
    return graph


def saved(server, graph: dict) -> tuple[list[np.ndarray], set]:
    """Run a good graph: the pixels of the images it saved, and the nodes the host took from its cache."""
    entry = server.run(saved_as_new(graph), timeout=300)
    files = server.output_files(entry)
    assert files and all(f.exists() for f in files), entry["outputs"]
    pixels = [np.asarray(Image.open(f).convert("RGB"), dtype=np.int16) for f in files]
    return pixels, cached_nodes(entry["status"]["messages"])


def images(server, graph: dict) -> list[np.ndarray]:
    return saved(server, graph)[0]


def cached_nodes(messages: list) -> set:
    return set().union(*(data["nodes"] for kind, data in messages if kind == "execution_cached"))


def finished(server, prompt_id: str, timeout: float = 300.0) -> dict:
    """The /history entry of a queued prompt once it is done, failed or not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = server.get(f"/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
            return entry
        time.sleep(0.2)
    raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout}s")


def execution_error(server, post_prompt, graph: dict) -> tuple[dict, set]:
    """Queue a graph that passes validation and fails while running: its execution_error message, and the
    nodes the host took from its cache in that prompt."""
    status, body = post_prompt(saved_as_new(graph))
    assert status == 200, f"expected the prompt to be queued, got HTTP {status}: {body}"
    entry = finished(server, body["prompt_id"])
    messages = entry["status"]["messages"]
    errors = [data for kind, data in messages if kind == "execution_error"]
    assert entry["status"]["status_str"] == "error" and len(errors) == 1, messages
    return errors[0], cached_nodes(messages)


def refusal(status: int, body: dict, node: str, class_type: str) -> list[str]:
    """Assert a validation refusal blaming `node` alone; the texts of its errors ("message: details")."""
    assert status == 400, f"expected a validation error, got HTTP {status}: {body}"
    assert body["error"]["type"] == "prompt_outputs_failed_validation", body
    assert "prompt_id" not in body, body
    assert set(body["node_errors"]) == {node}, body["node_errors"]
    errors = body["node_errors"][node]
    assert errors["class_type"] == class_type, errors
    return [f"{e['message']}: {e['details']}" for e in errors["errors"]]


def assert_unharmed(server, graph: dict, before: list[np.ndarray]) -> None:
    """The good graph still runs after the bad prompt and saves the same pixels as before it.

    In an edit from an inversion the Edit Sampler's seed is unused: a new one makes the host run the edit again
    (not take it from its cache), on the models and inversion the bad prompt may have touched.
    """
    rerun = with_input(graph, EDIT)
    edits = graph[EDIT]["class_type"] == "AttnEdit_EditSampler"
    if edits:
        rerun[EDIT]["inputs"]["seed"] = 1000 + next(_runs)
    after, cached = saved(server, rerun)
    if edits:
        assert EDIT not in cached, f"the edit was not run again; cached: {sorted(cached)}"
    assert len(after) == len(before)
    for a, b in zip(after, before):
        assert a.shape == b.shape and np.array_equal(a, b), "the good graph's image changed after the bad prompt"


# --- tests ----------------------------------------------------------------------------------------------------------

def test_a_batch_of_two_through_the_uam_recipe_edits_both_images(comfy_server, host_model_files):
    edited = images(comfy_server, uam_graph(host_model_files["toy_model"], batch=2))
    assert len(edited) == 2
    assert all(image.shape == (128, 128, 3) for image in edited)


def test_area_conditioning_fails_at_the_edit_sampler_before_the_inversion_runs(comfy_server, host_model_files,
                                                                               post_prompt):
    toy = host_model_files["toy_model"]
    before = images(comfy_server, edit_graph(toy))

    error, cached = execution_error(comfy_server, post_prompt, area_target_graph(toy))

    assert (error["node_id"], error["node_type"]) == (EDIT, "AttnEdit_EditSampler"), error
    assert "'target' has area conditioning" in error["exception_message"], error["exception_message"]
    # The inversion is a lazy input, asked for only after the prompts are checked: it neither ran nor came
    # from the cache (no other prompt inverts with this graph's inversion prompt).
    assert INVERSION not in error["executed"], error["executed"]
    assert INVERSION not in cached, cached
    assert_unharmed(comfy_server, edit_graph(toy), before)


NAN_INPUTS = [
    pytest.param(edit_graph, EDIT, "AttnEdit_EditSampler", "Edit Sampler (source + target branches)", "cfg",
                 id="edit-sampler-cfg"),
    pytest.param(instant_mask_graph, MASK, "AttnEdit_InstantMask", "Instant Attention Mask (InstDiffEdit)",
                 "threshold", id="instant-mask-threshold"),
    pytest.param(edit_graph, INJECTION, "AttnEdit_SelfAttentionInjection", "Self-Attention Injection (FPE / MasaCtrl)",
                 "fpe_max_map_side", id="injection-fpe-max-map-side"),
    pytest.param(regulation_graph, MASK, "AttnEdit_AttentionRegulation", "Attention Regulation", "map_side",
                 id="regulation-map-side"),
    pytest.param(uam_graph, MASK, "AttnEdit_AdaptiveMask", "Adaptive Edit Mask (UAM)", "t_mask",
                 id="adaptive-mask-t-mask"),
    pytest.param(uam_graph, MASK, "AttnEdit_AdaptiveMask", "Adaptive Edit Mask (UAM)", "lambda_max",
                 id="adaptive-mask-lambda-max"),
]


@pytest.mark.parametrize("build, node, class_type, display, name", NAN_INPUTS)
def test_nan_is_refused_at_validation_naming_the_input(comfy_server, host_model_files, post_prompt, build, node,
                                                       class_type, display, name):
    good = build(host_model_files["toy_model"])
    before = images(comfy_server, good)

    said = refusal(*post_prompt(with_input(good, node, **{name: NAN})), node, class_type)

    message = f"{display}: {name} is nan; give a finite number"
    assert any(message in text for text in said), f"{message!r} not in {said}"
    assert_unharmed(comfy_server, good, before)


def test_inversion_steps_above_the_maximum_are_refused_by_the_hosts_range_check(comfy_server, host_model_files,
                                                                                post_prompt):
    good = edit_graph(host_model_files["toy_model"])
    before = images(comfy_server, good)

    said = refusal(*post_prompt(with_input(good, INVERSION, steps=1001)), INVERSION, "AttnEdit_DDIMInversion")

    assert any("Value 1001 bigger than max of 1000" in text and "steps" in text for text in said), said
    assert_unharmed(comfy_server, good, before)


CHANGED_MODELS = [
    pytest.param({"class_type": "ModelSamplingDiscrete",
                  "inputs": {"model": [LOADER, 0], "sampling": "v_prediction", "zsnr": False}},
                 "model sampling", id="model-sampling-discrete-v-prediction"),
    pytest.param({"class_type": "ModelMergeSimple", "inputs": {"model1": [LOADER, 0], "model2": [LOADER, 0], "ratio": 0.5}},
                 "weight patches", id="model-merge-simple-with-itself"),
]


@pytest.mark.parametrize("change, what", CHANGED_MODELS)
def test_editing_with_a_changed_model_says_what_differs_from_the_inversions(comfy_server, host_model_files,
                                                                            post_prompt, change, what):
    toy = host_model_files["toy_model"]
    before = images(comfy_server, edit_graph(toy))

    error, _ = execution_error(comfy_server, post_prompt, changed_model_graph(toy, change))

    assert (error["node_id"], error["node_type"]) == (EDIT, "AttnEdit_EditSampler"), error
    assert "this inversion was made with another model" in error["exception_message"], error["exception_message"]
    assert what in error["exception_message"], error["exception_message"]
    assert_unharmed(comfy_server, edit_graph(toy), before)


def test_a_literal_where_a_model_link_belongs_is_named_not_an_attribute_error(comfy_server, host_model_files,
                                                                              post_prompt):
    good = edit_graph(host_model_files["toy_model"])
    before = images(comfy_server, good)
    bad = saved_as_new(with_input(good, INVERSION, model="abc"))

    status, body = post_prompt(bad)
    if status == 400:  # the host refused it itself: it must name the input
        said = refusal(status, body, INVERSION, "AttnEdit_DDIMInversion")
        assert any("model" in text for text in said), said
    else:
        assert status == 200, f"HTTP {status}: {body}"
        entry = finished(comfy_server, body["prompt_id"])
        errors = [data for kind, data in entry["status"]["messages"] if kind == "execution_error"]
        assert len(errors) == 1, entry["status"]["messages"]
        error = errors[0]
        assert (error["node_id"], error["node_type"]) == (INVERSION, "AttnEdit_DDIMInversion"), error
        assert error["exception_type"] != "AttributeError" and "has no attribute" not in error["exception_message"], error
        assert "'model' must be connected to a MODEL output" in error["exception_message"], error["exception_message"]
    assert_unharmed(comfy_server, good, before)


BOGUS_CHOICES = [
    pytest.param(edit_graph, EDIT, "AttnEdit_EditSampler", "scheduler", id="edit-sampler-scheduler"),
    pytest.param(edit_graph, INJECTION, "AttnEdit_SelfAttentionInjection", "mode", id="injection-mode"),
    pytest.param(uam_graph, MASK, "AttnEdit_AdaptiveMask", "dilation", id="adaptive-mask-dilation"),
]


@pytest.mark.parametrize("build, node, class_type, name", BOGUS_CHOICES)
def test_a_bogus_choice_is_refused_at_validation(comfy_server, host_model_files, post_prompt, build, node,
                                                 class_type, name):
    good = build(host_model_files["toy_model"])
    before = images(comfy_server, good)

    said = refusal(*post_prompt(with_input(good, node, **{name: "bogus"})), node, class_type)

    assert any(f"{name} 'bogus' is not a choice" in text for text in said), said
    assert_unharmed(comfy_server, good, before)


def test_an_instant_mask_word_missing_from_the_prompt_fails_naming_the_word(comfy_server, host_model_files,
                                                                            post_prompt):
    good = instant_mask_graph(host_model_files["toy_model"])
    before = images(comfy_server, good)

    error, _ = execution_error(comfy_server, post_prompt, with_input(good, MASK, words="triangle"))

    assert (error["node_id"], error["node_type"]) == (MASK, "AttnEdit_InstantMask"), error
    assert "'triangle' is not in the prompt" in error["exception_message"], error["exception_message"]
    assert_unharmed(comfy_server, good, before)
