"""``irtuning`` command line: prepare the built-in assets, run the demo, evaluate, summarise a run.

    irtuning prepare [--tiny]               build/convert the model(s) and the data set, print their paths
    irtuning demo [--max-steps N]           eval before, `axolotl train` the demo recipe, eval after, summary
    irtuning eval --model M [--adapter A]   accuracy, macro P/R/F1, per-class table, confusion matrix
    irtuning convert iterater|argrevision SRC OUT   the paper's released files -> our records + manifest
    irtuning train-seqcls --model M --output O   the paper's classifier setup (head + LoRA, plain Trainer)
    irtuning summary OUTPUT_DIR             what the selection did in a finished run
    irtuning keys                           every irtuning_* key with its default (markdown table)
    irtuning check RECIPE.yaml              validate an Axolotl recipe as `axolotl train` would, and catch
                                            irtuning_* keys without the plugin under plugins: (plain LoRA)
    irtuning llamafactory train R.yaml [k=v ...]   LLaMA-Factory training with layer selection
    irtuning llamafactory check R.yaml [k=v ...]   only validate the recipe
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
from pathlib import Path

from irtuning_plugin.user_input import (
    NUMPY_SEED_MAX,
    TRACEBACK_ENV,
    UserInputError,
    existing_dir,
    full_traceback_wanted,
    int_at_least,
    model_location,
    positive_float,
    read_jsonl,
    read_text,
    read_yaml_mapping,
    user_error_message,
)

LOG = logging.getLogger("irtuning")

# The demo recipe ships in the package (in a checkout, recipes/ links to yaml_recipes/).
DEMO_RECIPE = Path(__file__).resolve().parent / "recipes" / "demo-smollm2-ir.yaml"
AXOLOTL_ENV = {"AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
               "TOKENIZERS_PARALLELISM": "false"}


def _cmd_prepare(args) -> int:
    from irtuning_plugin.tasks.assets.models import prepare_smollm2, prepare_tiny_llama
    from irtuning_plugin.tasks.assets.references import revision_data_dir

    print(f"model  {prepare_smollm2()}")
    if args.tiny:
        print(f"tiny   {prepare_tiny_llama()}")
    print(f"data   {revision_data_dir()}")
    return 0


def _load_split(split: str, limit: int | None, data_dir: str | None = None) -> list[dict]:
    from irtuning_plugin.tasks.assets.references import revision_data_dir

    path = Path(data_dir) if data_dir else revision_data_dir()
    rows = [json.loads(line) for line in open(path / f"{split}.jsonl", encoding="utf-8") if line.strip()]
    return rows[:limit] if limit else rows


def _evaluate(model_path: str, adapter: str | None, split: str, limit: int | None, data_dir: str | None = None,
              full: bool = False):
    """EvalResult of either setup (completion or classifier, found from the trained folder) on a data folder;
    with ``full`` also the run facts and the records."""
    from irtuning_plugin.tasks.assets.references import revision_data_dir
    from irtuning_plugin.tasks.evaluation import evaluate_data

    res, meta, records = evaluate_data(model_path, adapter, data_dir or revision_data_dir(), split, limit)
    return (res, meta, records) if full else res


def _cmd_eval(args) -> int:
    from irtuning_plugin.tasks.evaluation import format_report, write_report

    model = model_location(args.model)
    if args.adapter is not None:
        existing_dir(args.adapter, "--adapter")
    if args.data is not None:
        existing_dir(args.data, "--data")
    res, meta, records = _evaluate(model, args.adapter, args.split, args.limit, args.data, full=True)
    print(format_report(res, title=f"{meta['setup']} on {meta['task']} {args.split} ({meta['data']})"))
    from irtuning_plugin.tasks.seq_classification import is_seq_cls_output

    trained = args.adapter or (args.model if is_seq_cls_output(args.model) else ".")
    report_dir = Path(args.report_dir) if args.report_dir else Path(trained) / f"eval-{args.split}"
    paths = write_report(res, report_dir, meta, ids=[r.get("id") for r in records], gold=[r["label"] for r in records])
    if args.json:
        Path(args.json).write_text(paths["json"].read_text())
        paths["json"] = Path(args.json)
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def summarize_run(output_dir: str | Path) -> dict:
    out = existing_dir(output_dir, "run folder")
    log = out / "irtuning_selection.jsonl"
    if not log.is_file():
        raise UserInputError(f"{str(output_dir)!r} holds no irtuning_selection.jsonl: not the output_dir of a run "
                             f"trained with irtuning (or trained with irtuning_selection_log: false)")
    # event rows (e.g. a resume with a changed configuration) carry no selection
    rows = [r for r in read_jsonl(log, "selection log") if "n_active" in r]
    run = _read_run_summary(out / "irtuning_run.json")
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


def _read_run_summary(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        run = json.loads(read_text(path, "run summary"))
    except ValueError as err:
        raise UserInputError(f"run summary {str(path)!r} is not valid JSON ({err}); it is truncated or corrupt") from None
    if not isinstance(run, dict):
        raise UserInputError(f"run summary {str(path)!r} is not a JSON object")
    return run


def _print_summary(s: dict) -> None:
    print(f"strategy {s['strategy']}: {s['steps']} optimizer steps over {s['num_layers']} layers")
    if s["loss_first"] is not None:
        print(f"training loss {s['loss_first']:.4f} -> {s['loss_last']:.4f}")
    print(f"layers trained per step: min {s['layers_min']}, median {s['layers_median']}, max {s['layers_max']}"
          f" (median lowest trained layer {s['lowest_trained_layer_median']})")
    print(f"selection log: {s['selection_log']}")
    print(f"heatmap:       {s['heatmap']}")


def _cmd_summary(args) -> int:
    _print_summary(summarize_run(args.output_dir))
    return 0


def _axolotl_command() -> list[str]:
    return [sys.executable, "-m", "axolotl.cli.main"]


def demo_train_command(recipe, launcher: str, max_steps: int | None = None) -> list[str]:
    """``axolotl train`` of the demo recipe. Axolotl's CLI spells config keys with dashes: an underscore
    spelling (``--max_steps=N``) is taken as an extra launcher argument, which ``--launcher python`` drops
    without a word, and the recipe's own max_steps would run."""
    cmd = _axolotl_command() + ["train", str(recipe), "--launcher", launcher]
    if max_steps is not None:
        if max_steps < 1:
            raise UserInputError(f"--max-steps={max_steps}; allowed: a whole number >= 1 (leave it out to train the "
                                 f"recipe's own max_steps)")
        cmd += [f"--max-steps={max_steps}"]
    return cmd


