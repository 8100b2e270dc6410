"""The ``irtuning`` commands that use the tasks: prepare, demo, eval, convert, train-seqcls, and the asset
building before ``irtuning llamafactory``. ``irtuning_plugin.cli`` holds their arguments and imports this
module only when one of them runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from irtuning_plugin.references import SCHEME, SMOLLM2, TINY_LLAMA, is_reference
from irtuning_plugin.run_summary import print_summary, summarize_run
from irtuning_plugin.tasks.assets.references import (
    DATA_NAME,
    build_references,
    resolve_asset_references,
    resolve_reference,
    revision_data_dir,
)
from irtuning_plugin.user_input import (
    UserInputError,
    existing_dir,
    model_location,
    read_yaml_mapping,
)

AXOLOTL_ENV = {"AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
               "TOKENIZERS_PARALLELISM": "false"}


def cmd_prepare(args) -> int:
    if args.references:
        values = list(args.references) + ([SCHEME + TINY_LLAMA] if args.tiny else [])
        for value, path in zip(values, build_references(values)):
            print(f"{value}  {path}")
        return 0
    print(f"model  {resolve_reference(SCHEME + SMOLLM2)}")
    if args.tiny:
        print(f"tiny   {resolve_reference(SCHEME + TINY_LLAMA)}")
    print(f"data   {revision_data_dir()}")
    return 0


def evaluate(model_path: str, adapter: str | None, split: str, limit: int | None, data_dir: str | None = None,
             full: bool = False):
    """EvalResult of either setup (completion or classifier, found from the trained folder) on a data folder;
    with ``full`` also the run facts and the records."""
    from irtuning_plugin.tasks.evaluation import evaluate_data

    res, meta, records = evaluate_data(model_path, adapter, data_dir or revision_data_dir(), split, limit)
    return (res, meta, records) if full else res


def cmd_eval(args) -> int:
    from irtuning_plugin.tasks.evaluation import format_report, write_report
    from irtuning_plugin.tasks.seq_classification import is_seq_cls_output

    model = model_location(args.model, resolve=resolve_reference)
    if args.adapter is not None:
        existing_dir(args.adapter, "--adapter")
    if args.data is not None:
        existing_dir(args.data, "--data")
    res, meta, records = evaluate(model, args.adapter, args.split, args.limit, args.data, full=True)
    print(format_report(res, title=f"{meta['setup']} on {meta['task']} {args.split} ({meta['data']})"))
    trained = args.adapter or (args.model if is_seq_cls_output(args.model) else ".")
    report_dir = Path(args.report_dir) if args.report_dir else Path(trained) / f"eval-{args.split}"
    paths = write_report(res, report_dir, meta, ids=[r.get("id") for r in records], gold=[r["label"] for r in records])
    if args.json:
        Path(args.json).write_text(paths["json"].read_text())
        paths["json"] = Path(args.json)
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def axolotl_command() -> list[str]:
    return [sys.executable, "-m", "axolotl.cli.main"]


def demo_train_command(recipe, launcher: str, max_steps: int | None = None) -> list[str]:
    """``axolotl train`` of the demo recipe. Axolotl's CLI spells config keys with dashes: an underscore
    spelling (``--max_steps=N``) is taken as an extra launcher argument, which ``--launcher python`` drops
    without a word, and the recipe's own max_steps would run."""
    cmd = axolotl_command() + ["train", str(recipe), "--launcher", launcher]
    if max_steps is not None:
        if max_steps < 1:
            raise UserInputError(f"--max-steps={max_steps}; allowed: a whole number >= 1 (leave it out to train the "
                                 f"recipe's own max_steps)")
        cmd += [f"--max-steps={max_steps}"]
    return cmd


