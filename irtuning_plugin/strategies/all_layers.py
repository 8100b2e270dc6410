"""``all``: plain LoRA (or full fine-tuning) on every layer, the baseline of every comparison."""

from __future__ import annotations

from irtuning_plugin.strategies.base import SelectionContext, SelectionStrategy, register_strategy


@register_strategy
class AllLayersStrategy(SelectionStrategy):
    name = "all"
    summary = "every layer trains every step (plain LoRA / full fine-tuning)"
    fixed_after_first_step = True
    freezes_layers = False

    def select(self, ctx: SelectionContext) -> list[int]:
        return list(range(ctx.num_layers))
