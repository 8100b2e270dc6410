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

from helpers_selection import without_timing
from helpers_tiny import make_trainer, tiny_peft_llama

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


@pytest.mark.parametrize("strategy,options", DYNAMIC, ids=[s for s, _ in DYNAMIC])
def test_resumed_run_selects_what_the_uninterrupted_run_selects(tmp_path, strategy, options):
    a_cb, a_trainer = _train(tmp_path / "a", strategy, options, max_steps=6)
    b_dir = tmp_path / "b"
    _train(b_dir, strategy, options, max_steps=4, save_steps=2)
    assert (b_dir / "checkpoint-2" / STATE_FILE).is_file()
    assert len(read_selection_log(b_dir / SELECTION_LOG)) == 4  # steps 3..4 get replaced by the resume
    b_cb, b_trainer = _train(b_dir, strategy, options, max_steps=6, resume=str(b_dir / "checkpoint-2"))

    a_rows = without_timing(read_selection_log(tmp_path / "a" / SELECTION_LOG))
    b_rows = without_timing(read_selection_log(b_dir / SELECTION_LOG))
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
    assert without_timing(read_selection_log(b / SELECTION_LOG)) == without_timing(read_selection_log(tmp_path / "a" / SELECTION_LOG))
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
    assert without_timing(read_selection_log(b / SELECTION_LOG)) == without_timing(read_selection_log(tmp_path / "a" / SELECTION_LOG))
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


# ---- issue 35: a resume checks every setting that shapes the selection -------------------------------
def _checkpointed(out, strategy="ir", options=None, **config):
    """A run of 4 steps with a checkpoint every 2 (the resume tests restart it from checkpoint-2)."""
    _train(out, strategy, options or {}, max_steps=4, save_steps=2, **config)
    return out / "checkpoint-2"


def _one_line_refusal(err) -> str:
    message = str(err.value)
    assert "\n" not in message and message.startswith("irtuning: "), message
    return message


def test_resume_with_changed_settings_is_refused_before_training_naming_each_key(tmp_path):
    out = tmp_path / "b"
    ckpt = _checkpointed(out, "ir", {"window_low": 0.35}, seed=5)
    before = (out / SELECTION_LOG).read_text()
    with pytest.raises(SelectionError) as err:
        _train(out, "ir", {"window_low": 0.4, "interval": 1}, max_steps=6, resume=str(ckpt), seed=6)
    message = _one_line_refusal(err)
    assert str(ckpt / STATE_FILE) in message
    assert "irtuning_ir_window_low 0.35 -> 0.4" in message and "irtuning_seed 5 -> 6" in message
    assert "irtuning_ir_interval" not in message  # given explicitly, but equal to the default that was used
    assert "irtuning_resume_allow_changed_config: true" in message
    assert (out / SELECTION_LOG).read_text() == before  # refused at train start: nothing of the log rewritten


@pytest.mark.parametrize("first,then,key", [
    ({"strategy": "lisa", "options": {"n_layers": 2, "interval": 2}},
     {"strategy": "lisa", "options": {"n_layers": 3, "interval": 2}}, "irtuning_lisa_n_layers 2 -> 3"),
    ({"strategy": "ist", "options": {"first_update": 2, "update_every": 2, "estimation_batch": 4}},
     {"strategy": "ist", "options": {"first_update": 2, "update_every": 2, "estimation_batch": 4,
                                     "train_fraction": 0.5}}, "irtuning_ist_train_fraction 0.25 -> 0.5"),
    ({"strategy": "ir", "options": {}}, {"strategy": "ir", "options": {"cut": "in_window"}},
     "irtuning_ir_cut 'reference' -> 'in_window'"),
    ({"strategy": "ir", "options": {}, "depth_floor": 3}, {"strategy": "ir", "options": {}},
     "irtuning_depth_floor 3 -> 0"),
    ({"strategy": "random", "options": {"n_layers": 2}},
     {"strategy": "random", "options": {"n_layers": 2}, "score_gradients": "clipped"},
     "irtuning_score_gradients 'unclipped' -> 'clipped'"),
], ids=["lisa_n_layers", "ist_fraction", "ir_cut", "floor_removed", "score_gradients"])
def test_each_changed_setting_is_named(tmp_path, first, then, key):
    first, then = dict(first), dict(then)
    ckpt = _checkpointed(tmp_path / "b", first.pop("strategy"), first.pop("options"), **first)
    with pytest.raises(SelectionError) as err:
        _train(tmp_path / "b", then.pop("strategy"), then.pop("options"), max_steps=6, resume=str(ckpt), **then)
    message = _one_line_refusal(err)
    assert key in message and "keeps no state" not in message


