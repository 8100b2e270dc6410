"""Train a LLaMA-Factory recipe with layer selection: check our keys, then LLaMA-Factory's own ``run_exp``.

    irtuning llamafactory train recipe.yaml [key=value ...]     (mirrors ``llamafactory-cli train``)

1. ``irtuning_*`` keys are checked by the same code as on Axolotl (:func:`config_from_flat`), then the
   LLaMA-Factory settings that cannot work with per-step layer selection are refused, naming the key,
   before anything is imported from LLaMA-Factory or a weight is read.
2. The other keys go unchanged to ``llamafactory.train.tuner.run_exp(args, callbacks=[ours])``.

LLaMA-Factory builds its Trainer internally. While ``run_exp`` runs, ``transformers.Trainer.__init__`` is
wrapped so that the Trainer holding our callback hands itself to it; the callback then scores gradients
before the Trainer clips them, exactly as on Axolotl.

LLaMA-Factory enables gradient checkpointing by default, reentrant, through its own wrapper that makes the
first input of every layer holding trainable parameters require grad. With that wrapper the embedding-output
hook (which peft installs for checkpointed models) is not needed, so the backward cut applies here as well.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import os
import sys
import types
from typing import Any, Callable, Iterable, Mapping

import yaml

from irtuning_plugin import preflight
from irtuning_plugin.config import PREFIX, SelectionConfig, config_from_flat
from irtuning_plugin.user_input import read_yaml_mapping

LOG = logging.getLogger(__name__)

# The qualified name of LLaMA-Factory's checkpoint wrapper (model/model_utils/checkpointing.py, 0.9.5).
_LF_CHECKPOINT_WRAPPER = "get_custom_gradient_checkpointing_func.<locals>.custom_gradient_checkpointing_func"


class LlamaFactoryConfigError(ValueError):
    """A recipe that cannot train with layer selection (one line, naming the key)."""


def load_recipe(path: str | os.PathLike, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """The YAML recipe with ``key=value`` overrides (values parsed as YAML), as ``llamafactory-cli train``."""
    cfg = read_yaml_mapping(path)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LlamaFactoryConfigError(f"override {item!r}: expected key=value")
        try:
            cfg[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise LlamaFactoryConfigError(f"override {item!r}: the value is not valid YAML") from None
    return cfg


def _refuse(message: str) -> None:
    raise LlamaFactoryConfigError(message)


def llamafactory_setup(cfg: Mapping[str, Any], config: SelectionConfig) -> preflight.TrainingSetup:
    """The run as the preflight rules see it, from the recipe's keys (LLaMA-Factory's defaults filled in)."""
    return preflight.TrainingSetup(
        preflight.LLAMAFACTORY, config.strategy, config.scope, finetuning_type=cfg.get("finetuning_type", "lora"),
        torch_compile=cfg.get("torch_compile"), deepspeed=cfg.get("deepspeed"), fsdp=cfg.get("fsdp"),
        fsdp_config=cfg.get("fsdp_config"), ddp_find_unused_parameters=cfg.get("ddp_find_unused_parameters"),
        keys=cfg)


def check_recipe(cfg: Mapping[str, Any], *, meta_model: bool = True,
                 parse_with_llamafactory: bool = False) -> SelectionConfig:
    """Our keys first (the Axolotl checks), then the LLaMA-Factory combinations that cannot work; with
    ``parse_with_llamafactory``, last LLaMA-Factory's own argument parsing and checks (what ``train`` runs
    first), so that a recipe ``check`` accepts is one ``train`` does not refuse."""
    if cfg.get(PREFIX + "strategy") is None:
        stray = sorted(k for k in cfg if str(k).startswith(PREFIX) and cfg[k] is not None)
        but = f" but {stray[0]} is" if stray else ""
        _refuse(f"irtuning_strategy is not set{but}: set irtuning_strategy (e.g. ir), or train without "
                "layer selection with llamafactory-cli train")
    config = config_from_flat(cfg)
    preflight.check(llamafactory_setup(cfg, config), error=LlamaFactoryConfigError)
    if meta_model and isinstance(cfg.get("model_name_or_path"), str) and "://" not in cfg["model_name_or_path"]:
        # same check as on Axolotl: the layer list resolves and the options fit its length
        preflight.check_options_on_model(
            preflight.meta_model(cfg["model_name_or_path"], cfg.get("trust_remote_code")), config)
    if parse_with_llamafactory:
        check_llamafactory_arguments(cfg)
    return config


def check_llamafactory_arguments(cfg: Mapping[str, Any]) -> None:
    """LLaMA-Factory's own parsing of the recipe (unknown keys, its combinations), as ``run_exp`` does it."""
    stub_missing_torchaudio()
    try:
        from llamafactory.hparams import get_train_args
    except ImportError as err:
        raise LlamaFactoryConfigError(f"LLaMA-Factory cannot be imported here ({err}), so its own checks of the "
                                      f"recipe cannot run: pip install 'irtuning[llamafactory]'") from None
    try:
        get_train_args(llamafactory_args(cfg))
    except ValueError as err:  # HfArgumentParser's unknown keys, TrainingArguments' and LLaMA-Factory's checks
        text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        raise LlamaFactoryConfigError(f"LLaMA-Factory refuses the recipe: {text}") from None


