"""Convergence grid: held-out quality against optimizer steps and counted FLOPs, per strategy, seed and task.

    python -m benchmarks.convergence --tasks revision-intention tweet-sentiment \
        --strategies all ir ist lisa random salf --seeds 1 2 3 --steps 300 --eval-every 50 \
        --no-report --out benchmarks/results/convergence-cpu-smollm2-300steps
    python -m benchmarks.convergence --out benchmarks/results/convergence-cpu-smollm2-300steps \
        --tag cpu-smollm2-300steps --report

The full-parameter arm (``--scope full``, an explicit ``--lr``) and its learning-rate sweep::

    python -m benchmarks.convergence --tasks tweet-sentiment --strategies all --seeds 1 \
        --scope full --steps 300 --test-n 0 --lr-sweep 1e-5 3e-5 1e-4 --no-report --out <sweep folder>
    python -m benchmarks.convergence --tasks tweet-sentiment --scope full --lr <chosen> \
        --strategies all ir+cpu lisa+cpu ir+floor8+cpu --steps 300 --no-report --out <full-arm folder>
    python -m benchmarks.convergence --out <full-arm folder> --also <LoRA grid folder> \
        --only-tasks tweet-sentiment --tag <tag> --report   # both arms in one table

A grid name is a strategy plus "+"-joined settings (see ``parse_grid_name``). One cell = (task, strategy,
seed), trained in its own process, one cell after another. A finished cell
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
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

from benchmarks.harness import results
from benchmarks.harness.grid import Cell, run_cells, write_cell
from benchmarks.harness.results import RESULTS_MD, code_span, replace_section

# A strategy's options where its default is not the setting compared (everything else: its defaults),
# as a function of the model's layer count.
STRATEGY_OPTIONS = {
    # Unbounded, SALF's calibration on SmolLM2 picks cut 0 and trains 29 of 30 layers (= `all`);
    # a third of the layers (10 of 30) is the setting compared, as in run_comparison.py.
    "salf": lambda num_layers: {"max_trainable": max(1, num_layers // 3)},
}

# A grid name is a registered strategy plus "+"-joined settings, e.g. `ir+floor12+cpu`:
#   floor      `irtuning_depth_floor: salf` (the salf calibration's cut; 24 of 30 layers on SmolLM2's LoRA path)
#   floor<N>   `irtuning_depth_floor: N` (layers 0..N-1 never train)
#   cpu / drop / keep   `irtuning_frozen_optimizer_state` (what happens to a frozen layer's Adam moments)
#   split<N>   ir's `split_num: N` (the split applied N times: fewer layers a step)
NAME_PARTS = "floor, floor<N>, cpu, drop, keep, split<N>"


def parse_grid_name(name: str) -> tuple[str, dict, dict]:
    """(strategy, engine settings, strategy options) of a grid name; a bad part is refused by name."""
    strategy, *parts = name.split("+")
    engine: dict = {}
    options: dict = {}
    for part in parts:
        if part == "floor":
            key, value, into = "depth_floor", "salf", engine
        elif part.startswith("floor") and part[5:].isdigit():
            key, value, into = "depth_floor", int(part[5:]), engine
        elif part in ("cpu", "drop", "keep"):
            key, value, into = "frozen_optimizer_state", part, engine
        elif part.startswith("split") and part[5:].isdigit():
            key, value, into = "split_num", int(part[5:]), options
        else:
            raise ValueError(f"grid strategy {name!r}: unknown part {part!r}; allowed after '+': {NAME_PARTS}")
        if key in into:
            raise ValueError(f"grid strategy {name!r}: {key} set twice")
        into[key] = value
    if not strategy:
        raise ValueError(f"grid strategy {name!r}: no strategy before the first '+'")
    return strategy, engine, options


def selection_config(name: str, options: dict | None, scope: str = "adapter"):
    """The SelectionConfig of a grid name (a registered strategy plus the settings of its parts)."""
    from irtuning_plugin.config import SelectionConfig

    strategy, engine, extra = parse_grid_name(name)
    return SelectionConfig(strategy=strategy, scope=scope, strategy_options={**dict(options or {}), **extra},
                           selection_log=False, heatmap=False, **engine).check()


def offload_moves(active_per_step: list[list[int]], layer_state_bytes: list[int]) -> list[int]:
    """Bytes that `frozen_optimizer_state: cpu` moves at each re-selection, from the trained sets of
    consecutive steps: the Adam moments of every layer leaving the trained set go to the CPU, and those of
    a layer coming back return, if it has trained before (AdamW allocates a parameter's moments at its first
    step). ``layer_state_bytes[i]``: layer i's moment bytes (exp_avg + exp_avg_sq)."""
    has_state: set[int] = set()
    moved = []
    for now, nxt in zip(active_per_step, active_per_step[1:]):
        has_state |= set(now)
        leaving = set(now) - set(nxt)
        returning = (set(nxt) - set(now)) & has_state
        moved.append(sum(layer_state_bytes[i] for i in leaving | returning))
    return moved