def test_settings_that_do_not_shape_the_selection_may_change(tmp_path):
    ckpt = _checkpointed(tmp_path / "b", "random", {"n_layers": 2})
    cb, _ = _train(tmp_path / "b", "random", {"n_layers": 2}, max_steps=6, resume=str(ckpt), heatmap=False,
                   log_scores=True, kernel_backend="reference", cut_backward=False)
    assert cb.engine.config_changes == {} and [r["step"] for r in cb.rows] == [1, 2, 3, 4, 5, 6]


def test_adding_a_floor_on_resume_never_trains_below_it(tmp_path):
    """Refused by default; allowed, the next step's layers are chosen again above the floor."""
    out = tmp_path / "b"
    ckpt = _checkpointed(out, "ir", {"window_low": 0.2, "window_high": 0.8})
    saved = torch.load(ckpt / STATE_FILE, weights_only=True)
    assert min(saved["engine"]["active"]) < 3  # the checkpoint's next step would train below the floor
    with pytest.raises(SelectionError, match="irtuning_depth_floor 0 -> 3"):
        _train(out, "ir", {"window_low": 0.2, "window_high": 0.8}, max_steps=6, resume=str(ckpt), depth_floor=3)
    cb, _ = _train(out, "ir", {"window_low": 0.2, "window_high": 0.8}, max_steps=6, resume=str(ckpt), depth_floor=3,
                   resume_allow_changed_config=True)
    rows = read_selection_log(out / SELECTION_LOG)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(min(r["active"]) >= 3 and min(r["next_active"]) >= 3 for r in rows[2:])
    assert rows[2]["resume_config_changed"] == {"irtuning_depth_floor": {"old": 0, "new": 3}}
    assert not any("resume_config_changed" in r for r in rows[:2] + rows[3:])
    run = json.loads((out / RUN_SUMMARY).read_text())
    assert run["resumes"] == [{"step": 2, "checkpoint": str(ckpt),
                               "config_changed": {"irtuning_depth_floor": {"old": 0, "new": 3}}}]
    assert run["layers_per_step"] == [r["n_active"] for r in rows]  # readers of the log keep working


def test_allowed_change_warns_loudly_and_keeps_the_selection_state(tmp_path, caplog):
    out = tmp_path / "b"
    ckpt = _checkpointed(out, "random", {"n_layers": 2}, frozen_optimizer_state="keep")
    with caplog.at_level("WARNING"):
        cb, _ = _train(out, "random", {"n_layers": 2}, max_steps=6, resume=str(ckpt), frozen_optimizer_state="drop",
                       resume_allow_changed_config=True)
    assert "RESUMING WITH CHANGED SELECTION SETTINGS" in caplog.text
    assert "irtuning_frozen_optimizer_state 'keep' -> 'drop'" in caplog.text
    saved = torch.load(ckpt / STATE_FILE, weights_only=True)["engine"]
    assert cb.rows[2]["active"] == saved["active"]  # an engine key only: the saved choice of step 3 stands


def _old_format(state: dict) -> dict:
    """A state as the irtuning before the fingerprint wrote it (version 1)."""
    old = {k: v for k, v in state.items() if k != "fingerprint"}
    old["version"] = 1
    return old


