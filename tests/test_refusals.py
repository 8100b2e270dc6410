"""What is refused before training, and why (the table in docs/refusals.md): each row has a test here or is named there.

The table's preflight rows are generated from irtuning_plugin/preflight.py (a test here compares them with the
committed file); tests/test_preflight.py fires every rule through each integration it applies to.

torch_compile is refused where the trained layers change during training and allowed where they never
change after step 0; a compile test counts the graphs Dynamo builds to show why.
"""

import json
from types import SimpleNamespace

import pytest
import torch

from irtuning_plugin import preflight
from irtuning_plugin.callback import LayerSelectionCallback, attach_layer_selection
from irtuning_plugin.config import SelectionConfig, config_from_flat
from irtuning_plugin.layer_map import build_layer_map
from irtuning_plugin.strategies import StrategyConfigError, registered_strategies

from helpers_tiny import make_trainer, tiny_peft_llama

CHANGING = sorted(n for n, c in registered_strategies().items() if not c.fixed_after_first_step)
FIXED = sorted(n for n, c in registered_strategies().items() if c.fixed_after_first_step)
OPTIONS = {"fixed": {"irtuning_fixed_layers": [5, 6, 7]}}


def test_the_split_of_strategies():
    assert FIXED == ["all", "fixed", "salf"]
    assert set(CHANGING) >= {"ir", "ist", "lisa", "random"}


# ---- torch_compile -----------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [True, "auto"])
@pytest.mark.parametrize("strategy", CHANGING)
def test_torch_compile_refused_where_layers_change(tiny_model_dir, strategy, value):
    from helpers_axolotl import base_cfg, validate

    with pytest.raises(Exception) as err:
        validate(base_cfg(tiny_model_dir, irtuning_strategy=strategy, torch_compile=value))
    message = str(err.value)
    assert f"torch_compile={value!r} with irtuning_strategy={strategy!r}: the trained layers change" in message
    assert "remove torch_compile" in message


@pytest.mark.parametrize("strategy", FIXED)
def test_torch_compile_allowed_where_layers_never_change(tiny_model_dir, strategy):
    from helpers_axolotl import base_cfg, validate

    cfg = validate(base_cfg(tiny_model_dir, irtuning_strategy=strategy, torch_compile=True,
                            **OPTIONS.get(strategy, {})))
    assert cfg.torch_compile is True and cfg.irtuning_strategy == strategy


def test_torch_compile_refused_on_a_plain_trainer(tmp_path):
    model = tiny_peft_llama()
    trainer = make_trainer(model, tmp_path, max_steps=2, torch_compile=True, torch_compile_backend="aot_eager")
    attach_layer_selection(trainer, SelectionConfig(strategy="ir"))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(StrategyConfigError, match=r"^torch_compile=True with irtuning_strategy='ir'"):
        trainer.train()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))  # refused before step 1


def _compiled_run(tmp_path, strategy, options, max_steps=6):
    from torch._dynamo.utils import counters

    model = tiny_peft_llama()
    lm = build_layer_map(model)
    before = [[p.detach().clone() for p in ps] for ps in lm.params]
    # aot_eager: Dynamo's graphs and guards as with inductor, without a C++ compiler
    trainer = make_trainer(model, tmp_path, max_steps=max_steps, torch_compile=True, torch_compile_backend="aot_eager")
    cb = attach_layer_selection(trainer, SelectionConfig(strategy=strategy, strategy_options=options))
    torch._dynamo.reset()
    counters.clear()
    trainer.train()
    changed = [any(not torch.equal(b, p.detach()) for b, p in zip(bs, ps)) for bs, ps in zip(before, lm.params)]
    return dict(counters["stats"]).get("unique_graphs", 0), cb, changed


@pytest.mark.slow
@pytest.mark.parametrize("strategy,options", [("fixed", {"layers": [3, 4, 5]}), ("salf", {})])
def test_torch_compile_builds_one_graph_where_layers_never_change(tmp_path, strategy, options):
    graphs, cb, changed = _compiled_run(tmp_path, strategy, options)
    assert graphs == 1  # six steps, no recompilation
    active = {tuple(r["active"]) for r in cb.rows}
    assert len(cb.rows) == 6 and len(active) == 1  # the plugin ran, with one trainable set
    trained = set(next(iter(active)))
    assert changed == [i in trained for i in range(len(changed))]  # and only those layers moved


@pytest.mark.slow
def test_torch_compile_recompiles_when_layers_change(tmp_path, monkeypatch):
    """Why the refusal: with the check bypassed, IR's changing sets make Dynamo build a graph per new set."""
    monkeypatch.setattr(LayerSelectionCallback, "_check_setup", lambda self, args: None)
    graphs, cb, _ = _compiled_run(tmp_path, "ir", {}, max_steps=3)
    sets = {tuple(r["active"]) for r in cb.rows}
    assert len(sets) > 1 and graphs >= len(sets), (graphs, sets)