def task_data_dir(task: str) -> Path:
    """The built-in data folder of a task (built on first use)."""
    from irtuning_plugin.tasks.assets.references import data_dir_for

    return data_dir_for(task)


def task_labels(data_dir: Path) -> list[str]:
    return list(json.loads((Path(data_dir) / "manifest.json").read_text())["labels"])


def load_split(data_dir: Path, split: str, limit: int | None = None) -> list[dict]:
    rows = [json.loads(x) for x in open(Path(data_dir) / f"{split}.jsonl", encoding="utf-8") if x.strip()]
    return rows[:limit] if limit else rows


def evaluate_task(model, tokenizer, records: list[dict], labels: list[str]):
    """Label scoring for any ``input_output`` task whose records are [prompt, " " + label]."""
    from irtuning_plugin.tasks.evaluation import classification_metrics, label_logprobs

    prompts = [r["segments"][0]["text"] for r in records]
    scores = label_logprobs(model, tokenizer, prompts, labels, batch_size=8)
    pred = [labels[i] for i in scores.argmax(dim=1).tolist()]
    return classification_metrics([r["label"] for r in records], pred, labels)


def run_cell(*, task: str, strategy: str, seed: int, steps: int, eval_every: int, val_n: int, test_n: int,
             model_dir: str, data_dir: str, micro_batch: int = 4, lr: float = 1e-3, warmup: int = 20,
             options: dict | None = None, partial: Path | None = None, eval_at_start: bool = False,
             scope: str = "adapter") -> dict:
    import torch
    from transformers import AutoTokenizer, TrainerCallback

    import irtuning_plugin.tasks.evaluation  # noqa: F401  (imported now: a checkout changed mid-cell must not mix versions)
    from benchmarks.harness.training import PadCollator, build_model, tokenize_records, train_counted

    labels = task_labels(Path(data_dir))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train = tokenize_records(tokenizer, load_split(Path(data_dir), "train"), 256)
    val = load_split(Path(data_dir), "val", val_n)
    test = load_split(Path(data_dir), "test", test_n) if test_n else []  # 0: the test split is not read

    # scope full: every parameter trainable; the engine freezes the layers it leaves out
    model = build_model(model_dir, scope, seed)
    if callable(options):
        options = options(getattr(model, "get_base_model", lambda: model)().config.num_hidden_layers)
    curve: list[dict] = []
    sink = open(partial, "w") if partial else None

    class Curve(TrainerCallback):  # validation points; their time is outside the step times
        def point(self, step: int) -> None:
            t0 = time.perf_counter()
            res = evaluate_task(model, tokenizer, val, labels)
            losses = [h["loss"] for h in self.counted.trainer.state.log_history if "loss" in h][-eval_every:]
            row = {"step": step, "flops": self.counted.flops, "train_s": self.counted.train_s,
                   "val_accuracy": res.accuracy, "val_macro_f1": res.macro_f1,
                   "train_loss": statistics.mean(losses) if losses else None, "eval_s": time.perf_counter() - t0}
            curve.append(row)
            if sink:
                sink.write(json.dumps(row) + "\n")
                sink.flush()

        def on_train_begin(self, a, s, c, **kw):
            if eval_at_start:
                self.point(0)

        def on_step_end(self, a, s, c, **kw):
            if s.global_step % eval_every == 0 or s.global_step == steps:
                self.point(s.global_step)

    run = train_counted(model, train, PadCollator(tokenizer.pad_token_id), selection_config(strategy, options, scope),
                        seed=seed, steps=steps, micro_batch=micro_batch, lr=lr, warmup=warmup, count_flops=True,
                        account_at="optimizer", callbacks=[Curve()], prefix=f"conv-{strategy}-")
    if sink:
        sink.close()
    cb = run.selection
    engine = cb.engine
    held = []  # per optimizer step: gradient + Adam bytes as the engine accounts them (after the step)
    for acc in run.accounts:
        grads = acc["grad_bytes_accelerator"] + acc["grad_bytes_host"]
        state = acc["optimizer_state_bytes_accelerator"] + acc["optimizer_state_bytes_host"]
        off = acc["optimizer_state_bytes_offloaded"]
        held.append({"device": grads + state - off, "offloaded": off})
    layer_state_bytes = [sum(2 * p.numel() * 4 for p in ps) for ps in engine.layer_map.params]  # fp32 m and v
    t0 = time.perf_counter()
    res = evaluate_task(model, tokenizer, test, labels) if test else None  # no test split: validation only
    return {
        "task": task, "strategy": strategy, "seed": seed, "steps": steps, "micro_batch": micro_batch, "lr": lr,
        "warmup": warmup, "options": options or {}, "eval_every": eval_every, "val_n": len(val),
        "curve": curve, "test_accuracy": res.accuracy if res else None,
        "test_macro_f1": res.macro_f1 if res else None, "test_n": res.n if res else 0,
        "test_per_class": res.per_class if res else None,
        "test_eval_s": time.perf_counter() - t0, "scope": scope,
        "frozen_optimizer_state": engine.config.frozen_optimizer_state,
        "layers_per_step": [r["n_active"] for r in cb.rows], "lowest_active": [r["lowest_active"] for r in cb.rows],
        "active_per_step": [r["active"] for r in cb.rows], "layer_state_bytes": layer_state_bytes,
        "device_bytes_per_step": [h["device"] for h in held], "offloaded_bytes_per_step": [h["offloaded"] for h in held],
        "train_flops": run.flops, "train_s": run.train_s, "step_s": run.step_s,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "load_avg_end": os.getloadavg(), "date": datetime.date.today().isoformat(),
    }


