"""Axolotl integration: ``plugins: [irtuning_plugin.IRTuningPlugin]``."""
