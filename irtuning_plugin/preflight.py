"""Preflight: every training set-up irtuning refuses, each rule written once.

Each integration describes its run as a :class:`TrainingSetup` filled from its own keys (Axolotl's
validator in ``axolotl_integration/args.py``, the LLaMA-Factory launcher, the plain-Trainer callback at
train start) and calls :func:`check`, which raises the first refusal that applies, as one line naming the
key and what to set instead. The rules run in the order of :data:`RULES`; a rule says which integrations
it applies to. The "what is refused, and why" table of docs/refusals.md is generated from :data:`RULES`
(:func:`refusals_table`; rewrite it with ``python -m irtuning_plugin.preflight --write docs/refusals.md``),
and a test compares the committed table with the generated one.

What a strategy accepts comes from its class attributes (``scopes``, ``freezes_layers``,
``fixed_after_first_step``), never from its name.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from irtuning_plugin.strategies import StrategyConfigError, get_strategy_class, registered_strategies

LOG = logging.getLogger(__name__)

AXOLOTL, LLAMAFACTORY, TRAINER = "axolotl", "llamafactory", "trainer"
INTEGRATIONS = {AXOLOTL: "Axolotl", LLAMAFACTORY: "LLaMA-Factory", TRAINER: "plain Trainer"}

# Axolotl keys of its built-in LISA, and Axolotl keys that put LoRA on fixed layers only.
AXOLOTL_LISA_KEYS = ("lisa_n_layers", "lisa_step_interval", "lisa_layers_attribute")
AXOLOTL_LAYER_FILTER_KEYS = ("peft_layers_to_transform", "layers_to_transform")
# LLaMA-Factory: stages trained by the transformers Trainer loop (PPO runs its own loop: no optimizer-step
# callbacks), the finetuning types and the scope each trains, and settings that select, freeze or update
# layers themselves.
LLAMAFACTORY_STAGES = ("pt", "sft", "rm", "dpo", "kto")
LLAMAFACTORY_FINETUNING_SCOPES = {"lora": "adapter", "full": "full"}
LLAMAFACTORY_OWN_LAYER_HANDLING = {
    "use_badam": "BAdam trains one block of layers at a time itself",
    "use_llama_pro": "LLaMA Pro trains only its expanded blocks",
    "galore_layerwise": "layer-wise GaLore steps each parameter inside backward, before gradients can be scored",
    "apollo_layerwise": "layer-wise APOLLO steps each parameter inside backward, before gradients can be scored",
    "use_mca": "Megatron-Core training does not run the transformers Trainer",
    "use_ray": "Ray trains in worker processes, out of the launcher's reach (no unclipped scores, no run record)",
}
AXOLOTL_FSDP2_REASON = (
    "Axolotl 0.19 builds its FSDP device mesh for CUDA only (axolotl/utils/distributed.py, "
    "build_parallelism_config: build_device_mesh('cuda')), so `axolotl train` with fsdp_version: 2 cannot run "
    "on the CPU machines irtuning is tested on (first error: AttributeError: module 'torch._C' has no attribute "
    "'_cuda_setDevice'), and irtuning's FSDP2 support is proven only with a plain Trainer")
_FSDP2_REASONS = {AXOLOTL: AXOLOTL_FSDP2_REASON,
                  LLAMAFACTORY: "not tested through its launcher; FSDP2 is proven only with a plain Trainer"}


@dataclass(frozen=True)
class TrainingSetup:
    """A run as the rules see it, whatever the integration: each integration fills it from its own keys.

    ``None`` means unset. ``keys`` holds the integration's whole recipe (Axolotl's config, LLaMA-Factory's
    recipe) for the rules about its own keys; the plain Trainer has none.
    """

    integration: str
    strategy: str
    scope: str = "adapter"
    adapter: Any = None  # Axolotl's `adapter` (lora, qlora, ...; unset = full fine-tuning)
    finetuning_type: Any = None  # LLaMA-Factory's finetuning_type (its default, lora, filled in)
    torch_compile: Any = None
    deepspeed: Any = None  # a DeepSpeed config: a dict, a JSON file, or true when only its use is known
    fsdp: Any = None
    fsdp_config: Any = None
    fsdp_version: Any = None  # Axolotl's top-level key, or accelerate's FSDP plugin
    ddp_find_unused_parameters: bool | None = None  # the plain Trainer: the value DDP was built with
    keys: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.integration not in INTEGRATIONS:
            raise ValueError(f"integration={self.integration!r}; allowed: {', '.join(INTEGRATIONS)}")


@dataclass(frozen=True)
class Rule:
    """One refusal: where it applies, the keys it concerns, and a check returning the message (None: fine)."""

    id: str
    integrations: tuple[str, ...]
    keys: tuple[str, ...]
    setting: str  # the refused setting, for the docs table (markdown)
    why: str  # one line, for the docs table (markdown)
    tests: tuple[str, ...]  # tests that show it beyond tests/test_preflight.py (``file::name`` or ``::name``)
    check: Callable[[TrainingSetup], str | None]


def _strategy(setup: TrainingSetup):
    return get_strategy_class(setup.strategy)


def _freezes_layers(setup: TrainingSetup) -> bool:
    return _strategy(setup).freezes_layers


# ---- the rules -------------------------------------------------------------------------------------
def _lf_freeze(s: TrainingSetup) -> str | None:
    if s.finetuning_type == "freeze":
        return (f"finetuning_type: freeze freezes layers itself (freeze_trainable_layers), which conflicts with "
                f"irtuning_strategy={s.strategy!r}: use finetuning_type: lora, or full with irtuning_scope: full")
    return None


def _lf_finetuning_type(s: TrainingSetup) -> str | None:
    if s.finetuning_type not in LLAMAFACTORY_FINETUNING_SCOPES:
        return (f"finetuning_type={s.finetuning_type!r} is not supported with irtuning; allowed: lora "
                f"(irtuning_scope: adapter), full (irtuning_scope: full)")
    return None


def _axolotl_lisa(s: TrainingSetup) -> str | None:
    for key in AXOLOTL_LISA_KEYS:
        if s.keys.get(key) is not None:
            return (f"{key} (Axolotl's built-in LISA) cannot be combined with the irtuning plugin: remove {key}, "
                    f"or use irtuning_strategy: lisa")
    return None


def scope_refusal(strategy: str, scope: str) -> str | None:
    """The refusal of a strategy on a scope it does not support (its class's ``scopes``), or None. The engine
    calls it too, so a direct engine user gets the same line as every integration."""
    scopes = get_strategy_class(strategy).scopes
    if scope not in scopes:
        return (f"irtuning_strategy={strategy!r} works only with irtuning_scope: {' or '.join(scopes)}, "
                f"not irtuning_scope={scope!r}")
    return None


def _strategy_scope(s: TrainingSetup) -> str | None:
    return scope_refusal(s.strategy, s.scope)


def _adapter_scope(s: TrainingSetup) -> str | None:
    """The scope says what a selected layer trains; each integration says in its own key whether the run
    trains an adapter (Axolotl: ``adapter``; LLaMA-Factory: ``finetuning_type``), and how to change it."""
    if s.integration == AXOLOTL:
        lacks_adapter, lacks_full = not s.adapter, bool(s.adapter)
        found = found_full = f"adapter={s.adapter!r} is set" if s.adapter else "no `adapter` is set"
        what, to_adapter = "adapter layers", "set adapter: lora (or qlora), or irtuning_scope: full for full fine-tuning"
        to_full = "use irtuning_scope: adapter, or remove adapter"
    elif s.integration == LLAMAFACTORY:
        lacks_adapter, lacks_full = s.finetuning_type != "lora", s.finetuning_type != "full"
        found = f"finetuning_type={s.finetuning_type!r}"
        what, to_adapter = "LoRA layers", "set finetuning_type: lora, or irtuning_scope: full"
        found_full = f"{found} (LLaMA-Factory's default is lora)"
        to_full = "set finetuning_type: full, or irtuning_scope: adapter"
    else:
        return None
    if s.scope == "adapter" and lacks_adapter:
        return f"irtuning_scope='adapter' (the default) selects {what} but {found}: {to_adapter}"
    if s.scope == "full" and lacks_full:
        return f"irtuning_scope='full' selects whole layers but {found_full}: {to_full}"
    return None


def _axolotl_layer_filter(s: TrainingSetup) -> str | None:
    if not _freezes_layers(s):
        return None
    for key in AXOLOTL_LAYER_FILTER_KEYS:
        if s.keys.get(key) is not None:
            return (f"{key} restricts LoRA to fixed layers, which conflicts with irtuning_strategy={s.strategy!r}: "
                    f"remove {key}")
    return None


def _lf_own_layer_handling(s: TrainingSetup) -> str | None:
    for key, why in LLAMAFACTORY_OWN_LAYER_HANDLING.items():
        if s.keys.get(key):
            return f"{key}: {why}, which conflicts with irtuning_strategy={s.strategy!r}: remove {key}"
    return None


def _lf_stage(s: TrainingSetup) -> str | None:
    stage = s.keys.get("stage", "sft")
    if stage not in LLAMAFACTORY_STAGES:
        return (f"stage={stage!r} runs its own training loop, which never calls the optimizer-step callbacks "
                f"irtuning needs; allowed with irtuning: {', '.join(LLAMAFACTORY_STAGES)}")
    return None


def _lf_do_train(s: TrainingSetup) -> str | None:
    if not s.keys.get("do_train"):
        return "do_train is not true: irtuning selects layers while training; set do_train: true"
    return None


def _torch_compile(s: TrainingSetup) -> str | None:
    if s.torch_compile and not _strategy(s).fixed_after_first_step:
        static = ", ".join(n for n, c in registered_strategies().items() if c.fixed_after_first_step)
        return (f"torch_compile={s.torch_compile!r} with irtuning_strategy={s.strategy!r}: the trained layers change "
                f"during training, and torch.compile recompiles the model for every new set (it guards on "
                f"requires_grad), so steps get far slower; remove torch_compile, or use a strategy whose layers "
                f"never change after step 0 ({static})")
    return None


def deepspeed_stage(deepspeed: Any) -> str:
    """'ZeRO stage N' from a DeepSpeed config (a dict or a JSON file), or '' when it cannot be read."""
    cfg = deepspeed
    if isinstance(deepspeed, (str, os.PathLike)):
        try:
            with open(deepspeed, encoding="utf-8") as fh:
                cfg = json.load(fh)
        except (OSError, ValueError):
            return ""
    stage = (cfg.get("zero_optimization") or {}).get("stage") if isinstance(cfg, dict) else None
    return f"ZeRO stage {stage}" if stage is not None else ""


def _deepspeed(s: TrainingSetup) -> str | None:
    if not s.deepspeed:
        return None
    stage = deepspeed_stage(s.deepspeed)
    return (f"deepspeed is set{f' ({stage})' if stage else ''}: irtuning does not support DeepSpeed. ZeRO moves "
            f"gradients into its own flat, partitioned buffers (the per-layer scores would be of a shard, or of "
            f"nothing) and builds its optimizer once from the parameters that require grad at initialize (ZeRO-3 "
            f"also drops frozen ones), while irtuning switches layers on and off every step; remove deepspeed "
            f"(DDP is supported), or shard with FSDP2 instead (fsdp_version: 2; supported with a plain Trainer)")


def fsdp_version_of(fsdp_config: Any = None, fsdp_version: Any = None) -> int | None:
    """The FSDP version a set-up asks for: ``fsdp_version`` (Axolotl's top-level key, accelerate's plugin),
    else ``fsdp_config``'s ``fsdp_version`` / ``version``; None when none says."""
    if fsdp_version is None and isinstance(fsdp_config, Mapping):
        fsdp_version = fsdp_config.get("fsdp_version", fsdp_config.get("version"))
    if fsdp_version is None:
        return None
    try:
        return int(str(fsdp_version))
    except ValueError:
        raise StrategyConfigError(f"fsdp_version={fsdp_version!r}; allowed: 1, 2") from None


def _fsdp1(s: TrainingSetup) -> str | None:
    """An FSDP set-up that does not say its version is taken as FSDP1 (accelerate's and Axolotl's default)."""
    try:
        version = fsdp_version_of(s.fsdp_config, s.fsdp_version)
    except StrategyConfigError as err:
        return str(err)
    if (s.fsdp or s.fsdp_config) and version != 2:
        return (f"fsdp is set: irtuning does not support FSDP version {version or 1} (FSDP1): its flat parameters "
                f"(without use_orig_params) cannot freeze single layers and its gradients live in flat shards the "
                f"per-layer scores cannot be read from; use FSDP2 with a plain Trainer (per-parameter sharding, "
                f"supported: fsdp_version: 2 in accelerate's config or fsdp_config: {{version: 2}} in "
                f"TrainingArguments; yaml_recipes/fsdp2/), or remove fsdp/fsdp_config (DDP is supported)")
    return None


def _fsdp2_outside_trainer(s: TrainingSetup) -> str | None:
    if s.fsdp or s.fsdp_config:  # FSDP2: it passed the FSDP1 rule
        return (f"fsdp is set: irtuning does not support FSDP2 under {INTEGRATIONS[s.integration]} yet: "
                f"{_FSDP2_REASONS[s.integration]}; use yaml_recipes/fsdp2/ (a plain Trainer under accelerate "
                f"launch), or remove fsdp/fsdp_config (DDP is supported)")
    return None


_DDP_FIX = {AXOLOTL: " or remove it (irtuning then sets it)", LLAMAFACTORY: " or remove it (irtuning then sets it)",
            TRAINER: " (TrainingArguments(ddp_find_unused_parameters=True))"}


def _ddp_unused_parameters(s: TrainingSetup) -> str | None:
    if s.ddp_find_unused_parameters is False and _freezes_layers(s):
        return (f"ddp_find_unused_parameters: false cannot work with irtuning_strategy={s.strategy!r}: frozen layers "
                f"get no gradient, which DDP then refuses at the next step; set ddp_find_unused_parameters: "
                f"true{_DDP_FIX[s.integration]}")
    return None


_ALL = (AXOLOTL, LLAMAFACTORY, TRAINER)
RULES: tuple[Rule, ...] = (
    Rule("llamafactory-freeze", (LLAMAFACTORY,), ("finetuning_type",), "`finetuning_type: freeze`",
         "LLaMA-Factory then freezes layers itself (`freeze_trainable_layers`)",
         ("tests_llamafactory/test_llamafactory_checks.py::test_bad_recipes_are_refused_before_training",),
         _lf_freeze),
    Rule("llamafactory-finetuning-type", (LLAMAFACTORY,), ("finetuning_type",),
         "`finetuning_type` other than `lora` or `full` (e.g. `oft`)",
         "layer selection works on LoRA tensors (`irtuning_scope: adapter`) or whole layers (`irtuning_scope: full`)",
         ("tests_llamafactory/test_llamafactory_checks.py::test_bad_recipes_are_refused_before_training",),
         _lf_finetuning_type),
    Rule("axolotl-lisa", (AXOLOTL,), AXOLOTL_LISA_KEYS,
         "`lisa_n_layers` / `lisa_step_interval` / `lisa_layers_attribute` (Axolotl's built-in LISA)",
         "it would toggle the same layers as the plugin; use `irtuning_strategy: lisa`",
         ("tests/integration/test_axolotl_plugin.py::test_bad_input_is_refused_before_training",), _axolotl_lisa),
    Rule("strategy-scope", _ALL, ("irtuning_scope", "irtuning_strategy"),
         "an `irtuning_scope` the strategy does not work with (`ist` with `irtuning_scope: full`)",
         "IST damps a layer through LoRA's scaling, so it needs adapters (the strategy's `scopes`)",
         ("tests/integration/test_axolotl_plugin.py::test_axolotl_validation_refuses_bad_baseline_options",
          "tests_llamafactory/test_llamafactory_checks.py::test_bad_recipes_are_refused_before_training"),
         _strategy_scope),
    Rule("adapter-scope", (AXOLOTL, LLAMAFACTORY), ("irtuning_scope", "adapter", "finetuning_type"),
         "`irtuning_scope: adapter` without an adapter (`adapter` unset; `finetuning_type` not `lora`), or "
         "`irtuning_scope: full` with one",
         "the scope says what a selected layer trains, so it must match what the run trains: its LoRA tensors "
         "or all its parameters (a plain `Trainer` is checked on the model at train start)",
         ("tests/integration/test_axolotl_plugin.py::test_bad_input_is_refused_before_training",
          "tests_llamafactory/test_llamafactory_checks.py::test_bad_recipes_are_refused_before_training"),
         _adapter_scope),
    Rule("axolotl-layer-filter", (AXOLOTL,), AXOLOTL_LAYER_FILTER_KEYS,
         "`peft_layers_to_transform` / `layers_to_transform` with a strategy that freezes layers (all but `all`)",
         "LoRA would exist only on fixed layers, so the selection could not choose the others",
         ("tests/integration/test_axolotl_plugin.py::test_bad_input_is_refused_before_training",), _axolotl_layer_filter),
    Rule("llamafactory-own-layer-handling", (LLAMAFACTORY,), tuple(LLAMAFACTORY_OWN_LAYER_HANDLING),
         "`" + "`, `".join(LLAMAFACTORY_OWN_LAYER_HANDLING) + "`",
         "each selects, freezes or updates layers itself: " + "; ".join(
             f"`{k}`: {v}" for k, v in LLAMAFACTORY_OWN_LAYER_HANDLING.items()),
         ("tests_llamafactory/test_llamafactory_checks.py::test_bad_recipes_are_refused_before_training",),
         _lf_own_layer_handling),
    Rule("llamafactory-stage", (LLAMAFACTORY,), ("stage",),
         "`stage` other than " + ", ".join(f"`{s}`" for s in LLAMAFACTORY_STAGES) + " (e.g. `ppo`)",
         "such a stage trains in a loop of its own, without the optimizer-step callbacks irtuning needs",
         ("tests_llamafactory/test_llamafactory_checks.py::test_bad_recipes_are_refused_before_training",), _lf_stage),
    Rule("llamafactory-do-train", (LLAMAFACTORY,), ("do_train",), "`do_train` not true",
         "irtuning selects layers while training",
         ("tests_llamafactory/test_llamafactory_checks.py::test_bad_recipes_are_refused_before_training",),
         _lf_do_train),
    Rule("torch-compile", _ALL, ("torch_compile",),
         "`torch_compile: true` (or `auto`) with a strategy whose layers change during training (`ir`, `ist`, "
         "`lisa`, `random`)",
         "torch.compile guards on `requires_grad`, so each new set recompiles (tiny model, 6 steps: 3 Dynamo graphs "
         "with `ir`, 1 with `fixed` or `salf`); allowed where the set chosen at step 0 never changes "
         "(`fixed_after_first_step`: `all`, `fixed`, `salf`)",
         ("tests/test_refusals.py::test_torch_compile_refused_where_layers_change",
          "::test_torch_compile_refused_on_a_plain_trainer", "::test_torch_compile_recompiles_when_layers_change",
          "::test_torch_compile_allowed_where_layers_never_change",
          "::test_torch_compile_builds_one_graph_where_layers_never_change"), _torch_compile),
    Rule("deepspeed", _ALL, ("deepspeed",), "`deepspeed` (ZeRO stage 1, 2 or 3)",
         "ZeRO moves gradients into its own flat, partitioned buffers (a layer's score would be of a shard, or of "
         "nothing) and builds its optimizer once from the parameters that require grad at initialize (ZeRO-3 also "
         "drops frozen ones), while irtuning switches layers every step; not proven to work, so refused: shard with "
         "FSDP2 instead (`fsdp_version: 2`, plain `Trainer`), or use DDP",
         ("tests/test_refusals.py::test_deepspeed_zero_refused", "::test_the_callback_refuses_the_same_trainer_arguments",
          "tests/integration/test_fsdp2.py::test_fsdp2_passes_the_shared_check_and_fsdp1_deepspeed_are_refused_naming_fsdp2"),
         _deepspeed),
    Rule("fsdp1", _ALL, ("fsdp", "fsdp_config", "fsdp_version"),
         "`fsdp` / `fsdp_config` with FSDP version 1 or no version; an `fsdp_version` other than 1 or 2",
         "FSDP1's flat parameters cannot freeze single layers and its flat gradient shards cannot be read per layer; "
         "FSDP2 (`fsdp_version: 2`) is supported on a plain `Trainer` ([distributed.md](distributed.md#fsdp2))",
         ("tests/test_refusals.py::test_fsdp_refused", "::test_the_callback_refuses_the_same_trainer_arguments",
          "tests/integration/test_fsdp2.py::test_the_callback_reads_the_fsdp_version_from_accelerate"), _fsdp1),
    Rule("fsdp2-outside-trainer", (AXOLOTL, LLAMAFACTORY), ("fsdp", "fsdp_config"),
         "`fsdp` / `fsdp_config` with FSDP version 2 through Axolotl or `irtuning llamafactory`",
         "Axolotl 0.19 builds its FSDP device mesh for CUDA only (`build_device_mesh(\"cuda\")` in "
         "`axolotl/utils/distributed.py`: `AttributeError: module 'torch._C' has no attribute '_cuda_setDevice'` "
         "on CPU), so it cannot be tested here; not tested through LLaMA-Factory's launcher; use the "
         "plain-`Trainer` recipe in `yaml_recipes/fsdp2/`",
         ("tests/integration/test_fsdp2.py::test_axolotl_fsdp2_is_refused_with_the_reason", "::test_llamafactory_fsdp2_is_refused"),
         _fsdp2_outside_trainer),
    Rule("ddp-find-unused-parameters", _ALL, ("ddp_find_unused_parameters",),
         "`ddp_find_unused_parameters: false` with a strategy that freezes layers (all but `all`)",
         "frozen layers get no gradient, which DDP refuses at the next step; left unset, Axolotl and "
         "`irtuning llamafactory` set it to `true` (a plain `Trainer` is checked on its DDP wrapper at train start)",
         ("tests/integration/test_ddp.py::test_find_unused_parameters_is_set_or_a_false_value_refused",
          "::test_plain_trainer_ddp_without_find_unused_parameters_is_refused"), _ddp_unused_parameters),
)


def rules_for(integration: str) -> tuple[Rule, ...]:
    return tuple(r for r in RULES if integration in r.integrations)


def refusal(setup: TrainingSetup) -> str | None:
    """The first refusal that applies to ``setup`` (one line), or None."""
    for rule in rules_for(setup.integration):
        message = rule.check(setup)
        if message is not None:
            return message
    return None


def check(setup: TrainingSetup, error: type[Exception] = StrategyConfigError) -> None:
    """Raise ``error`` (the integration's own error type) with the first refusal that applies to ``setup``."""
    message = refusal(setup)
    if message is not None:
        raise error(message)


# ---- the strategy's options against the model's real layer count (no weights read) -------------------
def meta_model(base_model: str | None, trust_remote_code: bool = False):
    """A meta-device copy of the base model (no weights are read), or None when its config is unreachable."""
    if not base_model:
        return None
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        hf_config = AutoConfig.from_pretrained(base_model, trust_remote_code=bool(trust_remote_code))
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config)
    except Exception as err:  # noqa: BLE001 - unreachable config: checked again once the model is loaded
        LOG.info("irtuning: layers and strategy options checked after model load (%s)", err)
        return None


