"""The launcher's checks: our keys as on Axolotl, then the LLaMA-Factory settings that cannot work."""

import subprocess
import sys
from pathlib import Path

import pytest

from irtuning_plugin.llamafactory_integration.launcher import check_recipe, load_recipe, resolve_recipe

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "yaml_recipes" / "llamafactory").glob("*.yaml"))
IR_RECIPE = REPO / "yaml_recipes" / "llamafactory" / "smollm2-ir-lora.yaml"
IRTUNING = str(Path(sys.executable).parent / "irtuning")


def tiny_recipe(**over):
    cfg = load_recipe(IR_RECIPE)
    cfg["model_name_or_path"] = "irtuning://tiny-llama"
    cfg.update(over)
    return {k: v for k, v in cfg.items() if v is not None}


def check(cfg):
    return check_recipe(resolve_recipe(cfg))


def test_recipe_keys_reach_the_config():
    config = check(tiny_recipe(irtuning_ir_boundary="strict", irtuning_kernel_backend="torch"))
    assert config.strategy == "ir" and config.strategy_options == {"boundary": "strict"}
    assert config.kernel_backend == "torch"


@pytest.mark.parametrize("over,fragment", [
    ({"irtuning_strategy": None}, "irtuning_strategy is not set"),
    ({"irtuning_strategy": None, "irtuning_ir_interval": 2}, "irtuning_strategy is not set but irtuning_ir_interval is"),
    ({"irtuning_strategy": "lasso"}, "irtuning_strategy='lasso' is not a strategy; allowed: "),
    ({"irtuning_windw": 0.3}, "irtuning_windw is not an irtuning key"),
    ({"irtuning_ir_interval": 0}, "irtuning_ir_interval=0; must be >= 1"),
    ({"irtuning_lisa_n_layers": 2}, "irtuning_lisa_n_layers is an option of strategy 'lisa'"),
    ({"irtuning_layers_path": "model.blocks"}, "irtuning_layers_path='model.blocks' does not resolve"),
    ({"irtuning_strategy": "lisa", "irtuning_lisa_n_layers": 9}, "irtuning_lisa_n_layers=9 exceeds the model's 8"),
    ({"finetuning_type": "freeze"}, "finetuning_type: freeze freezes layers itself"),
    ({"finetuning_type": "oft"}, "finetuning_type='oft' is not supported with irtuning"),
    ({"finetuning_type": "full"}, "irtuning_scope='adapter' (the default) selects LoRA layers but finetuning_type='full'"),
    ({"irtuning_scope": "full"}, "irtuning_scope='full' selects whole layers but finetuning_type='lora'"),
    ({"irtuning_strategy": "ist", "irtuning_scope": "full", "finetuning_type": "full"},
     "irtuning_strategy='ist' works only with irtuning_scope: adapter"),
    ({"use_badam": True}, "use_badam: BAdam trains one block of layers at a time itself"),
    ({"use_llama_pro": True}, "use_llama_pro: LLaMA Pro trains only its expanded blocks"),
    ({"use_galore": True, "galore_layerwise": True}, "galore_layerwise: layer-wise GaLore"),
    ({"use_ray": True}, "use_ray: Ray trains in worker processes"),
    ({"deepspeed": "examples/deepspeed/ds_z3_config.json"}, "deepspeed is set: irtuning does not support DeepSpeed"),
    ({"fsdp": "full_shard"}, "fsdp is set: irtuning does not support FSDP"),
    ({"torch_compile": True}, "torch_compile=True with irtuning_strategy='ir'"),
    ({"stage": "ppo"}, "stage='ppo' runs its own training loop"),
    ({"do_train": False}, "do_train is not true"),
    ({"ddp_find_unused_parameters": False}, "ddp_find_unused_parameters: false"),
    ({"dataset_dir": "irtuning://other-data"}, "dataset_dir='irtuning://other-data'; allowed reference"),
])
def test_bad_recipes_are_refused_before_training(over, fragment):
    with pytest.raises(ValueError) as err:
        check(tiny_recipe(**over))
    assert fragment in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipes_validate(recipe):
    cfg = load_recipe(recipe)
    config = check(cfg)
    assert cfg["irtuning_strategy"] == config.strategy
    assert (config.scope == "full") == (cfg["finetuning_type"] == "full")


def test_recipe_set_covers_the_strategies():
    assert {p.stem for p in RECIPES} >= {"smollm2-ir-lora", "smollm2-ist-lora", "smollm2-lisa-lora",
                                         "smollm2-salf-lora", "smollm2-lisa-full"}


def test_cli_error_is_one_line_and_nothing_loads(tmp_path):
    """A bad key ends the command with one line and exit code 2, before LLaMA-Factory or a model loads."""
    proc = subprocess.run([IRTUNING, "llamafactory", "train", str(IR_RECIPE), "irtuning_ir_window_low=0.9",
                           f"output_dir={tmp_path}/out"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert lines[-1].startswith("irtuning llamafactory: error: irtuning_ir_window_low=0.9"), proc.stderr
    assert "Traceback" not in proc.stderr and "llamafactory." not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_check_accepts_a_recipe():
    proc = subprocess.run([IRTUNING, "llamafactory", "check", str(IR_RECIPE), "model_name_or_path=irtuning://tiny-llama"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ok (irtuning_strategy ir, scope adapter)" in proc.stdout


def _one_error_line(proc) -> str:
    lines = [x for x in proc.stderr.splitlines() if x.strip() and not x.startswith(("INFO ", "WARNING "))]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_cli_check_runs_llamafactorys_own_parsing():
    """`check` ok must mean `train` will not refuse: a key LLaMA-Factory does not know is refused by check too
    (before, check said ok and train stopped in HfArgumentParser)."""
    proc = subprocess.run([IRTUNING, "llamafactory", "check", str(IR_RECIPE), "model_name_or_path=irtuning://tiny-llama",
                           "not_a_llamafactory_key=1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert "LLaMA-Factory refuses the recipe" in line and "not_a_llamafactory_key" in line


def test_cli_train_with_a_missing_recipe_is_one_line(tmp_path):
    proc = subprocess.run([IRTUNING, "llamafactory", "train", str(tmp_path / "nope.yaml")], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert "nope.yaml" in _one_error_line(proc) and "not found" in _one_error_line(proc)


def test_cli_train_with_a_layer_count_error_is_one_line(tmp_path):
    """The count is checked against the real model only once the asset is resolved, inside `train`: that used
    to end in a traceback, while `check` reported the same error in one line."""
    proc = subprocess.run([IRTUNING, "llamafactory", "train", str(IR_RECIPE), "model_name_or_path=irtuning://tiny-llama",
                           "irtuning_strategy=lisa", "irtuning_lisa_n_layers=99", f"output_dir={tmp_path / 'out'}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert "irtuning_lisa_n_layers" in line
    assert not (tmp_path / "out").exists()
