"""The convergence grid runner on the tiny model: curves, counted FLOPs, skip/restart of cells, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import convergence as cv


def _args(out: Path, strategies: list[str]):
    return cv.build_parser().parse_args(
        ["--out", str(out), "--model", "irtuning://tiny-llama", "--strategies", *strategies, "--seeds", "1",
         "--steps", "4", "--eval-every", "2", "--val-n", "6", "--test-n", "6", "--warmup", "1"])


@pytest.fixture(scope="module")
def grid(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("grid")
    # an interrupted earlier run of the salf cell: a curve line of its own, no result file
    stale = cv.cell_path(out, "revision-intention", "salf", 1).with_suffix(".partial.jsonl")
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"step": 999, "val_macro_f1": 1.0}) + "\n")
    done = cv.run_grid(_args(out, ["all", "salf"]))
    return out, done


@pytest.mark.slow
def test_cells_hold_curves_with_counted_flops(grid):
    out, done = grid
    assert [p.name for p in done] == ["all-seed1.json", "salf-seed1.json"]
    cells = {c["strategy"]: c for c in cv.load_cells(out)}
    for c in cells.values():
        assert [p["step"] for p in c["curve"]] == [2, 4]
        assert 0 < c["curve"][0]["flops"] < c["curve"][1]["flops"] == c["train_flops"]
        assert all(0 <= p["val_macro_f1"] <= 1 and p["train_s"] > 0 for p in c["curve"])
        assert c["val_n"] == 6 and c["test_n"] == 6 and len(c["layers_per_step"]) == 4
    # same seed, same batches: SALF trains the top layers only and cuts the backward pass below them,
    # so the counted FLOPs are lower than plain LoRA's; forward alone is a third of a LoRA step
    assert cells["salf"]["train_flops"] < cells["all"]["train_flops"]
    assert cells["salf"]["train_flops"] > cells["all"]["train_flops"] / 3
    assert max(cells["salf"]["layers_per_step"]) < cells["all"]["layers_per_step"][0]


@pytest.mark.slow
def test_interrupted_cell_restarts_cleanly_and_finished_cells_are_skipped(grid):
    out, _ = grid
    salf = cv.cell_path(out, "revision-intention", "salf", 1)
    assert not salf.with_suffix(".partial.jsonl").exists()
    assert 999 not in [p["step"] for p in json.loads(salf.read_text())["curve"]]
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/*.json")}
    assert cv.run_grid(_args(out, ["all", "salf"])) == []  # nothing left to do
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*.json")} == before


@pytest.mark.slow
def test_report_and_plot_from_the_cell_files(grid, tmp_path):
    out, _ = grid
    md = tmp_path / "RESULTS.md"
    md.write_text("# Benchmark results\n\nkept\n")
    assert cv.main(["--out", str(out), "--report", "--results-md", str(md), "--tag", "t",
                    "--remaining", "seeds 2-3 of `ir` missing"]) == 0
    partial = md.read_text()
    # the printed command rebuilds the section as it stands, "Partial grid" paragraph included,
    # in a code span that the backticks of the text do not break
    assert "**Partial grid.** seeds 2-3 of `ir` missing" in partial
    assert "--tag t --report --remaining 'seeds 2-3 of `ir` missing' ``" in partial
    cv.main(["--out", str(out), "--report", "--results-md", str(md), "--tag", "t"])  # replaces, never duplicates
    text = md.read_text()
    assert text.count("<!-- convergence:t:start -->") == 1 and "kept" in text
    assert "| all | 1 |" in text and "| salf | 1 |" in text and "#### Task `revision-intention`" in text
    assert (tmp_path / "convergence-t.png").read_bytes()[:4] == b"\x89PNG"


def _cell(strategy, seed, f1s, test_f1):
    return {"task": "t", "strategy": strategy, "seed": seed, "steps": 30, "test_accuracy": test_f1,
            "test_macro_f1": test_f1, "train_flops": 30, "train_s": 3.0, "layers_per_step": [2, 4],
            "curve": [{"step": 10 * (i + 1), "flops": 10 * (i + 1), "val_accuracy": f, "val_macro_f1": f} for i, f in enumerate(f1s)]}


def test_steps_to_ninety_percent_of_all_and_mean_std_by_hand():
    cells = [_cell("all", 1, [0.2, 0.5, 0.6], 0.6), _cell("all", 2, [0.3, 0.6, 0.8], 0.8),
             _cell("ir", 1, [0.1, 0.64, 0.7], 0.7), _cell("ir", 2, [0.2, 0.3, 0.5], 0.5)]
    s = cv.summarize(cells)["t"]
    assert s["target"] == pytest.approx(0.9 * 0.7)  # 0.63
    assert s["strategies"]["all"]["steps_to_target"] == [30]  # seed 1 never reaches it, seed 2 at step 30
    assert s["strategies"]["all"]["reached"] == 1
    assert s["strategies"]["ir"]["steps_to_target"] == [20] and s["strategies"]["ir"]["flops_to_target"] == [20]
    text = cv.report(cells, "t", "cmd")
    assert "| ir | 1,2 | 0.600 ± 0.141 | 0.600 ± 0.141 |" in text
    assert "20 (1/2)" in text and "30 (1/2)" in text
    assert "| 20 | 0.550 / 0.550 | 0.470 / 0.470 |" in text  # the curve table: mean over seeds per step


@pytest.mark.slow
def test_a_finished_cell_of_another_recipe_is_refused(grid):
    out, _ = grid
    args = _args(out, ["all"])
    args.steps = 8
    with pytest.raises(SystemExit, match="steps=4.*asks for 8"):
        cv.run_grid(args)


# ---- the full-parameter arm, grid names, the learning-rate sweep ------------------------------------

def test_grid_names_parse_into_engine_settings_and_bad_parts_are_refused():
    assert cv.parse_grid_name("all") == ("all", {}, {})
    assert cv.parse_grid_name("ir+floor") == ("ir", {"depth_floor": "salf"}, {})
    assert cv.parse_grid_name("ir+floor12+cpu") == ("ir", {"depth_floor": 12, "frozen_optimizer_state": "cpu"}, {})
    assert cv.parse_grid_name("ir+split2+cpu") == ("ir", {"frozen_optimizer_state": "cpu"}, {"split_num": 2})
    for bad, why in (("ir+gpu", "unknown part 'gpu'"), ("ir+cpu+drop", "frozen_optimizer_state set twice"),
                     ("+cpu", "no strategy"), ("ir+floorx", "unknown part 'floorx'")):
        with pytest.raises(ValueError, match=why):
            cv.parse_grid_name(bad)
    config = cv.selection_config("lisa+cpu", {}, "full")
    assert (config.strategy, config.scope, config.frozen_optimizer_state) == ("lisa", "full", "cpu")
    assert cv.selection_config("ir+split2", {}).strategy_options == {"split_num": 2}


def test_a_bad_grid_is_refused_before_any_cell_runs(tmp_path):
    args = _args(tmp_path, ["all", "ir+floor12+gpu"])
    with pytest.raises(SystemExit, match="--strategies: grid strategy 'ir\\+floor12\\+gpu': unknown part 'gpu'"):
        cv.run_grid(args)
    args = cv.build_parser().parse_args(["--out", str(tmp_path), "--lr-sweep", "1e-5", "3e-5"])
    with pytest.raises(SystemExit, match="--lr-sweep chooses on the validation split only: pass --test-n 0"):
        cv.run_grid(args)
    assert not list(tmp_path.iterdir())
    args = cv.build_parser().parse_args(["--out", str(tmp_path), "--scope", "full", "--test-n", "0",
                                         "--lr-sweep", "1e-5", "3e-5", "1e-4"])
    assert (args.scope, args.lr_sweep) == ("full", [1e-5, 3e-5, 1e-4])
    with pytest.raises(SystemExit):
        cv.build_parser().parse_args(["--out", str(tmp_path), "--scope", "lora"])
    # full fine-tuning never falls back to the LoRA rate: it needs the rate the sweep chose
    args = cv.build_parser().parse_args(["--out", str(tmp_path), "--scope", "full", "--strategies", "all"])
    with pytest.raises(SystemExit, match="--scope full needs --lr"):
        cv.run_grid(args)
    args = cv.build_parser().parse_args(["--out", str(tmp_path), "--strategies", "all"])
    cv.check_args(args)
    assert args.lr == 1e-3


def test_sweep_cells_are_named_by_rate_and_kept_apart_from_the_grid(tmp_path):
    assert cv.cell_path(tmp_path, "t", "all", 1).name == "all-seed1.json"
    assert cv.cell_path(tmp_path, "t", "all", 1, 3e-5).name == "all-lr3e-05-seed1.json"
    assert cv.cell_path(tmp_path, "t", "ir+floor12+cpu", 2).name == "ir+floor12+cpu-seed2.json"
    for lr in (None, 1e-4):
        path = cv.cell_path(tmp_path, "t", "all", 1, lr)
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"lr": lr}))
    assert [c["lr"] for c in cv.load_cells(tmp_path)] == [None]
    assert [c["lr"] for c in cv.load_cells(tmp_path, sweep=True)] == [1e-4]


def test_offload_moves_counts_layers_leaving_and_returning_with_state():
    sizes = [10, 100, 1000, 10000]
    # step 1 trains 0,1; step 2 trains 1,2 (0 leaves, 2 is new: no state yet); step 3 trains 0,2 (1 leaves,
    # 0 returns with state); step 4 the same set (nothing moves)
    assert cv.offload_moves([[0, 1], [1, 2], [0, 2], [0, 2]], sizes) == [10, 110, 0]
    assert cv.offload_moves([[0, 1, 2, 3]] * 3, sizes) == [0, 0]


def test_a_cell_from_before_the_scope_key_counts_as_the_lora_recipe(tmp_path):
    path = tmp_path / "old.json"
    recipe = {"steps": 4, "eval_every": 2, "val_n": 6, "test_n": 6, "micro_batch": 4, "lr": 1e-3, "warmup": 1,
              "model": "irtuning://tiny-llama"}  # no "scope": written before it existed
    path.write_text(json.dumps({"recipe": recipe}))
    args = _args(tmp_path, ["all"])
    cv.check_args(args)  # the LoRA default rate, 1e-3
    cv._check_same_recipe(path, args)  # adapter: accepted
    args.scope = "full"
    with pytest.raises(SystemExit, match="scope='adapter', this grid asks for 'full'"):
        cv._check_same_recipe(path, args)


def _full(strategy, seed, f1s, test_f1, *, held, active, mode="keep"):
    c = _cell(strategy, seed, f1s, test_f1)
    c.update(scope="full", lr=3e-5, device_bytes_per_step=held, active_per_step=active,
             layer_state_bytes=[2**20, 2**21, 2**22], frozen_optimizer_state=mode)
    return c


def test_both_arms_in_one_table_with_the_best_row_as_target_and_byte_columns():
    lora = [_cell("all", 1, [0.2, 0.5, 0.6], 0.6), _cell("ir", 1, [0.1, 0.64, 0.7], 0.7)]
    for c in lora:
        c["lr"] = 1e-3
    text_lora = cv.report(lora, "t", "cmd")
    assert "grads + Adam" not in text_lora and "| ir | 1 |" in text_lora  # the LoRA-only table as before
    full = [_full("all", 1, [0.3, 0.6, 0.8], 0.8, held=[3 * 2**20] * 3, active=[[0, 1, 2]] * 3),
            _full("ir+cpu", 1, [0.1, 0.75, 0.78], 0.75, held=[2**20, 2 * 2**20, 4 * 2**20],
                  active=[[0], [0, 1], [1]], mode="cpu")]
    s = cv.summarize(lora + full)["t"]
    assert s["target"] == pytest.approx(0.9 * 0.8)  # full all's 0.8 is the best final of either arm
    assert set(s["strategies"]) == {"LoRA all", "LoRA ir", "full all", "full ir+cpu"}
    assert s["strategies"]["full ir+cpu"]["steps_to_target"] == [20]  # 0.75 >= 0.72 at step 20
    assert s["strategies"]["LoRA ir"]["reached"] == 0  # 0.70 < 0.72
    # ir+cpu: step 1->2 layer 1 enters without state (0 B), step 2->3 layer 0 leaves (1 MiB)
    assert s["strategies"]["full ir+cpu"]["moved_bytes"] == (2**19, 2**20)
    assert s["strategies"]["full all"]["moved_bytes"] == (0, 0)
    text = cv.report(lora + full, "t", "cmd")
    assert "| full ir+cpu | 1 | 0.750 | 0.750 | 0.780 | 20 (1/1) |" in text
    assert "| 2.0 / 4.0 | 0.5 / 1.0 |" in text and "| LoRA all | 1 |" in text and "| - | - |" in text
    assert "at lr 3e-05" in text and "LoRA r=32 on q,k,v,up,down (rows `LoRA ...`)" in text


def test_a_lora_only_table_shows_the_byte_columns_once_a_cell_recorded_them():
    old = _cell("all", 1, [0.2, 0.5, 0.6], 0.6)  # a cell written before bytes were recorded
    floor = _cell("ir+floor8", 1, [0.1, 0.64, 0.7], 0.7)
    floor.update(device_bytes_per_step=[2**20, 3 * 2**20, 3 * 2**20], active_per_step=[[1], [1, 2], [1, 2]],
                 layer_state_bytes=[2**20, 2**21, 2**22], frozen_optimizer_state="keep")
    for c in (old, floor):
        c["lr"] = 1e-3
    text = cv.report([old, floor], "t", "cmd")
    assert "grads + Adam on device MB (median / max)" in text
    assert "| 3.0 / 3.0 | 0.0 / 0.0 |" in text  # the floor's row: median / max held, nothing moved (keep)
    assert text.count("| - | - |") == 1  # the old cell's row says it has no figures


def test_the_sweep_chooses_the_best_final_validation_rate_and_says_so():
    cells = []
    for lr, f1s in ((1e-5, [0.2, 0.4]), (3e-5, [0.5, 0.7]), (1e-4, [0.6, 0.7])):
        c = _cell("all", 1, f1s, None)
        c.update(lr=lr, scope="full", task="t", torch="x", threads=2, eval_every=10, val_n=6, model="m")
        cells.append(c)
    assert cv.choose_lr(cells) == 3e-5  # 3e-5 and 1e-4 tie at 0.7: the lower rate
    cells[2]["curve"][-1]["val_macro_f1"] = 0.71
    assert cv.choose_lr(cells) == 1e-4
    text = cv.sweep_report(cells, "cmd")
    assert "#### Task `t`: chosen lr 0.0001" in text and "| 3e-05 | 1 | 0.700 | 0.700 | 0.700 (20) |" in text
    assert "the test split is not read" in text


@pytest.fixture(scope="module")
def full_grid(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("full")
    args = _args(out, ["all", "ir+cpu"])
    args.scope, args.lr = "full", 1e-4
    cv.run_grid(args)
    sweep = cv.build_parser().parse_args(
        ["--out", str(out / "sweep"), "--model", "irtuning://tiny-llama", "--strategies", "all", "--seeds", "1",
         "--steps", "2", "--eval-every", "2", "--val-n", "6", "--test-n", "0", "--warmup", "1", "--scope", "full",
         "--lr-sweep", "1e-5", "1e-4"])
    cv.run_grid(sweep)
    return out


@pytest.mark.slow
def test_tiny_full_parameter_cells_hold_bytes_and_offload_moves(full_grid):
    cells = {c["strategy"]: c for c in cv.load_cells(full_grid)}
    assert set(cells) == {"all", "ir+cpu"} and all(c["scope"] == "full" for c in cells.values())
    every, ir = cells["all"], cells["ir+cpu"]
    assert every["recipe"]["scope"] == "full" and len(every["device_bytes_per_step"]) == 4
    # all: every layer trains every step, nothing is offloaded; the bytes on the device are constant after
    # AdamW's first step, and at least 3x the layers' parameters (weights' gradients + two moments)
    assert set(every["offloaded_bytes_per_step"]) == {0} and len(set(every["device_bytes_per_step"])) == 1
    assert every["device_bytes_per_step"][0] >= 3 * sum(every["layer_state_bytes"]) // 2
    assert ir["frozen_optimizer_state"] == "cpu" and max(ir["offloaded_bytes_per_step"]) > 0
    assert max(ir["device_bytes_per_step"]) < every["device_bytes_per_step"][0]
    assert any(n < len(ir["layer_state_bytes"]) for n in ir["layers_per_step"])
    moved = cv.summarize(list(cells.values()))["revision-intention"]["strategies"]["ir+cpu"]["moved_bytes"]
    assert moved[1] > 0
    assert cells["all"]["test_n"] == 6


@pytest.mark.slow
def test_tiny_sweep_reads_validation_only_and_reports_the_chosen_rate(full_grid, tmp_path):
    sweep = cv.load_cells(full_grid / "sweep", sweep=True)
    assert sorted(c["lr"] for c in sweep) == [1e-5, 1e-4]
    assert all(c["test_n"] == 0 and c["test_macro_f1"] is None for c in sweep)
    md = tmp_path / "R.md"
    assert cv.main(["--out", str(full_grid / "sweep"), "--report", "--results-md", str(md), "--tag", "lr",
                    "--test-n", "0", "--lr-sweep", "1e-5", "1e-4"]) == 0
    text = md.read_text()
    assert "<!-- convergence:lr:start -->" in text and "chosen lr" in text and "| 1e-05 | 1 |" in text


@pytest.mark.slow
def test_time_steps_times_lora_and_full_steps_of_all_in_one_process(tmp_path, tiny_model_dir):
    assert cv.main(["--time-steps", "2", "--tasks", "revision-intention", "--seeds", "1", "--out", str(tmp_path),
                    "--model", "irtuning://tiny-llama", "--warmup", "1"]) == 0
    runs = json.loads((tmp_path / "steptime-revision-intention.json").read_text())["runs"]
    assert [r["scope"] for r in runs] == ["adapter", "full", "adapter"]
    assert all(len(r["step_s"]) == 2 and min(r["step_s"]) > 0 for r in runs)
    # same batches: full fine-tuning computes every weight gradient, LoRA only the adapters'
    assert runs[1]["flops_per_step"] > runs[0]["flops_per_step"] == runs[2]["flops_per_step"]
    assert runs[1]["device_bytes"] > runs[0]["device_bytes"]
