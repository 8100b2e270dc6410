"""Resume: a run resumed from a checkpoint selects exactly what the uninterrupted run selects.

Plain transformers Trainer, tiny PEFT Llama. Run A trains 6 steps in one go. Run B trains 4 steps with a
checkpoint every 2, then (like a crashed run restarted by hand) resumes from checkpoint-2 in the same
output folder and trains to step 6. Every selection-log row of B must equal A's (scores, measured flags,
active sets, the strategy's own fields), the log must hold steps 1..6 once each, and irtuning_run.json
must agree with it.
"""

import json

import pytest
import torch

from irtuning_plugin.callback import RUN_SUMMARY, SELECTION_LOG, STATE_FILE, attach_layer_selection, read_selection_log
from irtuning_plugin.config import SelectionConfig
from irtuning_plugin.engine import LayerSelectionEngine, SelectionError

from helpers_tiny import make_trainer, tiny_peft_llama

TIMING = ("score_ms", "select_ms", "salf_calibration_s")

DYNAMIC = [
    ("ir", {}),
    ("ist", {"first_update": 2, "update_every": 2, "estimation_batch": 4}),
    ("lisa", {"n_layers": 3, "interval": 2}),
    ("random", {"n_layers": 2}),
    ("salf", {"calibration_batches": 2}),
]


def _train(out, strategy, options, max_steps, resume=None, save_steps=None, **config):
    model = tiny_peft_llama()
    kw = {"save_strategy": "steps", "save_steps": save_steps} if save_steps else {}
    trainer = make_trainer(model, out, max_steps=max_steps, max_grad_norm=1.0, **kw)
    cb = attach_layer_selection(trainer, SelectionConfig(strategy=strategy, strategy_options=dict(options), **config))
    trainer.train(resume_from_checkpoint=resume)
    return cb, trainer


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.mark.parametrize("strategy,options", DYNAMIC, ids=[s for s, _ in DYNAMIC])
def test_resumed_run_selects_what_the_uninterrupted_run_selects(tmp_path, strategy, options):
    a_cb, a_trainer = _train(tmp_path / "a", strategy, options, max_steps=6)
    b_dir = tmp_path / "b"
    _train(b_dir, strategy, options, max_steps=4, save_steps=2)
    assert (b_dir / "checkpoint-2" / STATE_FILE).is_file()
    assert len(read_selection_log(b_dir / SELECTION_LOG)) == 4  # steps 3..4 get replaced by the resume
    b_cb, b_trainer = _train(b_dir, strategy, options, max_steps=6, resume=str(b_dir / "checkpoint-2"))

    a_rows = _strip(read_selection_log(tmp_path / "a" / SELECTION_LOG))
    b_rows = _strip(read_selection_log(b_dir / SELECTION_LOG))
    assert [r["step"] for r in b_rows] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(a_rows, b_rows, strict=True):
        assert a == b, f"step {a['step']}: uninterrupted {a} != resumed {b}"
    # the selection really changes over these steps (otherwise the comparison proves little)
    if strategy != "salf":
        assert len({tuple(r["active"]) for r in a_rows}) > 1
    else:
        assert "salf_cut" in b_rows[0] and not any("salf_cut" in r for r in b_rows[1:])  # calibrated once
    # the resumed part trained the same weights
    for (name, pa), pb in zip(a_trainer.model.named_parameters(), b_trainer.model.parameters(), strict=True):
        if "lora_" in name:
            assert torch.equal(pa, pb), name
    run = json.loads((b_dir / RUN_SUMMARY).read_text())
    assert run["steps"] == 6 and len(run["layers_per_step"]) == 6 and len(run["losses"]) == 6
    assert run["layers_per_step"] == [r["n_active"] for r in a_rows]
    assert run["resumes"] == [{"step": 2, "checkpoint": str(b_dir / "checkpoint-2")}]
    if strategy == "ist":
        assert any("ist_update" in r for r in b_rows[2:])  # an importance update after the resume


