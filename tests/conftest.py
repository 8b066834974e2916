"""Test set-up: the ComfyUI host on sys.path, and the pack importable as `attention_edit`.

The pack is registered as a package without running its __init__ (which needs the host's API), the
way the pure modules are meant to be importable; host tests load __init__ through ComfyUI itself.
"""

import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import comfy_host  # noqa: E402

comfy_host.add_host_to_path()
comfy_host.register_pack()
