"""The Edit Sampler's report through the live host: an edit that can do nothing is queued on the toy-world model,
and the report in the node's UI output (the history the frontend reads) says why (engine/report.py's HINTs)."""

from __future__ import annotations

import pytest

SOURCE_TEXT = "a large red circle in the center on a white background"
TARGET_TEXT = "a large blue circle in the center on a white background"
STEPS = 5
SAMPLER = "9"


def edit_graph(toy_model: str, injection: dict | None = None, mask: dict | None = None) -> dict:
    """Toy model -> Edit Prompts (the target typed once) -> DDIM inversion of an empty latent -> Edit Sampler,
    with an FPE injection on the model and/or an instant mask reading Edit Prompts' target."""
    graph = {
        "1": {"class_type": "AttnEdit_ToyModelLoader", "inputs": {"model_name": toy_model}},
        "2": {"class_type": "AttnEdit_EditPrompts",
              "inputs": {"clip": ["1", 1], "source": "", "target": TARGET_TEXT, "negative": ""}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "4": {"class_type": "AttnEdit_DDIMInversion",
              "inputs": {"model": ["1", 0], "latent": ["3", 0], "positive": ["2", 0], "cfg": 1.0, "steps": STEPS,
                         "scheduler": "ddim_uniform", "strength": 1.0}},
        SAMPLER: {"class_type": "AttnEdit_EditSampler",
                  "inputs": {"model": ["1", 0], "source": ["2", 0], "target": ["2", 1], "negative": ["2", 2],
                             "cfg": 7.5, "steps": STEPS, "scheduler": "ddim_uniform", "pin_source": True, "seed": 0,
                             "inversion": ["4", 1]}},
        "10": {"class_type": "SaveLatent", "inputs": {"samples": [SAMPLER, 0], "filename_prefix": "report_host"}},
    }
    if injection is not None:
        graph["5"] = {"class_type": "AttnEdit_SelfAttentionInjection",
                      "inputs": {"model": ["1", 0], "mode": "fpe", "fpe_ratio": 0.8, "fpe_max_map_side": 0.5,
                                 "masactrl_start_step": 4, "masactrl_start_layer": -1, **injection}}
        graph[SAMPLER]["inputs"]["model"] = ["5", 0]
    if mask is not None:
        graph["6"] = {"class_type": "AttnEdit_InstantMask",
                      "inputs": {"prompts": ["2", 3], "target_prompt": "", "words": "", "map_side": 0.25,
                                 "object_similarity": 0.9, "background_similarity": 0.6, "blur_passes": 2,
                                 "threshold": 0.2, "start_map": "direct", **mask}}
        graph[SAMPLER]["inputs"]["mask_strategy"] = ["6", 0]
    return graph


def report_of(server, graph: dict) -> str:
    entry = server.run(graph, timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    text = "\n".join(entry["outputs"].get(SAMPLER, {}).get("text", []))
    assert text.startswith("Edit report"), f"the Edit Sampler returned no report: {entry['outputs']}"
    return text


def hint_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("HINT: ")]


def test_fpe_covering_every_step_is_reported(comfy_server, host_model_files):
    toy = host_model_files["toy_model"]
    text = report_of(comfy_server, edit_graph(toy, injection={"fpe_ratio": 1.0, "fpe_max_map_side": 1.0}))
    assert f"every step ({STEPS} of {STEPS})" in text, text
    assert any("FPE injects at every step" in h for h in hint_lines(text)), text
    # The same edit with the default window: the injection leaves steps free, and no such hint.
    usual = report_of(comfy_server, edit_graph(toy, injection={"fpe_ratio": 0.6}))
    assert "injection: fpe at" in usual and not any("FPE injects at every step" in h for h in hint_lines(usual)), usual


def test_a_mask_of_zero_area_is_reported(comfy_server, host_model_files):
    toy = host_model_files["toy_model"]
    # threshold 1.0: no point of the min-max normalised map exceeds it, the mask is empty.
    text = report_of(comfy_server, edit_graph(toy, mask={"words": "circle", "threshold": 1.0}))
    assert "mask: instant mask (InstDiffEdit), covers 0.0% of the image" in text, text
    assert any("zero area" in h for h in hint_lines(text)), text
    assert any("almost the source" in h for h in hint_lines(text)), text  # and so nothing moved
    usual = report_of(comfy_server, edit_graph(toy, mask={"words": "circle"}))
    assert not any("zero area" in h for h in hint_lines(usual)), usual


def test_a_word_not_in_the_prompt_is_named_to_the_user(comfy_server, host_model_files):
    graph = edit_graph(host_model_files["toy_model"], mask={"words": "dog"})
    prompt_id = comfy_server.queue(graph)
    with pytest.raises(RuntimeError, match="'dog' is not in the prompt"):
        comfy_server.wait(prompt_id, timeout=300)