@pytest.mark.parametrize("mode", ["cpu", "drop"])
def test_resume_with_frozen_optimizer_state_moved_or_dropped(tmp_path, mode):
    """The checkpointed optimizer lacks (drop) or holds host copies of (cpu) the frozen layers' moments."""
    a_cb, a_trainer = _train(tmp_path / "a", "random", {"n_layers": 2}, max_steps=6, frozen_optimizer_state=mode)
    b = tmp_path / "b"
    _train(b, "random", {"n_layers": 2}, max_steps=4, save_steps=2, frozen_optimizer_state=mode)
    b_cb, b_trainer = _train(b, "random", {"n_layers": 2}, max_steps=6, resume=str(b / "checkpoint-2"),
                             frozen_optimizer_state=mode)
    assert _strip(read_selection_log(b / SELECTION_LOG)) == _strip(read_selection_log(tmp_path / "a" / SELECTION_LOG))
    for pa, pb in zip(a_trainer.model.parameters(), b_trainer.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    if mode == "drop":  # after the resume, as before it: no moments held for the frozen layers
        frozen = set(range(6)) - set(b_cb.engine.active)
        state = b_cb.engine.optimizer.state
        assert not any(p in state for i in frozen for p in b_cb.engine.layer_map.params[i])


def test_resume_by_output_dir_lookup_and_second_resume(tmp_path):
    """resume_from_checkpoint=True (the last checkpoint), then resuming the resumed run again."""
    opts = {"n_layers": 2}
    a_cb, _ = _train(tmp_path / "a", "random", opts, max_steps=6)
    b = tmp_path / "b"
    _train(b, "random", opts, max_steps=2, save_steps=2)
    _train(b, "random", opts, max_steps=4, save_steps=2, resume=True)
    cb, _ = _train(b, "random", opts, max_steps=6, save_steps=2, resume=True)
    assert _strip(read_selection_log(b / SELECTION_LOG)) == _strip(read_selection_log(tmp_path / "a" / SELECTION_LOG))
    assert [r["step"] for r in cb.resumes] == [2, 4]


def test_resume_without_saved_state_warns_that_selection_restarts(tmp_path, caplog):
    b = tmp_path / "b"
    _train(b, "random", {"n_layers": 2}, max_steps=2, save_steps=2)
    (b / "checkpoint-2" / STATE_FILE).unlink()
    with caplog.at_level("WARNING"):
        cb, _ = _train(b, "random", {"n_layers": 2}, max_steps=3, resume=str(b / "checkpoint-2"))
    assert "STARTS AFRESH" in caplog.text
    assert [r["step"] for r in read_selection_log(b / SELECTION_LOG)] == [3]


def test_engine_state_dict_round_trip_and_mismatch_refused():
    model = tiny_peft_llama()
    eng = LayerSelectionEngine(model, SelectionConfig(strategy="ist", strategy_options={"first_update": 1}))
    eng.strategy.importance = torch.arange(6, dtype=torch.float64)
    eng.scores[2] = 0.5
    eng.ever_measured[2] = True
    eng.active = [1, 4]
    eng.generator.manual_seed(123)
    state = eng.state_dict()
    expected_draw = torch.rand(3, generator=eng.generator)
    other = LayerSelectionEngine(tiny_peft_llama(), SelectionConfig(strategy="ist", strategy_options={"first_update": 1}))
    other.load_state_dict(state)
    assert other.active == [1, 4] and other.scores[2] == 0.5 and bool(other.ever_measured[2])
    assert torch.equal(other.strategy.importance, torch.arange(6, dtype=torch.float64))
    assert torch.equal(torch.rand(3, generator=other.generator), expected_draw)
    wrong = LayerSelectionEngine(tiny_peft_llama(), SelectionConfig(strategy="random"))
    with pytest.raises(SelectionError, match="strategy='ist' but this run has strategy='random'"):
        wrong.load_state_dict(state)


@pytest.mark.slow
def test_axolotl_train_resume_continues_the_selection(tmp_path, tiny_model_dir):
    """Real `axolotl train` on the tiny-model recipe: 6 steps with a checkpoint every 2, then the same run
    restarted from checkpoint-2 in the same folder must rewrite steps 3..6 exactly as they were."""
    from test_axolotl_plugin import base_cfg, run_axolotl, slice_of_train

    data = slice_of_train(tmp_path, 64)
    out = tmp_path / "out"
    cfg = base_cfg(
        tiny_model_dir, datasets=[{"path": str(data), "ds_type": "json", "type": "input_output"}],
        output_dir=str(out), dataset_prepared_path=str(tmp_path / "prepared"), max_steps=6, micro_batch_size=2,
        learning_rate=5e-3, lr_scheduler="constant", warmup_steps=0, logging_steps=1, save_strategy="steps",
        save_steps=2, val_set_size=0, train_on_inputs=False, seed=3,
    )
    run_axolotl(tmp_path, cfg)
    first = _strip(read_selection_log(out / SELECTION_LOG))
    assert [r["step"] for r in first] == [1, 2, 3, 4, 5, 6]
    assert (out / "checkpoint-2" / STATE_FILE).is_file()
    log = run_axolotl(tmp_path, {**cfg, "resume_from_checkpoint": str(out / "checkpoint-2")})
    assert "resumed the selection at step 2" in log  # a WARNING: visible on Axolotl's console
    again = _strip(read_selection_log(out / SELECTION_LOG))
    assert again == first
    assert len({tuple(r["active"]) for r in first}) > 1
    run = json.loads((out / RUN_SUMMARY).read_text())
    assert run["steps"] == 6 and len(run["losses"]) == 6 and [s for s, _ in run["losses"]] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in run["resumes"]] == [2]
