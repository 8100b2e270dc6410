"""Axolotl helpers shared by the tests that validate a config or run `axolotl train` (tests/ and
tests/integration/, and tests_axolotl021/): a tiny-model config, Axolotl's own validation, a real run."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "yaml_recipes"
VENV_BIN = str(Path(sys.executable).parent)
# `accelerate launch` is found on PATH by Axolotl's launcher: put this environment's bin first.
AXOLOTL_ENV = {**os.environ, "AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
               "TOKENIZERS_PARALLELISM": "false",
               "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", "")}


def base_cfg(tiny_model_dir, **over):
    cfg = {
        "base_model": str(tiny_model_dir),
        "plugins": ["irtuning_plugin.IRTuningPlugin"],
        "irtuning_strategy": "ir",
        "datasets": [{"path": "irtuning://revision-intention/train.jsonl", "ds_type": "json", "type": "input_output"}],
        "adapter": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
        "lora_mlp_kernel": False, "lora_qkv_kernel": False, "lora_o_kernel": False,
        "sequence_len": 128, "micro_batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": 2,
        "learning_rate": 1e-3, "output_dir": "/tmp/irtuning-validate", "optimizer": "adamw_torch",
    }
    cfg.update(over)
    return {k: v for k, v in cfg.items() if v is not None}


def validate(cfg):
    from axolotl.cli.config import prepare_plugins
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    cfg = DictDefault(cfg)
    prepare_plugins(cfg)
    return validate_config(cfg)


def run_axolotl(tmp_path, cfg, launcher="python", extra=()):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [str(Path(VENV_BIN) / "axolotl"), "train", str(path), "--launcher", launcher, *extra]
    proc = subprocess.run(cmd, cwd=tmp_path, env=AXOLOTL_ENV, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    (tmp_path / "axolotl.log").write_text(log)
    assert proc.returncode == 0, log[-4000:]
    return log


def slice_of_train(tmp_path, n):
    from irtuning_plugin.tasks.assets.references import revision_data_dir

    rows = (revision_data_dir() / "train.jsonl").read_text().splitlines()[:n]
    out = tmp_path / "slice.jsonl"
    out.write_text("\n".join(rows) + "\n")
    return out
