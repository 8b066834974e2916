"""`make bench`: run the benchmarks and write bench/results/<device>.json.

    python -m bench.run [--device cpu|cuda] [--only SUITE ...] [--repeats 5] [--model FILE] [--flow-model FILE]
                        [--model256 FILE] [--per-kind N]

Suites: perf dit_perf regulation quality probes flow_quality quality256 probes256 (default: all).

perf and regulation time the full-size SD1.5 architecture; dit_perf the Flux.1 and SD3.5 architectures
(bench/dit_perf.py); quality measures edits on the toy world
(models/toyworld.safetensors, CPU always: the toy model is tiny); probes runs the FPE paper's probes on it
(per layer, how much of the source layout swapping in its self-attention restores; per word, where its
cross-attention goes: bench/probes.py); flow_quality measures the same edits on the toy flow world
(models/toyflow.safetensors, a Flux-shaped DiT, `python -m toyworld.train --stage flow`), recorded as toyflow.*;
quality256 and probes256 measure the same on the toy world drawn at 256 px (models/toyworld256.safetensors: 32x32
latents, so the 1/4-side attention maps are 8x8), recorded as toyworld256.*.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time

from .common import REPO, Recorder, setup

SUITES = ("perf", "dit_perf", "regulation", "quality", "probes", "flow_quality", "quality256", "probes256")


# quality256's sample, sized to run in about 40 minutes on these 2 CPU cores (every image costs 4x the 128-px
# compute; the 128-px suite: 16 reconstructions, 4 pairs of every kind, 64 generations, 32 attention scenes, 32
# regulated prompts): 4 pairs of each object edit (recolour, reshape, replace: what the methods' layout and mask
# claims are about), 2 reconstructions, 16 generations, 8 attention scenes, 8 regulated two-object prompts.
FINE_SAMPLE = {"n_recon": 2, "n_per_kind": 4, "kinds": ("recolour", "reshape", "replace"), "n_gen": 16,
               "n_attention": 8, "n_regulation": 8}


def suite_of(metric: str) -> str:
    if metric.startswith("toyflow."):
        return "flow_quality"
    if metric.startswith("toyworld256."):
        return "probes256" if metric.startswith("toyworld256.probe.") else "quality256"
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
    parser.add_argument("--model256", default=None, help="256-px toy world for the quality256 and probes256 suites "
                        "(default models/toyworld256.safetensors)")
    parser.add_argument("--per-kind", type=int, default=None,
                        help="edit pairs per edit kind in the quality suites (default 4; the probes: 1 per object edit)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny models, 2 steps, 1 repeat: checks the benchmarks run (CI); numbers mean nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    setup()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch sees no CUDA device")
    rec = Recorder(args.device)
    per_kind = {} if args.per_kind is None else {"n_per_kind": args.per_kind}
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
            quality.run(rec, model, **per_kind)
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
            quality.run(rec, flow, **per_kind)
    if "probes" in args.only:
        from . import probes

        if args.smoke:
            probes.run(rec, model, steps=3, n_per_kind=1, n_attention=1, kinds=("recolour",))
        else:
            probes.run(rec, model)
    if "quality256" in args.only or "probes256" in args.only:
        from attention_edit.toyworld import model as toymodel

        from . import probes, quality

        fine = type(REPO)(args.model256) if args.model256 else REPO / "models" / toymodel.TRAINED_256_FILE_NAME
        if not fine.is_file():
            parser.error(f"the quality256 and probes256 suites need the 256-px toy world: {fine} does not exist "
                         "(python -m toyworld.train --stage unet --finetune --image-size 256, see models/README.md)")
        if "quality256" in args.only:
            if args.smoke:
                quality.run(rec, fine, steps=3, n_recon=1, n_per_kind=1, n_gen=1, n_attention=1, n_regulation=1,
                            gen_steps=2, kinds=("recolour",), methods=("ddim", "instdiffedit"))
            else:  # a smaller sample than the 128-px suites: every image costs 4x the compute
                quality.run(rec, fine, **(FINE_SAMPLE | per_kind))
        if "probes256" in args.only:
            if args.smoke:
                probes.run(rec, fine, steps=2, n_per_kind=1, n_attention=1, kinds=("recolour",))
            else:
                probes.run(rec, fine)
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
