"""Layer-selection strategies, registered by name (one module each)."""

from irtuning_plugin.strategies import all_layers, ir  # noqa: F401  (registration on import)
from irtuning_plugin.strategies.base import (
    SENTINEL_SCORE,
    SelectionContext,
    SelectionStrategy,
    StrategyConfigError,
    get_strategy_class,
    register_strategy,
    registered_strategies,
)

__all__ = [
    "SENTINEL_SCORE",
    "SelectionContext",
    "SelectionStrategy",
    "StrategyConfigError",
    "get_strategy_class",
    "register_strategy",
    "registered_strategies",
]
