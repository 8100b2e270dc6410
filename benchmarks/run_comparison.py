"""The strategy comparison: every strategy x seed in its own process, then tables and a plot.

    python -m benchmarks.run_comparison --steps 30 --seeds 1 2 3 \
        --strategies all ir ist lisa random salf --axolotl-lisa --out benchmarks/results/cpu-smollm2

writes ``runs.jsonl`` (one line per run) there, then ``--report`` turns it into the generated section of
``benchmarks/RESULTS.md`` and ``strategies-<tag>.png``. Ratios against ``all`` (plain LoRA) measured in
the same invocation are the headline figures: these machines differ up to 3x in speed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import results
from benchmarks.harness.grid import Cell, cell_env, run_cells
from benchmarks.harness.results import RESULTS_MD, replace_section

# Options that make a short CPU run meaningful; the defaults of the papers otherwise.
DEFAULT_OPTIONS = {
    "lisa": {"n_layers": 2, "interval": 5},  # LMFlow's K=20 would re-draw once in a 30-step run
    "random": {"n_layers": 4},
    # Unbounded: with latent space 0 left out under SmolLM2's tied head (irtuning_salf_embedding_space:
    # auto, see docs/salf.md) the calibration picks cut 23 (6 layers train). The table of
    # 2026-11-23 was run with max_trainable: 10 before that default existed; it picked the same cut 23.
    "salf": {},
}


# Variants: name -> (strategy, engine options). "salf-hook-kept" keeps enable_input_require_grads' hook
# (what Axolotl 0.19 leaves in place), so its backward pass runs down to layer 0 despite the frozen layers.
VARIANTS = {"salf-hook-kept": ("salf", {"cut_backward": False}), "ir-hook-kept": ("ir", {"cut_backward": False})}


def cell(name: str, seed: int, args, out_dir: Path) -> Cell:
    """One run of the comparison: ``benchmarks.strategy_bench`` for one strategy (or variant) and seed."""
    strategy, engine_opts = VARIANTS.get(name, (name, {}))
    out = out_dir / f"{name}-seed{seed}.json"
    opts = json.dumps(DEFAULT_OPTIONS.get(strategy, {}))  # variants use their strategy's options
    return Cell(f"{name} seed {seed}", out, [
        "benchmarks.strategy_bench", "--strategy", strategy, "--seed", str(seed),
        "--steps", str(args.steps), "--model", args.model, "--micro-batch", str(args.micro_batch),
        "--eval-n", str(args.eval_n), "--options", opts, "--out", str(out),
        "--engine-options", json.dumps(engine_opts), "--label", name])


AXOLOTL_LISA_YAML = """
base_model: {model}
datasets:
  - path: {data}/train.jsonl
    ds_type: json
    type: input_output