def check_options_on_model(model: Any, config: Any) -> None:
    """Resolve the decoder layers (and irtuning_layers_path) of ``model`` (a meta-device copy will do) and
    check the strategy's options against the real layer count (e.g. irtuning_lisa_n_layers <= L)."""
    if model is None:
        return
    from irtuning_plugin.layer_map import find_decoder_layers

    _, layers = find_decoder_layers(model, config.layers_path)
    prefix = f"irtuning_{config.strategy}_"
    if isinstance(config.depth_floor, int) and not isinstance(config.depth_floor, bool) and config.depth_floor > 0:
        from irtuning_plugin.depth_floor import check_floor_depth, check_options_above_floor

        # the strategy works over the layers above the floor, so its options are checked against those
        floor = check_floor_depth(config.depth_floor, len(layers))
        check_options_above_floor(config.build_options(), prefix, len(layers), floor)
    else:
        config.build_options().check(prefix, len(layers))


# ---- the docs table ------------------------------------------------------------------------------------
TABLE_START, TABLE_END = "<!-- preflight:start -->", "<!-- preflight:end -->"
OWN_TEST = "tests/test_preflight.py::test_every_rule_fires_in_each_integration_it_applies_to"


def refusals_table() -> str:
    """The preflight rows of docs/refusals.md' "What is refused, and why" table, one per rule."""
    lines = ["| setting | refused by | why | test |", "|---|---|---|---|"]
    for rule in RULES:
        where = ", ".join(INTEGRATIONS[i] for i in rule.integrations)
        tests = ", ".join(f"`{t}`" for t in (OWN_TEST, *rule.tests))
        lines.append(f"| {rule.setting} | {where} | {rule.why} | {tests} |")
    return "\n".join(lines)


