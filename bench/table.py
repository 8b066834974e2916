"""The README's benchmark tables, made from result files (`make bench` writes them and calls this).

    python -m bench.table [bench/results/cpu.json ...] [--readme]

Without --readme the tables are printed; with it they replace the block between the README's
``<!-- bench:start -->`` and ``<!-- bench:end -->`` markers.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

from .common import REPO

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
README = REPO / "README.md"

EDIT_METHODS = {
    "ddim": "DDIM inversion + target prompt (no attention control)",
    "fpe": "Free-Prompt-Editing (empty-prompt inversion and source, r = 0.8)",
    "masactrl": "MasaCtrl (caption inversion)",
    "uam": "UAM (official): normal + uniform inversions, MasaCtrl, adaptive mask",
    "uam_pinned": "UAM, one pinned uniform inversion (uniform_pinned)",
    "uam_unchanged": "UAM, the paper's dilation (unchanged region)",
    "instdiffedit": "InstDiffEdit: instant mask, strength 0.5",
}
RECON_VARIANTS = {
    "vae": "VAE encode/decode only (ceiling)",
    "ddim_cfg1": "DDIM, caption, cfg 1",
    "ddim_cfg7_5": "DDIM, caption, cfg 7.5",
    "uniform": "uniform attention (UAM), empty prompt, cfg 1",
    "pinned": "pinned source (InversionReconstruct)",
}


def _fmt(value: float, unit: str) -> str:
    if value != value:  # NaN
        return "n/a"
    if unit == "dB":
        return f"{value:.2f}"
    if unit == "ratio":
        return f"{value:.3f}"
    if unit in ("rate", "iou", "ssim", "fraction"):
        return f"{value:.3f}"
    return f"{value:.3g}"


def _source(records: list[dict]) -> str:
    first = records[0]
    return f"{first['device']}, torch {first['torch']}, commit {first['commit']}, {first['date']}"


def quality_tables(records: list[dict]) -> list[str]:
    by = {r["metric"]: r for r in records}
    if not any(m.startswith("toyworld.") for m in by):
        return []

    def value(metric: str) -> str:
        r = by.get(metric)
        return "n/a" if r is None else _fmt(r["value"], r["unit"])

    model = next(r for r in records if r["metric"].startswith("toyworld."))["model"]
    lines = [f"**Quality on the toy world** ({model}; {_source(records)}):", ""]
    lines += ["| Reconstruction | PSNR dB | SSIM |", "|---|---|---|"]
    for key, label in RECON_VARIANTS.items():
        if f"toyworld.recon_psnr_db.{key}" in by:
            lines.append(f"| {label} | {value(f'toyworld.recon_psnr_db.{key}')} | {value(f'toyworld.recon_ssim.{key}')} |")
    lines += ["", f"Uniform attention over DDIM at cfg 7.5: "
              f"{value('toyworld.recon_psnr_gain_db.uniform_vs_ddim_cfg7_5')} dB.", ""]
    kinds = list(dict.fromkeys(m.rsplit(".", 1)[1] for m in by if m.startswith("toyworld.edit_success_rate.")
                               and m.count(".") == 3))
    lines += ["| Edit method | success | background PSNR dB | structure IoU | " + " | ".join(kinds) + " |",
              "|---|---|---|---|" + "---|" * len(kinds)]
    for key, label in EDIT_METHODS.items():
        if f"toyworld.edit_success_rate.{key}" not in by:
            continue
        per_kind = " | ".join(value(f"toyworld.edit_success_rate.{key}.{k}") for k in kinds)
        lines.append(f"| {label} | {value(f'toyworld.edit_success_rate.{key}')} | "
                     f"{value(f'toyworld.background_psnr_db.{key}')} | {value(f'toyworld.structure_iou.{key}')} | "
                     f"{per_kind} |")
    lines += ["", "(success per edit kind in the last columns.)", ""]
    rows = [("Mask IoU, instant (InstDiffEdit)", "toyworld.mask_iou.instant"),
            ("Mask IoU, adaptive (UAM, edit-region dilation)", "toyworld.mask_iou.adaptive"),
            ("Mask IoU, adaptive (UAM, unchanged-region dilation)", "toyworld.mask_iou.adaptive_unchanged"),
            ("Generation attribute accuracy (held-out captions)", "toyworld.gen_attribute_accuracy"),
            ("Objects with every attribute right", "toyworld.gen_object_attribute_rate"),
            ("Object-word attention mass inside the object", "toyworld.attention_mass_in_mask"),
            ("Both objects drawn, plain sampling", "toyworld.regulation.both_objects_rate.plain"),
            ("Both objects drawn, attention regulation", "toyworld.regulation.both_objects_rate"),
            ("Both objects with colour and shape, plain sampling", "toyworld.regulation.both_objects_exact_rate.plain"),
            ("Both objects with colour and shape, attention regulation", "toyworld.regulation.both_objects_exact_rate"),
            ("Both objects drawn with regulation where plain sampling dropped one",
             "toyworld.regulation.both_objects_rate.where_plain_dropped")]
    lines += ["| Measure | value |", "|---|---|"]
    for label, metric in rows:
        if metric in by:
            extra = f" (chance {by[metric]['chance']})" if "chance" in by[metric] else ""
            lines.append(f"| {label} | {value(metric)}{extra} |")
    return lines


def perf_table(records: list[dict]) -> list[str]:
    chosen = [r for r in records if not r["metric"].startswith("toyworld.")]
    if not chosen:
        return []
    lines = [f"**Speed** (ratios of wall times measured interleaved in one process; {_source(chosen)}):", "",
             "| Metric | value | goal | model, size, steps |", "|---|---|---|---|"]
    for r in chosen:
        goal = r.get("goal")
        goal_text = "" if goal is None else f"≤ {goal:g} ({'met' if r['value'] <= goal else 'not met'})"
        lines.append(f"| `{r['metric']}` | {_fmt(r['value'], r['unit'])} | {goal_text} | "
                     f"{r['model']}, {r['resolution']}, {r['steps']} |")
    return lines


def tables(files: list[pathlib.Path]) -> str:
    blocks = []
    for path in files:
        records = json.loads(path.read_text())
        if not records:
            continue
        for lines in (quality_tables(records), perf_table(records)):
            if lines:
                blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def update_readme(text: str, readme: pathlib.Path = README) -> None:
    content = readme.read_text()
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if not pattern.search(content):
        raise SystemExit(f"{readme} has no {START} ... {END} block")
    readme.write_text(pattern.sub(lambda _: f"{START}\n{text}\n{END}", content))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=pathlib.Path)
    parser.add_argument("--readme", action="store_true", help="write the tables into README.md")
    args = parser.parse_args(argv)
    files = args.files or sorted((REPO / "bench" / "results").glob("*.json"))
    text = tables(files)
    if args.readme:
        update_readme(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
