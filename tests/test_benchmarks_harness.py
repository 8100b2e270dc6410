"""The benchmark harness: no path edits anywhere, the grid runner's resume and atomic cells, the RESULTS
writer, and the committed RESULTS.md sections regenerated from the committed cells, word for word."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from benchmarks import regenerate
from benchmarks.harness import grid, results

REPO = Path(__file__).resolve().parent.parent


# Named exceptions, each with its reason (none in benchmarks/).
SYS_PATH_EDIT_ALLOWED: set[str] = set()  # none: tests and benchmarks import through pytest.ini / PYTHONPATH


def test_no_file_in_benchmarks_or_tests_edits_sys_path():
    edits = re.compile(r"sys\.path\.(insert|append)\(|sys\.path\s*\+?=")
    offenders = [f"{p.relative_to(REPO)}:{n}" for folder in ("benchmarks", "tests") for p in (REPO / folder).rglob("*.py")
                 for n, line in enumerate(p.read_text().splitlines(), 1)
                 if edits.search(line) and str(p.relative_to(REPO)) not in SYS_PATH_EDIT_ALLOWED]
    assert offenders == []


def test_a_section_is_replaced_in_place_and_an_unchanged_one_keeps_its_date(tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# Benchmark results\n\nkept\n")
    assert results.replace_section(md, "study:t", "Generated 2026-01-01 by x.\n\n| a |", "Study")
    first = md.read_text()
    assert first == ("# Benchmark results\n\nkept\n\n## Study\n\n<!-- study:t:start -->\n"
                     "Generated 2026-01-01 by x.\n\n| a |\n<!-- study:t:end -->\n")
    # the same tables on a later day: the file is not touched
    assert not results.replace_section(md, "study:t", "Generated 2026-02-02 by x.\n\n| a |", "Study")
    assert md.read_text() == first
    # other tables: replaced in place, never a second copy, the new date with them
    assert results.replace_section(md, "study:t", "Generated 2026-02-02 by x.\n\n| b |", "Study")
    text = md.read_text()
    assert text.count("<!-- study:t:start -->") == 1 and "| b |" in text and "| a |" not in text
    assert "Generated 2026-02-02" in text and text.startswith("# Benchmark results\n\nkept\n")


def test_collecting_writes_nothing(tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# Benchmark results\n")
    with results.collecting() as files:
        results.replace_section(md, "s", "one", "H")
        results.replace_section(md, "s2", "two", "H")  # sees the first section, held in memory
    assert md.read_text() == "# Benchmark results\n"
    assert files[md.resolve()] == ("# Benchmark results\n\n## H\n\n<!-- s:start -->\none\n<!-- s:end -->\n"
                                   "\n<!-- s2:start -->\ntwo\n<!-- s2:end -->\n")


def test_grid_skips_finished_cells_and_reruns_the_others_in_subprocesses(tmp_path, monkeypatch):
    writer = ("import json, sys, os; from benchmarks.harness.grid import write_cell; "
              "write_cell(sys.argv[1], {'pid': os.getpid(), 'threads': os.environ.get('OMP_NUM_THREADS')})")
    module = tmp_path / "pkg_cell_writer.py"
    module.write_text(writer + "\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    done_a, done_b = tmp_path / "a.json", tmp_path / "b.json"
    done_a.write_text(json.dumps({"old": True}))
    stale = tmp_path / "b.partial.jsonl"
    stale.write_text("{}\n")
    seen, checked = [], []
    cells = [grid.Cell("a", done_a, ["pkg_cell_writer", str(done_a)]),
             grid.Cell("b", done_b, ["pkg_cell_writer", str(done_b)], partial=stale)]
    computed = grid.run_cells(cells, resume=True, threads=3, check=lambda c: checked.append(c.label),
                              done=lambda c, r: seen.append((c.label, r["threads"])))
    assert computed == [done_b] and checked == ["a"] and seen == [("b", "3")]
    assert json.loads(done_a.read_text()) == {"old": True} and not stale.exists()
    assert not list(tmp_path.glob("*.tmp"))  # written to .tmp, then renamed
    # without resume every cell runs again
    assert grid.run_cells(cells, resume=False) == [done_a, done_b]
    assert "pid" in json.loads(done_a.read_text())


def test_a_failing_cell_stops_the_grid(tmp_path):
    cells = [grid.Cell("bad", tmp_path / "x.json", ["benchmarks.no_such_study"]),
             grid.Cell("never", tmp_path / "y.json", ["benchmarks.no_such_study"])]
    with pytest.raises(Exception, match="returned non-zero exit status"):
        grid.run_cells(cells, resume=True)
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "y.json").exists()


def test_every_generated_section_regenerates_from_the_committed_cells(monkeypatch, capsys):
    """benchmarks.regenerate --check: every marker section of RESULTS.md and of the issue-40 tables file
    comes out of the committed cells as committed (the "Generated <date>" aside). The strategy table
    names the machine that generated it; pinned here to the one the committed text names."""
    monkeypatch.setattr(results, "host", lambda: {"machine": "x86_64", "cpus": 2, "python": "3.11.7"})
    monkeypatch.chdir(REPO)  # regenerate runs from the repository root; the test's folder comes back after
    md = results.RESULTS_MD.read_text()
    names = re.findall(r"<!-- ([^ ]+):start -->", md)
    assert {"strategies:cpu-smollm2", "costs-lora", "costs-full", "salf", "convergence:cpu-smollm2-300steps",
            "convergence:cpu-smollm2-600steps", "convergence:cpu-smollm2-full-lr"} <= set(names)
    assert len([c for c in regenerate.commands() if "benchmarks.convergence" in c]) == len(
        [n for n in names if n.startswith("convergence:")])
    def files():
        return {p: p.stat().st_mtime_ns for p in (REPO / "benchmarks").rglob("*")
                if p.is_file() and "__pycache__" not in p.parts}

    before = files()
    assert regenerate.main(["--check"]) == 0, capsys.readouterr().out[-4000:]
    assert files() == before  # nothing written, no figure redrawn


def test_study_modules_run_from_the_repository_root_with_python_m():
    import subprocess

    out = subprocess.run([sys.executable, "-m", "benchmarks.convergence", "--help"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert "--lr-sweep" in out and "--time-steps" in out and "--only-tasks" in out


@pytest.mark.parametrize("account_at", ["pre_optimizer", "optimizer"])
def test_the_counted_loop_takes_the_account_where_asked_and_counts_flops_only_when_asked(tiny_model_dir, account_at):
    from transformers import AutoTokenizer

    from benchmarks.harness.training import PadCollator, build_model, tokenize_records, train_counted
    from irtuning_plugin.config import SelectionConfig
    from irtuning_plugin.tasks.assets.references import revision_data_dir

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [json.loads(x) for x in open(revision_data_dir() / "train.jsonl") if x.strip()][:16]
    run = train_counted(build_model(str(tiny_model_dir), "adapter", 1), tokenize_records(tok, rows, 256),
                        PadCollator(tok.pad_token_id), SelectionConfig(strategy="all"), seed=1, steps=2,
                        micro_batch=2, lr=1e-3, warmup=0, count_flops=account_at == "optimizer",
                        account_at=account_at)
    assert len(run.step_s) == len(run.accounts) == 2 and run.train_s == pytest.approx(sum(run.step_s))
    first_state = run.accounts[0]["optimizer_state_bytes_accelerator"] + run.accounts[0]["optimizer_state_bytes_host"]
    if account_at == "pre_optimizer":  # before the first optimizer.step(): AdamW has no state yet
        assert first_state == 0 and run.flops == 0
    else:  # after it: fp32 exp_avg + exp_avg_sq and a 4-byte step count per trainable tensor
        trainable = [p for p in run.trainer.model.parameters() if p.requires_grad]
        assert first_state == sum(2 * 4 * p.numel() + 4 for p in trainable) and run.flops > 0
    assert len(run.selection.rows) == 2


def test_the_counted_loop_refuses_an_unknown_account_point():
    from benchmarks.harness.training import train_counted

    with pytest.raises(ValueError, match="account_at: 'after'; allowed: pre_optimizer, optimizer"):
        train_counted(None, [], None, None, seed=1, steps=1, micro_batch=1, lr=1e-3, warmup=0, count_flops=False,
                      account_at="after")