# ---- the gradient-norm kernel ------------------------------------------------------------------------
def test_triton_backend_refused_without_cuda(monkeypatch, tiny_model_dir):
    from helpers_axolotl import base_cfg, validate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    message = ("irtuning_kernel_backend='triton' needs a CUDA GPU and none is visible here: use "
               "irtuning_kernel_backend: auto (Triton on CUDA, torch elsewhere) or torch")
    with pytest.raises(StrategyConfigError) as err:
        config_from_flat({"irtuning_kernel_backend": "triton"})
    assert str(err.value) == message
    with pytest.raises(Exception) as err:
        validate(base_cfg(tiny_model_dir, irtuning_kernel_backend="triton"))
    assert message in str(err.value)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton's CPU interpreter (the kernel tests) stays allowed
    assert config_from_flat({"irtuning_kernel_backend": "triton"}).kernel_backend == "triton"


# ---- DeepSpeed and FSDP ------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero_refused(tmp_path, tiny_model_dir, stage):
    from helpers_axolotl import base_cfg, validate

    path = tmp_path / f"zero{stage}.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto"}))
    with pytest.raises(Exception) as err:
        validate(base_cfg(tiny_model_dir, deepspeed=str(path)))
    message = str(err.value)
    assert f"deepspeed is set (ZeRO stage {stage}): irtuning does not support DeepSpeed" in message
    assert "remove deepspeed (DDP is supported)" in message


@pytest.mark.parametrize("over", [
    {"fsdp": ["full_shard", "auto_wrap"], "fsdp_config": {"fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}},
    {"fsdp_config": {"fsdp_version": 2, "reshard_after_forward": True}},
])
def test_fsdp_refused(tiny_model_dir, over):
    from helpers_axolotl import base_cfg, validate

    with pytest.raises(Exception) as err:
        validate(base_cfg(tiny_model_dir, **over))
    assert "fsdp is set: irtuning does not support FSDP" in str(err.value)
    assert "remove fsdp/fsdp_config (DDP is supported)" in str(err.value)


@pytest.mark.parametrize("args,fragment", [
    ({"deepspeed": {"zero_optimization": {"stage": 2}}}, "deepspeed is set (ZeRO stage 2)"),
    ({"fsdp": "full_shard"}, "fsdp is set"),
    ({"torch_compile": True}, "torch_compile=True with irtuning_strategy='ir'"),
])
def test_the_callback_refuses_the_same_trainer_arguments(args, fragment):
    """A plain Trainer (or LLaMA-Factory, which runs the callback) gets the same refusals at train start."""
    cb = LayerSelectionCallback(SelectionConfig(strategy="ir"), tiny_peft_llama())
    targs = SimpleNamespace(**{"torch_compile": False, "deepspeed": None, "fsdp": "", "seed": 0,
                               "max_grad_norm": 0.0, "output_dir": None, **args})
    with pytest.raises(StrategyConfigError) as err:
        cb.on_train_begin(targs, SimpleNamespace(is_world_process_zero=True), None)
    assert str(err.value).startswith(fragment) and "\n" not in str(err.value)
    assert cb.engine is None  # refused before the engine froze anything


def test_training_setup_check_passes_plain_ddp():
    preflight.check(preflight.TrainingSetup(preflight.TRAINER, "ir", torch_compile=False, deepspeed=None, fsdp="",
                                            ddp_find_unused_parameters=True))


def test_the_committed_table_is_the_one_generated_from_the_rules():
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "docs" / "refusals.md"
    text = path.read_text(encoding="utf-8")
    assert preflight.with_refusals_table(text) == text, (
        "docs/refusals.md is out of date: python -m irtuning_plugin.preflight --write docs/refusals.md")
    section = text.split("### What is refused, and why", 1)[1].split("\n## ", 1)[0]
    assert preflight.TABLE_START in section  # the generated rows are inside the section the next test reads


def test_every_row_of_the_readme_refusal_table_names_existing_tests():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    section = (root / "docs" / "refusals.md").read_text().split("### What is refused, and why", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| setting")]
    assert len(rows) >= 10
    for row in rows:
        refs = re.findall(r"`([^`]*::[^`]+)`", row.rsplit("|", 2)[1])
        assert refs, row
        path = None
        for ref in refs:
            file, name = ref.split("::", 1)
            path = file or path
            name = name.split("[", 1)[0]
            assert f"def {name}(" in (root / path).read_text(), (path, name)
