"""The paper's classifier setup (last-token head + LoRA SEQ_CLS) on a plain Trainer with our callback."""

from __future__ import annotations

import json

import pytest
import torch

from irtuning_plugin.config import SelectionConfig
from irtuning_plugin.layer_map import build_layer_map
from irtuning_plugin.tasks.revision_task import INTENTION
from irtuning_plugin.tasks.seq_classification import (
    SETUP_FILE,
    SeqClsSettings,
    build_seq_cls_model,
    class_logits,
    load_records,
    load_seq_cls_for_eval,
    prompt_of,
    train_seq_cls,
)

SMALL = SeqClsSettings(lora_r=4, lora_alpha=8, lora_dropout=0.0, max_length=128)
STEPS = 3
TRAINING = {"max_steps": STEPS, "per_device_train_batch_size": 4, "learning_rate": 5e-3, "warmup_steps": 0,
            "logging_steps": 1, "use_cpu": True, "seed": 5}
# small-run settings that make every strategy act within 3 steps on an 8-layer model
OPTIONS = {"ist": {"first_update": 1, "update_every": 1, "estimation_batch": 4},
           "lisa": {"interval": 1}, "salf": {"calibration_batches": 2}, "fixed": {"layers": [6, 7]}}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from irtuning_plugin.tasks.assets.references import revision_data_dir

    src = revision_data_dir()
    out = tmp_path_factory.mktemp("seqcls-data")
    for split, n in (("train", 24), ("val", 10), ("test", 10)):
        lines = (src / f"{split}.jsonl").read_text().splitlines()[:n]
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    (out / "manifest.json").write_text((src / "manifest.json").read_text())
    return out


def _head_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "score" in n and p.requires_grad}


def test_head_is_trained_outside_the_layer_map(tiny_model_dir):
    model, tok = build_seq_cls_model(str(tiny_model_dir), INTENTION, SMALL)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    head = [n for n in trainable if "score" in n]
    assert head and all("modules_to_save" in n for n in head)  # peft's trained copy of the head
    lm = build_layer_map(model, "adapter")
    assert lm.num_layers == 8
    assert sorted(lm.outside_trainable) == sorted(head)  # reported, never toggled
    in_layers = {n for ns in lm.names for n in ns}
    assert in_layers and all("lora_" in n for n in in_layers)
    assert model.config.pad_token_id == tok.pad_token_id is not None and tok.padding_side == "right"


@pytest.mark.parametrize("strategy", ["ir", "ist", "lisa", "random", "salf", "all", "fixed"])
def test_every_strategy_trains_the_head_and_only_selected_layers(tmp_path, tiny_model_dir, small_data, strategy,
                                                                 monkeypatch):
    import irtuning_plugin.tasks.seq_classification as sc

    built = {}
    real_build = sc.build_seq_cls_model

    def keep(*args, **kwargs):
        built["model"], tok = real_build(*args, **kwargs)
        built["start"] = {n: p.detach().clone() for n, p in built["model"].named_parameters()}
        return built["model"], tok

    monkeypatch.setattr(sc, "build_seq_cls_model", keep)
    selection = SelectionConfig(strategy=strategy, strategy_options=OPTIONS.get(strategy, {}))
    res = train_seq_cls(str(tiny_model_dir), small_data, tmp_path / "out", selection=selection, settings=SMALL,
                        training=TRAINING)
    model, start = built["model"], built["start"]
    assert res["steps"] == STEPS and len(res["selection_rows"]) == STEPS
    assert all(torch.isfinite(torch.tensor(res["losses"])))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), start[n])}
    head = {n for n in start if "score" in n and "modules_to_save" in n}
    assert head and head <= changed, "the classification head must train under every strategy"
    lm = build_layer_map(model, "adapter")
    trained_layers = {i for row in res["selection_rows"] for i in row["active"]}
    for i in range(lm.num_layers):
        layer_changed = any(f"layers.{i}." in n and "lora_B" in n for n in changed)
        assert layer_changed == (i in trained_layers), (strategy, i, trained_layers)
    if strategy == "salf":
        assert res["selection_rows"][0]["salf_source"] == "calibration"  # read through the classification head
    saved = json.loads((tmp_path / "out" / SETUP_FILE).read_text())
    assert saved["labels"] == list(INTENTION.labels) and saved["strategy"] == strategy


