"""``random``: RST, a fixed number of uniformly random layers re-drawn every optimizer step.

The IR-Tuning repository's random baseline trains 4 of 32 layers; draws come from the engine's seeded
generator (the same on every rank). See docs/strategies.md.

Differences from the reference's RST (``rst.py``), deliberate: ours draws ``n_layers`` from all L layers of
the model; the reference draws ``torch.randperm(32)[:4]`` whatever the layer count (on a model with fewer
than 32 layers some draws name layers that do not exist, on one with more the top layers never train),
from the global torch RNG, and it still runs IST's importance update (3 damped forward passes every 10
steps) whose scores it never uses. Ours pays for no forward pass beyond training.
"""

from __future__ import annotations

from dataclasses import dataclass

from irtuning_plugin.strategies.base import (
    SelectionContext,
    SelectionStrategy,
    option,
    register_strategy,
    sample_without_replacement,
)
from irtuning_plugin.strategies.lisa import check_layer_count


@dataclass
class RandomOptions:
    n_layers: int = option(4, "layers trained per step, drawn uniformly at random every step (the IR-Tuning "
                           "repo's RST baseline: 4 of 32)")

    def check(self, prefix: str, num_layers: int | None = None) -> None:
        check_layer_count(prefix, "n_layers", self.n_layers, num_layers)


@register_strategy
class RandomLayersStrategy(SelectionStrategy):
    name = "random"
    Options = RandomOptions
    summary = "RST: n uniformly random layers, re-drawn every step"

    def select(self, ctx: SelectionContext) -> list[int]:
        return sample_without_replacement(ctx.num_layers, int(self.options.n_layers), ctx.generator)
