"""One training run of one strategy on equal terms, measured: the unit of the strategy comparison.

Every run: the same model, the same LoRA initialisation (seeded before the adapter is created), the
same data order (Trainer seed), the same batch and steps; the engine on a plain transformers Trainer
with ``enable_input_require_grads()`` called first, as Axolotl does for every adapter run. Measured:
per-step wall time, the engine's scoring/selection time, trained layers and backward depth per step,
an exact byte account of trainable parameters / gradients / optimizer state per step, peak RSS, loss,
and label-scoring accuracy / macro-F1 on the held-out split.

Run one in a fresh process (peak RSS is per process)::

    python -m benchmarks.strategy_bench --strategy ir --seed 1 --steps 30 --out run.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.harness.grid import write_cell
from benchmarks.harness.training import PadCollator, account_totals, build_model, tokenize_records, train_counted


def _percentile(xs, q):
    xs = sorted(xs)
    if not xs:
        return None
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def run_strategy(strategy: str, *, seed: int, steps: int, model_dir: str, data_dir: str, micro_batch: int = 4,
                 lr: float = 5e-4, seq_len: int = 256, eval_n: int = 100, options: dict | None = None,
                 n_train: int = 1024, warmup_skip: int = 2, output_dir: str | None = None,
                 engine_options: dict | None = None, label: str | None = None) -> dict:
    from transformers import AutoTokenizer

    from irtuning_plugin.config import SelectionConfig
    from irtuning_plugin.tasks.evaluation import evaluate_records

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    load = lambda split: [json.loads(x) for x in open(Path(data_dir) / f"{split}.jsonl") if x.strip()]  # noqa: E731
    train = tokenize_records(tokenizer, load("train")[:n_train], seq_len)
    test = load("test")[:eval_n]

    model = build_model(model_dir, "adapter", seed)
    config = SelectionConfig(strategy=strategy, strategy_options=dict(options or {}), **(engine_options or {}))
    t_train = time.perf_counter()
    run = train_counted(model, train, PadCollator(tokenizer.pad_token_id), config, seed=seed, steps=steps,
                        micro_batch=micro_batch, lr=lr, warmup=min(5, steps // 5), count_flops=False,
                        account_at="pre_optimizer", output_dir=output_dir, prefix=f"bench-{strategy}-")
    train_seconds = time.perf_counter() - t_train
    trainer, cb, times = run.trainer, run.selection, run.step_s
    mem = [account_totals(acc) for acc in run.accounts]
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rows = cb.rows
    steady = times[warmup_skip:] or times
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    res = evaluate_records(model, tokenizer, test)
    return {
        "strategy": label or strategy, "seed": seed, "engine_options": engine_options or {}, "steps": steps,
        "micro_batch": micro_batch, "options": options or {},
        "num_layers": cb.engine.num_layers,
        "step_s_median": statistics.median(steady), "step_s_p20": _percentile(steady, 0.2),
        "step_s_p80": _percentile(steady, 0.8), "step_times": times, "train_seconds": train_seconds,
        "score_select_ms_median": statistics.median(r["score_ms"] + r["select_ms"] for r in rows[warmup_skip:] or rows),
        "layers_per_step": [r["n_active"] for r in rows],
        "lowest_active": [r["lowest_active"] for r in rows],
        "memory_per_step": mem, "peak_rss_bytes": peak_rss,
        "losses": losses, "loss_last5": statistics.mean(losses[-5:]) if losses else None,
        "accuracy": res.accuracy, "macro_f1": res.macro_f1, "eval_n": res.n,
        "torch": torch.__version__, "device": "cpu", "threads": torch.get_num_threads(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--strategy", required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--model", default="irtuning://smollm2-135m-instruct")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--eval-n", type=int, default=100)
    p.add_argument("--options", default="{}", help="strategy options as JSON")
    p.add_argument("--engine-options", default="{}", help="engine options (SelectionConfig fields) as JSON")
    p.add_argument("--label", default=None, help="name of this variant in the tables")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    from irtuning_plugin.tasks.assets.references import resolve_reference, revision_data_dir

    result = run_strategy(a.strategy, seed=a.seed, steps=a.steps, model_dir=resolve_reference(a.model),
                          data_dir=str(revision_data_dir()), micro_batch=a.micro_batch, eval_n=a.eval_n,
                          options=json.loads(a.options), engine_options=json.loads(a.engine_options),
                          label=a.label)
    write_cell(Path(a.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
