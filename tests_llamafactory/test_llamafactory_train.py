"""Real LLaMA-Factory trainings (its own run_exp) with the plugin: the tiny model, then SmolLM2."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import TrainerCallback

from irtuning_plugin.llamafactory_integration import launcher

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "yaml_recipes" / "llamafactory"
IRTUNING = str(Path(sys.executable).parent / "irtuning")
pytestmark = pytest.mark.slow


class Probe(TrainerCallback):
    """Records, per optimizer step, which parameters hold gradients, the lowest decoder layer that backward
    reached (full backward hooks), and the Trainer's logged (pre-clipping) gradient norm."""

    def __init__(self, selection):
        self.selection = selection  # our callback: its engine tells the layer map and the active layers
        self.grads, self.active, self.lowest_reached, self.grad_norms, self.losses = [], [], [], [], []
        self._reached = []

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.model = model
        for i, layer in enumerate(self.selection.engine.layer_map.layers):
            layer.register_full_backward_hook(lambda m, gi, go, i=i: self._reached.append(i))

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.grads.append({n for n, p in self.model.named_parameters() if p.grad is not None})
        self.active.append(list(self.selection.engine.active))
        self.lowest_reached.append(min(self._reached) if self._reached else None)
        self._reached.clear()

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.grad_norms.append(logs.get("grad_norm"))
            self.losses.append(logs["loss"])


def tiny_cfg(tmp_path, recipe="smollm2-ir-lora", **over):
    cfg = launcher.load_recipe(RECIPES / f"{recipe}.yaml")
    cfg.update(model_name_or_path="irtuning://tiny-llama", output_dir=str(tmp_path / "out"), max_steps=8,
               logging_steps=1, max_samples=64, cutoff_len=128, warmup_steps=0, lr_scheduler_type="constant")
    cfg.update(over)
    return cfg


def run(cfg):
    probes = []
    cb = launcher.train(cfg, watchers=lambda selection: probes.append(Probe(selection)) or probes)
    return cb, probes[0]


def layer_of(name):
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def test_tiny_ir_scores_unclipped_gradients_of_the_selected_adapters(tmp_path):
    cb, probe = run(tiny_cfg(tmp_path, learning_rate=5e-3, max_grad_norm=0.01, irtuning_ir_score="l2", max_steps=10))
    rows = cb.rows
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert cb.trainer is not None and cb.engine.backward_cut is True
    assert len({tuple(r["active"]) for r in rows}) > 1  # the selection changes
    for row, grads, active in zip(rows, probe.grads, probe.active, strict=True):
        assert row["active"] == active
        # gradients exist exactly on the LoRA tensors of the selected layers: nothing else trains
        assert grads and all("lora_" in n for n in grads)
        assert {layer_of(n) for n in grads} == set(active)
        assert row["fresh"] == active
    for row, grad_norm in zip(rows, probe.grad_norms, strict=True):
        # l2 scores of the fresh layers make up the Trainer's pre-clipping norm; clipped it would be 0.01
        assert grad_norm > 0.05
        assert math.sqrt(sum(row["scores"][i] ** 2 for i in row["fresh"])) == pytest.approx(grad_norm, rel=1e-4)
    assert sum(probe.losses[-3:]) / 3 < sum(probe.losses[:3]) / 3  # the loss went down
    out = tmp_path / "out"
    logged = [json.loads(x) for x in (out / "irtuning_selection.jsonl").read_text().splitlines()]
    assert logged == json.loads(json.dumps(rows))
    run_summary = json.loads((out / "irtuning_run.json").read_text())
    assert run_summary["num_layers"] == 8 and run_summary["backward_cut"] is True


