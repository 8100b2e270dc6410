"""Framework-neutral configuration of the selection engine.

Axolotl's args model, the LLaMA-Factory launcher and plain-Trainer users all end up here: a flat
mapping of ``irtuning_*`` keys becomes a :class:`SelectionConfig`, checked once, with errors that name
the offending key and its allowed values.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from irtuning_plugin.keys import KeyType, StrategyConfigError, key_types, make_options, option_fields
from irtuning_plugin.layer_map import SCOPES
from irtuning_plugin.strategies import SelectionStrategy, get_strategy_class, registered_strategies

PREFIX = "irtuning_"
SCORE_GRADIENTS = ("unclipped", "clipped")
KERNEL_BACKENDS = ("auto", "torch", "triton", "reference")
FROZEN_OPTIMIZER_STATES = ("keep", "cpu", "drop")
SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes 64 bits; the engine derives seed + 1 for ist's data order
FLOOR_FROM_SALF = "salf"  # irtuning_depth_floor: salf = the floor from the salf calibration


def _opt(default: Any, help: str, **kw) -> Any:  # noqa: A002
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class SelectionConfig:
    strategy: str = _opt("ir", "layer-selection strategy", choices_from_registry=True)
    scope: str = _opt("adapter", "what a selected layer trains: 'adapter' = its LoRA/DoRA tensors; "
                      "'full' = all of its parameters (full fine-tuning)", choices=SCOPES)
    layers_path: str | None = _opt(None, "dotted path of the decoder block list (e.g. model.layers); "
                                   "default: found automatically")
    seed: int | None = _opt(None, "seed of the selection's random draws (default: the training seed); "
                            "the same on every rank", minimum=0, maximum=SEED_MAX)
    score_gradients: str = _opt("unclipped", "score gradients before ('unclipped', as the reference) or after "
                                "('clipped') the Trainer's max_grad_norm clipping", choices=SCORE_GRADIENTS)
    kernel_backend: str = _opt("auto", "implementation of the per-layer gradient norms: auto (Triton on CUDA, "
                               "torch elsewhere), torch, triton, reference (fp64)", choices=KERNEL_BACKENDS)
    kernel_self_check: bool = _opt(True, "the first Triton launch for each new gradient structure (shapes, dtypes, "
                                   "layers) also runs the torch path and compares every tensor's and layer's norm "
                                   "(relative tolerance 1.2e-4); on a mismatch or an error: one ERROR line, the "
                                   "torch path for the rest of the run, kernel_fallback in irtuning_run.json. Off "
                                   "only for benchmarks")
    log_scores: bool = _opt(False, "also log every layer's score through the Trainer's logging (tensorboard, wandb)")
    selection_log: bool = _opt(True, "write irtuning_selection.jsonl (step, active layers, scores) in output_dir")
    heatmap: bool = _opt(True, "write irtuning_selection.png (active layers x steps, with scores) at train end")
    cut_backward: bool = _opt(True, "remove the embedding-output requires-grad hook (enable_input_require_grads) "
                              "so backprop stops at the lowest trained layer; kept with reentrant checkpointing")
    frozen_optimizer_state: str = _opt("keep", "optimizer state (Adam moments) of a frozen layer: 'keep' where it is "
                                       "(as the references), 'cpu' = moved to CPU memory while the layer is frozen "
                                       "and back when it is selected again, 'drop' = deleted (AdamW starts it afresh "
                                       "when the layer returns)", choices=FROZEN_OPTIMIZER_STATES)
    depth_floor: int | Literal["salf"] | None = _opt(
        None, "layers 0..floor-1 stay frozen for the whole run, so backward never reaches them; the strategy "
        "selects among the layers above (ir's window and split, lisa/random draws and ist's fractions apply to "
        "those). A number of layers (0 = none), or 'salf' = the cut of the salf calibration (cut + 1). For all, "
        "ir, ist, lisa, random")
    label_logits_only: bool = _opt(
        False, "project onto the vocabulary only the positions that predict a label token (transformers' "
        "logits_to_keep + shift_labels), in training forwards: the same loss and gradients, without the LM "
        "head's work on masked prompt tokens (with train_on_inputs: false, 0.81x the counted FLOPs of a SmolLM2 "
        "LoRA step). Causal LMs only; evaluation forwards are left alone")
    resume_allow_changed_config: bool = _opt(
        False, "on a resume, go on although the checkpoint's selection was made with other settings (the changed "
        "keys are warned about, written into the selection log's next row and into irtuning_run.json); by default "
        "such a resume is refused before training. A changed strategy or layer count is refused still; with changed "
        "strategy options or depth floor the strategy's own state restarts and the next step's layers are chosen "
        "again, so no layer below the floor trains")
    strategy_options: dict[str, Any] = field(default_factory=dict)

    def check(self) -> "SelectionConfig":
        """Refuse a bad value (one line naming the key and what it allows) and return ``self``.

        The work is done once for the values the config holds: the callback, the engine and the
        fingerprint all call this, and a later call with unchanged values only compares them with the
        checked ones. A config changed after its check (any key, or inside ``strategy_options``) is
        checked again."""
        values = _checked_values(self)
        checked = self.__dict__.get("_checked")
        if checked is not None and checked[0] == values:
            return self
        self.__dict__.pop("_checked", None)
        cls = get_strategy_class(self.strategy)
        for name, kind in key_types(SelectionConfig).items():
            if name != "strategy":  # checked above, with the list of strategies
                kind.check(PREFIX + name, getattr(self, name))
        if not isinstance(self.strategy_options, dict):
            raise StrategyConfigError(f"strategy_options={self.strategy_options!r}; must be a dict of option values")
        check_floor_value(self.depth_floor, cls)
        if self.kernel_backend == "triton":
            _check_triton_usable()
        options = make_options(cls, self.strategy_options, f"{PREFIX}{self.strategy}_")
        # not a dataclass field: it stays out of fields(), asdict(), ==, repr and the fingerprint
        self.__dict__["_checked"] = (values, options)
        return self

    def build_options(self) -> Any:
        """The chosen strategy's options (a new copy each call), from the check of the current values."""
        self.check()
        return copy.deepcopy(self.__dict__["_checked"][1])


