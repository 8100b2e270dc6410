"""``irtuning plan``: counts equal a real CPU step, the per-layer decomposition equals a whole-model count,
every recipe kind plans, and bad input gets one line and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from irtuning_plugin.planner import core
from irtuning_plugin.planner.count import (
    CountSetup,
    apply_states,
    build_meta_model,
    count_costs,
    count_whole,
    step_count,
)
from irtuning_plugin.planner.counters import SavedBytes
from irtuning_plugin.planner.inputs import ARCH_DIR
from irtuning_plugin.planner.selection import Selection

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "yaml_recipes"
TINY = json.loads((ARCH_DIR / "tiny-llama.json").read_text())


def _setup(scope: str, **kw) -> CountSetup:
    return CountSetup(config_json=json.dumps(TINY, sort_keys=True), scope=scope, lora_r=4, lora_alpha=8,
                      weight_dtype="fp32", train_outside=scope == "full", **kw)


@pytest.mark.parametrize("scope,active", [("adapter", [2, 5, 6]), ("adapter", list(range(8))), ("full", [3, 7])])
def test_per_layer_counts_add_up_to_a_whole_model_count(scope, active):
    setup = _setup(scope)
    costs = count_costs(setup, 2, 24, num_layers=8)
    parts = step_count(costs, active, train_outside=setup.train_outside, checkpointing=False)
    whole = count_whole(setup, 2, 24, 8, active)
    assert parts.saved_bytes == whole["saved_bytes"]
    assert parts.fwd_flops == whole["fwd_flops"]
    assert parts.bwd_flops == whole["bwd_flops"]


@pytest.mark.parametrize("scope,active", [("adapter", [1, 4, 6]), ("full", [2, 5])])
def test_prediction_equals_a_real_cpu_step(scope, active):
    """Gradient, optimizer and saved-activation bytes predicted from the meta counts equal the engine's
    memory_account() and a saved-tensor count of a real step (tiny Llama, fp32, CPU sdpa)."""
    from irtuning_plugin.config import SelectionConfig
    from irtuning_plugin.engine import LayerSelectionEngine

    setup = _setup(scope)
    batch, seq, L = 2, 16, 8
    torch.manual_seed(0)
    model = build_meta_model(setup, L, device="cpu")
    config = SelectionConfig(strategy="fixed", scope=scope, strategy_options={"layers": active},
                             selection_log=False, heatmap=False)
    engine = LayerSelectionEngine(model, config, seed=0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, foreach=False)
    engine.begin(optimizer)
    ids = torch.randint(0, TINY["vocab_size"], (batch, seq))
    saved = SavedBytes(model)
    with saved:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    account = engine.memory_account()

    spec = core.RowSpec(label="t", count=setup, selection=Selection([active], "fixed", (3, 3), list(active)),
                        batch=batch, seq=seq, num_layers=L, checkpointing=False, precision="fp32", foreach=False)
    m = core.Planner().memory(spec, batch)
    costs = m["costs"]
    assert m["saved"] == saved.bytes
    assert m["grads"] == account["grad_bytes_host"] + account["grad_bytes_accelerator"]
    n_tensors = len(active) * costs.layer_trainable_tensors + costs.outside_trainable_tensors
    step_scalars = 4 * n_tensors  # AdamW's per-tensor 'step' (fp32 scalar; on the host on a GPU)
    assert m["opt_device"] + step_scalars == account["optimizer_state_bytes_host"] + account[
        "optimizer_state_bytes_accelerator"]
    assert m["trainable_w"] == account["trainable_param_bytes_host"] + account["trainable_param_bytes_accelerator"]


def test_counts_extend_exactly_to_larger_batches():
    setup = _setup("adapter")
    planner = core.Planner()
    at5 = planner.costs(setup, 24, 8, 5)  # from the counts at batch 2 and 3
    direct = count_costs(setup, 5, 24, num_layers=8)
    assert (at5.saved, at5.outside_saved, at5.fwd_flops, at5.bwd_flops, at5.layer_input_bytes) == (
        direct.saved, direct.outside_saved, direct.fwd_flops, direct.bwd_flops, direct.layer_input_bytes)


def test_flash_like_kernel_saves_what_cpu_sdpa_saves():
    """The stand-in kernel of sdpa/flash saves the bytes that torch's CPU flash kernel saves."""
    setup = _setup("adapter")
    meta = count_costs(setup, 2, 16, num_layers=8)
    cpu = build_meta_model(setup, 4, device="cpu")
    apply_states(cpu, setup, [1, 2])
    ids = torch.randint(0, 100, (2, 16))
    saved = SavedBytes(cpu)
    with saved:
        cpu(input_ids=ids, labels=ids).loss.backward()
    assert saved.bytes == meta.outside_saved + sum(meta.saved[s] for s in ("below", "lowest", "trained", "frozen"))


