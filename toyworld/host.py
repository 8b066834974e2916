"""The process set-up the toy-world programs need: ``python -m toyworld.train`` and ``python -m toyworld.evaluate``.

The trainer (`toyworld.training`) and `toyworld.evaluate` import ComfyUI and the pack as
`attention_edit`, and set neither up when imported: whoever imports them does that first (tests:
tests/conftest.py; benchmarks: bench.common.setup; the CLIs: `setup_host`). Imports only the standard
library, so the CLIs can call it before anything loads torch.
"""

from __future__ import annotations

import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def setup_host() -> None:
    """The ComfyUI host importable and the pack registered as `attention_edit` (as tests and bench do).

    Also makes OpenMP threads wait passively unless OMP_WAIT_POLICY is set: threads that spin while
    waiting stall badly when other processes share the cores (measured here: a 20-step test 35 s with
    spinning, 3.5 s passive, on 2 busy cores). Only effective before torch is loaded, so call this first.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    scripts = str(REPO / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    import comfy_host

    comfy_host.add_host_to_path()
    comfy_host.register_pack()