train_on_inputs: false
val_set_size: 0
dataset_prepared_path: {work}/prepared
output_dir: {work}/out
sequence_len: 256
sample_packing: false
lisa_n_layers: 2
lisa_step_interval: 5
lisa_layers_attribute: model.layers
micro_batch_size: {mb}
gradient_accumulation_steps: 1
max_steps: {steps}
optimizer: adamw_torch
lr_scheduler: linear
learning_rate: 0.00001
warmup_steps: 2
seed: {seed}
logging_steps: 1
save_strategy: "no"
bf16: false
fp16: false
"""


def run_axolotl_lisa(seed: int, args, out_dir: Path) -> dict:
    """Axolotl's built-in LISA (full fine-tuning of 2 layers + embeddings/head), as an outside reference."""
    from irtuning_plugin.tasks.assets.references import resolve_reference, revision_data_dir

    work = Path(tempfile.mkdtemp(prefix="axolotl-lisa-"))
    cfg = work / "cfg.yaml"
    cfg.write_text(AXOLOTL_LISA_YAML.format(model=resolve_reference(args.model), data=revision_data_dir(),
                                            work=work, mb=args.micro_batch, steps=args.steps, seed=seed))
    t0 = time.perf_counter()
    # A fresh wrapper process whose only child is axolotl: its RUSAGE_CHILDREN peak is axolotl's own.
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print('IRTUNING_CHILD_MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
               "sys.exit(r.returncode)")
    proc = subprocess.run([sys.executable, "-c", wrapper, str(Path(sys.executable).parent / "axolotl"), "train",
                           str(cfg), "--launcher", "python"], env=cell_env(), capture_output=True, text=True, cwd=work)
    wall = time.perf_counter() - t0
    (out_dir / f"axolotl-lisa-seed{seed}.log").write_text(proc.stdout[-20000:] + proc.stderr[-20000:])
    if proc.returncode != 0:
        return {"strategy": "axolotl-lisa", "seed": seed, "error": f"exit {proc.returncode}"}
    runtime = None
    losses = []
    for line in (proc.stdout + proc.stderr).splitlines():
        if "'train_runtime'" in line:
            runtime = float(line.split("'train_runtime': '")[1].split("'")[0])
        if "{'loss': '" in line:
            losses.append(float(line.split("{'loss': '")[1].split("'")[0]))
    rss = None
    for line in proc.stdout.splitlines():
        if line.startswith("IRTUNING_CHILD_MAXRSS_KB"):
            rss = int(line.split()[1]) * 1024
    if rss is None:  # older wrapper-less runs: max over every child of this invocation (an upper bound)
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"strategy": "axolotl-lisa", "seed": seed, "steps": args.steps, "wall_s": wall,
            "step_s_mean": runtime / args.steps if runtime else None, "peak_rss_bytes_children_max": rss,
            "losses": losses, "loss_last5": statistics.mean(losses[-5:]) if losses else None,
            "rss_exact": any(line.startswith("IRTUNING_CHILD_MAXRSS_KB") for line in proc.stdout.splitlines()),
            "note": "full fine-tuning; step time = train_runtime / steps (includes Trainer overhead)"}