def cell_path(out: Path, task: str, strategy: str, seed: int, lr: float | None = None) -> Path:
    """``<out>/<task>/<strategy>-seed<seed>.json``; a cell of a learning-rate sweep carries its rate in the
    name (``<strategy>-lr<lr>-seed<seed>.json``), so that one folder holds every point of the sweep."""
    return out / task / (f"{strategy}-seed{seed}.json" if lr is None else f"{strategy}-lr{lr:g}-seed{seed}.json")


SWEEP_CELL = re.compile(r"-lr[0-9.e+-]+-seed\d+\.json$")


LORA_LR = 1e-3  # the LoRA grids' learning rate
RECIPE_KEYS = ("steps", "eval_every", "val_n", "test_n", "micro_batch", "lr", "warmup", "model", "scope")
RECIPE_DEFAULTS = {"scope": "adapter"}  # what a cell written before the key existed was run with


def _check_same_recipe(path: Path, a, lr: float | None = None) -> None:
    """A finished cell counts only if it was run with the recipe asked for now (a sweep cell: at its rate)."""
    recipe = json.loads(path.read_text()).get("recipe", {})
    for key in RECIPE_KEYS:
        want = lr if key == "lr" and lr is not None else getattr(a, key)
        if recipe.get(key, RECIPE_DEFAULTS.get(key)) != want:
            raise SystemExit(f"{path} was run with {key}={recipe.get(key, RECIPE_DEFAULTS.get(key))!r}, this grid "
                             f"asks for {want!r}; use another --out or delete that cell")


