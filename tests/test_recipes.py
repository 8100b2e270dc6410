"""The recipe library (yaml_recipes/iterater/<model>/<method>-<lora|full>.yaml).

Every recipe is (1) validated by Axolotl with our plugin on a meta-device model of its real architecture,
built from the config.json the tests ship (real layer count and sizes: tests/fixtures/architectures), (2)
trained for 2 steps with the model swapped for the tiny Llama, and (3) checked against the key table
in docs/keys.md and the paper's settings, so that a recipe cannot drift from either.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
LIBRARY = REPO / "yaml_recipes" / "iterater"
ARCH = Path(__file__).resolve().parent / "fixtures" / "architectures"
ITERATER_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "iterater_human_sent"

# facts of the three architectures: hub id, decoder layers, parameters (the published totals)
MODELS = {
    "llama-3.1-8b-instruct": ("meta-llama/Llama-3.1-8B-Instruct", 32, 8_030_261_248),
    "mistral-7b-instruct-v0.3": ("mistralai/Mistral-7B-Instruct-v0.3", 32, 7_248_023_552),
    "qwen3-8b": ("Qwen/Qwen3-8B", 36, 8_190_735_360),
}
LORA_METHODS = ("ir", "ist", "lisa", "random", "salf", "all")
FULL_METHODS = ("ir", "lisa")
RECIPES = [(m, f"{s}-lora") for m in MODELS for s in LORA_METHODS] + \
          [(m, f"{s}-full") for m in MODELS for s in FULL_METHODS]
IDS = [f"{m}/{r}" for m, r in RECIPES]
PAPER = {"sequence_len": 256, "micro_batch_size": 16, "gradient_accumulation_steps": 1, "num_epochs": 4,
         "lr_scheduler": "linear", "warmup_steps": 100, "seed": 171}
PAPER_LORA = {"adapter": "lora", "lora_r": 32, "lora_alpha": 64, "lora_dropout": 0.05, "learning_rate": 2e-4,
              "lora_target_modules": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]}


def load(model: str, name: str) -> dict:
    return yaml.safe_load((LIBRARY / model / f"{name}.yaml").read_text())


def validate(cfg: dict):
    from axolotl.cli.config import prepare_plugins
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    cfg = DictDefault(cfg)
    prepare_plugins(cfg)
    return validate_config(cfg)


def test_library_layout():
    found = sorted(str(p.relative_to(LIBRARY)) for p in LIBRARY.rglob("*.yaml"))
    assert found == sorted(f"{m}/{r}.yaml" for m, r in RECIPES)
    index = (REPO / "yaml_recipes" / "README.md").read_text()
    for model, name in RECIPES:
        assert f"iterater/{model}/{name}.yaml" in index, (model, name)


@pytest.mark.parametrize("model", list(MODELS))
def test_shipped_architecture_configs_have_the_real_sizes(model):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from irtuning_plugin.layer_map import find_decoder_layers

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ARCH / model))
    _, layers = find_decoder_layers(m)
    assert len(layers) == MODELS[model][1]
    assert sum(p.numel() for p in m.parameters()) == MODELS[model][2]


@pytest.mark.parametrize("model,name", RECIPES, ids=IDS)
def test_recipe_validates_on_a_meta_model_of_its_architecture(model, name, monkeypatch):
    from irtuning_plugin import preflight

    cfg = load(model, name)
    assert cfg["base_model"] == MODELS[model][0]
    cfg["base_model"] = str(ARCH / model)  # the real architecture, no weights
    built = []
    real = preflight.meta_model
    monkeypatch.setattr(preflight, "meta_model", lambda *a: built.append(real(*a)) or built[-1])
    out = validate(cfg)
    assert out.irtuning_strategy == name.split("-")[0]
    assert len(built) == 1 and built[0] is not None and str(built[0].device) == "meta"
    from irtuning_plugin.layer_map import find_decoder_layers

    assert len(find_decoder_layers(built[0])[1]) == MODELS[model][1]


@pytest.mark.parametrize("model", list(MODELS))
def test_meta_validation_refuses_options_the_architecture_cannot_take(model):
    cfg = load(model, "lisa-lora")
    cfg["base_model"] = str(ARCH / model)
    L = MODELS[model][1]
    cfg["irtuning_lisa_n_layers"] = L + 1
    with pytest.raises(Exception, match=f"irtuning_lisa_n_layers={L + 1} exceeds the model's {L} layers"):
        validate(cfg)


def _key_table() -> dict[str, object]:
    text = (REPO / "docs" / "keys.md").read_text()
    table = text.split("<!-- keys:start -->", 1)[1].split("<!-- keys:end -->", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in table.splitlines() if line.startswith("|")]
    col = rows[0].index("default")  # the table's columns may grow; find the one that holds the default
    out = {}
    for row in rows[2:]:
        key = re.fullmatch(r"`(irtuning_[a-z0-9_]+)`", row[0])
        if key:
            out[key.group(1)] = eval(row[col].strip("`"), {"None": None, "True": True, "False": False})  # noqa: S307
    return out


@pytest.mark.parametrize("model,name", RECIPES, ids=IDS)
def test_recipe_follows_the_key_table_and_the_paper(model, name):
    from irtuning_plugin.config import all_flat_keys

    table = _key_table()
    assert table.keys() == all_flat_keys().keys(), "docs/keys.md key table is stale: regenerate it (irtuning keys --write-readme docs/keys.md)"
    cfg = load(model, name)
    method, tuning = name.split("-")
    ours = {k: v for k, v in cfg.items() if k.startswith("irtuning_")}
    assert set(ours) <= set(table), sorted(set(ours) - set(table))
    assert ours["irtuning_strategy"] == method
    assert ours.get("irtuning_scope", "adapter") == ("full" if tuning == "full" else "adapter")
    # every option of the method that has a default is spelled out, at that default
    own = {k: v for k, v in table.items() if k.startswith(f"irtuning_{method}_") and v is not None}
    assert {k: v for k, v in ours.items() if k.startswith(f"irtuning_{method}_")} == own
    for key, value in PAPER.items():
        assert cfg[key] == value, key
    if tuning == "lora":
        for key, value in PAPER_LORA.items():
            assert cfg[key] == value, key
    else:
        assert "adapter" not in cfg and cfg["learning_rate"] == 2e-5
    assert cfg["datasets"][0]["path"] == "./data/iterater/train.jsonl"
    assert cfg["output_dir"] == f"./outputs/iterater/{model}/{name}"
    header = [x for x in (LIBRARY / model / f"{name}.yaml").read_text().splitlines() if x.startswith("#")]
    assert any("What was run:" in x for x in header) and any("NOT run:" in x for x in header)


VENV_BIN = str(Path(sys.executable).parent)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, tiny_model_dir):
    """All recipes, each trained 2 steps on the tiny model and converted ITERATER fixture data, in one process."""
    from irtuning_plugin.tasks.converters import convert_iterater

    work = tmp_path_factory.mktemp("recipes")
    convert_iterater(ITERATER_FIXTURE, work / "data")
    spec = []
    for model, name in RECIPES:
        tag = f"{model}--{name}"
        spec.append({
            "name": tag, "recipe": str(LIBRARY / model / f"{name}.yaml"), "drop": ["special_tokens"],
            "overrides": {
                "base_model": str(tiny_model_dir),
                "datasets": [{"path": str(work / "data" / "train.jsonl"), "ds_type": "json", "type": "input_output"}],
                "output_dir": str(work / tag), "dataset_prepared_path": str(work / "prepared"),  # hashed by Axolotl
                "micro_batch_size": 2, "max_steps": 2, "bf16": False, "tf32": False, "logging_steps": 1,
                "lora_mlp_kernel": False, "lora_qkv_kernel": False, "lora_o_kernel": False,
                "dataloader_num_workers": 0, "save_strategy": "no",
            },
        })
    (work / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false",
           "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", "")}
    runner = Path(__file__).resolve().parent / "recipe_tiny_runner.py"
    proc = subprocess.run([sys.executable, str(runner), str(work / "spec.json"), str(work / "results.json")],
                          cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    (work / "runner.log").write_text(proc.stdout + proc.stderr)
    assert (work / "results.json").exists(), (proc.stdout + proc.stderr)[-4000:]
    return work, json.loads((work / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("model,name", RECIPES, ids=IDS)
def test_recipe_trains_two_steps_with_the_tiny_model(tiny_runs, model, name):
    work, results = tiny_runs
    res = results[f"{model}--{name}"]
    assert res["ok"], res.get("trace")
    method, tuning = name.split("-")
    rows = res["rows"]
    assert [r["step"] for r in rows] == [1, 2]
    assert res["run"]["strategy"] == method and res["run"]["num_layers"] == 8
    assert res["run"]["config"]["scope"] == ("full" if tuning == "full" else "adapter")
    assert len(res["run"]["losses"]) == 2
    expected = {"lisa": 2, "random": 4, "all": 8}
    if method in expected:
        assert all(r["n_active"] == expected[method] for r in rows), rows
    if method == "ist":
        assert all(r["n_active"] == 2 for r in rows)  # int(0.25 * 8)
    if method == "ir":
        assert rows[0]["n_active"] < 8  # step 1: the split of uniform random scores
        assert set(range(8)) - set(rows[0]["active"]) <= set(rows[1]["active"])  # step 2: all never-measured ones
    if method == "salf":
        assert rows[0]["salf_source"] == "calibration" and rows[0]["active"] == rows[1]["active"]
    assert res["adapter_saved"] if tuning == "lora" else res["model_saved"]


@pytest.mark.slow
def test_a_recipe_trained_model_is_evaluated_on_converted_data(tiny_runs, tiny_model_dir):
    from irtuning_plugin.tasks.evaluation import evaluate_data

    work, results = tiny_runs
    res, meta, records = evaluate_data(str(tiny_model_dir), str(work / "llama-3.1-8b-instruct--ir-lora"),
                                       work / "data", "test")
    assert meta["setup"] == "completion (label scoring)" and res.n == len(records) == 4
    assert sum(map(sum, res.confusion)) == 4
