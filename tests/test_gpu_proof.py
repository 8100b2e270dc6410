"""benchmarks/gpu_proof.py --dry-run on the CPU: every section's code runs (tiny shapes, the Triton
interpreter), so the GPU proof script cannot rot between the rare runs on a GPU."""

import json
import re

from benchmarks import gpu_proof


def test_time_budget_on_paper_fits_eight_minutes():
    doc = gpu_proof.__doc__
    rows = re.findall(r"^([a-z_]+)\s{2,}.*?\s(\d+)$", doc, re.M)
    parts = {name: int(s) for name, s in rows}
    assert set(parts) == {"env", "correctness", "self_check", "timing", "offload", "training", "total"}
    assert sum(v for k, v in parts.items() if k != "total") == parts["total"] < 480


def test_dry_run_exercises_every_section(tmp_path):
    results = gpu_proof.main(["--dry-run", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu_proof.json").read_text())
    assert saved["dry_run"] is True and set(saved["sections"]) == {
        "env", "correctness", "self_check", "timing", "offload", "training"}
    for name, sec in saved["sections"].items():
        assert "error" not in sec, (name, sec)
    corr = saved["sections"]["correctness"]
    assert len(corr) == 8 and all(c["ok"] for c in corr.values())
    assert corr["odd-sizes-misaligned-mixed"]["tensors"] == 7
    assert saved["sections"]["self_check"]["ok"] is True
    for case in saved["sections"]["timing"].values():
        for provider in ("triton", "torch_foreach", "per_tensor_loop", "compiled_foreach"):
            assert "median_us" in case[provider], (provider, case[provider])
        assert case["triton"]["host_us_per_call"] > 0
    off = saved["sections"]["offload"]
    assert off["values_bit_identical"] is True and off["bytes_each_way"] > 0
    runs = {r["run"]: r for r in saved["sections"]["training"]["runs"]}
    assert not saved["sections"]["training"]["skipped"] and len(runs) == 8
    assert all("error" not in r for r in runs.values()), runs
    cpu = runs["tiny-llama ir full cpu"]
    assert sum(cpu["offload_d2h_bytes"]) + sum(cpu["offload_h2d_bytes"]) > 0
    assert cpu["facts"]["offload_d2h_bytes_total"] == sum(cpu["offload_d2h_bytes"])
    assert all(g["met"] is None for g in saved["goals"].values())  # a dry run proves nothing about a GPU
    report = (tmp_path / "gpu_proof.md").read_text()
    assert "DRY RUN" in report and "| tiny-llama ir full cpu |" in report
    assert results["total_s"] < 120
