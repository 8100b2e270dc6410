"""pytest-benchmark entry of the strategy comparison (one seed; run_comparison.py does seeds and tables).

    .venv/bin/pytest benchmarks/bench_strategies.py --benchmark-json=benchmarks/results/strategies.json

Each benchmark is one whole short run (train + held-out evaluation) of one strategy on SmolLM2; the
per-step figures (median/p20/p80 step time, scoring share, layers, backward depth, bytes) are stored in
``extra_info`` of the saved JSON. Set IRTUNING_BENCH_MODEL=irtuning://tiny-llama for a quick check.
"""

import os

import pytest

from benchmarks.strategy_bench import run_strategy

STRATEGIES = ["all", "ir", "ist", "lisa", "random", "salf"]
OPTIONS = {"lisa": {"n_layers": 2, "interval": 5}, "random": {"n_layers": 4}}
STEPS = int(os.environ.get("IRTUNING_BENCH_STEPS", "12"))
MODEL = os.environ.get("IRTUNING_BENCH_MODEL", "irtuning://smollm2-135m-instruct")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_run(benchmark, strategy, tmp_path):
    from irtuning_plugin.tasks.assets.references import resolve_reference, revision_data_dir

    model_dir, data_dir = resolve_reference(MODEL), str(revision_data_dir())
    result = benchmark.pedantic(
        run_strategy, args=(strategy,), rounds=1, iterations=1,
        kwargs=dict(seed=1, steps=STEPS, model_dir=model_dir, data_dir=data_dir, eval_n=50,
                    options=OPTIONS.get(strategy), output_dir=str(tmp_path)),
    )
    keep = ("step_s_median", "step_s_p20", "step_s_p80", "score_select_ms_median", "layers_per_step",
            "lowest_active", "peak_rss_bytes", "loss_last5", "accuracy", "macro_f1", "num_layers")
    benchmark.extra_info.update({k: result[k] for k in keep})
    benchmark.extra_info["grad_plus_optimizer_bytes"] = [m["grad_bytes"] + m["optimizer_state_bytes"]
                                                         for m in result["memory_per_step"]]
    assert len(result["layers_per_step"]) == STEPS
