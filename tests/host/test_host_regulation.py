"""Attention regulation in stock sampler graphs on the live host, with the toy model (real CLIP tokenizer)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

PROMPT = "a red circle and a blue square on a white background"
REGULATION = "5"


def regulation_graph(toy_model: str, target_words: str, prefix: str, sampler: str = "KSampler", seed: int = 3) -> dict:
    graph = {
        "1": {"class_type": "AttnEdit_ToyModelLoader", "inputs": {"model_name": toy_model}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        REGULATION: {"class_type": "AttnEdit_AttentionRegulation",
                     "inputs": {"model": ["1", 0], "clip": ["1", 1], "prompt": PROMPT, "target_words": target_words,
                                "end_percent": 0.5, "iterations": 20, "learning_rate": 100.0, "ema": 0.25,
                                "decay": 0.99, "peak_target": 0.9, "share_weight": 80.0, "beta": 0.09,
                                "blocks": "input, output", "map_side": 0.25}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": prefix}},
    }
    if sampler == "KSampler":
        graph["6"] = {"class_type": "KSampler",
                      "inputs": {"model": [REGULATION, 0], "seed": seed, "steps": 6, "cfg": 7.5, "sampler_name": "euler",
                                 "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0],
                                 "latent_image": ["4", 0], "denoise": 1.0}}
    else:
        graph["9"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
        graph["10"] = {"class_type": "BasicScheduler",
                       "inputs": {"model": [REGULATION, 0], "scheduler": "normal", "steps": 6, "denoise": 1.0}}
        graph["6"] = {"class_type": "SamplerCustom",
                      "inputs": {"model": [REGULATION, 0], "add_noise": True, "noise_seed": seed, "cfg": 7.5,
                                 "positive": ["2", 0], "negative": ["3", 0], "sampler": ["9", 0],
                                 "sigmas": ["10", 0], "latent_image": ["4", 0]}}
    return graph


def image(server, entry) -> np.ndarray:
    files = server.output_files(entry)
    assert len(files) == 1 and files[0].exists()
    return np.asarray(Image.open(files[0]).convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("sampler", ["KSampler", "SamplerCustom"])
def test_regulation_in_a_stock_sampler_graph(comfy_server, host_model_files, sampler):
    toy = host_model_files["toy_model"]
    plain = image(comfy_server, comfy_server.run(regulation_graph(toy, "", f"reg_plain_{sampler}", sampler), timeout=300))
    regulated_entry = comfy_server.run(regulation_graph(toy, "circle, square", f"reg_on_{sampler}", sampler), timeout=300)
    regulated = image(comfy_server, regulated_entry)
    assert regulated.shape == plain.shape == (128, 128, 3)
    assert np.abs(regulated - plain).max() > 0  # the regulation changed the image
    # Another seed, then the first again: the regulated model (cached by the host) is reused, and its
    # per-run state starts fresh each run, so the first image comes back exactly.
    other = image(comfy_server, comfy_server.run(regulation_graph(toy, "circle, square", f"reg_seed4_{sampler}", sampler,
                                                                  seed=4), timeout=300))
    again_entry = comfy_server.run(regulation_graph(toy, "circle, square", f"reg_again_{sampler}", sampler), timeout=300)
    assert REGULATION in cached_nodes(again_entry) and "6" not in cached_nodes(again_entry)
    assert np.abs(other - regulated).max() > 0
    assert np.array_equal(image(comfy_server, again_entry), regulated)


def cached_nodes(entry: dict) -> set:
    cached = set()
    for kind, data in entry["status"]["messages"]:
        if kind == "execution_cached":
            cached |= set(data["nodes"])
    return cached


def test_a_word_missing_from_the_prompt_is_reported_before_sampling(comfy_server, host_model_files):
    graph = regulation_graph(host_model_files["toy_model"], "circle, triangle", "reg_missing")
    prompt_id = comfy_server.queue(graph)
    with pytest.raises(RuntimeError) as err:
        comfy_server.wait(prompt_id, timeout=300)
    message = str(err.value)
    assert "AttnEdit_AttentionRegulation" in message and "'triangle' not found in the prompt" in message
    assert "red, circle, and, a, blue, square" in message
