"""What the planner reads: an Axolotl or LLaMA-Factory recipe, or flags alone, into one :class:`Request`.

Every key that changes a count is read; a key the planner cannot honour (quantized weights, DeepSpeed/FSDP,
an optimizer other than AdamW, ...) is refused with one line naming it. Models are read from a ``config.json``
only (never weights): a local folder or file, one of the architectures shipped with the planner, or a hub id
whose name is one of them. ``irtuning://`` models map to their shipped configs, so no asset is built.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from irtuning_plugin.config import PREFIX, SelectionConfig, config_from_flat
from irtuning_plugin.planner.selection import PlanInputError
from irtuning_plugin.strategies.base import StrategyConfigError

ARCH_DIR = Path(__file__).resolve().parent / "architectures"
ASSET_MODELS = {"irtuning://smollm2-135m-instruct": "smollm2-135m-instruct", "irtuning://tiny-llama": "tiny-llama"}
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAMW = ("adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw", None)
NEEDED = ("num_hidden_layers", "hidden_size", "vocab_size", "model_type", "num_attention_heads")


def shipped_architectures() -> list[str]:
    return sorted(p.stem for p in ARCH_DIR.glob("*.json"))


@dataclass
class Request:
    model_label: str
    config: dict
    scope: str = "adapter"  # adapter (LoRA) | full
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
    precision: str = "bf16"  # bf16 | fp16 | fp32 | mixed
    loss_chunks: int = 1
    adapter_dtype: str = "fp32"  # LoRA tensors: fp32 (PEFT's default upcast) or the weights' dtype
    attention: str = "sdpa"
    checkpointing: bool = False
    batch: int = 1
    seq: int = 2048
    selection: SelectionConfig | None = None  # None: no irtuning keys (plain LoRA / full fine-tuning)
    source: str = "flags"
    notes: list[str] = field(default_factory=list)


def read_config(model: str) -> tuple[str, dict]:
    """``(label, config dict)`` of a model given as a shipped name, a folder/config.json, an ``irtuning://``
    reference or a hub id named like a shipped architecture."""
    name = ASSET_MODELS.get(model, model)
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            raise PlanInputError(f"{path}: not a JSON config") from None
        label = path.parent.name if path.name == "config.json" else path.stem
    else:
        stem = name.rstrip("/").split("/")[-1].lower()
        arch = ARCH_DIR / f"{stem}.json"
        if not arch.is_file():
            raise PlanInputError(f"unknown model {model!r}: give a folder or config.json path, or one of the shipped "
                                 f"architectures: {', '.join(shipped_architectures())}")
        cfg = json.loads(arch.read_text(encoding="utf-8"))
        label = stem
    if not isinstance(cfg, dict):
        raise PlanInputError(f"{model}: the config is not a JSON object")
    if "text_config" in cfg and "num_hidden_layers" not in cfg:
        raise PlanInputError(f"{model}: a multimodal config (text_config); give the language model's config.json")
    missing = [k for k in NEEDED if k not in cfg]
    if missing:
        raise PlanInputError(f"{model}: the config has no {', '.join(missing)} (needs {', '.join(NEEDED)})")
    from transformers import CONFIG_MAPPING

    if cfg["model_type"] not in CONFIG_MAPPING:
        raise PlanInputError(f"{model}: unknown architecture model_type={cfg['model_type']!r} (transformers does not "
                             f"know it; for remote-code models write an equivalent config, as "
                             f"{ARCH_DIR.name}/qwen-7b-chat-equivalent.json does)")
    return label, cfg


def whole(value: Any, key: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        else:
            raise PlanInputError(f"{key}={value!r}: must be a whole number >= {minimum}")
    if value < minimum:
        raise PlanInputError(f"{key}={value!r}: must be a whole number >= {minimum}")
    return int(value)


def _precision(bf16: Any, fp16: Any, key_bf16: str, key_fp16: str) -> str:
    if bf16 in (True, "auto", "true", "True"):
        return "bf16"
    if fp16 in (True, "true", "True"):
        return "fp16"
    if bf16 not in (None, False, "false", "False") or fp16 not in (None, False, "false", "False"):
        raise PlanInputError(f"{key_bf16}={bf16!r} / {key_fp16}={fp16!r}: expected true or false")
    return "fp32"


def _selection(cfg: dict) -> SelectionConfig | None:
    flat = {k: v for k, v in cfg.items() if str(k).startswith(PREFIX)}
    if not flat:
        return None
    try:
        return config_from_flat(flat)
    except StrategyConfigError as exc:
        raise PlanInputError(str(exc).splitlines()[0]) from None


def _refuse(cfg: dict, keys: dict[str, str]) -> None:
    for key, why in keys.items():
        if cfg.get(key) not in (None, False, 0, "", []):
            raise PlanInputError(f"{key}={cfg[key]!r}: the planner cannot honour it ({why})")


def from_axolotl(cfg: dict, path: str) -> Request:
    _refuse(cfg, {"load_in_8bit": "8-bit weights are not counted", "load_in_4bit": "4-bit (QLoRA) weights are "
                  "not counted", "deepspeed": "sharded optimizer states", "fsdp": "sharded weights",
                  "fsdp_config": "sharded weights", "unfrozen_parameters": "partial freezing of the base model",
                  "lora_modules_to_save": "extra trained modules", "peft_layers_to_transform": "LoRA on some layers"})
    adapter = cfg.get("adapter")
    if adapter not in (None, "lora"):
        raise PlanInputError(f"adapter={adapter!r}: the planner counts lora or full fine-tuning (no adapter)")
    opt = cfg.get("optimizer")
    if opt not in ADAMW:
        raise PlanInputError(f"optimizer={opt!r}: the planner counts AdamW (allowed: adamw_torch, adamw_torch_fused)")
    model = cfg.get("base_model")
    if not model:
        raise PlanInputError(f"{path}: no base_model")
    label, config = read_config(str(model))
    targets = cfg.get("lora_target_modules") or []
    if cfg.get("lora_target_linear"):
        targets = list(ALL_LINEAR)
    if isinstance(targets, str):
        targets = [targets]
    if adapter == "lora" and not targets:
        raise PlanInputError("lora_target_modules is empty and lora_target_linear is not set")
    if cfg.get("eager_attention") or cfg.get("attn_implementation") == "eager":
        attention = "eager"
    elif cfg.get("flash_attention") or cfg.get("xformers_attention"):
        attention = "flash"
    else:
        attention = "sdpa"
    r = whole(cfg.get("lora_r", 8), "lora_r")
    req = Request(model_label=label, config=config, scope="adapter" if adapter == "lora" else "full",
                  lora_r=r, lora_alpha=int(cfg.get("lora_alpha") or r), lora_dropout=float(cfg.get("lora_dropout") or 0),
                  lora_targets=tuple(targets) or Request.lora_targets,
                  precision=_precision(cfg.get("bf16"), cfg.get("fp16"), "bf16", "fp16"), attention=attention,
                  checkpointing=bool(cfg.get("gradient_checkpointing")),
                  batch=whole(cfg.get("micro_batch_size", 1), "micro_batch_size"),
                  seq=whole(cfg.get("sequence_len", 2048), "sequence_len"), selection=_selection(cfg),
                  source=f"Axolotl recipe {Path(path).name}")
    return req


LF_DEFAULT_TARGETS = ALL_LINEAR


def from_llamafactory(cfg: dict, path: str) -> Request:
    _refuse(cfg, {"quantization_bit": "quantized weights are not counted", "deepspeed": "sharded optimizer states",
                  "use_badam": "BAdam", "use_galore": "GaLore projections", "use_apollo": "APOLLO",
                  "use_llama_pro": "LLaMA Pro", "additional_target": "extra trained modules",
                  "use_dora": "DoRA magnitudes", "pure_bf16": "pure bf16 (fp32 casts skipped); use bf16"})
    ft = cfg.get("finetuning_type", "lora")
    if ft not in ("lora", "full"):
        raise PlanInputError(f"finetuning_type={ft!r}: the planner counts lora or full")
    opt = cfg.get("optim", "adamw_torch")
    if opt not in ADAMW:
        raise PlanInputError(f"optim={opt!r}: the planner counts AdamW (allowed: adamw_torch, adamw_torch_fused)")
    model = cfg.get("model_name_or_path")
    if not model:
        raise PlanInputError(f"{path}: no model_name_or_path")
    label, config = read_config(str(model))
    target = cfg.get("lora_target", "all")
    targets = ALL_LINEAR if target in ("all", None) else tuple(t.strip() for t in str(target).split(","))
    fa = cfg.get("flash_attn", "auto")
    attention = {"auto": "sdpa", "sdpa": "sdpa", "fa2": "flash", "fa3": "flash", "disabled": "eager"}.get(fa)
    if attention is None:
        raise PlanInputError(f"flash_attn={fa!r}; allowed: auto, sdpa, fa2, disabled")
    precision = _precision(cfg.get("bf16"), cfg.get("fp16"), "bf16", "fp16")
    notes = []
    if ft == "full" and precision in ("bf16", "fp16"):
        # LLaMA-Factory casts the trainable parameters to fp32 unless pure_bf16: full fine-tuning keeps fp32
        # weights, gradients and moments and computes in bf16/fp16 under autocast
        precision = "mixed"
        notes.append("LLaMA-Factory full fine-tuning upcasts the trained weights to fp32 (not pure_bf16): "
                     "fp32 weights, gradients and moments, bf16 activations")
    r = whole(cfg.get("lora_rank", 8), "lora_rank")
    return Request(model_label=label, config=config, scope="adapter" if ft == "lora" else "full", lora_r=r,
                   lora_alpha=int(cfg.get("lora_alpha") or 2 * r), lora_dropout=float(cfg.get("lora_dropout") or 0),
                   lora_targets=tuple(targets), precision=precision, attention=attention,
                   checkpointing=not cfg.get("disable_gradient_checkpointing", False),
                   batch=whole(cfg.get("per_device_train_batch_size", 1), "per_device_train_batch_size"),
                   seq=whole(cfg.get("cutoff_len", 2048), "cutoff_len"), selection=_selection(cfg),
                   source=f"LLaMA-Factory recipe {Path(path).name}", notes=notes)


def load_recipe(path: str) -> Request:
    p = Path(path)
    if not p.is_file():
        raise PlanInputError(f"{path}: no such recipe file")
    try:
        cfg = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise PlanInputError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise PlanInputError(f"{path}: a recipe must be a YAML mapping of keys to values")
    if "model_name_or_path" in cfg or "finetuning_type" in cfg:
        return from_llamafactory(cfg, path)
    if "base_model" in cfg:
        return from_axolotl(cfg, path)
    raise PlanInputError(f"{path}: neither an Axolotl recipe (base_model) nor a LLaMA-Factory one (model_name_or_path)")
