"""Counted per-step costs of every strategy, LoRA and full fine-tuning: runs, tables, plot.

    python -m benchmarks.cost_table --out benchmarks/results/costs-smollm2   # runs + report
    python -m benchmarks.cost_table --out benchmarks/results/costs-smollm2 --report
    # issue 40's counts (the LoRA depth-floor curve, the full-parameter arm), tables in their own file:
    python -m benchmarks.cost_table --out benchmarks/results/costs-smollm2-issue40 \
        --results-md benchmarks/results/costs-smollm2-issue40/tables.md --only ISSUE40

Each variant is one ``benchmarks.cost_count`` process (a few real training steps on SmolLM2; FLOPs and saved
bytes of every selected set counted on the meta device at 4 x 128 tokens). ``--report`` turns
``runs.jsonl`` into the generated sections of ``benchmarks/RESULTS.md`` and ``costs-<tag>.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

from benchmarks.convergence import offload_moves
from benchmarks.harness import results
from benchmarks.harness.grid import Cell, run_cells
from benchmarks.harness.results import RESULTS_MD, replace_section

FLOOR = {"depth_floor": "salf"}
IST = {"first_update": 2, "update_every": 2, "estimation_batch": 4}
# name -> (strategy, steps, strategy options, engine options, real). Short runs: counts need no long
# training. real=True: real training steps (the strategy reads gradients); False: replayed with zero
# gradients (cost_count.py --replay; selections and AdamW bytes as in a real run). lisa re-draws every 2
# steps and ist updates its importance every 2 (defaults 20 and 10), so that a few steps show the draws.
LORA = {
    "all": ("all", 3, {}, {}, False),
    "ir": ("ir", 8, {}, {}, True),
    "ist": ("ist", 6, IST, {}, True),
    "lisa": ("lisa", 6, {"n_layers": 2, "interval": 2}, {}, False),
    "random": ("random", 4, {"n_layers": 4}, {}, False),
    "salf": ("salf", 2, {}, {}, False),
    "salf (latent space 0 included)": ("salf", 2, {"embedding_space": "include"}, {}, False),
    "ir + floor salf": ("ir", 8, {}, FLOOR, True),
    "ist + floor salf": ("ist", 6, IST, FLOOR, True),
    "lisa + floor salf": ("lisa", 6, {"n_layers": 2, "interval": 2}, FLOOR, False),
    "random + floor salf": ("random", 4, {"n_layers": 4}, FLOOR, False),
}
FULL = {
    "all": ("all", 2, {}, {}, False),
    "salf": ("salf", 2, {}, {}, False),
    **{f"ir {m}": ("ir", 5, {}, {"frozen_optimizer_state": m}, True) for m in ("keep", "cpu", "drop")},
    **{f"lisa {m}": ("lisa", 10, {"n_layers": 2, "interval": 2}, {"frozen_optimizer_state": m}, False)
       for m in ("keep", "cpu", "drop")},
    **{f"random {m}": ("random", 4, {"n_layers": 4}, {"frozen_optimizer_state": m}, False)
       for m in ("keep", "cpu", "drop")},
    "ir + floor salf cpu": ("ir", 5, {}, {**FLOOR, "frozen_optimizer_state": "cpu"}, True),
}
# Issue 40: the depth-floor curve on the LoRA path, and the full-parameter arm of the convergence grid
# (its four settings at their grid defaults, lisa's interval 20 included, plus the candidates for the lighter
# ir variant). ir runs longer here, so its selection sequence shows how many layers enter and leave.
LORA.update({f"ir + floor {n}": ("ir", 8, {}, {"depth_floor": n}, True) for n in (4, 8, 12, 16)})
CPU = {"frozen_optimizer_state": "cpu"}
FULL.update({
    "ir cpu, 16 steps": ("ir", 16, {}, CPU, True),
    "lisa cpu, defaults (n 2, interval 20)": ("lisa", 60, {}, CPU, False),
    "ir split_num 2 cpu": ("ir", 10, {"split_num": 2}, CPU, True),
    **{f"ir + floor {n} cpu": ("ir", 10, {}, {"depth_floor": n, **CPU}, True) for n in (8, 12)},
})
ISSUE40 = ["adapter:all", "adapter:ir", *(f"adapter:ir + floor {n}" for n in (4, 8, 12, 16)), "full:all",
           "full:ir cpu, 16 steps", "full:lisa cpu, defaults (n 2, interval 20)", "full:ir split_num 2 cpu",
           "full:ir + floor 8 cpu", "full:ir + floor 12 cpu"]
# Real training steps: 1 example of 128 (LoRA) / 64 (full) tokens, to keep these CPU runs short; FLOPs and
# saved bytes are counted at 4 x 128 for every variant.
TRAIN_SHAPE = {"adapter": (1, 128), "full": (1, 64)}
SECTIONS = {"adapter": "costs-lora", "full": "costs-full"}


def cell(name: str, scope: str, spec, args, out: Path) -> Cell:
    """One variant: a ``benchmarks.cost_count`` run writing ``<out>/<scope>-<name>.json``."""
    strategy, steps, options, engine, real = spec
    path = out / f"{scope}-{name.replace(' ', '_').replace('(', '').replace(')', '')}.json"
    batch, seq = TRAIN_SHAPE[scope]
    return Cell(f"{scope}:{name}", path, [
        "benchmarks.cost_count", "--strategy", strategy, "--scope", scope,
        "--steps", str(steps), "--batch", str(batch), "--seq", str(seq), "--model", args.model,
        "--options", json.dumps(options), "--engine-options", json.dumps(engine), "--label", name,
        "--out", str(path)] + ([] if real else ["--replay"]))


def _med(xs):
    return statistics.median(xs) if xs else float("nan")


def summarise(run: dict) -> dict:
    rows = run["rows"]
    steady = rows[1:] or rows  # step 1 carries one-off costs (first AdamW state allocation)
    return {
        "fwd": _med([r["forward_flops"] for r in rows]), "bwd": _med([r["backward_flops"] for r in rows]),
        "bwd_max": max(r["backward_flops"] for r in rows),
        "saved": _med([r["saved_bytes"] for r in rows]), "saved_max": max(r["saved_bytes"] for r in rows),
        "resident": _med([r["device_resident_bytes"] for r in rows]),
        "resident_max": max(r["device_resident_bytes"] for r in rows),
        "grad": _med([r["grad_bytes"] for r in rows]), "state": max(r["optimizer_state_bytes"] for r in rows),
        "offloaded": max(r["offloaded_bytes"] for r in rows),
        "layers": [len(r["active"]) for r in rows], "lowest": [r["lowest_active"] for r in rows],
        "wall": _med([r["wall_s"] for r in steady]),
        "engine_ms": _med([r["score_ms"] + r["select_ms"] for r in steady]),
        "engine_share": _med([(r["score_ms"] + r["select_ms"]) / 1e3 / r["wall_s"] for r in steady]),
        "engine_share_max": max((r["score_ms"] + r["select_ms"]) / 1e3 / r["wall_s"] for r in steady),
        "rss": run["peak_rss_bytes"], "floor": next((r["depth_floor"] for r in rows if "depth_floor" in r), None),
        "cut": next((r["salf_cut"] for r in rows if "salf_cut" in r), None), "replay": bool(run.get("replay")),
    }


def layer_moment_bytes(model: str, scope: str) -> list[int]:
    """Adam moment bytes (exp_avg + exp_avg_sq, fp32) of each decoder layer's trainable tensors."""
    from benchmarks.harness.training import meta_model
    from irtuning_plugin.layer_map import build_layer_map
    from irtuning_plugin.tasks.assets.references import resolve_reference

    lm = build_layer_map(meta_model(resolve_reference(model), scope), scope)
    return [sum(2 * p.numel() * 4 for p in ps) for ps in lm.params]