def check_args(a) -> None:
    """Refuse a bad grid before any cell runs (every name, and what a learning-rate sweep needs)."""
    for name in a.strategies:
        try:
            parse_grid_name(name)
        except ValueError as e:
            raise SystemExit(f"--strategies: {e}") from None
    if a.lr_sweep and a.test_n != 0:
        raise SystemExit(f"--lr-sweep chooses on the validation split only: pass --test-n 0 (got {a.test_n})")
    if a.lr is None:
        if a.scope == "full" and not a.lr_sweep and not a.report:
            raise SystemExit("--scope full needs --lr: the rate the --lr-sweep run chose (the LoRA recipe's "
                             f"{LORA_LR:g} is not a full fine-tuning rate)")
        a.lr = LORA_LR if a.scope == "adapter" else None


def run_grid(a) -> list[Path]:
    """Run every missing cell, one after another; return the cells that were (re)computed."""
    check_args(a)
    out = Path(a.out)
    cells, rates = [], {}
    # seeds outside strategies: a partial grid has every strategy on the same seeds
    for task, seed, strategy, lr in [(t, s, n, lr) for t in a.tasks for s in a.seeds for n in a.strategies
                                     for lr in (a.lr_sweep or [None])]:
        path = cell_path(out, task, strategy, seed, lr)
        argv = ["benchmarks.convergence", "--cell", "--tasks", task,
                "--strategies", strategy, "--seeds", str(seed), "--out", str(out),
                "--steps", str(a.steps), "--eval-every", str(a.eval_every), "--val-n", str(a.val_n),
                "--test-n", str(a.test_n), "--micro-batch", str(a.micro_batch), "--lr", str(lr or a.lr),
                "--warmup", str(a.warmup), "--model", a.model, "--scope", a.scope]
        if a.eval_at_start:
            argv.append("--eval-at-start")
        if lr is not None:
            argv += ["--lr-sweep", repr(lr)]
        label = f"{task} {strategy} seed {seed}{f' lr {lr:g}' if lr is not None else ''}"
        cells.append(Cell(label, path, argv, partial=path.with_suffix(".partial.jsonl")))
        rates[path] = lr
    return run_cells(cells, resume=True, threads=a.threads,
                     check=lambda cell: _check_same_recipe(cell.path, a, rates[cell.path]))


def _cell_main(a) -> int:
    from irtuning_plugin.tasks.assets.references import resolve_reference

    task, strategy, seed = a.tasks[0], a.strategies[0], a.seeds[0]
    lr = a.lr_sweep[0] if a.lr_sweep else None
    if lr is not None:
        a.lr = lr  # the sweep point this cell trains at
    path = cell_path(Path(a.out), task, strategy, seed, lr)
    path.parent.mkdir(parents=True, exist_ok=True)
    res = run_cell(task=task, strategy=strategy, seed=seed, steps=a.steps, eval_every=a.eval_every,
                   val_n=a.val_n, test_n=a.test_n, model_dir=resolve_reference(a.model),
                   data_dir=str(task_data_dir(task)), micro_batch=a.micro_batch, lr=a.lr, warmup=a.warmup,
                   options=STRATEGY_OPTIONS.get(strategy, {}), partial=path.with_suffix(".partial.jsonl"),
                   eval_at_start=a.eval_at_start, scope=a.scope)
    res["model"] = a.model
    res["recipe"] = {key: getattr(a, key) for key in RECIPE_KEYS}  # as asked (a split may hold fewer)
    write_cell(path, res)  # a result file exists only once the cell is complete
    path.with_suffix(".partial.jsonl").unlink(missing_ok=True)
    return 0


def time_steps(a) -> int:
    """Seconds per training step of `all`, LoRA then full fine-tuning then LoRA again, in one process, for
    each task (the cells' own code: run_cell, no evaluation); writes ``<out>/steptime-<task>.json``."""
    from irtuning_plugin.tasks.assets.references import resolve_reference

    model = resolve_reference(a.model)
    for task in a.tasks:
        runs = []
        for scope in ("adapter", "full", "adapter"):
            r = run_cell(task=task, strategy="all", seed=a.seeds[0], steps=a.time_steps, eval_every=10**9, val_n=2,
                         test_n=0, model_dir=model, data_dir=str(task_data_dir(task)), micro_batch=a.micro_batch,
                         lr=LORA_LR if scope == "adapter" else 3e-5, warmup=a.warmup, scope=scope)
            runs.append({"scope": scope, "step_s": r["step_s"], "flops_per_step": r["train_flops"] / a.time_steps,
                         "device_bytes": r["device_bytes_per_step"][-1]})
            print(f"{task} {scope}: median step {statistics.median(r['step_s'][1:]):.2f} s "
                  f"(steps 2-{a.time_steps}: {', '.join(f'{x:.2f}' for x in r['step_s'][1:])})", flush=True)
        out = Path(a.out) / f"steptime-{task}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"task": task, "runs": runs, "load_avg_end": os.getloadavg(),
                                   "cpu": platform.processor() or platform.machine(), "threads": r["threads"],
                                   "date": datetime.date.today().isoformat()}, indent=1))
    return 0


