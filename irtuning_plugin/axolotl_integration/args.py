"""Axolotl input args of the irtuning plugin: one flat pydantic model, every key prefixed ``irtuning_``.

The fields are generated from the engine's :class:`SelectionConfig` and from each registered
strategy's options, so a new strategy module brings its keys with it; each field carries the key's
type (strict: no '2' -> 2). All checking happens in one ``mode="before"`` validator that sees the
whole Axolotl config and fails with a one-line message naming the key, before any model is loaded;
that validator runs before pydantic's field checks, so the user reads our message, not pydantic's.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from irtuning_plugin import preflight
from irtuning_plugin.config import PREFIX, all_flat_keys, config_from_flat, flat_key_types
from irtuning_plugin.strategies import StrategyConfigError, get_strategy_class

PLUGIN_NAME = "IRTuningPlugin"


def plugin_listed(data: dict) -> bool:
    return any(PLUGIN_NAME in str(p) for p in (data.get("plugins") or []))


def plugin_active(data: dict) -> bool:
    """Listed in ``plugins:`` (Axolotl 0.19+) or switched on by ``irtuning_strategy`` (entry-point loading
    of Axolotl >= 0.21 registers the plugin on every run)."""
    return plugin_listed(data) or data.get("irtuning_strategy") is not None


def unlisted_plugin_message(data: dict) -> str | None:
    """The silent failure of Axolotl 0.19: irtuning_* keys in a recipe whose ``plugins:`` lacks the plugin.
    0.19 never imports it, drops the unknown keys and trains plain LoRA (``irtuning check`` reports it)."""
    keys = sorted((k for k in data if str(k).startswith(PREFIX) and data[k] is not None),
                  key=lambda k: (k != PREFIX + "strategy", k))
    if not keys or plugin_listed(data):
        return None
    return (f"{keys[0]} is set but irtuning_plugin.IRTuningPlugin is not under plugins: Axolotl 0.19 never loads "
            f"the plugin, drops every irtuning_* key and trains plain LoRA; add plugins: "
            f"[irtuning_plugin.IRTuningPlugin]")


def axolotl_setup(data: dict, config) -> preflight.TrainingSetup:
    """The run as the preflight rules see it, from Axolotl's keys."""
    # torch_compile: auto becomes true on torch >= 2.5.1 (Axolotl resolves it after this validator)
    return preflight.TrainingSetup(
        preflight.AXOLOTL, config.strategy, config.scope, adapter=data.get("adapter"),
        torch_compile=data.get("torch_compile"), deepspeed=data.get("deepspeed"), fsdp=data.get("fsdp"),
        fsdp_config=data.get("fsdp_config"), fsdp_version=data.get("fsdp_version"),
        ddp_find_unused_parameters=data.get("ddp_find_unused_parameters"), keys=data)


def validate_axolotl_config(data: dict) -> dict:
    if not isinstance(data, dict) or not plugin_active(data):
        stray = sorted(k for k in (data or {}) if str(k).startswith("irtuning_") and data[k] is not None)
        if stray:
            raise StrategyConfigError(f"{stray[0]} is set but the irtuning plugin is off: add "
                                      f"irtuning_plugin.IRTuningPlugin to plugins and set irtuning_strategy")
        return data
    config = config_from_flat(data)
    preflight.check(axolotl_setup(data, config))
    if get_strategy_class(config.strategy).freezes_layers and data.get("ddp_find_unused_parameters") is None:
        # Frozen layers get no gradient; Axolotl builds DDP with find_unused_parameters=False when the key is
        # unset (false is refused above), so irtuning sets it (read only under DDP).
        data["ddp_find_unused_parameters"] = True
    preflight.check_options_on_model(
        preflight.meta_model(data.get("base_model_config") or data.get("base_model"), data.get("trust_remote_code")),
        config)
    return data


def _build_args_model() -> type[BaseModel]:
    fields: dict[str, Any] = {}
    types_ = flat_key_types()
    for key, (owner, f) in all_flat_keys().items():
        text = f.metadata.get("help", "")
        if owner:
            text = f"[strategy {owner}] {text}"
        fields[key] = (types_[key].pydantic_annotation(),
                       Field(default=None, description=f"{text} (default: {f.default!r})"))

    class _Base(BaseModel):
        model_config = ConfigDict(protected_namespaces=())

        @model_validator(mode="before")
        @classmethod
        def check_irtuning(cls, data):
            return validate_axolotl_config(data)

    return create_model("IRTuningArgs", __base__=_Base, __module__=__name__, **fields)


IRTuningArgs = _build_args_model()
