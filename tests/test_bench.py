"""The benchmark runner runs every suite and writes records in the project's JSON format."""

import json

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
    assert all(isinstance(r["value"], float) and r["value"] == r["value"] for r in records)  # no NaN
    assert next(r for r in records if r["metric"] == "inversion.pinned_recon_max_abs_err")["value"] <= 1e-4


QUALITY = {"toyworld.recon_psnr_db.ddim_cfg1", "toyworld.recon_psnr_db.ddim_cfg7_5", "toyworld.recon_psnr_db.uniform",
           "toyworld.recon_psnr_db.pinned", "toyworld.recon_ssim.uniform",
           "toyworld.recon_psnr_gain_db.uniform_vs_ddim_cfg7_5", "toyworld.mask_iou.instant",
           "toyworld.mask_iou.adaptive", "toyworld.edit_success_rate", "toyworld.background_psnr_db",
           "toyworld.structure_iou", "toyworld.edit_success_rate.uam.recolour", "toyworld.gen_attribute_accuracy",
           "toyworld.regulation.both_objects_rate", "toyworld.regulation.both_objects_rate.plain"}


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


def test_readme_tables_come_from_result_records(tmp_path):
    from bench import table

    records = [{"metric": "toyworld.edit_success_rate.uam", "value": 0.75, "unit": "rate", "model": "toy world (m)",
                "device": "cpu: test", "torch": "2", "commit": "abc", "date": "d"},
               {"metric": "toyworld.edit_success_rate.uam.recolour", "value": 0.5, "unit": "rate",
                "model": "toy world (m)", "device": "cpu: test", "torch": "2", "commit": "abc", "date": "d"},
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
    assert "| recolour |" in text and "| 0.500 |" in text
    assert "| `uniform.overhead_ratio` | 0.900 | ≤ 1 (met) |" in text
    assert "cpu: test" in text
