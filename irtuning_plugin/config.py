"""Framework-neutral configuration of the selection engine.

Axolotl's args model, the LLaMA-Factory launcher and plain-Trainer users all end up here: a flat
mapping of ``irtuning_*`` keys becomes a :class:`SelectionConfig`, checked once, with errors that name
the offending key and its allowed values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from irtuning_plugin.depth_floor import check_floor_value
from irtuning_plugin.layer_map import SCOPES
from irtuning_plugin.strategies import get_strategy_class, registered_strategies
from irtuning_plugin.strategies.base import StrategyConfigError, make_options, option_fields

PREFIX = "irtuning_"
SCORE_GRADIENTS = ("unclipped", "clipped")
KERNEL_BACKENDS = ("auto", "torch", "triton", "reference")
FROZEN_OPTIMIZER_STATES = ("keep", "cpu", "drop")


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
                            "the same on every rank")
    score_gradients: str = _opt("unclipped", "score gradients before ('unclipped', as the reference) or after "
                                "('clipped') the Trainer's max_grad_norm clipping", choices=SCORE_GRADIENTS)
    kernel_backend: str = _opt("auto", "implementation of the per-layer gradient norms: auto (Triton on CUDA, "
                               "torch elsewhere), torch, triton, reference (fp64)", choices=KERNEL_BACKENDS)
    log_scores: bool = _opt(False, "also log every layer's score through the Trainer's logging (tensorboard, wandb)")
    selection_log: bool = _opt(True, "write irtuning_selection.jsonl (step, active layers, scores) in output_dir")
    heatmap: bool = _opt(True, "write irtuning_selection.png (active layers x steps, with scores) at train end")
    cut_backward: bool = _opt(True, "remove the embedding-output requires-grad hook (enable_input_require_grads) "
                              "so backprop stops at the lowest trained layer; kept with reentrant checkpointing")
    frozen_optimizer_state: str = _opt("keep", "optimizer state (Adam moments) of a frozen layer: 'keep' where it is "
                                       "(as the references), 'cpu' = moved to CPU memory while the layer is frozen "
                                       "and back when it is selected again, 'drop' = deleted (AdamW starts it afresh "
                                       "when the layer returns)", choices=FROZEN_OPTIMIZER_STATES)
    depth_floor: int | str | None = _opt(None, "layers 0..floor-1 stay frozen for the whole run, so backward never "
                                         "reaches them; the strategy selects among the layers above (ir's window "
                                         "and split, lisa/random draws and ist's fractions apply to those). A "
                                         "number of layers (0 = none), or 'salf' = the cut of the salf calibration "
                                         "(cut + 1). For all, ir, ist, lisa, random")
    strategy_options: dict[str, Any] = field(default_factory=dict)

    def check(self) -> "SelectionConfig":
        cls = get_strategy_class(self.strategy)
        for name, allowed in (("scope", SCOPES), ("score_gradients", SCORE_GRADIENTS),
                              ("kernel_backend", KERNEL_BACKENDS),
                              ("frozen_optimizer_state", FROZEN_OPTIMIZER_STATES)):
            value = getattr(self, name)
            if value not in allowed:
                raise StrategyConfigError(f"{PREFIX}{name}={value!r}; allowed: {', '.join(allowed)}")
        if self.layers_path is not None and (not isinstance(self.layers_path, str) or not self.layers_path.strip()):
            raise StrategyConfigError(f"{PREFIX}layers_path={self.layers_path!r}; must be a dotted path like model.layers")
        check_floor_value(self.depth_floor, self.strategy)
        make_options(cls, self.strategy_options, f"{PREFIX}{self.strategy}_")
        return self

    def build_options(self) -> Any:
        cls = get_strategy_class(self.strategy)
        return make_options(cls, self.strategy_options, f"{PREFIX}{self.strategy}_")


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


def config_from_flat(values: Mapping[str, Any]) -> SelectionConfig:
    """Build a checked config from flat ``irtuning_*`` keys (None = unset).

    Unknown ``irtuning_*`` keys and options of a strategy other than the chosen one are errors, so no
    setting is silently ignored.
    """
    known = all_flat_keys()
    given = {k: v for k, v in values.items() if k.startswith(PREFIX) and v is not None}
    for key in given:
        if key not in known:
            raise StrategyConfigError(f"{key} is not an irtuning key; see the README's key table")
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
