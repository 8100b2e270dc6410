"""LayerSelectionCallback / attach_layer_selection on a plain transformers Trainer with a tiny PEFT-wrapped Llama:
what trains, the scores, the selection log and Trainer logs, and the refusals met at train start."""

import json

import pytest
import torch
from transformers import TrainerCallback

from irtuning_plugin.callback import LayerSelectionCallback, attach_layer_selection, read_selection_log
from irtuning_plugin.config import SelectionConfig
from irtuning_plugin.engine import SelectionError
from irtuning_plugin.layer_map import LayerMapError, build_layer_map
from irtuning_plugin.strategies.ir import reference_layer_scores

from helpers_selection import Recorder, run_tiny
from helpers_tiny import make_trainer, tiny_peft_llama


def test_only_selected_layers_train_and_scores_follow_the_reference(tmp_path):
    cb, rec, _ = run_tiny(tmp_path)
    rows = cb.rows
    assert len(rows) == 8
    counts = [r["n_active"] for r in rows]
    assert len({tuple(r["active"]) for r in rows}) > 1 and min(counts) < 6  # the trained set really changes
    never_measured = {i for i, s in enumerate(rows[0]["scores"]) if s == 1000.0}
    assert never_measured and never_measured <= set(rows[1]["active"])  # step 2 trains the unmeasured layers
    for step, row in enumerate(rows):
        active = set(row["active"])
        assert active != set(range(6)), step  # the run is seeded: no step trains every layer
        for layer in range(6):
            changed = rec.changed[step][layer]
            grads = rec.has_grad[step][layer]
            if layer in active:
                assert all(changed) and all(grads), (step, layer)
            else:
                assert not any(changed), f"frozen layer {layer} changed at step {step + 1}"
                assert not any(grads), f"frozen layer {layer} has a gradient at step {step + 1}"
        # scores of this step's layers = sqrt(sum sqrt ||g||) of the UNCLIPPED gradients, recomputed here
        sq, ids = rec.unclipped_sq[step]
        expected = reference_layer_scores(sq, ids, 6)
        for layer in active:
            assert row["scores"][layer] == pytest.approx(expected[layer].item(), rel=1e-5)
        assert row["fresh"] == sorted(active)


def test_scores_of_frozen_layers_are_stale_and_sentinel_until_measured(tmp_path):
    cb, _, _ = run_tiny(tmp_path, max_steps=3)
    first, second = cb.rows[0], cb.rows[1]
    for layer in range(6):
        if layer not in first["active"]:
            assert first["scores"][layer] == 1000.0
        if layer not in second["active"]:
            assert second["scores"][layer] == first["scores"][layer]


def test_clipped_scores_differ_from_unclipped(tmp_path):
    unclipped, _, _ = run_tiny(tmp_path / "a", max_steps=1)
    clipped, _, _ = run_tiny(tmp_path / "b", max_steps=1, score_gradients="clipped")
    assert unclipped.rows[0]["active"] == clipped.rows[0]["active"]
    layer = unclipped.rows[0]["active"][0]
    assert clipped.rows[0]["scores"][layer] < unclipped.rows[0]["scores"][layer]


