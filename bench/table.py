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
PROBE = "toyworld.probe."
README = REPO / "README.md"

EDIT_METHODS = {
    "ddim": "DDIM inversion + target prompt (no attention control)",
    "fpe": "Free-Prompt-Editing (empty-prompt inversion and source, r = 0.8)",
    "masactrl": "MasaCtrl (caption inversion)",
    "uam": "UAM (official): normal + uniform inversions, MasaCtrl, adaptive mask",
    "uam_pinned": "UAM, one pinned uniform inversion (uniform_pinned)",
    "uam_unchanged": "UAM, the paper's dilation (unchanged region)",
    "fpe_all_maps": "FPE at every map size (fpe_max_map_side 1.0, a variant)",
    "instdiffedit": "InstDiffEdit, pack variant: instant mask in the Edit Sampler, strength 0.5",
    "instdiffedit_fine_maps": "InstDiffEdit in the Edit Sampler, mask from 1/2-side maps, threshold 0.05 (a variant)",
    "instdiffedit_paper": "InstDiffEdit (paper): Instant Mask Estimate, then stock masked inpainting",
    "ground_truth_mask": "the true edit region as edit_mask (Edit Sampler, strength 0.5): a perfect mask",
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
    if unit == "px":
        return f"{value:.1f}"
    return f"{value:.3g}"


def _source(records: list[dict]) -> str:
    first = records[0]
    return f"{first['device']}, torch {first['torch']}, commit {first['commit']}, {first['date']}"


WORLDS = {"toyworld.": "Quality on the toy world", "toyflow.": "Quality on the toy flow world (Flux-shaped DiT)",
          "toyworld256.": "Quality on the toy world at 256 px (32x32 latents, 8x8 maps at 1/4 side)"}


def quality_tables(records: list[dict], prefix: str = "toyworld.") -> list[str]:
    """The quality tables of one world: its records ("toyworld.", "toyworld256." or "toyflow.") read under the toy
    world's names."""
    records = [{**r, "metric": "toyworld." + r["metric"][len(prefix):]} for r in records
               if r["metric"].startswith(prefix) and not r["metric"].startswith(prefix + "probe.")]
    by = {r["metric"]: r for r in records}
    if not by:
        return []

    def value(metric: str) -> str:
        r = by.get(metric)
        return "n/a" if r is None else _fmt(r["value"], r["unit"])

    model = next(r for r in records if r["metric"].startswith("toyworld."))["model"]
    lines = [f"**{WORLDS[prefix]}** ({model}; {_source(records)}):", ""]
    if prefix == "toyflow.":  # the rows keep the UNet world's names
        lines += ["(On this flow model \"DDIM\" is the pack's inversion node: the Euler step of the rectified-flow "
                  "ODE, the same sigma-space step.)", ""]
    lines += ["| Reconstruction | PSNR dB | SSIM |", "|---|---|---|"]
    for key, label in RECON_VARIANTS.items():
        if f"toyworld.recon_psnr_db.{key}" in by:
            lines.append(f"| {label} | {value(f'toyworld.recon_psnr_db.{key}')} | {value(f'toyworld.recon_ssim.{key}')} |")
    lines += ["", f"Uniform attention over DDIM at cfg 7.5: "
              f"{value('toyworld.recon_psnr_gain_db.uniform_vs_ddim_cfg7_5')} dB.", ""]
    kinds = list(dict.fromkeys(m.rsplit(".", 1)[1] for m in by if m.startswith("toyworld.edit_success_rate.")
                               and m.count(".") == 3))

    def per_kind(key: str, kind: str) -> str:
        lenient = f"toyworld.edit_success_rate_lenient.{key}.{kind}"
        in_place = value(f"toyworld.edit_success_rate.{key}.{kind}")
        return in_place if lenient not in by else f"{in_place} / {value(lenient)}"

    columns = [("success, in place", "edit_success_rate"), ("success, lenient", "edit_success_rate_lenient"),
               ("median drift px", "edit_drift_px"), ("median kept-object drift px", "kept_drift_px"),
               ("background PSNR dB vs source", "background_psnr_db"),
               ("vs VAE round trip", "background_psnr_db_vs_vae"), ("background SSIM vs source", "background_ssim"),
               ("vs VAE round trip", "background_ssim_vs_vae"), ("structure IoU", "structure_iou")]
    lines += ["| Edit method | " + " | ".join(c[0] for c in columns) + " | " + " | ".join(kinds) + " |",
              "|---|" + "---|" * (len(columns) + len(kinds))]
    for key, label in EDIT_METHODS.items():
        if f"toyworld.edit_success_rate.{key}" not in by:
            continue
        cells = [value(f"toyworld.{metric}.{key}") for _, metric in columns] + [per_kind(key, k) for k in kinds]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "(In place: the target attributes where the source object was, within 4 px of the 128-px "
              "reference (half a 128-px latent cell, 1/32 of the side, at every image size) in position and size, "
              "every other object in place; lenient: the target attributes on the edited "
              "object wherever it is. Drift: the edited object's centroid, recolour/reshape/replace. Background: "
              "outside the ground-truth edit mask. Per edit kind in the last columns, in place / lenient.)", ""]
    lines += pasted_table(by, value)
    rows = [("Background PSNR dB of the source's VAE round trip (ceiling)", "toyworld.background_psnr_db.vae_round_trip"),
            ("Background SSIM of the source's VAE round trip (ceiling)", "toyworld.background_ssim.vae_round_trip"),
            ("Background PSNR dB, the true target's latent pasted into the source's on the edit cells (a perfect "
             "latent mask's ceiling)", "toyworld.background_psnr_db.latent_composite"),
            ("Mask IoU, instant (InstDiffEdit, in the Edit Sampler)", "toyworld.mask_iou.instant"),
            ("Instant mask: share inside the edit region (precision)", "toyworld.mask_precision.instant"),
            ("Instant mask: share of the edit region covered (recall)", "toyworld.mask_recall.instant"),
            ("Mask IoU, instant, 1/2-side maps, threshold 0.05 (a variant)", "toyworld.mask_iou.instant_fine_maps"),
            ("Instant mask variant: precision", "toyworld.mask_precision.instant_fine_maps"),
            ("Instant mask variant: recall", "toyworld.mask_recall.instant_fine_maps"),
            ("Mask IoU, Instant Mask Estimate (InstDiffEdit paper path)", "toyworld.mask_iou.instant_estimate"),
            ("Instant Mask Estimate: precision", "toyworld.mask_precision.instant_estimate"),
            ("Instant Mask Estimate: recall", "toyworld.mask_recall.instant_estimate"),
            ("Instant mask empty on a one-object scene (rate)", "toyworld.mask_empty_rate.instant"),
            ("Instant mask inverted on a one-object scene (rate)", "toyworld.mask_inverted_rate.instant"),
            ("Instant mask variant empty on a one-object scene (rate)", "toyworld.mask_empty_rate.instant_fine_maps"),
            ("Instant mask variant inverted on a one-object scene (rate)",
             "toyworld.mask_inverted_rate.instant_fine_maps"),
            ("Instant Mask Estimate empty on a one-object scene (rate)", "toyworld.mask_empty_rate.instant_estimate"),
            ("Instant Mask Estimate inverted on a one-object scene (rate)",
             "toyworld.mask_inverted_rate.instant_estimate"),
            ("Mask IoU, adaptive (UAM, edit-region dilation)", "toyworld.mask_iou.adaptive"),
            ("Adaptive mask: precision", "toyworld.mask_precision.adaptive"),
            ("Adaptive mask: recall", "toyworld.mask_recall.adaptive"),
            ("Mask IoU, adaptive (UAM, unchanged-region dilation)", "toyworld.mask_iou.adaptive_unchanged"),
            *((f"Mask IoU, the true edit region on the {m.rsplit('_', 1)[1]} grid and back (a perfect mask's)", m)
              for m in by if m.startswith("toyworld.mask_iou.ground_truth_on_")),
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


PASTED = ("", "_pasted", "_pasted_grown")  # bench.quality.PASTES: the latent-space edit, then finished in pixel space


def pasted_table(by: dict, value) -> list[str]:
    """The masked methods as they come out of VAEDecode and pasted into the source image through their MASK."""
    methods = [key for key in EDIT_METHODS if f"toyworld.edit_success_rate.{key}_pasted" in by]
    if not methods:
        return []
    columns = [("success, in place", "edit_success_rate"), ("success, lenient", "edit_success_rate_lenient"),
               ("median drift px", "edit_drift_px"), ("background PSNR dB vs source (pooled)",
                                                      "background_psnr_db_pooled"),
               ("background SSIM vs source", "background_ssim"), ("background exact", "background_exact_rate")]
    lines = ["Masked methods finished in pixel space: each cell reads *decoded / pasted / pasted, mask grown 8 px*. "
             "Pasted: the decoded edit laid over the source image through the edit's MASK with stock ComfyUI nodes "
             "(Image Composite Masked; Grow Mask by one latent cell first), so outside the mask the pixels are the "
             "source's own. Background PSNR here is that of the mean squared error over the edits, since a pasted "
             f"background can be exact; the VAE round trip's: "
             f"{value('toyworld.background_psnr_db_pooled.vae_round_trip')} dB.", "",
             "| Masked method | " + " | ".join(c[0] for c in columns) + " |", "|---|" + "---|" * len(columns)]
    for key in methods:
        cells = [" / ".join(value(f"toyworld.{metric}.{key}{suffix}") for suffix in PASTED) for _, metric in columns]
        lines.append(f"| {EDIT_METHODS[key]} | " + " | ".join(cells) + " |")
    return lines + [""]


def probe_tables(records: list[dict], prefix: str = "toyworld.") -> list[str]:
    """The FPE paper's probes (bench/probes.py) of one world: per layer the layout a swap restores, per word its
    attention."""
    by = {PROBE + r["metric"][len(prefix + "probe."):]: r for r in records if r["metric"].startswith(prefix + "probe.")}
    if not by:
        return []

    def value(metric: str) -> str:
        r = by.get(metric)
        return "n/a" if r is None else _fmt(r["value"], r["unit"])

    first = next(iter(by.values()))
    where = "on the toy world" if prefix == "toyworld." else "on the toy world at 256 px"
    lines = [f"**Probes {where}** ({first['model']}, {first['steps']} steps; {_source(list(by.values()))}):", ""]
    variants = list(dict.fromkeys(m.rsplit(".", 1)[1] for m in by if m.startswith(PROBE + "structure_iou.")))
    if variants:
        lines += ["| Source self-attention swapped into the target at | map side | layout restored (structure) | "
                  "layout restored (drift) | median drift px | structure IoU | success, in place |",
                  "|---|---|---|---|---|---|---|"]
        labels = {"baseline": "nowhere (no attention control)", "fpe_default": "the FPE default (map side ≤ 1/2)",
                  "all_layers": "every layer"}
        for variant in variants:
            side = by[PROBE + "structure_iou." + variant].get("map_side")
            lines.append(f"| {labels.get(variant, variant)} | {'' if side is None else f'{side}x{side}'} | "
                         f"{value(PROBE + 'structure_restored.' + variant)} | {value(PROBE + 'drift_restored.' + variant)}"
                         f" | {value(PROBE + 'median_drift_px.' + variant)} | {value(PROBE + 'structure_iou.' + variant)}"
                         f" | {value(PROBE + 'edit_success_rate.' + variant)} |")
        lines += ["", "(Layout restored: the share of the no-injection edit's layout error (1 - foreground IoU with "
                  "the ground truth; the edited object's centroid drift) that FPE's swap at that layer alone "
                  "removes: 0 = like no injection, 1 = the source layout.)", ""]
    kinds = list(dict.fromkeys(m.split(".")[3] for m in by if m.startswith(PROBE + "word_mass_in_mask.")))
    if kinds:
        views = list(dict.fromkeys(m.split(".", 4)[4] for m in by if m.startswith(PROBE + "word_mass_in_mask.")
                                   and m.count(".") == 4))
        lines += ["| Word | cross-attention mass in its object, all maps | " + " | ".join(views)
                  + " | chance | own object over the other |", "|---|---|" + "---|" * (len(views) + 2)]
        for kind in kinds:
            main = by[PROBE + "word_mass_in_mask." + kind]
            cells = [value(PROBE + f"word_mass_in_mask.{kind}.{view}") for view in views]
            lines.append(f"| {kind} | {value(PROBE + 'word_mass_in_mask.' + kind)} | " + " | ".join(cells)
                         + f" | {main.get('chance', 'n/a')} | {value(PROBE + 'word_own_object_rate.' + kind)} |")
    return lines


def perf_table(records: list[dict]) -> list[str]:
    """The speed records, one table per run that measured them (a run of some suites keeps the others')."""
    chosen = [r for r in records if not r["metric"].startswith(tuple(WORLDS))]
    runs: dict[str, list[dict]] = {}
    for r in chosen:
        runs.setdefault(_source([r]), []).append(r)
    lines = []
    for source, group in runs.items():
        if lines:
            lines.append("")
        lines += [f"**Speed** (ratios of wall times measured interleaved in one process; {source}):", "",
                  "| Metric | value | goal | model, size, steps |", "|---|---|---|---|"]
        for r in group:
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
        for lines in (quality_tables(records), probe_tables(records), quality_tables(records, "toyworld256."),
                      probe_tables(records, "toyworld256."), quality_tables(records, "toyflow."), perf_table(records)):
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
