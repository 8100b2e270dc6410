"""Axolotl input args of the irtuning plugin: one flat pydantic model, every key prefixed ``irtuning_``.

The fields are generated from the engine's :class:`SelectionConfig` and from each registered
strategy's options, so a new strategy module brings its keys with it; each field carries the key's
type (strict: no '2' -> 2). All checking happens in one ``mode="before"`` validator that sees the
whole Axolotl config and fails with a one-line message naming the key, before any model is loaded;
that validator runs before pydantic's field checks, so the user reads our message, not pydantic's.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from irtuning_plugin.config import PREFIX, all_flat_keys, check_training_setup, config_from_flat, flat_key_types
from irtuning_plugin.layer_map import SCOPES
from irtuning_plugin.strategies import StrategyConfigError, get_strategy_class

LOG = logging.getLogger(__name__)

PLUGIN_NAME = "IRTuningPlugin"
LISA_KEYS = ("lisa_n_layers", "lisa_step_interval", "lisa_layers_attribute")
# strategies whose choice uses per-parameter gradients (ZeRO/FSDP shard or hide them)
_NO_PEFT_LAYER_FILTER = ("peft_layers_to_transform", "layers_to_transform")


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


def _meta_model(data: dict):
    """A meta-device copy of the base model (no weights are read), or None when its config is unreachable."""
    base = data.get("base_model_config") or data.get("base_model")
    if not base:
        return None
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        hf_config = AutoConfig.from_pretrained(base, trust_remote_code=bool(data.get("trust_remote_code")))
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config)
    except Exception as err:  # noqa: BLE001 - unreachable config: checked again once the model is loaded
        LOG.info("irtuning: layers and strategy options checked after model load (%s)", err)
        return None


def _check_on_meta_model(data: dict, config) -> None:
    """Resolve the decoder layers (and irtuning_layers_path) on a meta-device copy of the model and check
    the strategy's options against the real layer count (e.g. irtuning_lisa_n_layers <= L)."""
    model = _meta_model(data)
    if model is None:
        return
    from irtuning_plugin.layer_map import find_decoder_layers

    _, layers = find_decoder_layers(model, config.layers_path)
    prefix = f"{PREFIX}{config.strategy}_"
    if isinstance(config.depth_floor, int) and not isinstance(config.depth_floor, bool) and config.depth_floor > 0:
        from irtuning_plugin.depth_floor import check_floor_depth, check_options_above_floor

        # the strategy works over the layers above the floor, so its options are checked against those
        floor = check_floor_depth(config.depth_floor, len(layers))
        check_options_above_floor(config.build_options(), prefix, len(layers), floor)
    else:
        config.build_options().check(prefix, len(layers))


def validate_axolotl_config(data: dict) -> dict:
    if not isinstance(data, dict) or not plugin_active(data):
        stray = sorted(k for k in (data or {}) if str(k).startswith("irtuning_") and data[k] is not None)
        if stray:
            raise StrategyConfigError(f"{stray[0]} is set but the irtuning plugin is off: add "
                                      f"irtuning_plugin.IRTuningPlugin to plugins and set irtuning_strategy")
        return data
    config = config_from_flat(data)
    for key in LISA_KEYS:
        if data.get(key) is not None:
            raise StrategyConfigError(f"{key} (Axolotl's built-in LISA) cannot be combined with the irtuning "
                                      f"plugin: remove {key}, or use irtuning_strategy: lisa")
    scopes = getattr(get_strategy_class(config.strategy), "scopes", SCOPES)
    if config.scope not in scopes:
        raise StrategyConfigError(f"irtuning_strategy={config.strategy!r} works only with irtuning_scope: "
                                  f"{' or '.join(scopes)}, not irtuning_scope={config.scope!r}")
    if config.scope == "adapter" and not data.get("adapter"):
        raise StrategyConfigError("irtuning_scope='adapter' (the default) selects adapter layers but no `adapter` "
                                  "is set: set adapter: lora (or qlora), or irtuning_scope: full for full "
                                  "fine-tuning")
    if config.scope == "full" and data.get("adapter"):
        raise StrategyConfigError(f"irtuning_scope='full' selects whole layers but adapter={data.get('adapter')!r} "
                                  "is set: use irtuning_scope: adapter, or remove adapter")
    if config.strategy != "all":
        for key in _NO_PEFT_LAYER_FILTER:
            if data.get(key) is not None:
                raise StrategyConfigError(f"{key} restricts LoRA to fixed layers, which conflicts with "
                                          f"irtuning_strategy={config.strategy!r}: remove {key}")
    # torch_compile: auto becomes true on torch >= 2.5.1 (Axolotl resolves it after this validator)
    check_training_setup(config, torch_compile=data.get("torch_compile"), deepspeed=data.get("deepspeed"),
                         fsdp=data.get("fsdp"), fsdp_config=data.get("fsdp_config"),
                         fsdp_version=data.get("fsdp_version"))
    _refuse_fsdp2(data)
    _ddp_unused_parameters(data, config)
    _check_on_meta_model(data, config)
    return data


AXOLOTL_FSDP2_REASON = (
    "Axolotl 0.19 builds its FSDP device mesh for CUDA only (axolotl/utils/distributed.py, "
    "build_parallelism_config: build_device_mesh('cuda')), so `axolotl train` with fsdp_version: 2 cannot run "
    "on the CPU machines irtuning is tested on (first error: AttributeError: module 'torch._C' has no attribute "
    "'_cuda_setDevice'), and irtuning's FSDP2 support is proven only with a plain Trainer")


def _refuse_fsdp2(data: dict) -> None:
    """FSDP2 passes the framework-neutral check, but not through Axolotl: not proven there (see the reason)."""
    if data.get("fsdp") or data.get("fsdp_config"):
        raise StrategyConfigError(
            f"fsdp is set: irtuning does not support FSDP2 under Axolotl yet: {AXOLOTL_FSDP2_REASON}; use "
            f"yaml_recipes/fsdp2/ (a plain Trainer under accelerate launch), or remove fsdp/fsdp_config (DDP is "
            f"supported)")


def _ddp_unused_parameters(data: dict, config) -> None:
    """Frozen layers get no gradient; DDP stops on that unless it looks for unused parameters, and Axolotl
    builds DDP with ddp_find_unused_parameters=False when the key is unset. So: unset -> true (only read
    under DDP), explicitly false -> refused."""
    if config.strategy == "all":
        return
    value = data.get("ddp_find_unused_parameters")
    if value is None:
        data["ddp_find_unused_parameters"] = True
    elif value is False:
        raise StrategyConfigError(f"ddp_find_unused_parameters: false cannot work with irtuning_strategy={config.strategy!r}: "
                                  f"frozen layers get no gradient, which DDP then refuses; set it to true or "
                                  f"remove it")


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
