"""Peak memory of a real-image edit (inversion, then the edit) over one stock generation.

On CUDA: torch's peak allocated memory, reset before each job, in this process. On the CPU there is
no allocator counter, so each job runs in a fresh process (``python -m bench.memory JOB ...``) that
builds the model, then samples its resident memory (/proc/self/statm) every millisecond while the
job runs; the peak includes the weights, as GPU peak memory does. The working-memory ratio (peaks
minus the resident memory just before the job) is reported beside it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

from .common import REPO

JOBS = ("generation", "edit")


class PeakSampler:
    """The highest resident set size (bytes) of this process while the block runs."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.baseline = self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def make_jobs(family: str, steps: int, latent_side: int, device: str):
    """(model, {job: callable}) for the generation and the edit, as perf.py runs them."""
    import nodes as comfy_nodes

    from attention_edit.nodes.edit_sampler import EditSampler
    from attention_edit.nodes.injection import SelfAttentionInjection
    from attention_edit.nodes.inversion import DDIMInversion
    from fixtures import tiny

    model = tiny.build(family)
    latent = tiny.latent(size=latent_side)
    empty, target = tiny.conditioning(family, 1), tiny.conditioning(family, 3)
    fpe = SelfAttentionInjection.execute(model=model, mode="fpe", fpe_ratio=0.8, fpe_max_map_side=0.5,
                                         masactrl_start_step=4, masactrl_start_layer=-1).args[0]

    def generation():
        comfy_nodes.common_ksampler(model, 0, steps, 7.5, "euler", "ddim_uniform", target, empty,
                                    {"samples": latent}, disable_noise=True)

    def edit():  # as the FPE workflow: the patched model inverts, then edits replaying the source
        _, handle = DDIMInversion.execute(model=fpe, latent={"samples": latent}, positive=empty, negative=empty,
                                          cfg=1.0, steps=steps, scheduler="ddim_uniform", strength=1.0).args
        EditSampler.execute(model=fpe, source=empty, target=target, negative=empty, cfg=7.5, steps=steps,
                            scheduler="ddim_uniform", pin_source=True, seed=0, inversion=handle)

    return model, {"generation": generation, "edit": edit}


def measure_in_subprocess(job: str, family: str, steps: int, latent_side: int) -> dict:
    cmd = [sys.executable, "-m", "bench.memory", job, family, str(steps), str(latent_side)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(rec, device: str, model_name: str, family: str, steps: int, latent_side: int) -> None:
    resolution = f"{latent_side * 8}px (latent {latent_side}x{latent_side})"
    if device == "cuda":
        import torch

        _, jobs = make_jobs(family, steps, latent_side, device)
        peaks = {}
        for job in JOBS:
            jobs[job]()  # warm-up: load the model onto the GPU
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            jobs[job]()
            torch.cuda.synchronize()
            peaks[job] = {"peak": torch.cuda.max_memory_allocated(), "baseline": torch.cuda.memory_allocated()}
    else:
        peaks = {job: measure_in_subprocess(job, family, steps, latent_side) for job in JOBS}
    gen, edit = peaks["generation"], peaks["edit"]
    working = (edit["peak"] - edit["baseline"]) / max(gen["peak"] - gen["baseline"], 1)
    rec.add("memory.edit_peak_ratio_vs_generation", edit["peak"] / gen["peak"], "ratio", True, model_name, resolution,
            steps, goal=1.20, edit_peak_mb=round(edit["peak"] / 2**20, 1), generation_peak_mb=round(gen["peak"] / 2**20, 1),
            working_memory_ratio=round(working, 3),
            how="peak allocated (CUDA)" if device == "cuda" else "peak resident memory, fresh process per job")


def main(argv=None) -> int:
    """Child process: build the model, run one job under the sampler, print {"peak", "baseline"} in bytes."""
    job, family, steps, side = (argv or sys.argv[1:])[:4]
    from .common import setup

    setup()
    import torch

    _, jobs = make_jobs(family, int(steps), int(side), "cpu")
    with torch.inference_mode(), PeakSampler() as sampler:
        jobs[job]()
    print(json.dumps({"peak": sampler.peak, "baseline": sampler.baseline}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
