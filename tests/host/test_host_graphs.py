"""API-format prompts against the live host: bad settings are refused at validation, before anything runs.

The graph is stock loader/encoder/latent nodes -> AttnEdit_UniformAttention -> AttnEdit_DDIMInversion ->
SaveLatent. The loader names the session's placeholder checkpoint (conftest.py), which exists and so
passes validation, but cannot be loaded: a prompt that passes validation fails at the loader, the first
node to run, so none of these tests needs a model or runs the pack's compute.
"""

from __future__ import annotations

import copy
import time

import pytest

UNIFORM, INVERSION = "4", "5"


def graph(checkpoint: str, uniform: dict | None = None, inversion: dict | None = None) -> dict:
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        UNIFORM: {"class_type": "AttnEdit_UniformAttention",
                  "inputs": {"model": ["1", 0], "scope": "all", "start_percent": 0.0, "end_percent": 1.0,
                             "blocks": "input:7-8, middle, output:3-5"}},
        INVERSION: {"class_type": "AttnEdit_DDIMInversion",
                    "inputs": {"model": [UNIFORM, 0], "latent": ["3", 0], "positive": ["2", 0], "cfg": 1.0,
                               "steps": 2, "scheduler": "ddim_uniform", "strength": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": [INVERSION, 0], "filename_prefix": "attn_edit_host"}},
    }
    prompt = copy.deepcopy(prompt)
    prompt[UNIFORM]["inputs"].update(uniform or {})
    prompt[INVERSION]["inputs"].update(inversion or {})
    return prompt


def _queue_is_empty(server) -> bool:
    q = server.get("/queue")
    return not q["queue_running"] and not q["queue_pending"]


def _wait_idle(server, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not _queue_is_empty(server):
        assert time.monotonic() < deadline, "the host queue did not drain"
        time.sleep(0.1)


NAN = float("nan")  # json.dumps writes NaN, which the host's JSON parser accepts
BAD_SETTINGS = [
    pytest.param(INVERSION, "AttnEdit_DDIMInversion", {"strength": 0.0},
                 "DDIM Inversion: strength is 0.0, outside [0.01, 1.0]", id="inversion-strength-0"),
    pytest.param(INVERSION, "AttnEdit_DDIMInversion", {"strength": 1.5},
                 "DDIM Inversion: strength is 1.5, outside [0.01, 1.0]", id="inversion-strength-1.5"),
    pytest.param(INVERSION, "AttnEdit_DDIMInversion", {"cfg": NAN}, "DDIM Inversion: cfg is nan; give a finite number",
                 id="inversion-cfg-nan"),
    pytest.param(INVERSION, "AttnEdit_DDIMInversion", {"scheduler": "bogus"},
                 "DDIM Inversion: scheduler 'bogus' is not a choice", id="inversion-scheduler-bogus"),
    # The host's own checks, which a node's validate_inputs would switch off for the inputs it takes.
    pytest.param(INVERSION, "AttnEdit_DDIMInversion", {"steps": 0}, "Value 0 smaller than min of 1",
                 id="inversion-steps-0"),
    pytest.param(INVERSION, "AttnEdit_DDIMInversion", {"steps": 1001}, "Value 1001 bigger than max of 1000",
                 id="inversion-steps-1001"),
    pytest.param(INVERSION, "AttnEdit_DDIMInversion", {"steps": "abc"}, "Failed to convert an input value to a INT",
                 id="inversion-steps-abc"),
    pytest.param(UNIFORM, "AttnEdit_UniformAttention", {"blocks": "bogus"}, "unknown block 'bogus'",
                 id="uniform-blocks-bogus"),
    pytest.param(UNIFORM, "AttnEdit_UniformAttention", {"start_percent": 0.6, "end_percent": 0.4},
                 "start_percent (0.6) must be below end_percent (0.4)", id="uniform-start-after-end"),
    pytest.param(UNIFORM, "AttnEdit_UniformAttention", {"end_percent": NAN},
                 "Uniform Cross-Attention (UAM): end_percent is nan", id="uniform-end-nan"),
    pytest.param(UNIFORM, "AttnEdit_UniformAttention", {"scope": "bogus"},
                 "Uniform Cross-Attention (UAM): scope 'bogus' is not a choice", id="uniform-scope-bogus"),
]


@pytest.mark.parametrize("node, class_type, bad, message", BAD_SETTINGS)
def test_bad_setting_is_refused_before_execution(comfy_server, host_model_files, post_prompt, node, class_type, bad,
                                                message):
    _wait_idle(comfy_server)
    history_before = set(comfy_server.get("/history"))
    prompt = graph(host_model_files["placeholder_checkpoint"], **({"inversion": bad} if node == INVERSION else {"uniform": bad}))

    status, body = post_prompt(prompt)

    assert status == 400, f"expected a validation error, got HTTP {status}: {body}"
    assert body["error"]["type"] == "prompt_outputs_failed_validation", body
    # Only the node with the bad setting is blamed: the stock nodes (placeholder checkpoint included) and
    # the other pack node validate, and the downstream nodes are reported without errors of their own.
    assert set(body["node_errors"]) == {node}, body["node_errors"]
    errors = body["node_errors"][node]
    assert errors["class_type"] == class_type
    said = [f"{e['message']}: {e['details']}" for e in errors["errors"]]
    assert any(message in text for text in said), f"{message!r} not in {said}"
    # Refused, not queued: nothing ran and nothing was recorded.
    assert "prompt_id" not in body
    assert _queue_is_empty(comfy_server)
    assert set(comfy_server.get("/history")) == history_before


def test_valid_settings_pass_validation_and_fail_only_at_the_loader(comfy_server, host_model_files, post_prompt):
    """The control: the same graph with good settings is accepted; it then stops at the placeholder
    checkpoint, which shows the refusals above came from the bad settings alone."""
    status, body = post_prompt(graph(host_model_files["placeholder_checkpoint"]))
    assert status == 200, f"HTTP {status}: {body}"
    assert body.get("node_errors") == {}, body
    prompt_id = body["prompt_id"]

    deadline = time.monotonic() + 60
    entry = None
    while time.monotonic() < deadline:
        entry = comfy_server.get(f"/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
            break
        time.sleep(0.2)
    assert entry, f"prompt {prompt_id} never reached /history"
    status = entry["status"]
    assert status["status_str"] == "error", status
    failures = [data for kind, data in status["messages"] if kind == "execution_error"]
    assert len(failures) == 1, status["messages"]
    assert failures[0]["node_id"] == "1" and failures[0]["node_type"] == "CheckpointLoaderSimple", failures[0]
