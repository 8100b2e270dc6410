"""irtuning_plugin/preflight.py: every rule fires through each integration it applies to (Axolotl's validator,
the LLaMA-Factory launcher's check, the plain-Trainer callback at train start), as one line naming the key and
what to set instead; and each refusal's text is written once in the package."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from irtuning_plugin import preflight
from irtuning_plugin.preflight import AXOLOTL, LLAMAFACTORY, RULES, TRAINER

PACKAGE = Path(preflight.__file__).resolve().parent

# rule id -> integration -> (the integration's settings that break the rule, the fragment of the message
# that only this rule writes, what the message tells to set or remove). The settings are the integration's
# own keys: Axolotl config keys, LLaMA-Factory recipe keys, the plain Trainer's TrainingArguments (plus
# "strategy"/"scope" for its SelectionConfig and "find_unused_parameters" for the DDP wrapper it was given).
CASES = {
    "llamafactory-freeze": {
        LLAMAFACTORY: ({"finetuning_type": "freeze"}, "freezes layers itself (freeze_trainable_layers)",
                       "use finetuning_type: lora")},
    "llamafactory-finetuning-type": {
        LLAMAFACTORY: ({"finetuning_type": "oft"}, "is not supported with irtuning; allowed: lora",
                       "allowed: lora (irtuning_scope: adapter), full (irtuning_scope: full)")},
    "axolotl-lisa": {
        AXOLOTL: ({"lisa_step_interval": 5}, "(Axolotl's built-in LISA) cannot be combined", "remove lisa_step_interval")},
    "strategy-scope": {
        AXOLOTL: ({"irtuning_strategy": "ist", "irtuning_scope": "full", "adapter": None}, "works only with irtuning_scope",
                  "works only with irtuning_scope: adapter"),
        LLAMAFACTORY: ({"irtuning_strategy": "ist", "irtuning_scope": "full", "finetuning_type": "full"},
                       "works only with irtuning_scope", "works only with irtuning_scope: adapter"),
        TRAINER: ({"strategy": "ist", "scope": "full"}, "works only with irtuning_scope",
                  "works only with irtuning_scope: adapter")},
    "adapter-scope": {
        AXOLOTL: ({"adapter": None}, "(the default) selects", "set adapter: lora (or qlora)"),
        LLAMAFACTORY: ({"irtuning_scope": "full"}, "selects whole layers but", "set finetuning_type: full")},
    "axolotl-layer-filter": {
        AXOLOTL: ({"layers_to_transform": [1, 2]}, "restricts LoRA to fixed layers", "remove layers_to_transform")},
    "llamafactory-own-layer-handling": {
        LLAMAFACTORY: ({"use_mca": True}, "Megatron-Core training does not run", "remove use_mca")},
    "llamafactory-stage": {
        LLAMAFACTORY: ({"stage": "ppo"}, "runs its own training loop", "allowed with irtuning: pt, sft, rm, dpo, kto")},
    "llamafactory-do-train": {
        LLAMAFACTORY: ({"do_train": False}, "do_train is not true", "set do_train: true")},
    "torch-compile": {
        AXOLOTL: ({"irtuning_strategy": "lisa", "torch_compile": True}, "torch.compile recompiles the model",
                  "remove torch_compile"),
        LLAMAFACTORY: ({"irtuning_strategy": "random", "torch_compile": True}, "torch.compile recompiles the model",
                       "remove torch_compile"),
        TRAINER: ({"strategy": "ist", "torch_compile": True}, "torch.compile recompiles the model",
                  "remove torch_compile")},
    "deepspeed": {
        AXOLOTL: ({"deepspeed": {"zero_optimization": {"stage": 1}}}, "irtuning does not support DeepSpeed",
                  "remove deepspeed"),
        LLAMAFACTORY: ({"deepspeed": {"zero_optimization": {"stage": 2}}}, "irtuning does not support DeepSpeed",
                       "remove deepspeed"),
        TRAINER: ({"deepspeed": {"zero_optimization": {"stage": 3}}}, "irtuning does not support DeepSpeed",
                  "remove deepspeed")},
    "fsdp1": {
        AXOLOTL: ({"fsdp_version": 1, "fsdp_config": {"reshard_after_forward": True}}, "(without use_orig_params)",
                  "remove fsdp/fsdp_config"),
        LLAMAFACTORY: ({"fsdp": "full_shard"}, "(without use_orig_params)", "remove fsdp/fsdp_config"),
        TRAINER: ({"fsdp": "full_shard", "fsdp_config": {"version": 1}}, "(without use_orig_params)",
                  "remove fsdp/fsdp_config")},
    "fsdp2-outside-trainer": {
        AXOLOTL: ({"fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True}}, "irtuning does not support FSDP2 under",
                  "remove fsdp/fsdp_config"),
        LLAMAFACTORY: ({"fsdp": "full_shard", "fsdp_config": {"version": 2}}, "irtuning does not support FSDP2 under",
                       "remove fsdp/fsdp_config")},
    "ddp-find-unused-parameters": {
        AXOLOTL: ({"irtuning_strategy": "salf", "ddp_find_unused_parameters": False}, "which DDP then refuses",
                  "set ddp_find_unused_parameters: true"),
        LLAMAFACTORY: ({"ddp_find_unused_parameters": False}, "which DDP then refuses",
                       "set ddp_find_unused_parameters: true"),
        TRAINER: ({"find_unused_parameters": False}, "which DDP then refuses", "set ddp_find_unused_parameters: true")},
}
PAIRS = [(r.id, i) for r in RULES for i in r.integrations]


def _refuse_axolotl(over, tiny_model_dir) -> str:
    from helpers_axolotl import base_cfg, validate

    with pytest.raises(Exception) as err:
        validate(base_cfg(tiny_model_dir, **over))
    from irtuning_plugin.axolotl_integration.errors import irtuning_message

    message = irtuning_message(err.value)  # pydantic wraps it; the user reads our line
    assert message is not None, err.value
    return message


def _refuse_llamafactory(over) -> str:
    from irtuning_plugin.llamafactory_integration.launcher import LlamaFactoryConfigError, check_recipe

    cfg = {"irtuning_strategy": "ir", "stage": "sft", "do_train": True, "finetuning_type": "lora", **over}
    with pytest.raises(LlamaFactoryConfigError) as err:  # the launcher's own error type
        check_recipe({k: v for k, v in cfg.items() if v is not None}, meta_model=False)
    return str(err.value)


def _fake_ddp(find_unused_parameters: bool) -> torch.nn.parallel.DistributedDataParallel:
    """An object the callback takes for a DDP wrapper (no process group needed: only the flag is read)."""
    ddp = torch.nn.parallel.DistributedDataParallel.__new__(torch.nn.parallel.DistributedDataParallel)
    object.__setattr__(ddp, "find_unused_parameters", find_unused_parameters)
    return ddp


def _refuse_trainer(over) -> str:
    from irtuning_plugin.callback import LayerSelectionCallback
    from irtuning_plugin.config import SelectionConfig
    from irtuning_plugin.strategies import StrategyConfigError

    over = dict(over)
    config = SelectionConfig(strategy=over.pop("strategy", "ir"), scope=over.pop("scope", "adapter"))
    wrapped = _fake_ddp(over.pop("find_unused_parameters")) if "find_unused_parameters" in over else None
    trainer = SimpleNamespace(model_wrapped=wrapped, is_fsdp_enabled=False, is_deepspeed_enabled=False)
    cb = LayerSelectionCallback(config, trainer=trainer)
    args = SimpleNamespace(**{"torch_compile": False, "deepspeed": None, "fsdp": "", "fsdp_config": None, "seed": 0,
                              "max_grad_norm": 0.0, "output_dir": None, **over})
    with pytest.raises(StrategyConfigError) as err:
        cb.on_train_begin(args, SimpleNamespace(is_world_process_zero=True, global_step=0), None)
    assert cb.engine is None  # refused before the engine froze anything
    return str(err.value)


def test_every_rule_has_a_case_for_each_integration_it_applies_to():
    assert {(r, i) for r, by in CASES.items() for i in by} == set(PAIRS)
    assert len({r.id for r in RULES}) == len(RULES)
    assert all(r.integrations and set(r.integrations) <= set(preflight.INTEGRATIONS) for r in RULES)


@pytest.mark.parametrize("rule_id,integration", PAIRS, ids=[f"{r}-{i}" for r, i in PAIRS])
def test_every_rule_fires_in_each_integration_it_applies_to(rule_id, integration, request):
    over, own, allowed = CASES[rule_id][integration]
    if integration == AXOLOTL:
        message = _refuse_axolotl(over, request.getfixturevalue("tiny_model_dir"))
    elif integration == LLAMAFACTORY:
        message = _refuse_llamafactory(over)
    else:
        message = _refuse_trainer(over)
    rule = next(r for r in RULES if r.id == rule_id)
    assert "\n" not in message
    assert own in message, message  # this rule's message, not another's
    assert any(key in message for key in rule.keys), (rule.keys, message)  # names the key
    assert allowed in message, message  # and what to set instead


def _sources() -> dict[Path, str]:
    return {p: p.read_text(encoding="utf-8") for p in PACKAGE.rglob("*.py")}


def test_each_refusal_text_is_written_once_in_the_package():
    sources = _sources()
    fragments = {own for by in CASES.values() for _, own, _ in by.values()} | {
        # texts of the rules that used to be written once per integration
        "ddp_find_unused_parameters: false cannot work", "selects whole layers but",
        "does not support DeepSpeed", "does not support FSDP version",
    }
    for fragment in sorted(fragments):
        where = {str(p.relative_to(PACKAGE)): text.count(fragment) for p, text in sources.items() if fragment in text}
        assert where == {"preflight.py": 1}, (fragment, where)
    gone = ("damps each layer by scaling its LoRA output, which needs adapters",  # ist.py's copy of the scope rule
            "ddp_find_unused_parameters: false, but frozen",  # the launcher's copy of the DDP rule
            "DDP was built with find_unused_parameters=False")  # the callback's copy
    for fragment in gone:
        assert not [p for p, text in sources.items() if fragment in text], fragment


def test_the_strategy_abilities_come_from_the_classes_not_their_names():
    from irtuning_plugin.strategies import registered_strategies

    strategies = registered_strategies()
    assert [n for n, c in strategies.items() if not c.freezes_layers] == ["all"]
    assert {n for n, c in strategies.items() if c.scopes != ("adapter", "full")} == {"ist"}
    text = (PACKAGE / "preflight.py").read_text(encoding="utf-8")
    for name in strategies:
        assert f'== "{name}"' not in text and f"== '{name}'" not in text


def test_a_setup_that_breaks_no_rule_passes_in_each_integration():
    for integration in preflight.INTEGRATIONS:
        finetuning = "lora" if integration == LLAMAFACTORY else None
        keys = {"do_train": True} if integration == LLAMAFACTORY else {}
        setup = preflight.TrainingSetup(integration, "ir", adapter="lora", finetuning_type=finetuning,
                                        ddp_find_unused_parameters=True, fsdp_config={"version": 2} if
                                        integration == TRAINER else None, fsdp="full_shard" if integration == TRAINER
                                        else None, keys=keys)
        assert preflight.refusal(setup) is None, integration


def test_an_unknown_integration_is_refused_naming_the_allowed_ones():
    with pytest.raises(ValueError, match="integration='deepspeed'; allowed: axolotl, llamafactory, trainer"):
        preflight.TrainingSetup("deepspeed", "ir")


def test_the_table_lists_every_rule_in_order():
    rows = preflight.refusals_table().splitlines()[2:]
    assert len(rows) == len(RULES)
    for row, rule in zip(rows, RULES):
        assert row.startswith(f"| {rule.setting} | ") and rule.why in row


def test_write_refuses_a_missing_or_unmarked_file_in_one_line(tmp_path, capsys):
    assert preflight.main(["--write", str(tmp_path / "nowhere" / "refusals.md")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m irtuning_plugin.preflight --write: ") and "No such file" in err
    assert len(err.strip().splitlines()) == 1
    plain = tmp_path / "plain.md"
    plain.write_text("no markers here\n")
    assert preflight.main(["--write", str(plain)]) == 2
    assert "must hold the markers" in capsys.readouterr().err
    assert plain.read_text() == "no markers here\n"  # untouched
    marked = tmp_path / "marked.md"
    marked.write_text(f"head\n{preflight.TABLE_START}\nold\n{preflight.TABLE_END}\ntail\n")
    (tmp_path / "marked.md.irtuning-tmp").mkdir()  # the copy cannot be written: refused, the file untouched
    assert preflight.main(["--write", str(marked)]) == 2
    assert "marked.md.irtuning-tmp" in capsys.readouterr().err
    assert "old" in marked.read_text()
    (tmp_path / "marked.md.irtuning-tmp").rmdir()
    assert preflight.main(["--write", str(marked)]) == 0
    assert marked.read_text() == preflight.with_refusals_table(f"head\n{preflight.TABLE_START}\nx\n"
                                                                f"{preflight.TABLE_END}\ntail\n")