def test_checkpointing_keeps_layer_inputs_and_offload_counts_moments():
    setup = _setup("adapter")
    costs = count_costs(setup, 1, 32, num_layers=8)
    full = step_count(costs, list(range(8)), train_outside=False, checkpointing=False)
    ck = step_count(costs, list(range(8)), train_outside=False, checkpointing=True)
    assert ck.saved_bytes == costs.outside_saved + 8 * costs.layer_input_bytes < full.saved_bytes
    assert ck.bwd_flops == full.bwd_flops + costs.fwd_flops["lowest"] + 7 * costs.fwd_flops["trained"]
    sel = Selection([[0, 1], [1, 2], [1, 2]], "t", (2, 2), list(range(8)))
    spec = core.RowSpec(label="t", count=setup, selection=sel, batch=1, seq=32, num_layers=8, checkpointing=False,
                        frozen_optimizer_state="cpu", precision="fp32")
    plan = core.Planner().plan(spec, "h100")
    moments = 2 * costs.layer_trainable_bytes
    assert plan.offload_bytes_per_step_max == 2 * moments  # layer 0 leaves, layer 2 enters
    # on the device: two consecutive sets together ({0, 1} and {1, 2}: 3 layers); on the host: all but the set
    assert plan.optimizer_device_bytes == 3 * moments and plan.optimizer_host_bytes == 6 * moments


def _plan(argv: list[str]) -> tuple[int, str]:
    from irtuning_plugin.plan import add_arguments, main

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(argv)
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(args)
    return rc, out.getvalue() + err.getvalue()


def test_axolotl_recipe_plans():
    rc, out = _plan([str(RECIPES / "demo-smollm2-ir.yaml"), "--json"])
    assert rc == 0, out
    data = json.loads(out)
    row = data["rows"][0]
    assert data["model"] == "smollm2-135m-instruct" and data["num_layers"] == 30 and data["batch"] == 4
    assert data["precision"] == "fp32" and row["label"].startswith("recipe: ir")
    assert 1 <= row["layers"]["layers_min"] <= row["layers"]["layers_max"] <= 30
    assert row["bwd_flops_ratio_to_all"] < 1.0


def test_llamafactory_recipe_plans():
    rc, out = _plan([str(RECIPES / "llamafactory" / "smollm2-lisa-full.yaml"), "--json", "--compare"])
    assert rc == 0, out
    rows = {r["label"]: r for r in json.loads(out)["rows"]}
    lisa = rows["recipe: lisa full (keep)"]
    assert lisa["layers"]["layers_max"] == 2
    full = rows["full fine-tuning"]
    lora = rows["plain LoRA"]
    assert lora["peak_allocated_bytes"] < lisa["peak_allocated_bytes"] <= full["peak_allocated_bytes"]


def test_flags_only_plans_and_markdown():
    rc, out = _plan(["--model", "tiny-llama", "--batch", "2", "--seq", "64", "--strategy", "ir",
                     "--frozen-optimizer-state", "cpu", "--markdown", "--gpu", "4090"])
    assert rc == 0, out
    assert out.startswith("**tiny-llama (8 layers)") and "| recipe: ir LoRA (cpu) |" in out
    assert "step time is a MODEL" in out


def test_recipe_without_irtuning_keys_plans_plain_training(tmp_path):
    recipe = tmp_path / "plain.yaml"
    recipe.write_text("base_model: irtuning://smollm2-135m-instruct\nadapter: lora\nlora_r: 16\n"
                      "lora_target_modules: [q_proj, v_proj]\nmicro_batch_size: 2\nsequence_len: 128\nbf16: true\n")
    rc, out = _plan([str(recipe), "--json"])
    assert rc == 0, out
    row = json.loads(out)["rows"][0]
    assert row["label"] == "recipe: plain LoRA" and row["layers"]["layers_min"] == 30
    # LoRA r16 on q (576->576) and v (576->192) in 30 layers: counted from the meta model
    assert row["trainable_params"] == 30 * 16 * ((576 + 576) + (576 + 192))
    full = tmp_path / "full.yaml"
    full.write_text("model_name_or_path: irtuning://smollm2-135m-instruct\nfinetuning_type: full\nbf16: true\n"
                    "per_device_train_batch_size: 1\ncutoff_len: 256\n")
    rc, out = _plan([str(full), "--json"])
    assert rc == 0, out
    row = json.loads(out)["rows"][0]
    assert row["label"] == "recipe: plain full" and row["trainable_params"] > 130_000_000


