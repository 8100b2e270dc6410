"""Convergence grid: held-out quality against optimizer steps and counted FLOPs, per strategy, seed and task.

    PYTHONSAFEPATH=1 python benchmarks/convergence.py --tasks revision-intention tweet-sentiment \
        --strategies all ir ist lisa random salf --seeds 1 2 3 --steps 300 --eval-every 50 \
        --no-report --out benchmarks/results/convergence-cpu-smollm2-300steps
    PYTHONSAFEPATH=1 python benchmarks/convergence.py --out benchmarks/results/convergence-cpu-smollm2-300steps \
        --tag cpu-smollm2-300steps --report

One cell = (task, strategy, seed), trained in its own process, one cell after another. A finished cell
leaves ``<out>/<task>/<strategy>-seed<seed>.json`` (written atomically) and is skipped when the grid is
run again; an interrupted cell leaves only ``*.partial.jsonl`` (its curve so far, for watching), which
the next run deletes before it trains that cell again from step 0. So a grid can be stopped at any time
and re-run with the same command; only the cell in flight is lost.

Each cell: the strategy's own defaults (plus ``STRATEGY_OPTIONS``), the same LoRA initialisation (seeded
before the adapter), data order, learning rate and schedule for every strategy; label-scoring accuracy
and macro-F1 on the first ``--val-n`` validation examples every ``--eval-every`` steps, and on the first
``--test-n`` test examples once at the end. Training FLOPs are counted (``FlopCounterMode`` around every
forward+backward, i.e. matmuls and attention, the optimizer not included); training wall time excludes
evaluation. ``--report`` regenerates the tables in ``benchmarks/RESULTS.md`` and the plot from the cell
files alone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # run as a script under PYTHONSAFEPATH=1, the folder is not on the path
    sys.path.insert(0, str(HERE))

from results_md import replace_section  # noqa: E402

# A strategy's options where its default is not the setting compared (everything else: its defaults),
# as a function of the model's layer count.
STRATEGY_OPTIONS = {
    # Unbounded, SALF's calibration on SmolLM2 picks cut 0 and trains 29 of 30 layers (= `all`);
    # a third of the layers (10 of 30) is the setting compared, as in run_comparison.py.
    "salf": lambda num_layers: {"max_trainable": max(1, num_layers // 3)},
}

# Grid names that are a strategy plus engine settings: `ir+floor` = `ir` above the depth floor taken from
# the salf calibration (`irtuning_depth_floor: salf`, salf's own defaults; 24 of 30 layers on SmolLM2).
VARIANTS = {"ir+floor": ("ir", {"depth_floor": "salf"})}


def selection_config(name: str, options: dict | None):
    """The SelectionConfig of a grid strategy name (a registered strategy, or one of VARIANTS)."""
    from irtuning_plugin.config import SelectionConfig

    strategy, extra = VARIANTS.get(name, (name, {}))
    return SelectionConfig(strategy=strategy, strategy_options=dict(options or {}), selection_log=False,
                           heatmap=False, **extra)


def task_data_dir(task: str) -> Path:
    """The built-in data folder of a task (built on first use)."""
    from irtuning_plugin.assets.references import data_dir_for

    return data_dir_for(task)


def task_labels(data_dir: Path) -> list[str]:
    return list(json.loads((Path(data_dir) / "manifest.json").read_text())["labels"])


def load_split(data_dir: Path, split: str, limit: int | None = None) -> list[dict]:
    rows = [json.loads(x) for x in open(Path(data_dir) / f"{split}.jsonl", encoding="utf-8") if x.strip()]
    return rows[:limit] if limit else rows


def evaluate_task(model, tokenizer, records: list[dict], labels: list[str]):
    """Label scoring for any ``input_output`` task whose records are [prompt, " " + label]."""
    from irtuning_plugin.evaluation import classification_metrics, label_logprobs

    prompts = [r["segments"][0]["text"] for r in records]
    scores = label_logprobs(model, tokenizer, prompts, labels, batch_size=8)
    pred = [labels[i] for i in scores.argmax(dim=1).tolist()]
    return classification_metrics([r["label"] for r in records], pred, labels)


def run_cell(*, task: str, strategy: str, seed: int, steps: int, eval_every: int, val_n: int, test_n: int,
             model_dir: str, data_dir: str, micro_batch: int = 4, lr: float = 1e-3, warmup: int = 20,
             options: dict | None = None, partial: Path | None = None, eval_at_start: bool = False) -> dict:
    import tempfile

    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments, set_seed

    import irtuning_plugin.evaluation  # noqa: F401  (imported now: a checkout changed mid-cell must not mix versions)
    from irtuning_plugin.callback import attach_layer_selection

    from strategy_bench import LORA, TARGETS, PadCollator, tokenize_records

    labels = task_labels(Path(data_dir))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train = tokenize_records(tokenizer, load_split(Path(data_dir), "train"), 256)
    val = load_split(Path(data_dir), "val", val_n)
    test = load_split(Path(data_dir), "test", test_n)

    set_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    set_seed(seed)
    model = get_peft_model(base, LoraConfig(target_modules=TARGETS, task_type="CAUSAL_LM", **LORA))
    model.enable_input_require_grads()  # as Axolotl 0.19 does for every adapter run
    if callable(options):
        options = options(base.config.num_hidden_layers)
    counted = {"flops": 0}

    class CountingTrainer(Trainer):
        def training_step(self, *args, **kwargs):
            with FlopCounterMode(display=False) as fc:
                loss = super().training_step(*args, **kwargs)
            counted["flops"] += fc.get_total_flops()
            return loss

    out = tempfile.mkdtemp(prefix=f"conv-{strategy}-")
    targs = TrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=micro_batch, learning_rate=lr,
        lr_scheduler_type="linear", warmup_steps=warmup, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, seed=seed, data_seed=seed, dataloader_num_workers=0,
        remove_unused_columns=False, disable_tqdm=True,
    )
    trainer = CountingTrainer(model=model, args=targs, train_dataset=train,
                              data_collator=PadCollator(tokenizer.pad_token_id))
    cb = attach_layer_selection(trainer, selection_config(strategy, options))
    curve: list[dict] = []
    clock = {"train_s": 0.0}
    sink = open(partial, "w") if partial else None

    def point(step: int) -> None:
        t0 = time.perf_counter()
        res = evaluate_task(model, tokenizer, val, labels)
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h][-eval_every:]
        row = {"step": step, "flops": counted["flops"], "train_s": clock["train_s"], "val_accuracy": res.accuracy,
               "val_macro_f1": res.macro_f1, "train_loss": statistics.mean(losses) if losses else None,
               "eval_s": time.perf_counter() - t0}
        curve.append(row)
        if sink:
            sink.write(json.dumps(row) + "\n")
            sink.flush()

    class Curve(TrainerCallback):
        def on_train_begin(self, a, s, c, **kw):
            if eval_at_start:
                point(0)

        def on_step_begin(self, a, s, c, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, s, c, **kw):
            clock["train_s"] += time.perf_counter() - self.t0
            if s.global_step % eval_every == 0 or s.global_step == steps:
                point(s.global_step)

    trainer.add_callback(Curve())
    trainer.train()
    if sink:
        sink.close()
    t0 = time.perf_counter()
    res = evaluate_task(model, tokenizer, test, labels)
    return {
        "task": task, "strategy": strategy, "seed": seed, "steps": steps, "micro_batch": micro_batch, "lr": lr,
        "warmup": warmup, "options": options or {}, "eval_every": eval_every, "val_n": len(val),
        "curve": curve, "test_accuracy": res.accuracy, "test_macro_f1": res.macro_f1, "test_n": res.n,
        "test_per_class": res.per_class, "test_eval_s": time.perf_counter() - t0,
        "layers_per_step": [r["n_active"] for r in cb.rows], "lowest_active": [r["lowest_active"] for r in cb.rows],
        "train_flops": counted["flops"], "train_s": clock["train_s"],
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "load_avg_end": os.getloadavg(), "date": datetime.date.today().isoformat(),
    }


def cell_path(out: Path, task: str, strategy: str, seed: int) -> Path:
    return out / task / f"{strategy}-seed{seed}.json"


def _env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONSAFEPATH": "1", "HF_HUB_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1",
            "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}


RECIPE_KEYS = ("steps", "eval_every", "val_n", "test_n", "micro_batch", "lr", "warmup", "model")


def _check_same_recipe(path: Path, a) -> None:
    """A finished cell counts only if it was run with the recipe asked for now."""
    recipe = json.loads(path.read_text()).get("recipe", {})
    for key in RECIPE_KEYS:
        if recipe.get(key) != getattr(a, key):
            raise SystemExit(f"{path} was run with {key}={recipe.get(key)!r}, this grid asks for "
                             f"{getattr(a, key)!r}; use another --out or delete that cell")


def run_grid(a) -> list[Path]:
    """Run every missing cell, one after another; return the cells that were (re)computed."""
    out = Path(a.out)
    done = []
    for task in a.tasks:
        for seed in a.seeds:  # seeds outermost: a partial grid has every strategy on the same seeds
            for strategy in a.strategies:
                path = cell_path(out, task, strategy, seed)
                if path.exists():
                    _check_same_recipe(path, a)
                    print(f"skip {path} (finished)", flush=True)
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                partial = path.with_suffix(".partial.jsonl")
                partial.unlink(missing_ok=True)  # an interrupted cell starts again from step 0
                cmd = [sys.executable, str(Path(__file__).resolve()), "--cell", "--tasks", task,
                       "--strategies", strategy, "--seeds", str(seed), "--out", str(out),
                       "--steps", str(a.steps), "--eval-every", str(a.eval_every), "--val-n", str(a.val_n),
                       "--test-n", str(a.test_n), "--micro-batch", str(a.micro_batch), "--lr", str(a.lr),
                       "--warmup", str(a.warmup), "--model", a.model]
                if a.eval_at_start:
                    cmd.append("--eval-at-start")
                print(f"cell {task} {strategy} seed {seed} -> {path}", flush=True)
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True, env=_env(a.threads))
                print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
                done.append(path)
    return done


def _cell_main(a) -> int:
    from irtuning_plugin.assets.references import resolve_reference

    task, strategy, seed = a.tasks[0], a.strategies[0], a.seeds[0]
    path = cell_path(Path(a.out), task, strategy, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    res = run_cell(task=task, strategy=strategy, seed=seed, steps=a.steps, eval_every=a.eval_every,
                   val_n=a.val_n, test_n=a.test_n, model_dir=resolve_reference(a.model),
                   data_dir=str(task_data_dir(task)), micro_batch=a.micro_batch, lr=a.lr, warmup=a.warmup,
                   options=STRATEGY_OPTIONS.get(strategy, {}), partial=path.with_suffix(".partial.jsonl"),
                   eval_at_start=a.eval_at_start)
    res["model"] = a.model
    res["recipe"] = {key: getattr(a, key) for key in RECIPE_KEYS}  # as asked (a split may hold fewer)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, path)  # a result file exists only once the cell is complete
    path.with_suffix(".partial.jsonl").unlink(missing_ok=True)
    return 0


# ---- report ------------------------------------------------------------------------------------------

def load_cells(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(out).glob("*/*-seed*.json"))]


def _ms(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def steps_to_target(curve: list[dict], target: float) -> dict | None:
    """First evaluation point whose validation macro-F1 reaches the target (None: never)."""
    for row in curve:
        if row["val_macro_f1"] >= target:
            return row
    return None


def summarize(cells: list[dict]) -> dict:
    """Per task and strategy: final test figures over seeds and steps/FLOPs to 90% of `all`'s final F1."""
    out: dict = {}
    for task in sorted({c["task"] for c in cells}):
        by: dict[str, list[dict]] = {}
        for c in cells:
            if c["task"] == task:
                by.setdefault(c["strategy"], []).append(c)
        base = by.get("all")
        target = 0.9 * statistics.mean(c["curve"][-1]["val_macro_f1"] for c in base) if base else None
        rows = {}
        for name, cs in by.items():
            reach = [steps_to_target(c["curve"], target) if target is not None else None for c in cs]
            hit = [r for r in reach if r is not None]
            rows[name] = {
                "seeds": sorted(c["seed"] for c in cs), "steps": cs[0]["steps"],
                "test_accuracy": [c["test_accuracy"] for c in cs], "test_macro_f1": [c["test_macro_f1"] for c in cs],
                "final_val_macro_f1": [c["curve"][-1]["val_macro_f1"] for c in cs],
                "reached": len(hit), "steps_to_target": [r["step"] for r in hit],
                "flops_to_target": [r["flops"] for r in hit],
                "train_flops": [c["train_flops"] for c in cs], "train_s": [c["train_s"] for c in cs],
                "layers_median": statistics.median(n for c in cs for n in c["layers_per_step"]),
            }
        out[task] = {"target": target, "strategies": rows}
    return out


