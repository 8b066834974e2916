"""The benchmark runner runs every suite and writes records in the project's JSON format."""

import json
import math

from bench import run

REQUIRED = {"metric", "value", "unit", "lower_is_better", "model", "resolution", "steps", "device", "torch",
            "commit", "date"}


def test_smoke_run_writes_every_metric_in_the_record_format(tmp_path):
    out = tmp_path / "smoke.json"
    assert run.main(["--smoke", "--output", str(out)]) == 0
    records = json.loads(out.read_text())
    assert all(REQUIRED <= set(r) for r in records)
    metrics = {r["metric"] for r in records}
    assert {"inversion.cost_ratio_vs_stock", "inversion.pinned_recon_max_abs_err", "uniform.overhead_ratio",
            "injection.overhead_ratio", "edit.cost_ratio_vs_generation", "mask.instant_overhead_ratio",
            "mask.adaptive_overhead_ratio", "memory.edit_peak_ratio_vs_generation"} <= metrics
    assert {f"{family}.{m}" for family in ("flux", "sd35") for m in
            ("inversion.cost_ratio_vs_stock", "edit.cost_ratio_vs_generation", "override.overhead_ratio")} <= metrics
    assert any(m.startswith("toyflow.") for m in metrics)  # the toy flow world's quality suite ran too
    assert all(isinstance(r["value"], float) and r["value"] == r["value"] for r in records)  # no NaN
    assert next(r for r in records if r["metric"] == "inversion.pinned_recon_max_abs_err")["value"] <= 1e-4


QUALITY = {"toyworld.recon_psnr_db.ddim_cfg1", "toyworld.recon_psnr_db.ddim_cfg7_5", "toyworld.recon_psnr_db.uniform",
           "toyworld.recon_psnr_db.pinned", "toyworld.recon_ssim.uniform",
           "toyworld.recon_psnr_gain_db.uniform_vs_ddim_cfg7_5", "toyworld.mask_iou.instant",
           "toyworld.mask_iou.adaptive", "toyworld.edit_success_rate", "toyworld.background_psnr_db",
           "toyworld.structure_iou", "toyworld.edit_success_rate.uam.recolour", "toyworld.gen_attribute_accuracy",
           "toyworld.regulation.both_objects_rate", "toyworld.regulation.both_objects_rate.plain",
           "toyworld.edit_success_rate_lenient", "toyworld.edit_success_rate_lenient.uam",
           "toyworld.edit_success_rate_lenient.uam.recolour", "toyworld.background_psnr_db_vs_vae.uam",
           "toyworld.background_ssim.uam", "toyworld.background_ssim_vs_vae.uam",
           "toyworld.background_psnr_db.vae_round_trip", "toyworld.background_ssim.vae_round_trip"}


def test_quality_smoke_runs_every_method_on_the_trained_toy_model(tmp_path):
    out = tmp_path / "quality.json"
    assert run.main(["--smoke", "--only", "quality", "--output", str(out)]) == 0
    records = json.loads(out.read_text())
    assert all(REQUIRED <= set(r) for r in records)
    by = {r["metric"]: r for r in records}
    assert QUALITY <= set(by)
    assert all(r["value"] == r["value"] for r in records)  # no NaN
    # The pinned reconstruction is exact in latent space, so it decodes to the VAE's own round trip.
    assert abs(by["toyworld.recon_psnr_db.pinned"]["value"] - by["toyworld.recon_psnr_db.vae"]["value"]) < 0.05
    assert "untrained" not in by["toyworld.edit_success_rate"]["model"]
    # The in-place test asks the lenient one's question and more: it can only be stricter.
    for metric in [m for m in by if m.startswith("toyworld.edit_success_rate.")]:
        lenient = metric.replace("edit_success_rate", "edit_success_rate_lenient")
        assert by[metric]["value"] <= by[lenient]["value"] + 1e-9, metric
    assert not any(m.startswith("toyworld.probe.") for m in by)  # the probes are their own suite
    # What the mask rows are made of: too wide or too narrow, and what a perfect mask reaches at each grid.
    assert {"toyworld.mask_precision.instant", "toyworld.mask_recall.instant", "toyworld.mask_recall.adaptive",
            "toyworld.mask_iou.ground_truth_on_16x16", "toyworld.mask_iou.ground_truth_on_4x4",
            "toyworld.edit_success_rate.ground_truth_mask", "toyworld.background_psnr_db.latent_composite"} <= set(by)
    # Every masked method is scored again pasted into the source (no extra sampling); unmasked ones are not.
    assert {f"toyworld.{m}.{method}{suffix}" for m in ("edit_success_rate", "background_psnr_db_pooled")
            for method in ("instdiffedit", "uam", "ground_truth_mask") for suffix in ("_pasted", "_pasted_grown")} <= set(by)
    assert "toyworld.edit_success_rate.ddim_pasted" not in by
    assert all(0.0 <= by[m]["value"] <= 1.0 for m in by if m.startswith(("toyworld.mask_precision.",
                                                                         "toyworld.mask_recall."))), by
    # A coarser grid loses more of the region's outline.
    assert by["toyworld.mask_iou.ground_truth_on_4x4"]["value"] < by["toyworld.mask_iou.ground_truth_on_16x16"]["value"]