def cmd_demo(args) -> int:
    recipe = Path(args.recipe)
    cfg = read_yaml_mapping(recipe)
    datasets = cfg.get("datasets")
    if not isinstance(cfg.get("base_model"), str) or not (
            isinstance(datasets, list) and datasets and isinstance(datasets[0], dict)
            and isinstance(datasets[0].get("path"), str)):
        raise UserInputError(f"recipe {str(recipe)!r}: the demo needs base_model and datasets[0].path (a JSONL file "
                             f"in a data folder with test.jsonl beside it)")
    cmd = demo_train_command(recipe, args.launcher, args.max_steps)  # refuses a bad --max-steps before any work
    # Builds the model and data on first use; the plugin inside `axolotl train` then finds them built.
    resolve_asset_references(cfg)
    output_dir = Path(cfg.get("output_dir", "./outputs/demo"))
    data_dir = str(Path(cfg["datasets"][0]["path"]).parent)
    before = evaluate(cfg["base_model"], None, "test", args.eval_limit, data_dir)
    print(f"before training: accuracy {before.accuracy:.3f}, macro-F1 {before.macro_f1:.3f} (n={before.n})",
          flush=True)
    env = {**os.environ, **AXOLOTL_ENV,
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    print("running: " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        print(f"axolotl train failed with exit code {proc.returncode}", file=sys.stderr)
        return proc.returncode
    after = evaluate(cfg["base_model"], str(output_dir), "test", args.eval_limit, data_dir)
    summary = summarize_run(output_dir)
    summary.update(accuracy_before=before.accuracy, macro_f1_before=before.macro_f1,
                   accuracy_after=after.accuracy, macro_f1_after=after.macro_f1, eval_n=after.n,
                   per_class_before=before.per_class, per_class_after=after.per_class)
    (output_dir / "irtuning_demo_summary.json").write_text(json.dumps(summary, indent=1))
    print("\n=== irtuning demo summary ===")
    print_summary(summary)
    print(demo_table(before, after))
    return 0


def demo_table(before, after) -> str:
    """Held-out figures before and after training, per class, and the overall line with chance."""
    rows = [f"held-out test examples (n={after.n}, label scoring), before -> after training:",
            f"{'class':<16}{'n':>4}  {'recall':>14}  {'F1':>14}"]
    for label, b in before.per_class.items():
        a = after.per_class[label]
        rows.append(f"{label:<16}{a['support']:>4}  {b['recall']:>6.2f} -> {a['recall']:<4.2f}  "
                    f"{b['f1']:>6.2f} -> {a['f1']:<4.2f}")
    chance = 1 / len(before.per_class)
    rows.append(f"test accuracy {before.accuracy:.3f} -> {after.accuracy:.3f}; "
                f"macro-F1 {before.macro_f1:.3f} -> {after.macro_f1:.3f} "
                f"(chance 1/{len(before.per_class)} = {chance:.3f})")
    return "\n".join(rows)


def cmd_train_seqcls(args) -> int:
    import yaml

    from irtuning_plugin.config import config_from_flat
    from irtuning_plugin.tasks.seq_classification import SeqClsSettings, train_seq_cls

    flat = {"irtuning_strategy": args.strategy, "irtuning_scope": "full" if args.full else "adapter"}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("irtuning_"):
            raise UserInputError(f"--set {item!r}; expected irtuning_KEY=VALUE")
        try:
            flat[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserInputError(f"--set {item!r}: the value is not valid YAML") from None
    selection = config_from_flat(flat)
    model = model_location(args.model, resolve=resolve_reference)
    if args.data is not None:
        existing_dir(args.data, "--data")
    if Path(args.output).expanduser().exists() and not Path(args.output).expanduser().is_dir():
        raise UserInputError(f"--output {args.output!r} is a file; give a folder")
    training = {k: v for k, v in (("max_steps", args.max_steps), ("num_train_epochs", args.epochs),
                                  ("per_device_train_batch_size", args.batch_size), ("learning_rate", args.lr),
                                  ("warmup_steps", args.warmup_steps), ("seed", args.seed)) if v is not None}
    import torch

    res = train_seq_cls(model, args.data or revision_data_dir(), args.output,
                        selection=selection, settings=SeqClsSettings(full_finetune=args.full), training=training,
                        dtype=getattr(torch, args.dtype))
    print(f"trained {res['steps']} steps, training loss {res['train_loss']:.4f}; saved to {res['output_dir']}")
    return 0


def cmd_convert(args) -> int:
    from irtuning_plugin.tasks.converters import CONVERTERS, ConversionError

    kwargs = {"seed": args.seed} if args.dataset == "argrevision" else {}
    if not Path(args.src).expanduser().exists():
        raise UserInputError(f"source {args.src!r} not found")
    try:
        manifest = CONVERTERS[args.dataset](args.src, args.out, force=args.force, **kwargs)
    except ConversionError as err:
        raise UserInputError(str(err)) from None
    for split, counts in manifest["counts"].items():
        per_label = ", ".join(f"{lab} {n}" for lab, n in counts.items() if lab != "total")
        dropped = ", ".join(f"{lab} {n}" for lab, n in manifest["dropped"][split].items()) or "none"
        print(f"{split:5s} {counts['total']:5d} records ({per_label}); dropped: {dropped}")
    for original, moved in (manifest.get("moved_aside") or {}).items():
        print(f"moved aside (--force): {original} -> {moved}")
    print(f"wrote {Path(args.out).resolve()} (manifest.json: counts, sha256 of sources and outputs)")
    return 0


def cmd_llamafactory_assets(cfg: dict[str, Any]) -> None:
    """Build the assets a LLaMA-Factory recipe names, so that the launcher finds them built. A reference the
    launcher refuses (an unknown name) is left to it, so its message stays the one the user sees."""
    from irtuning_plugin.llamafactory_integration.launcher import LLAMAFACTORY_MODEL_KEYS
    from irtuning_plugin.references import parse_reference
    from irtuning_plugin.tasks.assets.llamafactory_data import llamafactory_dataset_dir

    for key in LLAMAFACTORY_MODEL_KEYS:
        if is_reference(cfg.get(key)):
            try:
                parse_reference(cfg[key])
            except ValueError:
                continue
            resolve_reference(cfg[key])
    if is_reference(cfg.get("dataset_dir")) and cfg["dataset_dir"].strip("/") == SCHEME + DATA_NAME:
        llamafactory_dataset_dir()
