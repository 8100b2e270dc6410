"""``IRTuningPlugin``: wires the selection engine into Axolotl's hooks; the work happens elsewhere."""

from __future__ import annotations

import logging

from axolotl.integrations.base import BasePlugin

from irtuning_plugin.axolotl_integration.args import plugin_active
from irtuning_plugin.config import config_from_flat
from irtuning_plugin.references import resolve_axolotl_references

# Axolotl's console handler passes INFO records only from loggers named axolotl.*: the few lines a user
# must see (strategy, layer map, backprop cut) go through this one.
CONSOLE_LOG = logging.getLogger("axolotl.integrations.irtuning")


def _first_instance(plugin: "IRTuningPlugin") -> bool:
    """Axolotl >= 0.21 registers the entry-point instance, and again the one a recipe lists under another
    name (``irtuning_plugin.IRTuningPlugin``): only the first works, else the args model would be merged
    twice ("duplicate base class") and two callbacks would select layers."""
    try:
        from axolotl.integrations.base import PluginManager
    except ImportError:  # pragma: no cover
        return True
    manager = getattr(PluginManager, "_instance", None)
    plugins = getattr(manager, "plugins", {}) or {}
    first = next((p for p in list(plugins.values()) if isinstance(p, IRTuningPlugin)), plugin)
    return first is plugin


class IRTuningPlugin(BasePlugin):
    def get_input_args(self) -> str | None:
        if not _first_instance(self):
            return None
        return "irtuning_plugin.axolotl_integration.args.IRTuningArgs"

    def register(self, cfg):
        if plugin_active(cfg) and _first_instance(self):
            # irtuning:// names a built-in asset; the plugin never builds one (`irtuning prepare` does).
            resolve_axolotl_references(cfg)

    def on_config_validation_error(self, cfg):
        # Axolotl's config loader rejected the config and is handling the error: ours ends the run in one line
        from irtuning_plugin.axolotl_integration.errors import exit_on_our_config_error

        exit_on_our_config_error()

    def pre_lora_load(self, cfg, model):
        if plugin_active(cfg) and _first_instance(self):
            # Axolotl 0.19 does not seed before creating the adapter; seeding here makes two runs with
            # the same seed start from identical LoRA weights, so strategies compare on equal terms.
            from transformers import set_seed

            set_seed(int(cfg.seed) if cfg.seed is not None else 42)

    def post_model_load(self, cfg, model):
        if not plugin_active(cfg) or not _first_instance(self):
            return
        from irtuning_plugin.layer_map import build_layer_map

        config = config_from_flat(dict(cfg))
        # Fails here, before the trainer exists, on a layers path or scope that does not fit the model.
        CONSOLE_LOG.info("irtuning: %s", build_layer_map(model, config.scope, config.layers_path).describe())

    def add_callbacks_post_trainer(self, cfg, trainer):
        if not plugin_active(cfg) or not _first_instance(self):
            return []
        from irtuning_plugin.callback import LayerSelectionCallback

        config = config_from_flat(dict(cfg))
        CONSOLE_LOG.info("irtuning: strategy %s enabled", config.strategy)
        return [LayerSelectionCallback(config, trainer=trainer, console_log=CONSOLE_LOG)]
