"""``irtuning`` command line: prepare the built-in assets, run the demo, evaluate, summarise a run.

    irtuning prepare [--tiny] [REF ...]     build/convert the model(s) and the data set (or the irtuning:// REFs)
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
import logging
import os
import sys
from pathlib import Path

from irtuning_plugin.run_summary import print_summary, summarize_run
from irtuning_plugin.user_input import (
    NUMPY_SEED_MAX,
    TRACEBACK_ENV,
    UserInputError,
    full_traceback_wanted,
    int_at_least,
    positive_float,
    read_text,
    read_yaml_mapping,
    user_error_message,
)

LOG = logging.getLogger("irtuning")

# The demo recipe ships in the package (in a checkout, recipes/ links to yaml_recipes/).
DEMO_RECIPE = Path(__file__).resolve().parent / "recipes" / "demo-smollm2-ir.yaml"
__all__ = ["UserInputError", "build_parser", "keys_table", "main", "summarize_run"]


def _task_command(name: str):
    """The ``cmd_<name>`` of :mod:`irtuning_plugin.tasks.commands`, imported only when that command runs (the
    plugin's own commands never import the tasks)."""
    def run(args) -> int:
        from irtuning_plugin.tasks import commands

        return getattr(commands, f"cmd_{name}")(args)

    run.__name__ = f"cmd_{name}"
    return run


def _cmd_summary(args) -> int:
    print_summary(summarize_run(args.output_dir))
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
        _task_command("llamafactory_assets")(cfg)
        config = launcher.check_recipe(launcher.resolve_recipe(cfg), parse_with_llamafactory=True)
        print(f"{args.recipe}: ok (irtuning_strategy {config.strategy}, scope {config.scope}); LLaMA-Factory's own "
              f"argument checks passed too")
        return 0
    launcher.check_recipe(cfg, meta_model=False)  # our keys before any asset is built
    _task_command("llamafactory_assets")(cfg)
    callback = launcher.train(cfg)
    if callback.engine is not None and callback.rows:
        out = callback.trainer.args.output_dir if callback.trainer is not None else None
        if out:
            print_summary(summarize_run(out))
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
    sp.add_argument("references", nargs="*", metavar="irtuning://NAME",
                    help="build these instead (each named as a recipe names it, e.g. irtuning://tweet-sentiment)")
    sp.add_argument("--tiny", action="store_true", help="also the tiny test model")
    sp.set_defaults(func=_task_command("prepare"))
    sp = sub.add_parser("demo", help="run the demo: eval, axolotl train, eval, summary")
    sp.add_argument("--recipe", default=str(DEMO_RECIPE), help="Axolotl recipe (default: the packaged demo recipe, "
                    "%(default)s)")
    sp.add_argument("--max-steps", type=int_at_least(1), default=None, help="override the recipe's max_steps (>= 1)")
    sp.add_argument("--eval-limit", type=int_at_least(1), default=200, help="test examples scored before/after")
    sp.add_argument("--launcher", default="python", choices=("python", "accelerate"))
    sp.set_defaults(func=_task_command("demo"))
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
    sp.set_defaults(func=_task_command("eval"))
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
    sp.set_defaults(func=_task_command("convert"))
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
    sp.set_defaults(func=_task_command("train_seqcls"))
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