def test_flow_quality_smoke_runs_the_dit_methods_on_the_toy_flow_world(tmp_path):
    from bench import quality

    out = tmp_path / "flow.json"
    assert run.main(["--smoke", "--only", "flow_quality", "--output", str(out)]) == 0
    records = json.loads(out.read_text())
    assert all(REQUIRED <= set(r) for r in records)
    assert all(r["metric"].startswith("toyflow.") and r["value"] == r["value"] for r in records)
    by = {r["metric"]: r for r in records}
    assert {"toyflow." + m[len("toyworld."):] for m in QUALITY if "instant" not in m} <= set(by)
    assert {f"toyflow.edit_success_rate.{m}" for m in quality.FLOW_METHODS} <= set(by)
    assert "Flux-shaped DiT" in by["toyflow.edit_success_rate"]["model"]
    assert abs(by["toyflow.recon_psnr_db.pinned"]["value"] - by["toyflow.recon_psnr_db.vae"]["value"]) < 0.05


def test_probes_smoke_swaps_self_attention_one_layer_at_a_time(tmp_path):
    from attention_edit.engine.patching import transformer_blocks
    from attention_edit.nodes.toy_loader import MODELS_DIR
    from attention_edit.toyworld import model as toymodel
    from bench import probes

    out = tmp_path / "probes.json"
    assert run.main(["--smoke", "--only", "probes", "--output", str(out)]) == 0
    records = json.loads(out.read_text())
    assert all(REQUIRED <= set(r) for r in records)
    assert all(r["metric"].startswith("toyworld.probe.") and r["value"] == r["value"] for r in records)
    by = {r["metric"]: r for r in records}
    keys = transformer_blocks(toymodel.load_toy(MODELS_DIR / toymodel.TRAINED_FILE_NAME)[0])
    variants = [probes.layer_name(k) for k in keys] + ["baseline", probes.ALL_LAYERS, probes.FPE_DEFAULT]
    assert {f"toyworld.probe.structure_iou.{v}" for v in variants} <= set(by)
    assert by["toyworld.probe.structure_restored.baseline"]["value"] == 0.0  # the reference itself
    sides = [by[f"toyworld.probe.structure_iou.{probes.layer_name(k)}"]["map_side"] for k in keys]
    assert max(sides) == 16 and min(sides) < 16  # the 16x16 latent's full-size and coarser maps
    for kind in ("size", "colour", "shape"):
        word = by[f"toyworld.probe.word_mass_in_mask.{kind}"]
        assert 0.0 <= word["value"] <= 1.0 and 0.0 < word["chance"] < 1.0