def _ms(xs):
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def report(runs: list[dict], tag: str, title: str) -> str:
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["strategy"], []).append(r)
    base = by.get("all")
    base_step = statistics.mean(r["step_s_median"] for r in base) if base else None
    where = results.host()
    lines = [f"### {title}", "",
             f"Generated {datetime.date.today()} by benchmarks/run_comparison.py on {where['machine']} CPU "
             f"({where['cpus']} cores), Python {where['python']}, "
             f"torch {runs[0].get('torch', '?')}; {len({r['seed'] for r in runs})} seeds; "
             f"{runs[0].get('steps')} steps, micro-batch {runs[0].get('micro_batch')}.", "",
             "| strategy | step s (median [p20, p80]) | vs all | score+select ms | layers/step (min-med-max) "
             "| lowest trained layer (median) | grad+optimizer MB (median step) | peak RSS MB | loss (last 5) "
             "| accuracy | macro-F1 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, rs in by.items():
        if name == "axolotl-lisa":
            continue
        step = [r["step_s_median"] for r in rs]
        p20 = statistics.mean(r["step_s_p20"] for r in rs)
        p80 = statistics.mean(r["step_s_p80"] for r in rs)
        layers = [n for r in rs for n in r["layers_per_step"]]
        lowest = [x for r in rs for x in r["lowest_active"]]
        mem = [statistics.median(m["grad_bytes"] + m["optimizer_state_bytes"] for m in r["memory_per_step"]) / 2**20
               for r in rs]
        rss = [r["peak_rss_bytes"] / 2**20 for r in rs]
        ratio = f"{statistics.mean(step) / base_step:.2f}×" if base_step else "-"
        lines.append(
            f"| {name} | {statistics.mean(step):.2f} [{p20:.2f}, {p80:.2f}] | {ratio} "
            f"| {statistics.mean(r['score_select_ms_median'] for r in rs):.1f} "
            f"| {min(layers)}-{statistics.median(layers):g}-{max(layers)} | {statistics.median(lowest):g} "
            f"| {statistics.mean(mem):.1f} | {statistics.mean(rss):.0f} | {_ms([r['loss_last5'] for r in rs])} "
            f"| {_ms([r['accuracy'] for r in rs])} | {_ms([r['macro_f1'] for r in rs])} |")
    if "axolotl-lisa" in by:
        rs = [r for r in by["axolotl-lisa"] if "error" not in r]
        if rs:
            lines += ["", "Outside reference, Axolotl 0.19's own LISA (full fine-tuning, 2 layers + embeddings/head, "
                      "`axolotl train --launcher python`): step "
                      f"{statistics.mean(r['step_s_mean'] for r in rs):.2f} s (train_runtime/steps), "
                      f"loss (last 5) {_ms([r['loss_last5'] for r in rs])}, peak RSS "
                      f"{max(r['peak_rss_bytes_children_max'] for r in rs) / 2**20:.0f} MB"
                      + ("" if all(r.get("rss_exact") for r in rs) else
                         " (an upper bound: the maximum over every child process of that invocation, which also "
                         "ran strategy_bench processes)") + "."]
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by: dict[str, list[dict]] = {}
    for r in runs:
        if r["strategy"] != "axolotl-lisa":
            by.setdefault(r["strategy"], []).append(r)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, rs in by.items():
        n = min(len(r["losses"]) for r in rs)
        mean = [statistics.mean(r["losses"][i] for r in rs) for i in range(n)]
        axes[0].plot(range(1, n + 1), mean, label=name)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("training loss (mean over seeds)")
    axes[0].legend()
    names = list(by)
    axes[1].bar(names, [statistics.mean(r["step_s_median"] for r in by[n]) for n in names])
    axes[1].set_ylabel("median step time (s)")
    axes[2].bar(names, [statistics.mean(statistics.median(m["grad_bytes"] + m["optimizer_state_bytes"]
                                                          for m in r["memory_per_step"]) / 2**20 for r in by[n])
                        for n in names])
    axes[2].set_ylabel("gradient + optimizer-state MB (median step)")
    for ax in axes[1:]:
        ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    results.save_figure(fig, path, dpi=90)


def write_results(section: str, tag: str, results_md: Path) -> None:
    replace_section(results_md, f"strategies:{tag}", section, "Strategy comparison")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--strategies", nargs="+", default=["all", "ir", "ist", "lisa", "random", "salf"])
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--eval-n", type=int, default=100)
    p.add_argument("--model", default="irtuning://smollm2-135m-instruct")
    p.add_argument("--axolotl-lisa", action="store_true", help="also run Axolotl's own LISA (full FT)")
    p.add_argument("--axolotl-lisa-seeds", nargs="+", type=int, default=None,
                   help="seeds of the Axolotl LISA runs (default: all seeds)")
    p.add_argument("--out", required=True, help="folder for runs.jsonl and per-run JSON")
    p.add_argument("--report", action="store_true", help="only regenerate RESULTS.md + PNG from runs.jsonl")
    p.add_argument("--tag", default="cpu-smollm2")
    p.add_argument("--title", default="CPU, SmolLM2-135M-Instruct, LoRA r=32 on q,k,v,up,down")
    p.add_argument("--results-md", default=str(RESULTS_MD))
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / "runs.jsonl"
    if not a.report:
        with open(runs_path, "a") as fh:
            def append(_cell, run: dict) -> None:
                fh.write(json.dumps(run) + "\n")
                fh.flush()

            for seed in a.seeds:  # seeds outermost: a slow spell of the machine hits every strategy alike
                run_cells([cell(name, seed, a, out) for name in a.strategies], resume=False, done=append)
                if a.axolotl_lisa and (a.axolotl_lisa_seeds is None or seed in a.axolotl_lisa_seeds):
                    append(None, run_axolotl_lisa(seed, a, out))
    runs = [json.loads(x) for x in runs_path.read_text().splitlines() if x.strip()]
    write_results(report(runs, a.tag, a.title), a.tag, Path(a.results_md))
    plot(runs, Path(a.results_md).parent / f"strategies-{a.tag}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
