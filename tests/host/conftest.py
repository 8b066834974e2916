"""Host tests: one ComfyUI 0.3.75 subprocess per pytest session, with the pack in its custom_nodes/.

The server is a separate process (scripts/comfy_host.py ComfyServer) on a free loopback port, in a
fresh base directory under pytest's tmp_path_factory; it starts at most once per session, only when a
host test asks for it, and is stopped by its pid at the end of the session. The pytest process itself
only has the host on sys.path (tests/conftest.py), so these tests run fine beside the unit tests.
"""

from __future__ import annotations

import json
import pathlib
import time
import urllib.error
import urllib.request

import pytest

import comfy_host

# An existing (but unloadable) checkpoint file: stock loaders that reference it pass the host's
# validation, so a graph's validation errors come only from the nodes under test.
PLACEHOLDER_CHECKPOINT = "attn_edit_placeholder.safetensors"
WORKFLOW_DIR = comfy_host.REPO / "workflows"


def workflow_checkpoints() -> list[str]:
    """The checkpoint names the example workflows' CheckpointLoaderSimple nodes select (their ckpt_name widget)."""
    names = set()
    for wf_file in sorted(WORKFLOW_DIR.glob("*.json")):
        for node in json.loads(wf_file.read_text()).get("nodes", []):
            if node.get("type") == "CheckpointLoaderSimple" and node.get("widgets_values"):
                names.add(node["widgets_values"][0])
    return sorted(names)


def write_model_files(base: pathlib.Path) -> dict:
    """Model files the host tests refer to, written before the server starts (it lists folders at start).

    A placeholder checkpoint (a valid safetensors file that no loader can turn into a model), the same
    placeholder under each checkpoint name the example workflows select (a user who loads one has that
    checkpoint; the frontend marks a loader whose file the host does not list as an error), and the
    toy-world models for graphs that really run (the UNet toy world, the toy flow world and the SD3.5-shaped toy).
    """
    import torch
    from safetensors.torch import save_file

    from attention_edit.toyworld.model import FLUX, SD3, demo_dit_file, demo_model_file

    checkpoints = base / "models" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    save_file({"placeholder": torch.zeros(1)}, str(checkpoints / PLACEHOLDER_CHECKPOINT))
    referenced = workflow_checkpoints()
    for name in referenced:
        save_file({"placeholder": torch.zeros(1)}, str(checkpoints / name))
    # The toy-world model in the pack's own models/ folder (trained if present, else seeded random).
    toy = pathlib.Path(demo_model_file(str(comfy_host.REPO / "models"))).name
    # The DiT toy models there: the toy flow world (Flux-shaped; trained if present) and an SD3.5-shaped one (random).
    flux = demo_dit_file(comfy_host.REPO / "models", FLUX)
    sd3 = demo_dit_file(comfy_host.REPO / "models", SD3)
    return {"placeholder_checkpoint": PLACEHOLDER_CHECKPOINT, "toy_model": toy, "toy_flux_model": flux,
            "toy_sd3_model": sd3, "workflow_checkpoints": referenced}


@pytest.fixture(scope="session")
def host_base(tmp_path_factory) -> pathlib.Path:
    return comfy_host.prepare_base_directory(tmp_path_factory.mktemp("comfy_base"))


@pytest.fixture(scope="session")
def host_model_files(host_base) -> dict:
    return write_model_files(host_base)


@pytest.fixture(scope="session")
def comfy_server(host_base, host_model_files):
    t0 = time.monotonic()
    server = comfy_host.ComfyServer(host_base).start(timeout=120)
    server.start_seconds = time.monotonic() - t0
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def startup_log(comfy_server) -> str:
    """The host's log up to the point where it serves: everything the pack's import printed."""
    log = comfy_server.log()
    marker = "To see the GUI go to"
    assert marker in log, f"the host log has no start-up banner:\n{log[-4000:]}"
    return log[: log.index(marker)]


@pytest.fixture(scope="session")
def object_info(comfy_server) -> dict:
    return comfy_server.get("/object_info")


def post_json(server, path: str, payload: dict) -> tuple[int, dict]:
    """POST and return (HTTP status, parsed body), error statuses included (ComfyServer.post raises)."""
    req = urllib.request.Request(server.url + path, data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")
        try:
            return e.code, json.loads(body)
        except json.JSONDecodeError:
            return e.code, {"raw": body}


@pytest.fixture
def post_prompt(comfy_server):
    """post_prompt(prompt) -> (status, body) of POST /prompt on the session's server."""
    return lambda prompt: post_json(comfy_server, "/prompt", {"prompt": prompt})