def resolve_recipe(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Resolve ``irtuning://`` references (model, dataset folder) to the built-in assets, which must be built
    (``irtuning llamafactory`` builds them first; see :mod:`irtuning_plugin.references`)."""
    from irtuning_plugin.references import REVISION_DATA, SCHEME, built_path, llamafactory_built_dir

    out = dict(cfg)
    for key in LLAMAFACTORY_MODEL_KEYS:
        if isinstance(out.get(key), str):
            out[key] = built_path(out[key])
    if isinstance(out.get("dataset_dir"), str) and out["dataset_dir"].startswith(SCHEME):
        if out["dataset_dir"].strip("/") != SCHEME + REVISION_DATA:
            raise LlamaFactoryConfigError(f"dataset_dir={out['dataset_dir']!r}; allowed reference: "
                                          f"{SCHEME}{REVISION_DATA}")
        out["dataset_dir"] = llamafactory_built_dir(out["dataset_dir"])
    return out


# The keys of a LLaMA-Factory recipe that may name an irtuning:// model.
LLAMAFACTORY_MODEL_KEYS = ("model_name_or_path", "tokenizer_name_or_path")


def llamafactory_args(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What LLaMA-Factory receives: every key but ours."""
    args = {k: v for k, v in cfg.items() if not str(k).startswith(PREFIX)}
    args.setdefault("ddp_find_unused_parameters", True)  # frozen layers are unused parameters under DDP
    return args


def stub_missing_torchaudio() -> bool:
    """``llamafactory.data.mm_plugin`` imports torchaudio at top level, though text training never uses it.

    When torchaudio is not installed (the CPU set-up: pip's torchaudio wheel is CUDA-linked), an empty module
    with a spec takes its place; transformers still finds no torchaudio distribution and treats it as absent.
    """
    if "torchaudio" in sys.modules or importlib.util.find_spec("torchaudio") is not None:
        return False
    stub = types.ModuleType("torchaudio")
    stub.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
    sys.modules["torchaudio"] = stub
    LOG.info("irtuning: torchaudio is not installed; an empty stand-in lets LLaMA-Factory import (text only)")
    return True


def mark_llamafactory_checkpointing(model: Any) -> int:
    """Tell the engine which checkpoint functions make a trained layer's input require grad themselves."""
    marked = 0
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        code = getattr(func, "__code__", None)
        if code is not None and getattr(code, "co_qualname", "") == _LF_CHECKPOINT_WRAPPER:
            func.irtuning_inputs_require_grad = True
            marked += 1
    return marked


def _callback_class():
    from irtuning_plugin.callback import LayerSelectionCallback

    class LlamaFactorySelectionCallback(LayerSelectionCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            target = self.model if self.model is not None else model
            if target is not None and mark_llamafactory_checkpointing(target):
                LOG.info("irtuning: LLaMA-Factory's checkpoint wrapper makes trained layers' inputs require grad")
            if self.trainer is None:
                LOG.warning("irtuning: the LLaMA-Factory Trainer was not captured: scores are of CLIPPED gradients")
            return super().on_train_begin(args, state, control, model=model, **kwargs)

    return LlamaFactorySelectionCallback


def trainer_capture(callback: Any):
    """While active (a ``with`` block), a Trainer created with ``callback`` among its callbacks is bound to it."""
    from irtuning_plugin.trainer_patches import capture_new_trainers

    def on_new(trainer: Any) -> None:
        if callback.trainer is None and callback in trainer.callback_handler.callbacks:
            callback.bind_trainer(trainer)

    return capture_new_trainers(on_new)


def train(cfg: Mapping[str, Any], *, watchers: Callable[[Any], Iterable[Any]] | None = None) -> Any:
    """Check, resolve and train; returns our callback (its ``rows`` and ``engine`` tell what happened).

    ``watchers(our_callback)`` may return more Trainer callbacks (tools and tests that observe the run).
    """
    config = check_recipe(cfg, meta_model=False)
    resolved = resolve_recipe(cfg)
    check_recipe(resolved)  # now with the model's real layer count
    stub_missing_torchaudio()
    from llamafactory.train.tuner import run_exp

    callback = _callback_class()(config)
    with trainer_capture(callback):
        run_exp(llamafactory_args(resolved), callbacks=[callback, *(watchers(callback) if watchers else ())])
    if callback.engine is None or not callback.engine.started:
        raise RuntimeError("irtuning: LLaMA-Factory finished without starting the layer selection")
    return callback