def _code_span(text: str) -> str:
    """Markdown inline code that survives backticks inside `text` (e.g. a quoted --remaining)."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def report(cells: list[dict], tag: str, command: str, remaining: str = "") -> str:
    s = summarize(cells)
    c0 = cells[0]
    g = lambda key: c0.get(key, "?")  # noqa: E731
    lines = [f"Generated {datetime.date.today()} by `benchmarks/convergence.py` from {len(cells)} finished cells "
             f"(model {g('model')}, torch {g('torch')}, {g('cpus')} CPUs, {g('threads')} threads); "
             f"LoRA r=32 on q,k,v,up,down, fp32, micro-batch {g('micro_batch')}, lr {g('lr')}, linear schedule "
             f"with {g('warmup')} warm-up steps, {g('steps')} steps; validation every {g('eval_every')} "
             f"steps on {g('val_n')} examples, test once at the end on the first {g('test_n')} test examples (fewer where the split is smaller: "
             f"each task says its n).", "",
             f"Regenerate: {_code_span(command)}", ""]
    if remaining:
        lines += [f"**Partial grid.** {remaining}", ""]
    for task, t in s.items():
        target = f"{t['target']:.3f}" if t["target"] is not None else "n/a (no `all` cells)"
        test_ns = sorted({c["test_n"] for c in cells if c["task"] == task and "test_n" in c})
        lines += [f"#### Task `{task}`", ""]
        if test_ns:
            lines += [f"Test examples per cell: {'/'.join(map(str, test_ns))}.", ""]
        lines += [f"Target for \"steps to 90%\": 0.9 × `all`'s final validation macro-F1 (mean over its seeds) "
                  f"= {target}.", "",
                  "| strategy | seeds | test accuracy | test macro-F1 | final val macro-F1 | steps to 90% of all "
                  "(mean; seeds reaching) | TFLOPs to 90% | training TFLOPs (counted) | train s (mean) "
                  "| layers/step (median) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in t["strategies"].items():
            reach = (f"{statistics.mean(r['steps_to_target']):.0f} ({r['reached']}/{len(r['seeds'])})"
                     if r["reached"] else f"not reached (0/{len(r['seeds'])})" if t["target"] is not None else "n/a")
            gfl = f"{statistics.mean(r['flops_to_target']) / 1e12:,.1f}" if r["reached"] else "-"
            lines.append(
                f"| {name} | {','.join(map(str, r['seeds']))} | {_ms(r['test_accuracy'])} | {_ms(r['test_macro_f1'])} "
                f"| {_ms(r['final_val_macro_f1'])} | {reach} | {gfl} | {statistics.mean(r['train_flops']) / 1e12:.1f} "
                f"| {statistics.mean(r['train_s']):.0f} | {r['layers_median']:g} |")
        lines += ["", "Validation accuracy / macro-F1 by optimizer step (mean over seeds):", ""]
        names = list(t["strategies"])
        steps = sorted({p["step"] for c in cells if c["task"] == task for p in c["curve"]})
        lines += ["| step | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for step in steps:
            vals = []
            for name in names:
                pts = [p for c in cells if c["task"] == task and c["strategy"] == name for p in c["curve"]
                       if p["step"] == step]
                vals.append(f"{statistics.mean(p['val_accuracy'] for p in pts):.3f} / "
                            f"{statistics.mean(p['val_macro_f1'] for p in pts):.3f}" if pts else "-")
            lines.append(f"| {step} | " + " | ".join(vals) + " |")
        lines.append("")
    lines.append(f"![convergence curves](convergence-{tag}.png)")
    return "\n".join(lines)


def plot(cells: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({c["task"] for c in cells})
    fig, axes = plt.subplots(len(tasks), 3, figsize=(16, 4.2 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        by: dict[str, list[dict]] = {}
        for c in cells:
            if c["task"] == task:
                by.setdefault(c["strategy"], []).append(c)
        for name, cs in by.items():
            n = min(len(c["curve"]) for c in cs)
            step = [cs[0]["curve"][k]["step"] for k in range(n)]
            flops = [statistics.mean(c["curve"][k]["flops"] for c in cs) / 1e12 for k in range(n)]
            for j, (key, xs) in enumerate((("val_accuracy", step), ("val_macro_f1", step), ("val_macro_f1", flops))):
                ys = [[c["curve"][k][key] for c in cs] for k in range(n)]
                mean = [statistics.mean(y) for y in ys]
                label = f"{name} ({len(cs)} seed{'' if len(cs) == 1 else 's'})"
                line = axes[i][j].plot(xs, mean, marker=".", label=label)[0]
                if len(cs) > 1:
                    axes[i][j].fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], alpha=0.12,
                                            color=line.get_color())
        for j, (xl, yl) in enumerate((("optimizer step", "val accuracy"), ("optimizer step", "val macro-F1"),
                                      ("counted training TFLOPs", "val macro-F1"))):
            axes[i][j].set_xlabel(xl)
            axes[i][j].set_ylabel(f"{task}: {yl}")
            axes[i][j].grid(alpha=0.3)
        axes[i][0].legend(fontsize=8)
    fig.suptitle("validation curves (mean over seeds; band: min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_results(section: str, tag: str, results_md: Path) -> None:
    replace_section(results_md, "convergence", tag, section, "Convergence")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["revision-intention"])
    p.add_argument("--strategies", nargs="+", default=["all", "ir", "ist", "lisa", "random", "salf", "ir+floor"])
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--val-n", type=int, default=60)
    p.add_argument("--test-n", type=int, default=300)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--eval-at-start", action="store_true", help="also evaluate at step 0 (the base model)")
    p.add_argument("--model", default="irtuning://smollm2-135m-instruct")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads of a cell (cells run one at a time; default: every CPU)")
    p.add_argument("--out", required=True, help="grid folder: <out>/<task>/<strategy>-seed<seed>.json")
    p.add_argument("--report", action="store_true", help="only regenerate RESULTS.md + PNG from the cell files")
    p.add_argument("--no-report", action="store_true", help="run the cells, leave RESULTS.md alone")
    p.add_argument("--tag", default="cpu-smollm2")
    p.add_argument("--remaining", default="", help="text saying what a partial grid still lacks")
    p.add_argument("--results-md", default=str(HERE / "RESULTS.md"))
    p.add_argument("--cell", action="store_true", help=argparse.SUPPRESS)  # internal: one cell, this process
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.cell:
        return _cell_main(a)
    if not a.report:
        run_grid(a)
    if a.no_report:
        return 0
    cells = load_cells(Path(a.out))
    if not cells:
        print(f"no finished cells in {a.out}", file=sys.stderr)
        return 1
    command = f"python benchmarks/convergence.py --out {a.out} --tag {a.tag} --report"
    if a.remaining:  # printed too, so that a re-run as printed keeps the "Partial grid" paragraph
        command += f" --remaining {shlex.quote(a.remaining)}"
    md = Path(a.results_md)
    write_results(report(cells, a.tag, command, a.remaining), a.tag, md)
    plot(cells, md.parent / f"convergence-{a.tag}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
