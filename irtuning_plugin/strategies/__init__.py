"""Layer-selection strategies, registered by name: one module each in this package.

Every module here is imported on first use of the package, so a new strategy is one new file with a
``@register_strategy`` class; nothing else needs editing (the Axolotl keys and the key table in
docs/keys.md are generated from the registry).
"""

import importlib
import pkgutil

from irtuning_plugin.strategies.base import (
    SENTINEL_SCORE,
    SelectionContext,
    SelectionStrategy,
    StrategyConfigError,
    get_strategy_class,
    register_strategy,
    registered_strategies,
)

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name != "base" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "SENTINEL_SCORE",
    "SelectionContext",
    "SelectionStrategy",
    "StrategyConfigError",
    "get_strategy_class",
    "register_strategy",
    "registered_strategies",
]