@pytest.mark.parametrize("cut", [True, False])
def test_backward_stops_at_the_lowest_trained_layer(tmp_path, cut):
    """LLaMA-Factory checkpoints reentrantly and peft installs the embedding-output hook: with the cut,
    backward stops at layer 5 (salf cut 4 trains 5..7); without it, it runs down to layer 0."""
    cb, probe = run(tiny_cfg(tmp_path, recipe="smollm2-salf-lora", irtuning_salf_cut=4, max_steps=3,
                             irtuning_cut_backward=cut))
    assert [r["active"] for r in cb.rows] == [[5, 6, 7]] * 3
    assert cb.engine.backward_cut is cut
    assert probe.lowest_reached == ([5] * 3 if cut else [0] * 3)
    assert all({layer_of(n) for n in g} == {5, 6, 7} for g in probe.grads)


@pytest.mark.parametrize("recipe,over", [
    ("smollm2-ist-lora", {"irtuning_ist_first_update": 2, "irtuning_ist_update_every": 2,
                          "irtuning_ist_estimation_batch": 4}),
    ("smollm2-lisa-lora", {"irtuning_lisa_interval": 3}),
    ("smollm2-salf-lora", {"irtuning_salf_calibration_batches": 2}),
    ("smollm2-lisa-full", {"irtuning_lisa_interval": 3, "learning_rate": 1e-3}),
])
def test_recipe_trains_on_the_tiny_model(tmp_path, recipe, over):
    cb, probe = run(tiny_cfg(tmp_path, recipe=recipe, max_steps=6, **over))
    rows = cb.rows
    assert len(rows) == 6 and cb.trainer is not None
    full = recipe.endswith("-full")
    for row, grads, active in zip(rows, probe.grads, probe.active, strict=True):
        assert row["active"] == active
        in_layers = {n for n in grads if layer_of(n) is not None}
        assert {layer_of(n) for n in in_layers} == set(active)
        if full:  # whole layers, and LISA keeps embeddings / final norm training
            assert all("lora_" not in n for n in grads)
            assert any("embed_tokens" in n for n in grads) and any(n.endswith("model.norm.weight") for n in grads)
        else:
            assert all("lora_" in n for n in grads)
    if recipe.startswith("smollm2-lisa"):
        assert all(r["n_active"] == 2 for r in rows)
        assert rows[0]["active"] == rows[1]["active"] == rows[2]["active"]  # redrawn every 3 steps
        assert rows[3]["active"] == rows[4]["active"] == rows[5]["active"]
    if recipe == "smollm2-ist-lora":
        assert all(r["n_active"] == 2 for r in rows)  # int(0.25 * 8)
        scores = [r["scores"] for r in rows]
        assert scores[0] != scores[-1]  # the importance updates ran
    if recipe == "smollm2-salf-lora":
        assert len({tuple(r["active"]) for r in rows}) == 1  # one cut for the whole run
    assert all(math.isfinite(x) for x in probe.losses)


def test_smollm2_ir_through_the_command(tmp_path, smollm2_dir):
    """The real command on the real recipe: `irtuning llamafactory train` on SmolLM2 for a few steps."""
    out = tmp_path / "out"
    steps = 6
    cmd = [IRTUNING, "llamafactory", "train", str(RECIPES / "smollm2-ir-lora.yaml"), f"max_steps={steps}",
           "logging_steps=1", "max_samples=64", "warmup_steps=0", f"output_dir={out}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    (tmp_path / "run.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert f"strategy ir: {steps} optimizer steps over 30 layers" in proc.stdout
    assert "CLIPPED" not in proc.stderr
    rows = [json.loads(x) for x in (out / "irtuning_selection.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(len(r["scores"]) == 30 for r in rows)
    assert 10 <= rows[0]["n_active"] <= 20  # 30 layers: the cut window 10..19 (+ the boundary layer)
    assert all(r["fresh"] == r["active"] for r in rows)  # gradients reached exactly the selected layers
    run_summary = json.loads((out / "irtuning_run.json").read_text())
    assert run_summary["backward_cut"] is True
    losses = [loss for _, loss in run_summary["losses"]]
    assert len(losses) == steps and sum(losses[-2:]) / 2 < sum(losses[:2]) / 2