def moved_per_step(run: dict, layer_bytes: list[int]) -> list[int]:
    """Bytes `frozen_optimizer_state: cpu` moves at each re-selection of the run (0 for other modes)."""
    if run.get("engine_options", {}).get("frozen_optimizer_state") != "cpu":
        return [0] * max(len(run["rows"]) - 1, 1)
    return offload_moves([r["active"] for r in run["rows"]], layer_bytes) or [0]


def _x(v, base):
    return f"{v / base:.3f}×" if base else "-"


def report(runs: list[dict], scope: str, out: str = "benchmarks/results/costs-smollm2", extra: str = "",
           model: str = "irtuning://smollm2-135m-instruct") -> str:
    runs = [r for r in runs if r["scope"] == scope]
    if not runs:
        return ""
    by = {r["label"]: summarise(r) for r in runs}
    if scope == "full":
        layer_bytes = layer_moment_bytes(model, scope)
        for r in runs:
            moved = moved_per_step(r, layer_bytes)
            by[r["label"]]["moved"] = (statistics.median(moved), max(moved))
    base = by.get("all")
    first = runs[0]
    G, MB = 1e9, 2**20
    what = "LoRA r=32 on q,k,v,up,down" if scope == "adapter" else "full fine-tuning (irtuning_scope: full)"
    train = f"{first['batch']}×{first['seq']} tokens"
    real = [r for r in runs if not r.get("replay")]
    lines = [
        f"### Counted costs per optimizer step: {first.get('model', '?')}, {what}", "",
        f"Generated {datetime.date.today()} by `python -m benchmarks.cost_table --out "
        f"{out}{extra} --report` (runs: the same command without `--report`) on "
        f"{results.host()['machine']}, torch {first['torch']}. Steps: *trained* = real training steps ({train} per "
        f"step, AdamW lr 2e-4, seed 1), for the strategies that read gradients; *replayed* = the same engine "
        f"and AdamW with zero gradients instead of forward/backward (`cost_count.py --replay`), for those "
        f"that never do, so their selections and byte accounts are a real run's. Every selected set's FLOPs "
        f"and saved bytes are counted at {first['count_batch']}×{first['count_seq']} tokens on the meta "
        f"device (math attention kernel; equal to a CPU count, tests/test_cost_count.py). Ratios are to "
        f"`all` in this table. Step time and RSS of the trained runs were taken on a shared 2-core machine "
        f"(load average {statistics.mean(r['load_avg'][0] for r in (real or runs)):.1f}) at {train} per "
        f"step: indications only.", "",
        "| variant | steps | layers/step (min-med-max) | lowest trained (min-med) | fwd GFLOP | bwd GFLOP (median) "
        "| bwd vs all | saved for backward MB | saved vs all | grads + Adam on device MB (median / max) "
        "| vs all | kept off device by `cpu` MB (max) | Adam state MB (max) | step s | score+select ms (share) "
        "| peak RSS MB |" + (" moved by `cpu` per step MB (median / max) |" if scope == "full" else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if scope == "full" else "")]
    for name, s in by.items():
        extra = []
        if s["floor"] is not None:
            extra.append(f"floor {s['floor']}")
        if s["cut"] is not None and s["floor"] is None:
            extra.append(f"cut {s['cut']}")
        label = f"{name}" + (f" ({', '.join(extra)})" if extra else "")
        lines.append(
            f"| {label} | {len(s['layers'])} {'replayed' if s['replay'] else 'trained'} | {min(s['layers'])}-{statistics.median(s['layers']):g}-"
            f"{max(s['layers'])} | {min(s['lowest'])}-{statistics.median(s['lowest']):g} | {s['fwd'] / G:.1f} "
            f"| {s['bwd'] / G:.1f} | {_x(s['bwd'], base and base['bwd'])} | {s['saved'] / MB:.0f} "
            f"| {_x(s['saved'], base and base['saved'])} | {s['resident'] / MB:.1f} / {s['resident_max'] / MB:.1f} "
            f"| {_x(s['resident_max'], base and base['resident_max'])} | {s['offloaded'] / MB:.1f} "
            f"| {s['state'] / MB:.1f} | " + ("- | - | - |" if s["replay"] else
            f"{s['wall']:.1f} | {s['engine_ms']:.1f} ({100 * s['engine_share']:.2f}%, max "
            f"{100 * s['engine_share_max']:.2f}%) | {s['rss'] / MB:.0f} |")
            + (f" {s['moved'][0] / MB:.1f} / {s['moved'][1] / MB:.1f} |" if "moved" in s else ""))
    return "\n".join(lines)