def _typed(value: Any) -> Any:
    """``value`` with the type of every part kept, so that ``1``, ``1.0`` and ``True`` compare unequal."""
    if isinstance(value, dict):
        return (type(value), tuple((_typed(k), _typed(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value), tuple(_typed(v) for v in value))
    return (type(value), value)


def _checked_values(config: SelectionConfig) -> tuple:
    """What :meth:`SelectionConfig.check` validates, as a comparable snapshot (a copy: later changes to
    the config's lists and dicts do not reach it)."""
    return tuple(_typed(getattr(config, f.name)) for f in dataclasses.fields(config))


def check_floor_value(value: Any, strategy: type[SelectionStrategy]) -> None:
    """irtuning_depth_floor at config time (the layer count is not known yet): a layer count or 'salf',
    and only with a strategy that accepts a floor (:attr:`SelectionStrategy.accepts_depth_floor`)."""
    key = PREFIX + "depth_floor"
    if value is None:
        return
    if value != FLOOR_FROM_SALF and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise StrategyConfigError(f"{key}={value!r}; allowed: a whole number of layers >= 0, or 'salf'")
    if not strategy.accepts_depth_floor and value not in (0, None):
        raise StrategyConfigError(f"{key}={value!r} cannot be combined with irtuning_strategy={strategy.name!r}, "
                                  f"which chooses its layers itself: remove {key} (salf's cut is a floor already)")


def _check_triton_usable() -> None:
    """irtuning_kernel_backend: triton needs triton and a CUDA GPU (or Triton's CPU interpreter, for tests):
    refused here rather than at the first optimizer step."""
    import importlib.util

    import torch

    key = f"{PREFIX}kernel_backend='triton'"
    if importlib.util.find_spec("triton") is None:
        raise StrategyConfigError(f"{key} but triton is not installed: pip install triton, or use "
                                  f"{PREFIX}kernel_backend: auto")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise StrategyConfigError(f"{key} needs a CUDA GPU and none is visible here: use {PREFIX}kernel_backend: "
                                  f"auto (Triton on CUDA, torch elsewhere) or torch")


# Engine keys left out of the resume fingerprint: none of them changes which layers are chosen.
NOT_IN_FINGERPRINT = {
    "kernel_backend": "the same per-layer norms computed another way (float rounding only); a resume may move "
                      "to other hardware",
    "kernel_self_check": "compares the kernel's norms with torch's once; a fallback gives the same norms",
    "log_scores": "logging only",
    "selection_log": "writes a file only",
    "heatmap": "writes a file only",
    "cut_backward": "where backprop stops; the trained layers' gradients are the same",
    "label_logits_only": "the same loss and gradients with less LM-head work",
    "resume_allow_changed_config": "governs the comparison itself",
}


def _plain(value: Any) -> Any:
    """A value as torch.load(weights_only=True) and JSON take it (tuples become lists)."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def selection_fingerprint(config: SelectionConfig, *, seed: int, layers_path: str) -> dict[str, Any]:
    """Every key that shapes which layers are chosen, as flat ``irtuning_*`` keys with defaults resolved:
    the engine's keys (all but :data:`NOT_IN_FINGERPRINT`), the seed the engine uses (the training seed
    when irtuning_seed is unset), the decoder-layer path found, and every option of the chosen strategy.
    Stored with the selection state; a resume compares it with its own (a key added later is included
    unless listed above)."""
    out: dict[str, Any] = {}
    for f in engine_keys():
        if f.name not in NOT_IN_FINGERPRINT:
            out[PREFIX + f.name] = _plain(getattr(config, f.name))
    out[PREFIX + "seed"] = int(seed)
    out[PREFIX + "layers_path"] = layers_path
    if out.get(PREFIX + "depth_floor") is None:
        out[PREFIX + "depth_floor"] = 0  # unset and 0 both mean no floor
    options = config.build_options()
    for f in dataclasses.fields(options):
        out[f"{PREFIX}{config.strategy}_{f.name}"] = _plain(getattr(options, f.name))
    return out


def engine_keys() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(SelectionConfig) if f.name != "strategy_options"]


def all_flat_keys() -> dict[str, tuple[str | None, dataclasses.Field]]:
    """Every accepted flat key -> (strategy it belongs to or None, dataclass field)."""
    keys: dict[str, tuple[str | None, dataclasses.Field]] = {}
    for f in engine_keys():
        keys[PREFIX + f.name] = (None, f)
    for name, cls in registered_strategies().items():
        for f in option_fields(cls):
            keys[f"{PREFIX}{name}_{f.name}"] = (name, f)
    return keys


def flat_key_types() -> dict[str, KeyType]:
    """Every accepted flat key -> the values it takes (what the args models and the type tests use)."""
    types_: dict[str, KeyType] = {}
    for key, (owner, f) in all_flat_keys().items():
        if key == PREFIX + "strategy":
            types_[key] = KeyType(choices=tuple(registered_strategies()))
        else:
            types_[key] = key_types(SelectionConfig if owner is None else get_strategy_class(owner).Options)[f.name]
    return types_


def config_from_flat(values: Mapping[str, Any]) -> SelectionConfig:
    """Build a checked config from flat ``irtuning_*`` keys (None = unset).

    Unknown ``irtuning_*`` keys and options of a strategy other than the chosen one are errors, so no
    setting is silently ignored.
    """
    known = all_flat_keys()
    given = {k: v for k, v in values.items() if k.startswith(PREFIX) and v is not None}
    for key in given:
        if key not in known:
            raise StrategyConfigError(f"{key} is not an irtuning key; see the key table in docs/keys.md")
    strategy = given.get(PREFIX + "strategy", "ir")
    get_strategy_class(strategy)  # unknown strategy: error listing the valid ones
    engine_kwargs: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for key, value in given.items():
        owner, f = known[key]
        if owner is None:
            engine_kwargs[f.name] = value
        elif owner != strategy:
            raise StrategyConfigError(
                f"{key} is an option of strategy {owner!r}, but irtuning_strategy is {strategy!r}: remove it "
                f"or set irtuning_strategy: {owner}"
            )
        else:
            options[f.name] = value
    return SelectionConfig(**engine_kwargs, strategy_options=options).check()


key_types(SelectionConfig)  # an engine key of an unsupported type fails at import, not in a user's run