def test_state_of_the_previous_version_loads_with_a_warning(caplog):
    cfg = SelectionConfig(strategy="random", strategy_options={"n_layers": 2})
    eng = LayerSelectionEngine(tiny_peft_llama(), cfg)
    eng.active = [1, 4]
    state = _old_format(eng.state_dict())
    other = LayerSelectionEngine(tiny_peft_llama(), cfg)
    with caplog.at_level("WARNING"):
        assert other.load_state_dict(state, source="ckpt/irtuning_state.pt") is False
    assert other.active == [1, 4] and "kept no fingerprint" in caplog.text
    floored = LayerSelectionEngine(tiny_peft_llama(), SelectionConfig(strategy="random", depth_floor=3,
                                                                      strategy_options={"n_layers": 2}))
    with pytest.raises(SelectionError, match=r"irtuning_depth_floor 0 -> 3"):
        floored.load_state_dict(state)
    # and the other way round: an old floored state into a run without the floor
    with pytest.raises(SelectionError, match=r"irtuning_depth_floor 3 -> 0"):
        LayerSelectionEngine(tiny_peft_llama(), cfg).load_state_dict(_old_format(floored.state_dict()))


def test_fingerprint_holds_every_key_that_shapes_the_selection():
    from irtuning_plugin.config import NOT_IN_FINGERPRINT, all_flat_keys, engine_keys

    eng = LayerSelectionEngine(tiny_peft_llama(), SelectionConfig(strategy="ist"), seed=11)
    fp = eng.fingerprint
    engine_names = {f.name for f in engine_keys()}
    assert set(NOT_IN_FINGERPRINT) <= engine_names
    expected = {"irtuning_" + n for n in engine_names - set(NOT_IN_FINGERPRINT)}
    expected |= {k for k, (owner, _) in all_flat_keys().items() if owner == "ist"}
    assert set(fp) == expected
    assert fp["irtuning_seed"] == 11 and fp["irtuning_layers_path"] == eng.layer_map.layers_path
    assert fp["irtuning_ist_train_fraction"] == 0.25 and fp["irtuning_depth_floor"] == 0


# ---- files read on a resume are validated ------------------------------------------------------------
class _NotPlain:
    pass


@pytest.mark.parametrize("damage", ["truncated", "garbage", "a_list", "no_engine", "engine_keys_missing",
                                    "bad_scores", "pickled_object", "bad_generator"])
def test_unusable_state_file_is_one_line_naming_the_file(tmp_path, damage):
    from irtuning_plugin.callback import read_state_file

    out = tmp_path / "b"
    ckpt = _checkpointed(out, "random", {"n_layers": 2})
    path = ckpt / STATE_FILE
    good = torch.load(path, weights_only=True)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "garbage":
        path.write_bytes(b"not a torch file\n" * 10)
    elif damage == "a_list":
        torch.save([1, 2], path)
    elif damage == "no_engine":
        torch.save({"step": 2}, path)
    elif damage == "engine_keys_missing":
        torch.save({"step": 2, "engine": {"version": 2, "strategy": "random"}}, path)
    elif damage == "bad_scores":
        good["engine"]["scores"] = torch.zeros(3)
        torch.save(good, path)
    elif damage == "pickled_object":
        good["engine"]["strategy_state"] = {"x": _NotPlain()}
        torch.save(good, path)
    elif damage == "bad_generator":
        good["engine"]["generator"] = torch.zeros(4, dtype=torch.uint8)
        torch.save(good, path)
    with pytest.raises(SelectionError) as err:
        _train(out, "random", {"n_layers": 2}, max_steps=6, resume=str(ckpt))
    message = _one_line_refusal(err)
    assert str(path) in message and "remove that file" in message and "another checkpoint" in message
    assert "weights_only" not in message
    if damage in ("truncated", "garbage", "pickled_object"):
        with pytest.raises(SelectionError):
            read_state_file(path)


@pytest.mark.parametrize("damage", ["cut_mid_row", "not_a_row"])
def test_damaged_checkpoint_log_is_one_line_naming_file_and_line(tmp_path, damage):
    out = tmp_path / "b"
    ckpt = _checkpointed(out, "random", {"n_layers": 2})
    log = ckpt / SELECTION_LOG
    lines = log.read_text().splitlines()
    if damage == "cut_mid_row":
        log.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])
    else:
        log.write_text(lines[0] + "\n[1, 2]\n")
    with pytest.raises(SelectionError) as err:
        _train(out, "random", {"n_layers": 2}, max_steps=6, resume=str(ckpt))
    message = _one_line_refusal(err)
    assert f"{log} line 2 " in message and "resume from another checkpoint" in message
