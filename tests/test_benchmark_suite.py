"""The strategy benchmark suite in reduced form (tiny model, 2 steps), so it cannot rot."""

import json

import pytest


@pytest.fixture(scope="module")
def runs(tiny_model_dir):
    from benchmarks.run_comparison import DEFAULT_OPTIONS
    from benchmarks.strategy_bench import run_strategy
    from irtuning_plugin.strategies import registered_strategies
    from irtuning_plugin.tasks.assets.references import revision_data_dir

    data = str(revision_data_dir())
    names = [n for n in ("all", "ir", "ist", "lisa", "random", "salf") if n in registered_strategies()]
    options = {n: dict(DEFAULT_OPTIONS.get(n) or {}) for n in names}
    options["salf"] = {"max_trainable": 3}  # the comparison's 10 exceeds the tiny model's 8 layers
    return [run_strategy(n, seed=s, steps=2, model_dir=str(tiny_model_dir), data_dir=data, eval_n=5, n_train=32,
                         options=options[n], warmup_skip=0)
            for n in names for s in (1, 2)]


def test_each_run_measures_what_the_tables_need(runs):
    for r in runs:
        assert len(r["step_times"]) == 2 and r["step_s_median"] > 0
        assert len(r["layers_per_step"]) == 2 and len(r["memory_per_step"]) == 2
        assert r["peak_rss_bytes"] > 0 and r["eval_n"] == 5
        assert r["accuracy"] * 5 == pytest.approx(round(r["accuracy"] * 5))  # correct answers out of the 5 scored
    by = {r["strategy"]: r for r in runs}
    # plain LoRA keeps gradients for every adapter tensor; a selecting strategy for fewer
    assert by["ir"]["memory_per_step"][0]["grad_bytes"] < by["all"]["memory_per_step"][0]["grad_bytes"]


def test_report_and_plot_are_generated(runs, tmp_path):
    from benchmarks.run_comparison import plot, report, write_results

    md = tmp_path / "RESULTS.md"
    md.write_text("# Benchmark results\n\n## Gradient-norm kernel\nkept\n")
    write_results(report(runs, "t", "tiny"), "t", md)
    write_results(report(runs, "t", "tiny"), "t", md)  # regenerating replaces, never duplicates
    text = md.read_text()
    assert text.count("<!-- strategies:t:start -->") == 1 and "kept" in text
    assert "| ir |" in text and "| all |" in text and "1.00×" in text
    plot(runs, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    json.dumps(runs)  # machine-readable as saved