@pytest.mark.parametrize("argv,needle", [
    (["--model", "no-such-arch"], "unknown model 'no-such-arch'"),
    (["--model", "tiny-llama", "--batch", "2.5"], "--batch='2.5': must be a whole number"),
    (["--model", "tiny-llama", "--strategy", "nope"], "nope"),
    (["--model", "tiny-llama", "--set", "irtuning_bogus=1"], "irtuning_bogus is not an irtuning key"),
])
def test_bad_input_gives_one_line(argv, needle):
    rc, out = _plan(argv)
    assert rc != 0
    assert len(out.strip().splitlines()) == 1 and needle in out and "Traceback" not in out


def test_bad_configs_and_recipe_keys_give_one_line(tmp_path):
    nolayers = tmp_path / "config.json"
    nolayers.write_text(json.dumps({k: v for k, v in TINY.items() if k != "num_hidden_layers"}))
    rc, out = _plan(["--model", str(nolayers)])
    assert rc != 0 and "has no num_hidden_layers" in out and len(out.strip().splitlines()) == 1
    unknown = tmp_path / "u.json"
    unknown.write_text(json.dumps(dict(TINY, model_type="qwen_remote")))
    rc, out = _plan(["--model", str(unknown)])
    assert rc != 0 and "unknown architecture model_type='qwen_remote'" in out
    q = tmp_path / "q.yaml"
    q.write_text("base_model: irtuning://tiny-llama\nadapter: lora\nload_in_4bit: true\nlora_target_linear: true\n")
    rc, out = _plan([str(q)])
    assert rc != 0 and out.strip() == "irtuning plan: load_in_4bit=True: the planner cannot honour it (4-bit (QLoRA) " \
                                      "weights are not counted)"


def test_every_shipped_recipe_plans():
    import yaml

    recipes = [r for r in sorted(RECIPES.rglob("*.yaml"))
               if {"base_model", "model_name_or_path"} & set(yaml.safe_load(r.read_text()) or {})]
    assert len(recipes) >= 30  # the demo, 24 ITERATER recipes at 7-8B, the LLaMA-Factory ones
    for r in recipes:
        rc, out = _plan([str(r), "--json"])
        assert rc == 0, f"{r.name}: {out}"
        row = json.loads(out)["rows"][0]
        assert row["peak_reserved_bytes"] > row["frozen_weight_bytes"] + row["trainable_weight_bytes"]


def test_cli_entry_point_one_line_error():
    proc = subprocess.run([sys.executable, "-m", "irtuning_plugin.cli", "plan", "--model", "tiny-llama", "--seq", "x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("irtuning plan:")]
    assert lines == ["irtuning plan: --seq='x': must be a whole number >= 1"], proc.stderr
    assert "Traceback" not in proc.stderr


def test_replay_maps_recorded_layers_to_the_target_depth(tmp_path):
    rec = tmp_path / "irtuning_selection.jsonl"
    rows = [{"step": 1, "active": [0, 1, 2, 3, 4, 5, 6, 7], "scores": [1.0] * 8},
            {"step": 2, "active": [6, 7], "scores": [1.0] * 8}]
    rec.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    rc, out = _plan(["--model", "llama-3.1-8b-instruct", "--batch", "1", "--seq", "64", "--strategy", "ir",
                     "--selection", str(rec), "--json"])
    assert rc == 0, out
    lay = json.loads(out)["rows"][0]["layers"]
    # 8 recorded layers -> 32: each stands for 4; [6, 7] -> 24..31
    assert (lay["layers_min"], lay["layers_max"], lay["steps"]) == (8, 32, 2) and "replayed 2 steps" in lay["source"]
    rec.write_text("{\"step\": 1}\n")
    rc, out = _plan(["--model", "tiny-llama", "--strategy", "ir", "--selection", str(rec)])
    assert rc != 0 and "line 1 is not an irtuning_selection.jsonl row" in out