def test_readme_tables_come_from_result_records(tmp_path):
    from bench import table

    records = [{"metric": "toyworld.edit_success_rate.uam", "value": 0.75, "unit": "rate", "model": "toy world (m)",
                "device": "cpu: test", "torch": "2", "commit": "abc", "date": "d"},
               {"metric": "toyworld.edit_success_rate.uam.recolour", "value": 0.5, "unit": "rate",
                "model": "toy world (m)", "device": "cpu: test", "torch": "2", "commit": "abc", "date": "d"},
               {"metric": "toyworld.edit_success_rate_lenient.uam.recolour", "value": 1.0, "unit": "rate",
                "model": "toy world (m)", "device": "cpu: test", "torch": "2", "commit": "abc", "date": "d"},
               {"metric": "toyworld.edit_drift_px.uam", "value": 9.25, "unit": "px", "model": "toy world (m)",
                "device": "cpu: test", "torch": "2", "commit": "abc", "date": "d"},
               {"metric": "toyworld.probe.structure_restored.output4", "value": 0.375, "unit": "fraction",
                "model": "toy world (m)", "steps": 50, "map_side": 16, "device": "cpu: test", "torch": "2",
                "commit": "abc", "date": "d"},
               {"metric": "toyworld.probe.structure_iou.output4", "value": 0.625, "unit": "iou",
                "model": "toy world (m)", "steps": 50, "map_side": 16, "device": "cpu: test", "torch": "2",
                "commit": "abc", "date": "d"},
               {"metric": "toyworld.probe.word_mass_in_mask.colour", "value": 0.875, "unit": "fraction",
                "model": "toy world (m)", "steps": 0, "chance": 0.08, "device": "cpu: test", "torch": "2",
                "commit": "abc", "date": "d"},
               {"metric": "uniform.overhead_ratio", "value": 0.9, "unit": "ratio", "model": "SD1.5", "goal": 1.0,
                "resolution": "256px", "steps": 4, "device": "cpu: test", "torch": "2", "commit": "abc", "date": "d"}]
    results = tmp_path / "cpu.json"
    results.write_text(json.dumps(records))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{table.START}\nold\n{table.END}\noutro\n")
    table.update_readme(table.tables([results]), readme)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text
    assert "| UAM (official): normal + uniform inversions, MasaCtrl, adaptive mask | 0.750 |" in text
    assert "| recolour |" in text and "| 0.500 / 1.000 |" in text  # per kind: in place / lenient
    assert "| median drift px |" in text and "| 9.2 |" in text
    assert "| output4 | 16x16 | 0.375 | n/a | n/a | 0.625 | n/a |" in text
    assert "| colour | 0.875 |" in text and "| 0.08 |" in text
    assert "| `uniform.overhead_ratio` | 0.900 | ≤ 1 (met) |" in text
    assert "cpu: test" in text


def test_256px_suites_measure_the_toy_world_at_256px_under_their_own_names(tmp_path):
    out = tmp_path / "fine.json"
    assert run.main(["--smoke", "--only", "quality256", "probes256", "--output", str(out)]) == 0
    records = json.loads(out.read_text())
    assert all(REQUIRED <= set(r) for r in records)
    assert all(r["metric"].startswith("toyworld256.") and r["value"] == r["value"] for r in records)
    by = {r["metric"]: r for r in records}
    assert {"toyworld256.edit_success_rate.ddim", "toyworld256.mask_iou.instant", "toyworld256.recon_psnr_db.vae",
            "toyworld256.probe.structure_iou.baseline", "toyworld256.probe.word_mass_in_mask.colour"} <= set(by)
    assert by["toyworld256.edit_success_rate.ddim"]["resolution"] == "256px (latent 32x32)"
    sides = {r["map_side"] for r in records if r["metric"].startswith("toyworld256.probe.structure_iou.")
             and "map_side" in r}
    assert max(sides) == 32 and min(sides) == 8  # 32x32 latents: the 1/4-side maps are 8x8
    assert {run.suite_of(m) for m in by} == {"quality256", "probes256"}
    assert "toyworld256.probe.word_mass_in_mask.colour.8x8" in by  # the words' attention on the 1/4-side maps


def test_a_perfect_mask_on_a_grid_keeps_what_the_grid_can_hold():
    import numpy as np

    from bench.quality import grid_iou

    square = np.zeros((64, 64), bool)
    square[16:48, 16:48] = True  # 4x4 cells of an 8x8 grid
    assert grid_iou(square, 64) == 1.0  # a grid as fine as the image changes nothing
    assert grid_iou(square, 8) > 0.95  # an aligned square: only its corners round off
    line = np.zeros((64, 64), bool)
    line[:, 30:33] = True  # 3 px wide: under half of any 8-px cell
    assert grid_iou(line, 8) == 0.0
    assert grid_iou(line, 32) > 0.5


def test_the_latent_composite_takes_the_target_on_every_cell_the_edit_touches():
    import numpy as np
    import torch

    from bench.quality import latent_composite

    source, target = {"samples": torch.zeros(1, 4, 4, 4)}, {"samples": torch.ones(1, 4, 4, 4)}
    region = np.zeros((32, 32), bool)
    region[9, 17] = True  # one pixel, in latent cell (1, 2)
    out = latent_composite(source, target, region)["samples"]
    expected = torch.zeros(1, 4, 4, 4)
    expected[..., 1, 2] = 1.0
    assert torch.equal(out, expected)


