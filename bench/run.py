"""`make bench`: run the benchmarks and write bench/results/<device>.json.

    python -m bench.run [--device cpu|cuda] [--only SUITE ...] [--repeats 5] [--model FILE] [--flow-model FILE]

Suites: perf dit_perf regulation quality probes flow_quality (default: all).

perf and regulation time the full-size SD1.5 architecture; dit_perf the Flux.1 and SD3.5 architectures
(bench/dit_perf.py); quality measures edits on the toy world
(models/toyworld.safetensors, CPU always: the toy model is tiny); probes runs the FPE paper's probes on it
(per layer, how much of the source layout swapping in its self-attention restores; per word, where its
cross-attention goes: bench/probes.py); flow_quality measures the same edits on the toy flow world
(models/toyflow.safetensors, a Flux-shaped DiT, `python -m toyworld.train --stage flow`), recorded as toyflow.*.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time

from .common import REPO, Recorder, setup

SUITES = ("perf", "dit_perf", "regulation", "quality", "probes", "flow_quality")


def suite_of(metric: str) -> str:
    if metric.startswith("toyflow."):
        return "flow_quality"
    if metric.startswith(("flux.", "sd35.")):
        return "dit_perf"
    if metric.startswith("toyworld.probe."):
        return "probes"
    if metric.startswith("toyworld."):
        return "quality"
    return "regulation" if metric.startswith("regulation.") else "perf"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--only", nargs="*", choices=SUITES, default=list(SUITES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=None, help="result file (default bench/results/<device>.json)")
    parser.add_argument("--model", default=None, help="toy-world model file for the quality suite "
                        "(default models/toyworld.safetensors)")
    parser.add_argument("--flow-model", default=None, help="toy flow world model file for the flow_quality suite "
                        "(default models/toyflow.safetensors)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny models, 2 steps, 1 repeat: checks the benchmarks run (CI); numbers mean nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    setup()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch sees no CUDA device")
    rec = Recorder(args.device)
    started = time.perf_counter()
    if "perf" in args.only:
        from . import perf

        if args.smoke:
            perf.run(rec, args.device, steps=2, latent_side=16, edit_latent_side=16, repeats=1, family="sd15")
        else:
            perf.run(rec, args.device, repeats=args.repeats)
    if "dit_perf" in args.only:
        from . import dit_perf

        if args.smoke:
            dit_perf.run(rec, args.device, steps=2, latent_side=16, repeats=1, smoke=True)
        else:
            dit_perf.run(rec, args.device, repeats=args.repeats)
    if "regulation" in args.only:
        from . import regulation

        if args.smoke:
            regulation.run(rec, args.device, steps=2, latent_side=16, repeats=1, family="sd15")
        else:
            regulation.run(rec, args.device, repeats=args.repeats)
    if "quality" in args.only or "probes" in args.only:
        from attention_edit.toyworld import model as toymodel

        model = type(REPO)(args.model) if args.model else REPO / "models" / toymodel.TRAINED_FILE_NAME
        if not model.is_file():
            parser.error(f"the quality and probes suites need the toy-world model: {model} does not exist "
                         "(train it with python -m toyworld.train)")
    if "quality" in args.only:
        from . import quality

        if args.smoke:
            quality.run(rec, model, steps=4, n_recon=1, n_per_kind=1, n_gen=2, n_attention=1, n_regulation=1,
                        gen_steps=3, kinds=("recolour", "remove"))
        else:
            quality.run(rec, model)
    if "flow_quality" in args.only:
        from attention_edit.toyworld import model as toymodel

        from . import quality

        flow = type(REPO)(args.flow_model) if args.flow_model else REPO / "models" / toymodel.TRAINED_FLOW_FILE_NAME
        if not flow.is_file():
            parser.error(f"the flow_quality suite needs the toy flow world: {flow} does not exist "
                         "(train it with python -m toyworld.train --stage flow)")
        if args.smoke:
            quality.run(rec, flow, steps=4, n_recon=1, n_per_kind=1, n_gen=2, n_attention=0, n_regulation=1,
                        gen_steps=3, kinds=("recolour", "remove"))
        else:
            quality.run(rec, flow)
    if "probes" in args.only:
        from . import probes

        if args.smoke:
            probes.run(rec, model, steps=3, n_per_kind=1, n_attention=1, kinds=("recolour",))
        else:
            probes.run(rec, model)
    name = "cpu" if args.device == "cpu" else re.sub(r"[^a-z0-9]+", "-", rec.common["device"].lower()).strip("-")
    out = REPO / "bench" / "results" / f"{name}.json" if args.output is None else args.output
    out = type(REPO)(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = rec.records
    if args.output is None and not args.smoke and out.is_file():
        # A run of some suites keeps the other suites' records of the last full run.
        records = [r for r in json.loads(out.read_text()) if suite_of(r["metric"]) not in args.only] + records
    out.write_text(json.dumps(records, indent=1) + "\n")
    if args.output is None and not args.smoke:
        from . import table

        table.update_readme(table.tables(sorted(out.parent.glob("*.json"))))
        logging.info("README benchmark tables updated from %s", out.parent.relative_to(REPO))
    logging.info("%d records in %.0f s on %s -> %s", len(rec.records), time.perf_counter() - started,
                 rec.common["device"], out)
    for r in rec.records:
        goal = r.get("goal")
        status = "" if goal is None else f"  (goal {goal}: {'met' if r['value'] <= goal else 'NOT met'})"
        print(f"{r['metric']:<45} {r['value']:.4g} {r['unit']}{status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
