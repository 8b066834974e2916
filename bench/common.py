"""What every benchmark shares: the environment, interleaved timing and the result records."""

from __future__ import annotations

import datetime
import logging
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

REPO = pathlib.Path(__file__).resolve().parents[1]
log = logging.getLogger("attention_edit.bench")


def setup() -> None:
    """The host and the pack importable here, as in the tests. The shared helpers (`fixtures`: the tiny
    model builders, the toy-world node calls) come from the repository root, on sys.path for
    ``python -m bench.run`` as for the tests."""
    if str(REPO / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO / "scripts"))
    import comfy_host

    comfy_host.add_host_to_path()
    comfy_host.register_pack()


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu}, {torch.get_num_threads()} threads"


def commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Recorder:
    """Collects result records in the project's JSON format."""

    def __init__(self, device: str):
        import torch

        self.device = device
        self.common = {"device": device_name(device), "torch": torch.__version__, "commit": commit(),
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        self.records: list[dict] = []

    def add(self, metric: str, value: float, unit: str, lower_is_better: bool, model: str, resolution: str,
            steps: int, **extra) -> None:
        record = {"metric": metric, "value": float(value), "unit": unit, "lower_is_better": lower_is_better,
                  "model": model, "resolution": resolution, "steps": steps, **self.common, **extra}
        self.records.append(record)
        log.info("%-45s %12.6g %-8s (%s, %s, %d steps)", metric, value, unit, model, resolution, steps)


def interleaved(runs: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> dict[str, list[float]]:
    """Wall times of each run, measured A B C A B C ... so machine noise hits all alike."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    return statistics.median(times[numerator]) / statistics.median(times[denominator])
