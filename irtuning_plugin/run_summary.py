"""What the selection did in a finished run (``irtuning summary OUTPUT_DIR``), read from the files the
callback writes: ``irtuning_selection.jsonl`` (one row per optimizer step) and ``irtuning_run.json``."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from irtuning_plugin.user_input import UserInputError, existing_dir, read_jsonl, read_text


def summarize_run(output_dir: str | Path) -> dict:
    out = existing_dir(output_dir, "run folder")
    log = out / "irtuning_selection.jsonl"
    if not log.is_file():
        raise UserInputError(f"{str(output_dir)!r} holds no irtuning_selection.jsonl: not the output_dir of a run "
                             f"trained with irtuning (or trained with irtuning_selection_log: false)")
    # event rows (e.g. a resume with a changed configuration) carry no selection
    rows = [r for r in read_jsonl(log, "selection log") if "n_active" in r]
    run = read_run_summary(out / "irtuning_run.json")
    counts = [r["n_active"] for r in rows]
    losses = run.get("losses", [])
    return {
        "strategy": run.get("strategy"),
        "num_layers": run.get("num_layers"),
        "steps": len(rows),
        "layers_min": min(counts) if counts else None,
        "layers_median": statistics.median(counts) if counts else None,
        "layers_max": max(counts) if counts else None,
        "lowest_trained_layer_median": statistics.median(r["lowest_active"] for r in rows) if rows else None,
        "loss_first": losses[0][1] if losses else None,
        "loss_last": losses[-1][1] if losses else None,
        "selection_log": str(out / "irtuning_selection.jsonl"),
        "heatmap": str(out / "irtuning_selection.png") if (out / "irtuning_selection.png").exists() else None,
    }


def read_run_summary(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        run = json.loads(read_text(path, "run summary"))
    except ValueError as err:
        raise UserInputError(f"run summary {str(path)!r} is not valid JSON ({err}); it is truncated or corrupt") from None
    if not isinstance(run, dict):
        raise UserInputError(f"run summary {str(path)!r} is not a JSON object")
    return run


def print_summary(s: dict) -> None:
    print(f"strategy {s['strategy']}: {s['steps']} optimizer steps over {s['num_layers']} layers")
    if s["loss_first"] is not None:
        print(f"training loss {s['loss_first']:.4f} -> {s['loss_last']:.4f}")
    print(f"layers trained per step: min {s['layers_min']}, median {s['layers_median']}, max {s['layers_max']}"
          f" (median lowest trained layer {s['lowest_trained_layer_median']})")
    print(f"selection log: {s['selection_log']}")
    print(f"heatmap:       {s['heatmap']}")
