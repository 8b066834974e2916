"""Test set-up: the ComfyUI host on sys.path, the pack importable as `attention_edit`, and the
repository root's packages (`fixtures`, `toyworld`, `bench`) importable.

The pack is registered as a package without running its __init__ (which needs the host's API), the
way the pure modules are meant to be importable; host tests load __init__ through ComfyUI itself.
"""

import os
import pathlib
import sys

import pytest

# Spinning OpenMP workers stall when another process holds the cores (the ComfyUI server of the host
# tests, a training run, CI's neighbours): a 20-step training test took 35 s spinning, 3.5 s passive,
# on 2 busy cores. Inherited by the host tests' ComfyUI subprocesses too. Set it yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # last: the pack's nodes/ folder must not hide the host's `nodes` module

import comfy_host  # noqa: E402

comfy_host.add_host_to_path()
comfy_host.register_pack()


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tests run torch on one thread: their tensors are too small to gain from a second one, results do
    not depend on the machine's core count, and a host test's ComfyUI server keeps the other core.
    ATTN_EDIT_TEST_THREADS=n overrides; the previous setting is restored at the end."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("ATTN_EDIT_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(previous)
