"""The table a user decides from (issue 40): per setting, quality on our two tasks (the convergence grids' test
macro-F1) beside what the same setting needs for Llama-3.1-8B on one GPU (``irtuning plan``'s counts).

    python -m benchmarks.decision_table --measure   # plan every row at 8B -> benchmarks/results/decision-llama8b/plan.json
    python -m benchmarks.decision_table --report    # the RESULTS.md section, from plan.json and the committed cells

``--measure`` counts on the meta device (no weights; ~2-4 min on 2 cores); ``--report`` reads files only. A
setting whose cells are not there yet says "not run", with the seeds it has where it has some.

The depth floors of the grids are SmolLM2 layer counts (of 30); at 8B (32 layers) each keeps its relative
depth: ``round(N * 32 / 30)`` layers stay frozen at the bottom, as the planner does for salf's cut.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

from benchmarks.harness.results import RESULTS_MD, code_span, replace_section

OUT = Path("benchmarks/results/decision-llama8b")
MODEL = "llama-3.1-8b-instruct"
GRIDS = Path("benchmarks/results")
# task -> (its grid length, the folders whose cells of that length count), per arm
TASKS = {
    "tweet-sentiment": (300, {"adapter": ("convergence-cpu-smollm2-300steps", "convergence-cpu-smollm2-floors-300steps"),
                              "full": ("convergence-cpu-smollm2-full-300steps",)}),
    "revision-intention": (600, {"adapter": ("convergence-cpu-smollm2-600steps", "convergence-cpu-smollm2-floors-600steps"),
                                 "full": ("convergence-cpu-smollm2-full-600steps",)}),
}
SMOLLM2_LAYERS, TARGET_LAYERS = 30, 32


@dataclass(frozen=True)
class Setting:
    label: str
    scope: str  # adapter | full
    grid_name: str  # the convergence grid's strategy name
    selection: dict | None  # irtuning_* keys without the prefix (None: no layer selection)


def _floor(n: int) -> int:
    return round(n * TARGET_LAYERS / SMOLLM2_LAYERS)


SETTINGS = [
    Setting("LoRA `all` (plain LoRA)", "adapter", "all", {"strategy": "all"}),
    Setting("LoRA `ir`", "adapter", "ir", {"strategy": "ir"}),
    *[Setting(f"LoRA `ir` + depth floor {n}", "adapter", f"ir+floor{n}", {"strategy": "ir", "depth_floor": _floor(n)})
      for n in (4, 8, 12, 16)],
    Setting("LoRA `ir` + depth floor salf (24)", "adapter", "ir+floor", {"strategy": "ir", "depth_floor": "salf"}),
    Setting("LoRA `salf` (layers 24-29)", "adapter", "salf", {"strategy": "salf"}),
    Setting("LoRA `ist`", "adapter", "ist", {"strategy": "ist"}),
    Setting("LoRA `lisa`", "adapter", "lisa", {"strategy": "lisa"}),
    Setting("LoRA `random`", "adapter", "random", {"strategy": "random"}),
    Setting("full `all` (full fine-tuning)", "full", "all", None),
    Setting("full `ir` + `cpu`", "full", "ir+cpu", {"strategy": "ir", "frozen_optimizer_state": "cpu"}),
    Setting("full `lisa` + `cpu`", "full", "lisa+cpu", {"strategy": "lisa", "frozen_optimizer_state": "cpu"}),
    Setting("full `ir` + depth floor 8 + `cpu`", "full", "ir+floor8+cpu",
            {"strategy": "ir", "depth_floor": _floor(8), "frozen_optimizer_state": "cpu"}),
]


def recipes() -> dict:
    """The two 8B recipes of the planner's 7-70B table (the paper's and a chat one)."""
    from irtuning_plugin.planner.sizes_table import PAPER_LORA
    from irtuning_plugin.planner.sizes_table import SETTINGS as RECIPES

    return {name: {**PAPER_LORA, **kw} for name, kw in RECIPES.items()}


def measure() -> dict:
    from irtuning_plugin.config import PREFIX, config_from_flat
    from irtuning_plugin.planner import core
    from irtuning_plugin.planner.command import build_rows, plan_rows
    from irtuning_plugin.planner.inputs import Request, read_config
    from irtuning_plugin.planner.selection import SIM_STEPS

    label, cfg = read_config(MODEL)
    rows = []
    for recipe, kw in recipes().items():
        for s in SETTINGS:
            sel = None
            if s.selection is not None:
                sel = config_from_flat({PREFIX + k: v for k, v in {**s.selection, "scope": s.scope}.items()})
            req = Request(model_label=label, config=cfg, precision="bf16", attention="sdpa", scope=s.scope,
                          selection=sel, **kw)
            spec = build_rows(req, Namespace(steps=str(SIM_STEPS), selection=None, compare=False))[0]
            p = plan_rows([spec], None, core.MFU)[0]
            rows.append({"recipe": recipe, "setting": s.label, "peak_reserved_gib": p.peak_reserved_bytes / core.GIB,
                         "fits": p.fits, "max_micro_batch": p.max_micro_batch,
                         "grads_adam_device_gib": (p.grad_bytes + p.optimizer_device_bytes) / core.GIB,
                         "optimizer_host_gib": p.optimizer_host_bytes / core.GIB,
                         "bwd_flops_ratio_to_all": p.bwd_flops_ratio_to_all,
                         "offload_gb_per_step_mean": p.offload_bytes_per_step_mean / 1e9,
                         "layers": p.layers, "strategy_source": p.strategy_source})
    return {"model": label, "num_layers": cfg["num_hidden_layers"], "recipes": recipes(), "precision": "bf16",
            "attention": "sdpa", "simulated_steps": SIM_STEPS, "rows": rows}


def load_plan(path: Path) -> dict:
    try:
        plan = json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"{path}: missing; run `python -m benchmarks.decision_table --measure` first") from None
    except ValueError as exc:
        raise SystemExit(f"{path}: not JSON ({exc})") from None
    have = {(r.get("recipe"), r.get("setting")) for r in plan.get("rows", [])}
    missing = [(r, s.label) for r in recipes() for s in SETTINGS if (r, s.label) not in have]
    if missing:
        raise SystemExit(f"{path}: no plan for {missing[0][1]!r} at {missing[0][0]!r}; re-run --measure")
    return plan


def quality(grids: Path = GRIDS) -> dict:
    """(task, scope, grid name) -> the finished cells' test macro-F1 and counted training FLOPs, by seed."""
    out: dict = {}
    for task, (steps, arms) in TASKS.items():
        for scope, folders in arms.items():
            for folder in folders:
                for path in sorted((grids / folder / task).glob("*-seed*.json")):
                    try:
                        c = json.loads(path.read_text())
                    except ValueError as exc:
                        raise SystemExit(f"{path}: not a finished cell's JSON ({exc}); remove it or re-run the "
                                         f"cell") from None
                    if c.get("steps") != steps or c.get("scope", "adapter") != scope or "test_macro_f1" not in c:
                        continue
                    key = (task, scope, c["strategy"])
                    seeds = out.setdefault(key, {})
                    if c["seed"] in seeds:
                        raise SystemExit(f"{path}: seed {c['seed']} of {c['strategy']} ({scope}, {task}) is in two "
                                         f"grid folders")
                    seeds[c["seed"]] = (c["test_macro_f1"], c["train_flops"])
    return out


