"""The convergence grid runner on the tiny model: curves, counted FLOPs, skip/restart of cells, report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import convergence as cv  # noqa: E402


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
