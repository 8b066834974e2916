"""Inversion and editing through the live host: ComfyUI's cache keeps the inversion (invert once, edit many)."""

import copy

PROMPT_A = "a large blue circle in the center on a white background"
PROMPT_B = "a large green circle in the center on a white background"


def edit_graph(toy_model: str, target_text: str) -> dict:
    return {
        "1": {"class_type": "AttnEdit_ToyModelLoader", "inputs": {"model_name": toy_model}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": target_text, "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "5": {"class_type": "AttnEdit_DDIMInversion",
              "inputs": {"model": ["1", 0], "latent": ["4", 0], "positive": ["2", 0], "cfg": 1.0, "steps": 5,
                         "scheduler": "ddim_uniform", "strength": 1.0}},
        "6": {"class_type": "AttnEdit_SelfAttentionInjection",
              "inputs": {"model": ["1", 0], "mode": "fpe", "fpe_ratio": 0.8, "fpe_max_map_side": 0.5,
                         "masactrl_start_step": 4, "masactrl_start_layer": -1}},
        "7": {"class_type": "AttnEdit_EditSampler",
              "inputs": {"model": ["6", 0], "source": ["2", 0], "target": ["3", 0], "negative": ["2", 0],
                         "cfg": 7.5, "steps": 5, "scheduler": "ddim_uniform", "pin_source": True, "seed": 0,
                         "inversion": ["5", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "host_edit"}},
    }


def executed_and_cached(entry: dict) -> tuple[set, set]:
    cached = set()
    for kind, data in entry["status"]["messages"]:
        if kind == "execution_cached":
            cached |= set(data["nodes"])
    return set(entry["outputs"]) | {"7"}, cached


def test_changing_only_the_target_prompt_does_not_rerun_inversion(comfy_server, host_model_files):
    toy = host_model_files["toy_model"]
    first = comfy_server.run(edit_graph(toy, PROMPT_A), timeout=300)
    assert comfy_server.output_files(first) and all(f.exists() for f in comfy_server.output_files(first))
    second = comfy_server.run(edit_graph(toy, PROMPT_B), timeout=300)
    _, cached = executed_and_cached(second)
    assert "5" in cached, f"the inversion ran again; cached nodes: {sorted(cached)}"
    assert {"1", "2", "4", "6"} <= cached
    assert "3" not in cached and "7" not in cached  # the changed prompt and the edit did run
    # Re-queuing the identical graph runs nothing new.
    third = comfy_server.run(copy.deepcopy(edit_graph(toy, PROMPT_B)), timeout=300)
    _, cached = executed_and_cached(third)
    assert {"5", "7"} <= cached


def test_runtime_errors_reach_the_user_before_compute(comfy_server, host_model_files):
    graph = edit_graph(host_model_files["toy_model"], PROMPT_A)
    graph["7"]["inputs"]["steps"] = 9  # the inversion used 5
    prompt_id = comfy_server.queue(graph)
    try:
        comfy_server.wait(prompt_id, timeout=300)
    except RuntimeError as e:
        assert "used 5 steps but 9 were asked for" in str(e)
    else:
        raise AssertionError("a step count different from the inversion's must fail")
