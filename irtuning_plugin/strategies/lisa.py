"""``lisa``: Layerwise Importance Sampled AdamW (Pan et al., NeurIPS 2024).

Every ``interval`` optimizer steps, ``n_layers`` decoder layers drawn uniformly at random (from the
engine's seeded generator, the same on every rank) train and all others freeze. Parameters outside the
decoder layers (embeddings, final norm, LM head) keep training, as in the paper, unless
``train_outside`` is off. Works over adapters (``irtuning_scope: adapter``) and full fine-tuning
(``irtuning_scope: full``, the paper's setting). Defaults follow LMFlow (K=20, n=2); see
docs/strategies.md. Unlike LMFlow/Axolotl, the optimizer is built once over every layer and the
draws never touch the global numpy RNG; ``irtuning_frozen_optimizer_state`` decides what happens to the
moments of re-frozen layers.

Draw schedule: ours draws at steps 0, K, 2K, ... (LMFlow's). Axolotl's built-in LISA also redraws at step
1 (so its first draw trains one step only) and unfreezes EVERY parameter of a drawn layer, LoRA or not
(with an adapter, base weights then get gradients that no optimizer holds); ours trains what
``irtuning_scope`` says: the layer's adapter tensors, or all its parameters with ``scope: full``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from irtuning_plugin.strategies.base import (
    SelectionContext,
    SelectionStrategy,
    StrategyConfigError,
    option,
    register_strategy,
    sample_without_replacement,
)

if TYPE_CHECKING:  # pragma: no cover
    from irtuning_plugin.strategies.runtime import StrategyRuntime

LOG = logging.getLogger(__name__)


def check_layer_count(prefix: str, key: str, value, num_layers: int | None) -> int:
    """``value`` (a whole number: its key's type) must be in 1..num_layers; the message names ``prefix + key``
    and the layer count."""
    if value < 1:
        raise StrategyConfigError(f"{prefix}{key}={value}; must be >= 1")
    if num_layers is not None and value > num_layers:
        raise StrategyConfigError(f"{prefix}{key}={value} exceeds the model's {num_layers} layers")
    return value


@dataclass
class LISAOptions:
    n_layers: int = option(2, "decoder layers trained at a time, drawn uniformly at random (LMFlow: 2)")
    interval: int = option(20, "draw new layers every this many optimizer steps (LMFlow: 20)")
    train_outside: bool = option(True, "parameters outside the decoder layers (embeddings, final norm, LM head) "
                                 "keep training, as in the paper; false freezes them at train start")

    def check(self, prefix: str, num_layers: int | None = None) -> None:
        check_layer_count(prefix, "n_layers", self.n_layers, num_layers)
        if self.interval < 1:
            raise StrategyConfigError(f"{prefix}interval={self.interval!r}; must be a whole number >= 1")


@register_strategy
class LISAStrategy(SelectionStrategy):
    name = "lisa"
    Options = LISAOptions
    summary = "LISA: n uniformly random layers, re-drawn every K steps; embeddings and head keep training"

    def setup(self, runtime: "StrategyRuntime") -> None:
        super().setup(runtime)
        if self.options.train_outside:
            return
        outside = set(runtime.outside_trainable)
        frozen = []
        for name, p in runtime.model.named_parameters():
            if name in outside and p.requires_grad:
                p.requires_grad_(False)
                p.grad = None
                frozen.append(name)
        LOG.info("irtuning lisa: froze %d parameter tensors outside the decoder layers (train_outside=false)",
                 len(frozen))

    def select(self, ctx: SelectionContext) -> list[int]:
        if ctx.step % int(self.options.interval) != 0:
            return list(ctx.active)
        return sample_without_replacement(ctx.num_layers, int(self.options.n_layers), ctx.generator)