def _f1(seeds: dict | None) -> str:
    if not seeds:
        return "not run"
    xs = [f for f, _ in seeds.values()]
    spread = f" ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else ""
    return f"{statistics.mean(xs):.3f}{spread} ({len(xs)})"


def _delta(seeds: dict | None, base: dict | None) -> str:
    if not seeds or not base:
        return "-"
    d = 100 * (statistics.mean(f for f, _ in seeds.values()) - statistics.mean(f for f, _ in base.values()))
    return f"{d:+.1f}"


def _flops(seeds: dict | None, base: dict | None) -> str:
    if not seeds or not base:
        return "-"
    return f"{statistics.mean(f for _, f in seeds.values()) / statistics.mean(f for _, f in base.values()):.2f}×"


def _fit(row: dict) -> str:
    return f"{row['peak_reserved_gib']:.1f} ({'/'.join('yes' if v else 'no' for v in row['fits'].values())})"


def report(plan: dict, q: dict, command: str) -> str:
    by = {(r["recipe"], r["setting"]): r for r in plan["rows"]}
    names = list(plan["recipes"])
    base = {t: q.get((t, "adapter", "all")) for t in TASKS}
    ran = sum(len(v) for v in q.values())
    lines = [f"Generated {datetime.date.today()} by `benchmarks/decision_table.py` from {ran} finished convergence "
             f"cells (SmolLM2-135M-Instruct on CPU; test macro-F1, mean ± std, (seeds)) and `irtuning plan`'s counts "
             f"for {plan['model']} ({plan['num_layers']} layers, {plan['precision']}, {plan['attention']}, LoRA r32 "
             f"on q,k,v,up,down where LoRA; {plan['simulated_steps']} simulated steps).", "",
             f"Regenerate: {code_span(command)} (the 8B figures: `python -m benchmarks.decision_table --measure`).", "",
             "| setting | tweet-sentiment, 300 steps | Δ vs LoRA `all` (points) | revision-intention, 600 steps "
             "| Δ vs LoRA `all` (points) | training FLOPs vs LoRA `all` (tweet; counted) | "
             + " | ".join(f"8B {n}: peak reserved GiB (fits 24/40/80 GB)" for n in names)
             + f" | 8B grads + Adam on the GPU at the peak, GiB ({names[0].split(':')[0]}) | 8B backward FLOPs vs its arm's `all` ("
             f"{names[0].split(':')[0]}) |",
             "|" + "---|" * (8 + len(names))]
    for s in SETTINGS:
        cells = {t: q.get((t, s.scope, s.grid_name)) for t in TASKS}
        t1, t2 = TASKS
        p0 = by[(names[0], s.label)]
        lines.append(f"| {s.label} | {_f1(cells[t1])} | {_delta(cells[t1], base[t1])} | {_f1(cells[t2])} | "
                     f"{_delta(cells[t2], base[t2])} | {_flops(cells[t1], base[t1])} | "
                     + " | ".join(_fit(by[(n, s.label)]) for n in names)
                     + f" | {p0['grads_adam_device_gib']:.1f} | {p0['bwd_flops_ratio_to_all']:.2f} |")
    lines += ["", "- Quality is from SmolLM2-135M (30 layers), memory from Llama-3.1-8B (32 layers): the table puts "
              "the two side by side, it does not claim the 8B quality.",
              "- 8B memory is `irtuning plan`'s prediction (counted on the meta device; the allocator, CUDA context "
              "and attention kernel are modelled: see the planner section). `ir` layers come from its rule with "
              "random scores; the depth floors keep their relative depth (floor N of 30 -> "
              + ", ".join(f"{n}->{_floor(n)}" for n in (4, 8, 12, 16)) + " of 32).",
              "- \"fits\": the reserved peak plus the 0.75 GiB CUDA context on one 24 / 40 / 80 GB card."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--measure", action="store_true", help="plan every setting at 8B and write plan.json")
    mode.add_argument("--report", action="store_true", help="write the RESULTS.md section from plan.json and the cells")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--results-md", default=str(RESULTS_MD))
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.measure:
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "plan.json").write_text(json.dumps(measure(), indent=1) + "\n")
        except OSError as exc:
            raise SystemExit(f"--out {out}: cannot write plan.json ({exc})") from None
        print(f"wrote {out / 'plan.json'}")
        return 0
    extra = "" if a.out == str(OUT) else f" --out {a.out}"
    text = report(load_plan(out / "plan.json"), quality(), f"python -m benchmarks.decision_table --report{extra}")
    changed = replace_section(Path(a.results_md), "decision:llama8b", text, heading="Decision table")
    print(f"decision table: {len(SETTINGS)} settings; {a.results_md} {'rewritten' if changed else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
