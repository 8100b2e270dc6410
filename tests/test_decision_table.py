"""benchmarks/decision_table.py: which cells count for a setting, the figures it prints, and its refusals."""

from __future__ import annotations

import json

import pytest

from benchmarks import decision_table as dt


def _cell(root, folder, task, strategy, seed, f1, flops, steps, scope="adapter"):
    path = root / folder / task / f"{strategy}-seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    cell = {"task": task, "strategy": strategy, "seed": seed, "steps": steps, "test_macro_f1": f1,
            "train_flops": flops}
    if scope != "adapter":
        cell["scope"] = scope
    path.write_text(json.dumps(cell))


def _plan():
    rows = [{"recipe": r, "setting": s.label, "peak_reserved_gib": 10.0 + i, "fits": {"24GB": True, "40GB": True,
             "80GB": True}, "max_micro_batch": {}, "grads_adam_device_gib": 1.5, "optimizer_host_gib": 0.0,
             "bwd_flops_ratio_to_all": 0.5, "offload_gb_per_step_mean": 0.0, "layers": {}, "strategy_source": ""}
            for r in dt.recipes() for i, s in enumerate(dt.SETTINGS)]
    return {"model": "m", "num_layers": 32, "recipes": dt.recipes(), "precision": "bf16", "attention": "sdpa",
            "simulated_steps": 200, "rows": rows}


def test_quality_takes_each_task_s_own_length_and_arm(tmp_path):
    tw, rv = "tweet-sentiment", "revision-intention"
    _cell(tmp_path, "convergence-cpu-smollm2-300steps", tw, "all", 1, 0.80, 100, 300)
    _cell(tmp_path, "convergence-cpu-smollm2-300steps", tw, "all", 2, 0.90, 100, 300)
    _cell(tmp_path, "convergence-cpu-smollm2-floors-300steps", tw, "ir+floor8", 1, 0.70, 50, 300)
    _cell(tmp_path, "convergence-cpu-smollm2-300steps", rv, "all", 1, 0.10, 100, 300)  # 300 steps: not the grid's 600
    _cell(tmp_path, "convergence-cpu-smollm2-full-300steps", tw, "all", 1, 0.60, 140, 300, scope="full")
    q = dt.quality(tmp_path)
    assert q[(tw, "adapter", "all")] == {1: (0.80, 100), 2: (0.90, 100)}
    assert q[(tw, "adapter", "ir+floor8")] == {1: (0.70, 50)}
    assert q[(tw, "full", "all")] == {1: (0.60, 140)}
    assert (rv, "adapter", "all") not in q


def test_a_seed_in_two_folders_is_refused(tmp_path):
    tw = "tweet-sentiment"
    _cell(tmp_path, "convergence-cpu-smollm2-300steps", tw, "ir+floor8", 1, 0.7, 50, 300)
    _cell(tmp_path, "convergence-cpu-smollm2-floors-300steps", tw, "ir+floor8", 1, 0.6, 50, 300)
    with pytest.raises(SystemExit, match="seed 1 of ir\\+floor8 .* in two grid folders"):
        dt.quality(tmp_path)


def test_report_figures_and_settings_not_run():
    tw = "tweet-sentiment"
    q = {(tw, "adapter", "all"): {1: (0.80, 100), 2: (0.90, 100)}, (tw, "adapter", "ir+floor8"): {1: (0.70, 50)},
         (tw, "full", "all"): {1: (0.95, 140)}}
    text = dt.report(_plan(), q, "python -m benchmarks.decision_table --report")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "| 0.850 ± 0.071 (2) | +0.0 | not run | - | 1.00× |" in rows["LoRA `all` (plain LoRA)"]
    assert "| 0.700 (1) | -15.0 | not run | - | 0.50× |" in rows["LoRA `ir` + depth floor 8"]
    assert "| 0.950 (1) | +10.0 | not run | - | 1.40× |" in rows["full `all` (full fine-tuning)"]
    assert "| not run | - | not run | - | - |" in rows["full `lisa` + `cpu`"]
    assert "| 10.0 (yes/yes/yes) |" in rows["LoRA `all` (plain LoRA)"]
    assert len([r for r in rows if r in {s.label for s in dt.SETTINGS}]) == len(dt.SETTINGS)


def test_a_plan_without_a_setting_is_refused(tmp_path):
    plan = _plan()
    plan["rows"] = [r for r in plan["rows"] if r["setting"] != "full `lisa` + `cpu`"]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(SystemExit, match="no plan for 'full `lisa` \\+ `cpu`'.*re-run --measure"):
        dt.load_plan(tmp_path / "plan.json")
    with pytest.raises(SystemExit, match="missing; run `python -m benchmarks.decision_table --measure`"):
        dt.load_plan(tmp_path / "absent.json")


def test_floors_keep_their_relative_depth_at_8b():
    floors = {s.grid_name: s.selection["depth_floor"] for s in dt.SETTINGS
              if s.selection and isinstance(s.selection.get("depth_floor"), int)}
    assert floors == {"ir+floor4": 4, "ir+floor8": 9, "ir+floor12": 13, "ir+floor16": 17, "ir+floor8+cpu": 9}


def test_a_corrupt_cell_is_refused_naming_it(tmp_path):
    path = tmp_path / "convergence-cpu-smollm2-300steps" / "tweet-sentiment" / "all-seed1.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"task": "tweet')
    with pytest.raises(SystemExit, match="all-seed1.json: not a finished cell's JSON"):
        dt.quality(tmp_path)
