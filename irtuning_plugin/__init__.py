"""irtuning: layer-selection fine-tuning (IR-Tuning and baselines) for transformers, Axolotl and
LLaMA-Factory. The engine never imports Axolotl; ``IRTuningPlugin`` is loaded lazily for Axolotl's
``plugins: [irtuning_plugin.IRTuningPlugin]``."""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "IRTuningPlugin": ("irtuning_plugin.axolotl_integration.plugin", "IRTuningPlugin"),
    "LayerSelectionCallback": ("irtuning_plugin.callback", "LayerSelectionCallback"),
    "attach_layer_selection": ("irtuning_plugin.callback", "attach_layer_selection"),
    "LayerSelectionEngine": ("irtuning_plugin.engine", "LayerSelectionEngine"),
    "SelectionConfig": ("irtuning_plugin.config", "SelectionConfig"),
    "config_from_flat": ("irtuning_plugin.config", "config_from_flat"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'irtuning_plugin' has no attribute {name!r}")