def test_selection_log_heatmap_and_trainer_logs(tmp_path):
    cb, _, trainer = run_tiny(tmp_path, max_steps=4, log_scores=True)
    rows = read_selection_log(tmp_path / "irtuning_selection.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows == json.loads(json.dumps(cb.rows))
    png = tmp_path / "irtuning_selection.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all("irtuning/active_layers" in h and "irtuning/score_00" in h for h in logged)
    assert [h["irtuning/active_layers"] for h in logged] == [float(r["n_active"]) for r in rows]


def test_same_seed_same_selection_different_seed_differs(tmp_path):
    a, _, _ = run_tiny(tmp_path / "a", max_steps=3, seed=5)
    b, _, _ = run_tiny(tmp_path / "b", max_steps=3, seed=5)
    assert [r["active"] for r in a.rows] == [r["active"] for r in b.rows]
    firsts = {tuple(run_tiny(tmp_path / f"s{s}", max_steps=1, seed=s)[0].rows[0]["active"]) for s in range(4)}
    assert len(firsts) > 1


def test_optimizer_missing_selectable_parameters_fails_loudly(tmp_path):
    model = tiny_peft_llama()
    lm = build_layer_map(model)
    partial = [p for ps in lm.params[:3] for p in ps]
    opt = torch.optim.AdamW(partial, lr=1e-3)
    trainer = make_trainer(model, tmp_path, optimizers=(opt, None))
    attach_layer_selection(trainer, SelectionConfig())
    with pytest.raises(SelectionError, match="not in the optimizer"):
        trainer.train()


@pytest.mark.parametrize("cut", [True, False])
def test_backward_stops_at_lowest_trained_layer(tmp_path, cut):
    """With the input-grad hook removed, no gradient reaches a layer below the lowest trained one."""
    model = tiny_peft_llama()
    model.enable_input_require_grads()  # what Axolotl 0.19 does for every adapter run
    trainer = make_trainer(model, tmp_path, max_steps=4)
    cb = attach_layer_selection(trainer, SelectionConfig(strategy="ir", cut_backward=cut))
    seen, lowest_seen = [], []

    class PerStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            lowest_seen.append(min(seen))
            seen.clear()

    for i, layer in enumerate(build_layer_map(model).layers):
        layer.register_full_backward_hook(lambda m, gi, go, i=i: seen.append(i))
    trainer.add_callback(PerStep())
    trainer.train()
    assert cb.engine.backward_cut is cut
    if cut:
        assert lowest_seen == [r["lowest_active"] for r in cb.rows]
        assert max(lowest_seen) > 0  # some step really stopped above layer 0
    else:
        assert lowest_seen == [0] * 4


def test_manual_callback_without_trainer_scores_clipped_gradients(tmp_path):
    model = tiny_peft_llama()
    trainer = make_trainer(model, tmp_path, max_steps=2)
    cb = LayerSelectionCallback(SelectionConfig(), model)
    trainer.add_callback(cb)
    trainer.train()
    assert len(cb.rows) == 2 and cb.rows[0]["fresh"] == cb.rows[0]["active"]


# ---- issue 17: NaN gradients, layers with nothing selectable, nn.Sequential, gradient checkpointing --------
class NaNFromStep(TrainerCallback):
    """Makes one LoRA gradient of ``layer`` NaN from optimizer step ``start`` (1-based) on."""

    def __init__(self, param, start):
        self.on, self.start = False, start
        param.register_hook(lambda g: g * float("nan") if self.on else g)

    def on_step_begin(self, args, state, control, **kw):
        self.on = state.global_step + 1 >= self.start


def test_nonfinite_gradients_are_logged_per_row_and_warned_once(tmp_path, caplog):
    model = tiny_peft_llama()
    trainer = make_trainer(model, tmp_path, max_steps=4)
    attach_layer_selection(trainer, SelectionConfig(strategy="all"))
    trainer.add_callback(NaNFromStep(build_layer_map(model).params[3][0], start=2))
    with caplog.at_level("WARNING", logger="irtuning_plugin.engine"):
        trainer.train()
    rows = read_selection_log(tmp_path / "irtuning_selection.jsonl")
    assert rows[0]["nonfinite_layers"] == []
    assert rows[1]["nonfinite_layers"] == [3]  # only that gradient is NaN at step 2 (no clipping)
    assert rows[1]["scores"][3] == 1000.0  # the reference's rule stays the default
    assert all(r["nonfinite_layers"] for r in rows[1:])  # NaN weights keep every later step non-finite
    warnings = [r.getMessage() for r in caplog.records if "NON-FINITE" in r.getMessage()]
    assert len(warnings) == 1 and "optimizer step 2" in warnings[0] and "[3]" in warnings[0]
    run = json.loads((tmp_path / "irtuning_run.json").read_text())
    assert run["nonfinite_steps"] == [2, 3, 4]


def test_nonfinite_flag_is_only_set_for_measured_layers(tmp_path):
    """A frozen (unmeasured) layer has a NaN placeholder norm inside the kernel, which is not a NaN gradient."""
    cb, _, _ = run_tiny(tmp_path, max_steps=3)
    assert all(r["nonfinite_layers"] == [] for r in cb.rows)
    assert any(len(r["fresh"]) < 6 for r in cb.rows)


def _freeze_layer0(model):
    for name, p in model.named_parameters():
        if "layers.0." in name and "lora_" in name:
            p.requires_grad_(False)


def test_layer_with_nothing_selectable_is_refused_at_train_start(tmp_path):
    model = tiny_peft_llama()
    _freeze_layer0(model)
    lm = build_layer_map(model)
    assert lm.empty_layers == [0] and "layers [0] hold nothing selectable" in lm.describe()
    trainer = make_trainer(model, tmp_path, max_steps=2)
    attach_layer_selection(trainer, SelectionConfig(strategy="ir"))
    with pytest.raises(SelectionError, match=r"decoder layer\(s\) \[0\] of 6 hold no selectable"):
        trainer.train()


def test_layer_with_nothing_selectable_is_harmless_under_all(tmp_path):
    model = tiny_peft_llama()
    _freeze_layer0(model)
    trainer = make_trainer(model, tmp_path, max_steps=2)
    cb = attach_layer_selection(trainer, SelectionConfig(strategy="all"))
    trainer.train()
    assert cb.rows[-1]["fresh"] == [1, 2, 3, 4, 5]


def sequential_peft_llama():
    """The tiny Llama with its decoder blocks in an nn.Sequential (LlamaModel iterates a slice of it)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from helpers_tiny import TARGETS

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base = LlamaForCausalLM(cfg)
    base.model.layers = torch.nn.Sequential(*base.model.layers)
    lcfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False,
                      task_type="CAUSAL_LM")
    return get_peft_model(base, lcfg)


def test_decoder_blocks_in_a_sequential_work_when_named(tmp_path):
    model = sequential_peft_llama()
    with pytest.raises(LayerMapError, match="set irtuning_layers_path"):
        build_layer_map(model)  # found automatically only as a ModuleList
    lm = build_layer_map(model, layers_path="model.layers")  # relative to the base model
    assert isinstance(lm.layers, torch.nn.Sequential) and lm.num_layers == 6
    trainer = make_trainer(model, tmp_path, max_steps=4, max_grad_norm=1.0)
    cb = attach_layer_selection(trainer, SelectionConfig(strategy="ir", layers_path="model.layers"))
    rec = Recorder(lm)
    trainer.add_callback(rec)
    trainer.train()
    for row, changed in zip(cb.rows, rec.changed, strict=True):
        trained = [i for i, flags in enumerate(changed) if any(flags)]
        assert trained == row["active"]
    assert any(r["n_active"] < 6 for r in cb.rows)


@pytest.mark.parametrize("reentrant", [True, False])
def test_selected_layers_get_gradients_under_gradient_checkpointing(tmp_path, reentrant):
    model = tiny_peft_llama()
    trainer = make_trainer(model, tmp_path, max_steps=4, gradient_checkpointing=True,
                           gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    cb = attach_layer_selection(trainer, SelectionConfig(strategy="ir"))
    rec = Recorder(build_layer_map(model))
    trainer.add_callback(rec)
    trainer.train()
    assert cb.engine.backward_cut is (not reentrant)
    for row, has in zip(cb.rows, rec.has_grad, strict=True):
        with_grad = [i for i, flags in enumerate(has) if all(flags)]
        without = [i for i, flags in enumerate(has) if not any(flags)]
        assert with_grad == row["active"] and sorted(with_grad + without) == list(range(6))
    assert any(r["n_active"] < 6 for r in cb.rows)