def _cmd_demo(args) -> int:
    from irtuning_plugin.tasks.assets.references import resolve_asset_references

    recipe = Path(args.recipe)
    cfg = read_yaml_mapping(recipe)
    datasets = cfg.get("datasets")
    if not isinstance(cfg.get("base_model"), str) or not (
            isinstance(datasets, list) and datasets and isinstance(datasets[0], dict)
            and isinstance(datasets[0].get("path"), str)):
        raise UserInputError(f"recipe {str(recipe)!r}: the demo needs base_model and datasets[0].path (a JSONL file "
                             f"in a data folder with test.jsonl beside it)")
    cmd = demo_train_command(recipe, args.launcher, args.max_steps)  # refuses a bad --max-steps before any work
    resolve_asset_references(cfg)  # builds the model and data on first use
    output_dir = Path(cfg.get("output_dir", "./outputs/demo"))
    data_dir = str(Path(cfg["datasets"][0]["path"]).parent)
    before = _evaluate(cfg["base_model"], None, "test", args.eval_limit, data_dir)
    print(f"before training: accuracy {before.accuracy:.3f}, macro-F1 {before.macro_f1:.3f} (n={before.n})",
          flush=True)
    env = {**os.environ, **AXOLOTL_ENV,
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    print("running: " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        print(f"axolotl train failed with exit code {proc.returncode}", file=sys.stderr)
        return proc.returncode
    after = _evaluate(cfg["base_model"], str(output_dir), "test", args.eval_limit, data_dir)
    summary = summarize_run(output_dir)
    summary.update(accuracy_before=before.accuracy, macro_f1_before=before.macro_f1,
                   accuracy_after=after.accuracy, macro_f1_after=after.macro_f1, eval_n=after.n,
                   per_class_before=before.per_class, per_class_after=after.per_class)
    (output_dir / "irtuning_demo_summary.json").write_text(json.dumps(summary, indent=1))
    print("\n=== irtuning demo summary ===")
    _print_summary(summary)
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


def _cmd_train_seqcls(args) -> int:
    import yaml

    from irtuning_plugin.config import config_from_flat
    from irtuning_plugin.tasks.assets.references import revision_data_dir
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
    model = model_location(args.model)
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


def _cmd_convert(args) -> int:
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


KEYS_START, KEYS_END = "<!-- keys:start -->", "<!-- keys:end -->"


def keys_table() -> str:
    from irtuning_plugin.config import all_flat_keys, flat_key_types
    from irtuning_plugin.strategies import registered_strategies

    types_ = flat_key_types()
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, (owner, f) in all_flat_keys().items():
        text = f.metadata.get("help", "")
        if key == "irtuning_strategy":
            text += ": " + "; ".join(f"`{n}` {c.summary}" for n, c in registered_strategies().items())
        if owner:
            text = f"(strategy `{owner}`) {text}"
        lines.append(f"| `{key}` | {types_[key].describe()} | `{f.default!r}` | {text} |")
    return "\n".join(lines)


def _cmd_keys(args) -> int:
    table = keys_table()
    if args.write_readme:
        path = Path(args.write_readme)
        text = read_text(path, "--write-readme file")
        if text.count(KEYS_START) != 1 or text.count(KEYS_END) != 1 or text.index(KEYS_START) > text.index(KEYS_END):
            raise UserInputError(f"--write-readme {str(path)!r} must hold the markers {KEYS_START} and {KEYS_END} "
                                 f"once each, in that order; the file is left as it was")
        head, rest = text.split(KEYS_START, 1)
        _, tail = rest.split(KEYS_END, 1)
        tmp = path.with_name(f".{path.name}.irtuning-tmp")
        tmp.write_text(f"{head}{KEYS_START}\n{table}\n{KEYS_END}{tail}", encoding="utf-8")
        os.replace(tmp, path)
    else:
        print(table)
    return 0


def _cmd_llamafactory(args) -> int:
    from irtuning_plugin.llamafactory_integration import launcher

    cfg = launcher.load_recipe(args.recipe, args.overrides)
    if args.action == "check":
        config = launcher.check_recipe(launcher.resolve_recipe(cfg), parse_with_llamafactory=True)
        print(f"{args.recipe}: ok (irtuning_strategy {config.strategy}, scope {config.scope}); LLaMA-Factory's own "
              f"argument checks passed too")
        return 0
    launcher.check_recipe(cfg, meta_model=False)  # our keys before any asset is built
    callback = launcher.train(cfg)
    if callback.engine is not None and callback.rows:
        out = callback.trainer.args.output_dir if callback.trainer is not None else None
        if out:
            _print_summary(summarize_run(out))
    return 0


def _cmd_check(args) -> int:
    from irtuning_plugin.axolotl_integration.args import plugin_listed, unlisted_plugin_message

    cfg = read_yaml_mapping(args.recipe)
    problem = unlisted_plugin_message(cfg)
    if problem:
        print(f"irtuning check: {problem}", file=sys.stderr)
        return 1
    if not plugin_listed(cfg):
        print("irtuning check: the irtuning plugin is not used by this recipe")
        return 0
    from axolotl.cli.config import prepare_plugins
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    from irtuning_plugin.axolotl_integration.errors import irtuning_message
    from irtuning_plugin.config import config_from_flat

    cfg = DictDefault(cfg)
    try:
        prepare_plugins(cfg)
        validated = validate_config(cfg)
    except Exception as exc:  # noqa: BLE001 - report any refusal, ours or Axolotl's, as one line
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        print(f"irtuning check: {irtuning_message(exc) or lines[-1].strip()}", file=sys.stderr)
        return 1
    config = config_from_flat(dict(validated))
    print(f"irtuning check: ok (irtuning_strategy {config.strategy}, scope {config.scope})")
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other error of the command line."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="irtuning", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("prepare", help="build the built-in model(s) and data set")
    sp.add_argument("--tiny", action="store_true", help="also the tiny test model")
    sp.set_defaults(func=_cmd_prepare)
    sp = sub.add_parser("demo", help="run the demo: eval, axolotl train, eval, summary")
    sp.add_argument("--recipe", default=str(DEMO_RECIPE), help="Axolotl recipe (default: the packaged demo recipe, "
                    "%(default)s)")
    sp.add_argument("--max-steps", type=int_at_least(1), default=None, help="override the recipe's max_steps (>= 1)")
    sp.add_argument("--eval-limit", type=int_at_least(1), default=200, help="test examples scored before/after")
    sp.add_argument("--launcher", default="python", choices=("python", "accelerate"))
    sp.set_defaults(func=_cmd_demo)
    sp = sub.add_parser("eval", help="accuracy, macro P/R/F1, per-class table, confusion matrix (JSON + PNG)")
    sp.add_argument("--model", required=True, help="base model folder or irtuning:// reference (a full fine-tuning "
                    "output folder for a fully fine-tuned model)")
    sp.add_argument("--adapter", default=None, help="LoRA output folder: an Axolotl output_dir (completion setup) or "
                    "a seq-cls output (irtuning_seq_cls.json in it)")
    sp.add_argument("--split", default="test", choices=("train", "val", "test"))
    sp.add_argument("--data", default=None, help="data folder: built-in or `irtuning convert` output (default: the "
                    "built-in data set)")
    sp.add_argument("--limit", type=int_at_least(1), default=None, help="score only the first N examples")
    sp.add_argument("--report-dir", default=None, help="where eval.json and confusion.png go (default: "
                    "ADAPTER/eval-SPLIT, MODEL/eval-SPLIT for a local model, else ./eval-SPLIT)")
    sp.add_argument("--json", default=None, help="also copy eval.json here")
    sp.set_defaults(func=_cmd_eval)
    sp = sub.add_parser("convert", help="convert the paper's released data files into our records")
    sp.add_argument("dataset", choices=("iterater", "argrevision"))
    sp.add_argument("src", help="iterater: the folder with train.json, dev.json, test.json; "
                    "argrevision: revision_purpose.xlsx (or a .csv of it)")
    sp.add_argument("out", help="output folder: a new or empty one, or the output of an earlier convert; only "
                    "train/val/test.jsonl + manifest.json are written there, and the source is never written")
    sp.add_argument("--force", action="store_true", help="OUT holds files irtuning did not write: move them aside into "
                    "OUT/irtuning-moved-aside-TIME/ (printed) instead of refusing")
    sp.add_argument("--seed", type=int_at_least(0, NUMPY_SEED_MAX), default=171,
                    help="argrevision: seed of the reference's 80/10/10 split")
    sp.set_defaults(func=_cmd_convert)
    sp = sub.add_parser("train-seqcls", help="the paper's classifier setup: last-token head + LoRA on a plain Trainer")
    sp.add_argument("--model", required=True, help="base model folder, hub id or irtuning:// reference")
    sp.add_argument("--data", default=None, help="data folder (default: the built-in data set)")
    sp.add_argument("--output", required=True, help="output folder (adapter + head, or the full model)")
    sp.add_argument("--strategy", default="ir", help="irtuning_strategy")
    sp.add_argument("--set", action="append", default=[], metavar="irtuning_KEY=VALUE", help="any irtuning_* key")
    sp.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA (irtuning_scope: full)")
    sp.add_argument("--max-steps", type=int_at_least(1), default=None)
    sp.add_argument("--epochs", type=positive_float, default=None, help="default 4 (the paper)")
    sp.add_argument("--batch-size", type=int_at_least(1), default=None, help="default 16 (the paper)")
    sp.add_argument("--lr", type=positive_float, default=None, help="default 2e-4 (the paper)")
    sp.add_argument("--warmup-steps", type=int_at_least(0), default=None, help="default 100 (the paper)")
    sp.add_argument("--seed", type=int_at_least(0, NUMPY_SEED_MAX), default=None, help="default 171 (the paper)")
    sp.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="weights' dtype (bfloat16 for 7-8B models on a GPU)")
    sp.set_defaults(func=_cmd_train_seqcls)
    sp = sub.add_parser("summary", help="summarise a finished run's selection")
    sp.add_argument("output_dir")
    sp.set_defaults(func=_cmd_summary)
    sp = sub.add_parser("keys", help="print every irtuning_* key (markdown)")
    sp.add_argument("--write-readme", default=None, help="replace the key table between the markers of this file")
    sp.set_defaults(func=_cmd_keys)
    sp = sub.add_parser("check", help="validate an Axolotl recipe (catches irtuning_* keys without the plugin)")
    sp.add_argument("recipe")
    sp.set_defaults(func=_cmd_check)
    sp = sub.add_parser("llamafactory", help="LLaMA-Factory training with layer selection (irtuning_* keys)")
    sp.add_argument("action", choices=("train", "check"), help="train, or only validate the recipe")
    sp.add_argument("recipe", help="a LLaMA-Factory training YAML with irtuning_* keys")
    sp.add_argument("overrides", nargs="*", help="key=value overrides, as with llamafactory-cli train")
    sp.set_defaults(func=_cmd_llamafactory)
    from irtuning_plugin import plan

    sp = sub.add_parser("plan", help="predict a recipe's GPU memory, FLOPs and offload traffic at any model size")
    plan.add_arguments(sp)
    sp.set_defaults(func=plan.main)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user error (a missing path, bad YAML or encoding, a refused setting) prints one
    line naming it and returns 2; IRTUNING_FULL_TRACEBACK=1 raises it with its traceback instead."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as exc:  # noqa: BLE001 - sorted into user errors (one line) and bugs (traceback) below
        message = user_error_message(exc)
        if message is None or full_traceback_wanted():
            raise
        print(f"irtuning {args.command}: error: {message} (set {TRACEBACK_ENV}=1 for the traceback)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