def with_refusals_table(text: str, where: str = "docs/refusals.md") -> str:
    """``text`` with the part between the table markers replaced by :func:`refusals_table`."""
    if text.count(TABLE_START) != 1 or text.count(TABLE_END) != 1 or text.index(TABLE_START) > text.index(TABLE_END):
        raise ValueError(f"{where} must hold the markers {TABLE_START} and {TABLE_END} once each, in that order")
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    return f"{head}{TABLE_START}\n{refusals_table()}\n{TABLE_END}{tail}"


def main(argv: list[str] | None = None) -> int:
    """``python -m irtuning_plugin.preflight`` prints the table; ``--write FILE`` rewrites it between the markers."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m irtuning_plugin.preflight", description=main.__doc__)
    parser.add_argument("--write", metavar="FILE", help="rewrite the table between the markers of FILE")
    args = parser.parse_args(argv)
    if args.write is None:
        print(refusals_table())
        return 0
    tmp = f"{args.write}.irtuning-tmp"
    try:
        with open(args.write, encoding="utf-8") as fh:
            text = fh.read()
        new = with_refusals_table(text, args.write)
        with open(tmp, "w", encoding="utf-8") as fh:  # the file itself is replaced only once the copy is whole
            fh.write(new)
        os.replace(tmp, args.write)
    except (OSError, UnicodeDecodeError, ValueError) as err:  # one line, never a traceback; the file is untouched
        if os.path.isfile(tmp):  # a partial copy of ours
            os.remove(tmp)
        print(f"python -m irtuning_plugin.preflight --write: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
