"""``IRTuningPlugin``: wires the selection engine into Axolotl's hooks; the work happens elsewhere."""

from __future__ import annotations

import logging

from axolotl.integrations.base import BasePlugin

from irtuning_plugin.axolotl_integration.args import plugin_active
from irtuning_plugin.config import config_from_flat

# Axolotl's console handler passes INFO records only from loggers named axolotl.*: the few lines a user
# must see (strategy, layer map, backprop cut) go through this one.
CONSOLE_LOG = logging.getLogger("axolotl.integrations.irtuning")


class IRTuningPlugin(BasePlugin):
    def get_input_args(self) -> str:
        return "irtuning_plugin.axolotl_integration.args.IRTuningArgs"

    def register(self, cfg):
        from irtuning_plugin.assets.references import resolve_asset_references
        from irtuning_plugin.axolotl_integration.errors import install_concise_config_errors

        install_concise_config_errors()
        if plugin_active(cfg):
            resolve_asset_references(cfg)

    def pre_lora_load(self, cfg, model):
        if plugin_active(cfg):
            # Axolotl 0.19 does not seed before creating the adapter; seeding here makes two runs with
            # the same seed start from identical LoRA weights, so strategies compare on equal terms.
            from transformers import set_seed

            set_seed(int(cfg.seed) if cfg.seed is not None else 42)

    def post_model_load(self, cfg, model):
        if not plugin_active(cfg):
            return
        from irtuning_plugin.layer_map import build_layer_map

        config = config_from_flat(dict(cfg))
        # Fails here, before the trainer exists, on a layers path or scope that does not fit the model.
        CONSOLE_LOG.info("irtuning: %s", build_layer_map(model, config.scope, config.layers_path).describe())

    def add_callbacks_post_trainer(self, cfg, trainer):
        if not plugin_active(cfg):
            return []
        from irtuning_plugin.callback import LayerSelectionCallback

        config = config_from_flat(dict(cfg))
        CONSOLE_LOG.info("irtuning: strategy %s enabled", config.strategy)
        return [LayerSelectionCallback(config, trainer=trainer, console_log=CONSOLE_LOG)]