# ---- report ------------------------------------------------------------------------------------------

def load_cells(out: Path, sweep: bool = False) -> list[dict]:
    """The finished cells of a grid folder: the grid's own, or (``sweep``) those of a learning-rate sweep."""
    paths = sorted(Path(out).glob("*/*-seed*.json"))
    return [json.loads(p.read_text()) for p in paths if bool(SWEEP_CELL.search(p.name)) == sweep]


def _ms(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def steps_to_target(curve: list[dict], target: float) -> dict | None:
    """First evaluation point whose validation macro-F1 reaches the target (None: never)."""
    for row in curve:
        if row["val_macro_f1"] >= target:
            return row
    return None


def _scope(cell: dict) -> str:
    return cell.get("scope", RECIPE_DEFAULTS["scope"])


def two_arms(cells: list[dict]) -> bool:
    """Whether the cells hold both arms (LoRA and full fine-tuning): rows then carry the arm's name."""
    return len({_scope(c) for c in cells}) > 1


def row_name(cell: dict, arms: bool) -> str:
    return f"{ARM[_scope(cell)]} {cell['strategy']}" if arms else cell["strategy"]


ARM = {"adapter": "LoRA", "full": "full"}


def _mean_final(cs: list[dict]) -> float:
    return statistics.mean(c["curve"][-1]["val_macro_f1"] for c in cs)


def summarize(cells: list[dict]) -> dict:
    """Per task and strategy: final test figures over seeds and steps/FLOPs to 90% of a target F1: `all`'s
    final validation macro-F1 (mean over seeds), or, where the cells hold both arms, the best final
    validation macro-F1 of any row of either arm."""
    out: dict = {}
    arms = two_arms(cells)
    for task in sorted({c["task"] for c in cells}):
        by: dict[str, list[dict]] = {}
        for c in cells:
            if c["task"] == task:
                by.setdefault(row_name(c, arms), []).append(c)
        if arms:
            target = 0.9 * max(_mean_final(cs) for cs in by.values())
        else:
            base = by.get("all")
            target = 0.9 * _mean_final(base) if base else None
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
                "scope": _scope(cs[0]),
                **byte_figures(cs),
            }
        out[task] = {"target": target, "strategies": rows}
    return out


def byte_figures(cs: list[dict]) -> dict:
    """Median and max over every step of the cells: gradient + Adam bytes on the training device, and bytes
    the `cpu` offload moves per step (empty for cells written before they were recorded)."""
    if not all("device_bytes_per_step" in c for c in cs):
        return {}
    held = [b for c in cs for b in c["device_bytes_per_step"]]
    moved = [b for c in cs for b in (offload_moves(c["active_per_step"], c["layer_state_bytes"])
                                     if c.get("frozen_optimizer_state") == "cpu" else [0])]
    return {"device_bytes": (statistics.median(held), max(held)),
            "moved_bytes": (statistics.median(moved), max(moved)) if moved else (0, 0)}


def _bytes_cells(r: dict) -> str:
    mb = 2**20
    if "device_bytes" not in r:
        return " - | - |"
    (hm, hx), (mm, mx) = r["device_bytes"], r["moved_bytes"]
    return f" {hm / mb:,.1f} / {hx / mb:,.1f} | {mm / mb:,.1f} / {mx / mb:,.1f} |"