def test_saved_classifier_reloads_with_the_same_logits(tmp_path, tiny_model_dir, small_data):
    import irtuning_plugin.tasks.seq_classification as sc

    holder = {}
    real_build = sc.build_seq_cls_model

    def keep(*args, **kwargs):
        holder["model"], holder["tok"] = real_build(*args, **kwargs)
        return holder["model"], holder["tok"]

    sc.build_seq_cls_model = keep
    try:
        train_seq_cls(str(tiny_model_dir), small_data, tmp_path / "out", selection=SelectionConfig(strategy="ir"),
                      settings=SMALL, training=TRAINING)
    finally:
        sc.build_seq_cls_model = real_build
    records, task = load_records(small_data, "test")
    prompts = [prompt_of(r, task) for r in records]
    before = class_logits(holder["model"], holder["tok"], prompts, batch_size=3)
    model, tok, labels = load_seq_cls_for_eval(str(tiny_model_dir), str(tmp_path / "out"))
    after = class_logits(model, tok, prompts, batch_size=10)  # other batch composition, same logits
    assert labels == INTENTION.labels and before.shape == (10, 5)
    assert torch.allclose(before, after, atol=1e-5), (before - after).abs().max()


def test_full_finetune_lisa_trains_head_and_drawn_layers(tmp_path, tiny_model_dir, small_data):
    settings = SeqClsSettings(full_finetune=True, max_length=128)
    selection = SelectionConfig(strategy="lisa", scope="full", strategy_options={"n_layers": 2, "interval": 1})
    res = train_seq_cls(str(tiny_model_dir), small_data, tmp_path / "out", selection=selection, settings=settings,
                        training={**TRAINING, "max_steps": 2})
    assert res["steps"] == 2 and all(r["n_active"] == 2 for r in res["selection_rows"])
    model, _, labels = load_seq_cls_for_eval(str(tmp_path / "out"))
    assert model.score.weight.shape == (len(labels), 64)


def test_bad_setups_are_refused(tmp_path, tiny_model_dir, small_data):
    with pytest.raises(ValueError, match="irtuning_lisa_train_outside=false would freeze the classification head"):
        train_seq_cls(str(tiny_model_dir), small_data, tmp_path / "o",
                      selection=SelectionConfig(strategy="lisa", strategy_options={"train_outside": False}),
                      settings=SMALL, training=TRAINING)
    with pytest.raises(ValueError, match="irtuning_scope='full' but the model is set up for LoRA"):
        train_seq_cls(str(tiny_model_dir), small_data, tmp_path / "o", selection=SelectionConfig(scope="full"),
                      settings=SMALL, training=TRAINING)


def test_salf_reads_a_classifier_through_its_head(tiny_model_dir, small_data):
    """The last point of the deviation curve is the classifier's own loss (mixed lengths, right padding)."""
    from transformers import DataCollatorWithPadding

    from irtuning_plugin.salf_calibration import CalibrationError, deviation_curve
    from irtuning_plugin.tasks.seq_classification import PromptDataset

    model, tok = build_seq_cls_model(str(tiny_model_dir), INTENTION, SMALL)
    records, task = load_records(small_data, "train")
    ds = PromptDataset(records[:6], task, tok, 128)
    batch = DataCollatorWithPadding(tok)([ds[i] for i in range(6)])
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # padding is exercised
    layers = build_layer_map(model, "adapter").layers
    curve = deviation_curve(model, layers, [batch])
    with torch.no_grad():
        loss = model(**batch).loss.item()
    assert len(curve.deviation) == 9 and curve.tokens == 6
    assert curve.deviation[-1] == pytest.approx(loss, rel=1e-5)
    with pytest.raises(CalibrationError, match="irtuning_salf_metric='vocab_semantics' reads through a vocabulary"):
        deviation_curve(model, layers, [batch], metric="vocab_semantics")


@pytest.mark.slow
def test_setup_comparison_benchmark_runs(tmp_path, tiny_model_dir):
    """benchmarks/compare_setups.py on the tiny model: both setups train the same steps and report."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "compare_setups.py"
    out = tmp_path / "setups.json"
    proc = subprocess.run([sys.executable, str(script), "--model", str(tiny_model_dir), "--steps", "2",
                           "--eval-n", "5", "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for name in ("completion", "seq_cls"):
        s = res["setups"][name]
        assert s["steps"] == 2 and len(s["layers_per_step"]) == 2 and s["after"]["n"] == 5
    assert res["setups"]["seq_cls"]["head_params"] == 5 * 64 and res["setups"]["completion"]["head_params"] == 0