def test_each_world_gets_its_own_readme_tables(tmp_path):
    from bench import table

    common = {"device": "cpu: test", "torch": "2", "commit": "abc", "date": "d", "steps": 50}
    records = [{"metric": "toyworld.edit_success_rate.fpe", "value": 0.5, "unit": "rate", "model": "toy world (a)",
                **common},
               {"metric": "toyworld256.edit_success_rate.fpe", "value": 0.875, "unit": "rate",
                "model": "toy world (b)", **common},
               {"metric": "toyworld256.probe.structure_iou.output4", "value": 0.625, "unit": "iou", "map_side": 32,
                "model": "toy world (b)", **common},
               {"metric": "toyworld256.mask_iou.ground_truth_on_8x8", "value": 0.75, "unit": "iou",
                "model": "toy world (b)", **common}]
    results = tmp_path / "cpu.json"
    results.write_text(json.dumps(records))
    text = table.tables([results])
    plain, fine = text.split("**Quality on the toy world at 256 px")
    assert "| 0.500 |" in plain and "0.875" not in plain and "toy world (b)" not in plain
    assert "| 0.875 |" in fine and "**Probes on the toy world at 256 px** (toy world (b)" in fine
    assert "| output4 | 32x32 | n/a | n/a | n/a | 0.625 | n/a |" in fine
    assert "| Mask IoU, the true edit region on the 8x8 grid and back (a perfect mask's) | 0.750 |" in fine


def test_pooled_psnr_is_that_of_the_mean_squared_error():
    from bench.quality import pooled_psnr

    # One exact background (infinite PSNR on its own) and one at 20 dB: the mean error is half the second's.
    assert abs(pooled_psnr([0.0, 255.0 ** 2 / 100.0]) - 10.0 * math.log10(200.0)) < 1e-9


def test_paste_takes_the_edit_inside_the_mask_and_the_source_outside():
    import numpy as np
    import torch

    from fixtures.toy_graph import paste_into_source

    source = np.full((9, 9, 3), 10, np.uint8)
    edited = np.full((9, 9, 3), 200, np.uint8)
    mask = torch.zeros(1, 9, 9)
    mask[0, 4, 4] = 1.0
    mask[0, 0, 0] = 0.5
    out = paste_into_source(edited, source, mask)
    expected = source.copy()
    expected[4, 4] = 200
    expected[0, 0] = 105  # alpha 0.5: (10 + 200) / 2
    assert np.array_equal(out, expected)
    # Grown by 2 (GrowMask, tapered corners): every pixel within 2 steps of the centre, counted along the axes.
    grown = paste_into_source(edited, source, mask, grow_px=2)
    rows, cols = np.indices((9, 9))
    inside = np.abs(rows - 4) + np.abs(cols - 4) <= 2
    assert np.all(grown[inside] == 200) and np.all(grown[~inside & (rows + cols > 2)] == 10)


def test_the_pasted_table_reads_decoded_pasted_and_grown_side_by_side(tmp_path):
    from bench import table

    common = {"device": "cpu: test", "torch": "2", "commit": "abc", "date": "d", "steps": 50, "model": "toy world (a)"}
    values = {"": 0.5, "_pasted": 0.75, "_pasted_grown": 0.625}
    records = [{"metric": f"toyworld.edit_success_rate.ground_truth_mask{suffix}", "value": v, "unit": "rate", **common}
               for suffix, v in values.items()]
    records += [{"metric": f"toyworld.background_psnr_db_pooled.ground_truth_mask{suffix}", "value": 30.0 + 10 * v,
                 "unit": "dB", **common} for suffix, v in values.items()]
    records.append({"metric": "toyworld.background_psnr_db_pooled.vae_round_trip", "value": 38.25, "unit": "dB",
                    **common})
    text = "\n".join(table.quality_tables(records))
    row = [line for line in text.splitlines() if line.startswith("| the true edit region")][-1]  # the pasted table's
    assert "| 0.500 / 0.750 / 0.625 |" in row and "| 35.00 / 37.50 / 36.25 |" in row
    assert "round trip's: 38.25 dB" in text
