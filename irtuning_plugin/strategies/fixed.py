"""``fixed``: the same layers every step, what peft's ``layers_to_transform`` does, for comparison."""

from __future__ import annotations

from dataclasses import dataclass

from irtuning_plugin.strategies.base import (
    SelectionContext,
    SelectionStrategy,
    StrategyConfigError,
    option,
    register_strategy,
)


@dataclass
class FixedOptions:
    layers: list[int] | None = option(None, "the layers that train (0-based indices, e.g. [28, 29, 30, 31]); "
                                      "required")

    def check(self, prefix: str, num_layers: int | None = None) -> None:
        key = f"{prefix}layers"
        if self.layers is None:
            raise StrategyConfigError(f"{key} is required with irtuning_strategy: fixed (a list of layer indices)")
        if not self.layers:
            raise StrategyConfigError(f"{key}={self.layers!r}; must be a non-empty list of layer indices")
        for i in self.layers:
            if i < 0 or (num_layers is not None and i >= num_layers):
                top = f"0..{num_layers - 1}" if num_layers is not None else ">= 0"
                raise StrategyConfigError(f"{key}={list(self.layers)!r}: layer {i} is outside {top}"
                                          + (f" (the model has {num_layers} layers)" if num_layers else ""))
        if len(set(self.layers)) != len(self.layers):
            raise StrategyConfigError(f"{key}={list(self.layers)!r} lists a layer twice")


@register_strategy
class FixedLayersStrategy(SelectionStrategy):
    name = "fixed"
    Options = FixedOptions
    summary = "a fixed list of layers trains every step (as peft's layers_to_transform)"
    fixed_after_first_step = True
    accepts_depth_floor = False  # its list is the whole choice

    def select(self, ctx: SelectionContext) -> list[int]:
        return sorted(int(i) for i in self.options.layers)