def lisa_redraws(runs: list[dict]) -> str:
    """Per step of the full-FT lisa runs: trained layers and device-resident bytes by mode."""
    rs = {r["label"]: r for r in runs if r["scope"] == "full" and r["strategy"] == "lisa"}
    if not rs:
        return ""
    MB = 2**20
    names = sorted(rs)
    lines = ["#### LISA, full fine-tuning: gradient + Adam bytes on the training device over the re-draws", "",
             "Same command. `n_layers: 2`, `interval: 2` (a re-draw every 2 steps, so 10 steps hold 5 draws); "
             "embeddings/head train throughout (`train_outside: true`, the paper's setting).", "",
             "| step | trained layers | " + " | ".join(f"{n}: on device MB" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    ref = rs[names[0]]["rows"]
    for i, row in enumerate(ref):
        cells = [f"{rs[n]['rows'][i]['device_resident_bytes'] / MB:.1f}" for n in names]
        lines.append(f"| {row['step']} | {row['active']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    for scope, marker in (("adapter", "o"), ("full", "s")):
        rs = [r for r in runs if r["scope"] == scope]
        if not rs:
            continue
        by = {r["label"]: summarise(r) for r in rs}
        base = by.get("all")
        if not base:
            continue
        names = list(by)
        xb = [by[n]["bwd"] / base["bwd"] for n in names]
        ys = [by[n]["saved"] / base["saved"] for n in names]
        zr = [by[n]["resident_max"] / base["resident_max"] for n in names]
        tag = "LoRA" if scope == "adapter" else "full FT"
        axes[0].scatter(xb, ys, marker=marker, label=tag)
        for n, x, y in zip(names, xb, ys, strict=True):
            axes[0].annotate(n, (x, y), fontsize=7)
        axes[1 if scope == "adapter" else 2].barh(names, zr)
        axes[1 if scope == "adapter" else 2].axvline(0.6, color="tab:red", linestyle=":")
        axes[1 if scope == "adapter" else 2].set_title(f"{tag}: grads + Adam on device (max step) / all")
    axes[0].axvline(0.6, color="tab:red", linestyle=":")
    axes[0].axhline(0.7, color="tab:red", linestyle=":")
    axes[0].set_xlabel("backward FLOPs / all (median step)")
    axes[0].set_ylabel("bytes saved for backward / all")
    axes[0].legend()
    fig.tight_layout()
    results.save_figure(fig, path, dpi=90)


def write_section(text: str, tag: str, results_md: Path) -> None:
    replace_section(results_md, tag, text, title="# Counted costs")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--report", action="store_true")
    p.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all); ISSUE40: the "
                   "variants of issue 40 (depth-floor curve, full-parameter arm)")
    p.add_argument("--scopes", nargs="+", default=["adapter", "full"])
    p.add_argument("--model", default="irtuning://smollm2-135m-instruct")
    p.add_argument("--results-md", default=str(RESULTS_MD))
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / "runs.jsonl"
    if not a.report:
        todo = [(scope, name) for scope in a.scopes for name in (LORA if scope == "adapter" else FULL)]
        if a.only:  # in the order given; "full:NAME" / "adapter:NAME" picks one scope
            only = [x for item in a.only for x in (ISSUE40 if item == "ISSUE40" else [item])]
            unknown = [x for x in only if not any(x in (n, f"{sc}:{n}") for sc, n in todo)]
            if unknown:
                raise SystemExit(f"--only: no variant {unknown[0]!r}; known: "
                                 + ", ".join(f"{sc}:{n}" for sc, n in todo))
            todo = [(sc, n) for item in only for sc, n in todo if item in (n, f"{sc}:{n}")]
        def append(_cell, result: dict) -> None:
            with open(runs_path, "a") as fh:
                fh.write(json.dumps(result) + "\n")

        run_cells([cell(name, scope, (LORA if scope == "adapter" else FULL)[name], a, out) for scope, name in todo],
                  resume=False, done=append)
    runs = {}
    for line in runs_path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            runs[(r["scope"], r["label"])] = r  # a rerun of a variant replaces the earlier one
    runs = list(runs.values())
    md = Path(a.results_md)
    extra = "" if a.results_md == str(RESULTS_MD) else f" --results-md {a.results_md}"
    for scope, tag in SECTIONS.items():
        text = report(runs, scope, a.out, extra, a.model)
        if scope == "full":
            text += "\n\n" + lisa_redraws(runs)
        if text.strip():
            write_section(text, tag, md)
    plot(runs, md.parent / "costs-smollm2.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
