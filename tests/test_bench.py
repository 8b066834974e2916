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
            "mask.adaptive_overhead_ratio"} <= metrics
    assert all(isinstance(r["value"], float) and r["value"] == r["value"] for r in records)  # no NaN
    assert next(r for r in records if r["metric"] == "inversion.pinned_recon_max_abs_err")["value"] <= 1e-4