def report(cells: list[dict], tag: str, command: str, remaining: str = "") -> str:
    s = summarize(cells)
    c0 = cells[0]
    g = lambda key: c0.get(key, "?")  # noqa: E731
    arms = two_arms(cells)
    full = any(_scope(c) == "full" for c in cells)
    # the byte columns: wherever a cell recorded them (full fine-tuning, or the LoRA floors of issue 40)
    held = full or any("device_bytes_per_step" in c for c in cells)
    if full:  # name each arm's trainable part and learning rate
        lrs = {sc: sorted({c.get("lr") for c in cells if _scope(c) == sc}) for sc in ("adapter", "full")}
        what = "; ".join(f"{'LoRA r=32 on q,k,v,up,down' if sc == 'adapter' else 'full fine-tuning (irtuning_scope: full)'}"
                         f"{' (rows `LoRA ...`)' if arms and sc == 'adapter' else ' (rows `full ...`)' if arms else ''}"
                         f" at lr {'/'.join(f'{x:g}' for x in lrs[sc])}" for sc in ("adapter", "full") if lrs[sc])
        what += ", fp32"
    else:
        what = f"LoRA r=32 on q,k,v,up,down, fp32, micro-batch {g('micro_batch')}, lr {g('lr')}"
    if full:
        what += f", micro-batch {g('micro_batch')}"
    lines = [f"Generated {datetime.date.today()} by `benchmarks/convergence.py` from {len(cells)} finished cells "
             f"(model {g('model')}, torch {g('torch')}, {g('cpus')} CPUs, {g('threads')} threads); "
             f"{what}, linear schedule "
             f"with {g('warmup')} warm-up steps, {g('steps')} steps; validation every {g('eval_every')} "
             f"steps on {g('val_n')} examples, test once at the end on the first {g('test_n')} test examples (fewer where the split is smaller: "
             f"each task says its n).", "",
             f"Regenerate: {code_span(command)}", ""]
    if remaining:
        lines += [f"**Partial grid.** {remaining}", ""]
    for task, t in s.items():
        target = f"{t['target']:.3f}" if t["target"] is not None else "n/a (no `all` cells)"
        test_ns = sorted({c["test_n"] for c in cells if c["task"] == task and "test_n" in c})
        lines += [f"#### Task `{task}`", ""]
        if test_ns:
            lines += [f"Test examples per cell: {'/'.join(map(str, test_ns))}.", ""]
        whose = ("the best final validation macro-F1 (mean over its seeds) of any row of either arm" if arms
                 else "`all`'s final validation macro-F1 (mean over its seeds)")
        lines += [f"Target for \"steps to 90%\": 0.9 × {whose} = {target}.", "",
                  "| strategy | seeds | test accuracy | test macro-F1 | final val macro-F1 | steps to 90% "
                  f"{'of the best' if arms else 'of all'} (mean; seeds reaching) | TFLOPs to 90% | training TFLOPs "
                  "(counted) | train s (mean) | layers/step (median) |"
                  + (" grads + Adam on device MB (median / max) | `cpu` offload moved MB/step (median / max) |"
                     if held else ""),
                  "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if held else "")]
        for name, r in t["strategies"].items():
            reach = (f"{statistics.mean(r['steps_to_target']):.0f} ({r['reached']}/{len(r['seeds'])})"
                     if r["reached"] else f"not reached (0/{len(r['seeds'])})" if t["target"] is not None else "n/a")
            gfl = f"{statistics.mean(r['flops_to_target']) / 1e12:,.1f}" if r["reached"] else "-"
            lines.append(
                f"| {name} | {','.join(map(str, r['seeds']))} | {_ms(r['test_accuracy'])} | {_ms(r['test_macro_f1'])} "
                f"| {_ms(r['final_val_macro_f1'])} | {reach} | {gfl} | {statistics.mean(r['train_flops']) / 1e12:.1f} "
                f"| {statistics.mean(r['train_s']):.0f} | {r['layers_median']:g} |" + (_bytes_cells(r) if held else ""))
        lines += ["", "Validation accuracy / macro-F1 by optimizer step (mean over seeds):", ""]
        names = list(t["strategies"])
        steps = sorted({p["step"] for c in cells if c["task"] == task for p in c["curve"]})
        lines += ["| step | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for step in steps:
            vals = []
            for name in names:
                pts = [p for c in cells if c["task"] == task and row_name(c, arms) == name for p in c["curve"]
                       if p["step"] == step]
                vals.append(f"{statistics.mean(p['val_accuracy'] for p in pts):.3f} / "
                            f"{statistics.mean(p['val_macro_f1'] for p in pts):.3f}" if pts else "-")
            lines.append(f"| {step} | " + " | ".join(vals) + " |")
        lines.append("")
    lines.append(f"![convergence curves](convergence-{tag}.png)")
    return "\n".join(lines)


def choose_lr(cells: list[dict]) -> float:
    """The sweep's rate: highest final validation macro-F1, mean over its seeds (a tie: the lower rate)."""
    by: dict[float, list[dict]] = {}
    for c in cells:
        by.setdefault(c["lr"], []).append(c)
    return max(sorted(by), key=lambda lr: _mean_final(by[lr]))  # max keeps the first (lowest) of equals


def sweep_report(cells: list[dict], command: str) -> str:
    """The learning-rate sweep: validation figures per rate and the rate chosen (test split never read)."""
    c0 = cells[0]
    lines = [f"Generated {datetime.date.today()} by `benchmarks/convergence.py` from {len(cells)} finished sweep "
             f"cells (model {c0.get('model', '?')}, torch {c0['torch']}, {c0['threads']} threads); "
             f"{'full fine-tuning (irtuning_scope: full)' if _scope(c0) == 'full' else 'LoRA r=32'}, strategy "
             f"{', '.join(sorted({c['strategy'] for c in cells}))}, seeds "
             f"{','.join(map(str, sorted({c['seed'] for c in cells})))}, {c0['steps']} steps, validation every "
             f"{c0['eval_every']} steps on {c0['val_n']} examples; the test split is not read. The rate chosen "
             f"is the one with the highest final validation macro-F1 (mean over seeds; a tie goes to the lower "
             f"rate).", "", f"Regenerate: {code_span(command)}", ""]
    for task in sorted({c["task"] for c in cells}):
        cs = [c for c in cells if c["task"] == task]
        chosen = choose_lr(cs)
        lines += [f"#### Task `{task}`: chosen lr {chosen:g}", "",
                  "| lr | seeds | final val accuracy | final val macro-F1 | best val macro-F1 (step) "
                  "| last train loss | train s (mean) |", "|---|---|---|---|---|---|---|"]
        for lr in sorted({c["lr"] for c in cs}):
            at = [c for c in cs if c["lr"] == lr]
            best = [max(c["curve"], key=lambda p: p["val_macro_f1"]) for c in at]
            loss = [c["curve"][-1]["train_loss"] for c in at if c["curve"][-1].get("train_loss") is not None]
            peaks = ", ".join(f"{b['val_macro_f1']:.3f} ({b['step']})" for b in best)
            lines.append(
                f"| {lr:g} | {','.join(str(c['seed']) for c in at)} "
                f"| {_ms([c['curve'][-1]['val_accuracy'] for c in at])} "
                f"| {_ms([c['curve'][-1]['val_macro_f1'] for c in at])} | {peaks} "
                f"| {_ms(loss) if loss else '-'} | {statistics.mean(c['train_s'] for c in at):.0f} |")
        lines.append("")
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
                by.setdefault(row_name(c, two_arms(cells)), []).append(c)
        # more rows than the default cycle's 10 colours: tab20, so that no two rows share a colour; with two
        # arms, the full-parameter rows are dashed
        colors = plt.get_cmap("tab20").colors if len(by) > 10 else [None] * len(by)
        for (name, cs), color in zip(by.items(), colors):
            n = min(len(c["curve"]) for c in cs)
            step = [cs[0]["curve"][k]["step"] for k in range(n)]
            flops = [statistics.mean(c["curve"][k]["flops"] for c in cs) / 1e12 for k in range(n)]
            for j, (key, xs) in enumerate((("val_accuracy", step), ("val_macro_f1", step), ("val_macro_f1", flops))):
                ys = [[c["curve"][k][key] for c in cs] for k in range(n)]
                mean = [statistics.mean(y) for y in ys]
                label = f"{name} ({len(cs)} seed{'' if len(cs) == 1 else 's'})"
                style = "--" if two_arms(cells) and _scope(cs[0]) == "full" else "-"
                line = axes[i][j].plot(xs, mean, marker=".", label=label, color=color, linestyle=style)[0]
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
    results.save_figure(fig, path, dpi=80)


def write_results(section: str, tag: str, results_md: Path) -> None:
    replace_section(results_md, f"convergence:{tag}", section, "Convergence")


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
    p.add_argument("--lr", type=float, default=None,
                   help=f"learning rate (default {LORA_LR:g} with --scope adapter; --scope full needs it given)")
    p.add_argument("--lr-sweep", nargs="+", type=float, default=None, metavar="LR",
                   help="learning-rate selection: one cell per rate (named <strategy>-lr<LR>-seed<S>.json), "
                   "validation only (needs --test-n 0); --report then writes the sweep's table and the rate chosen")
    p.add_argument("--scope", choices=("adapter", "full"), default="adapter",
                   help="adapter: the LoRA recipe (r=32 on q,k,v,up,down); full: full fine-tuning "
                   "(irtuning_scope: full, every parameter of a selected layer trains)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--eval-at-start", action="store_true", help="also evaluate at step 0 (the base model)")
    p.add_argument("--model", default="irtuning://smollm2-135m-instruct")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads of a cell (cells run one at a time; default: every CPU)")
    p.add_argument("--out", required=True, help="grid folder: <out>/<task>/<strategy>-seed<seed>.json")
    p.add_argument("--report", action="store_true", help="only regenerate RESULTS.md + PNG from the cell files")
    p.add_argument("--no-report", action="store_true", help="run the cells, leave RESULTS.md alone")
    p.add_argument("--also", nargs="+", default=[], metavar="DIR",
                   help="--report: also take the cells of these grid folders (e.g. the LoRA arm beside the full one)")
    p.add_argument("--only-tasks", nargs="+", default=None, metavar="TASK",
                   help="--report: only these tasks' cells")
    p.add_argument("--tag", default="cpu-smollm2")
    p.add_argument("--remaining", default="", help="text saying what a partial grid still lacks")
    p.add_argument("--results-md", default=str(RESULTS_MD))
    p.add_argument("--time-steps", type=int, default=0, metavar="N",
                   help="only time N training steps of `all`, LoRA / full / LoRA, one process per task "
                   "(writes <out>/steptime-<task>.json)")
    p.add_argument("--cell", action="store_true", help=argparse.SUPPRESS)  # internal: one cell, this process
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.cell:
        return _cell_main(a)
    if a.time_steps:
        return time_steps(a)
    check_args(a)
    if not a.report:
        run_grid(a)
    if a.no_report:
        return 0
    sweep = bool(a.lr_sweep)
    cells = [c for d in [a.out, *a.also] for c in load_cells(Path(d), sweep=sweep)
             if a.only_tasks is None or c["task"] in a.only_tasks]
    if not cells:
        print(f"no finished {'sweep ' if sweep else ''}cells in {', '.join([a.out, *a.also])}", file=sys.stderr)
        return 1
    command = f"python -m benchmarks.convergence --out {a.out} --tag {a.tag} --report"
    if a.also:
        command += " --also " + " ".join(a.also)
    if a.only_tasks:
        command += " --only-tasks " + " ".join(a.only_tasks)
    md = Path(a.results_md)
    if sweep:
        command += " --test-n 0 --lr-sweep " + " ".join(f"{x:g}" for x in a.lr_sweep)
        write_results(sweep_report(cells, command), a.tag, md)
        for task in sorted({c["task"] for c in cells}):
            print(f"{task}: chosen lr {choose_lr([c for c in cells if c['task'] == task]):g}")
        return 0
    if a.remaining:  # printed too, so that a re-run as printed keeps the "Partial grid" paragraph
        command += f" --remaining {shlex.quote(a.remaining)}"
    write_results(report(cells, a.tag, command, a.remaining), a.tag, md)
    plot(cells, md.parent / f"convergence-{a.tag}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
