"""Our files never cost the user theirs: a failed write of ours (selection log, heatmap, run summary,
checkpoint state, a strategy's plot) is one loud line naming the file; training and the Trainer's own
saving go on, and irtuning_run.json lists what was not written.

Plain transformers Trainer on the tiny PEFT Llama of helpers_tiny.
"""

import errno
import json
import logging

import irtuning_plugin.callback as callback_module
from irtuning_plugin.callback import (
    HEATMAP,
    RUN_SUMMARY,
    SELECTION_LOG,
    STATE_FILE,
    attach_layer_selection,
    read_selection_log,
)
from irtuning_plugin.config import SelectionConfig

from helpers_tiny import make_trainer, tiny_peft_llama

ADAPTER = "adapter_model.safetensors"


def _trainer(out, max_steps=4, strategy="random", options=None, **kw):
    trainer = make_trainer(tiny_peft_llama(), out, max_steps=max_steps, **kw)
    cb = attach_layer_selection(trainer, SelectionConfig(strategy=strategy, strategy_options=options or {"n_layers": 2}))
    return trainer, cb


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("irtuning")]


def test_unwritable_heatmap_still_saves_the_adapter(tmp_path, caplog):
    out = tmp_path / "out"
    (out / HEATMAP).mkdir(parents=True)  # something the plot cannot be written over
    trainer, cb = _trainer(out)
    with caplog.at_level("ERROR"):
        trainer.train()
    trainer.save_model()
    assert (out / ADAPTER).is_file()  # the user's model is saved
    assert trainer.state.global_step == 4
    [line] = _errors(caplog)
    assert str(out / HEATMAP) in line and "IsADirectoryError" in line and "\n" not in line
    run = json.loads((out / RUN_SUMMARY).read_text())
    assert [e["file"] for e in run["not_written"]] == [str(out / HEATMAP)]
    assert len(read_selection_log(out / SELECTION_LOG)) == 4


def test_plot_library_error_does_not_end_the_run(tmp_path, monkeypatch):
    import irtuning_plugin.selection_plot as plot

    def broken(*args, **kwargs):
        raise ValueError("Image size of 100x99999 pixels is too large")  # as matplotlib says it

    monkeypatch.setattr(plot, "plot_selection", broken)
    out = tmp_path / "out"
    trainer, _ = _trainer(out, save_strategy="steps", save_steps=2)
    trainer.train()
    assert (out / "checkpoint-4" / ADAPTER).is_file()  # the Trainer's own checkpoint at the last step
    run = json.loads((out / RUN_SUMMARY).read_text())
    assert run["not_written"] == [{"file": str(out / HEATMAP), "error": "ValueError: Image size of 100x99999 "
                                   "pixels is too large"}]


class _FullDisk:
    """A file object whose writes fail as on a full disk."""

    def __init__(self, real):
        self.real = real
        self.writes = 0

    def write(self, text):
        self.writes += 1
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self):
        self.real.flush()

    def close(self):
        self.real.close()


def _fill_disk_after_train_begin(cb):
    original = cb.on_train_begin

    def on_train_begin(*args, **kwargs):
        control = original(*args, **kwargs)
        cb._jsonl = _FullDisk(cb._jsonl)
        return control

    cb.on_train_begin = on_train_begin


def test_disk_full_during_the_step_log_lets_training_finish(tmp_path, caplog):
    out = tmp_path / "out"
    trainer, cb = _trainer(out, max_steps=5)
    _fill_disk_after_train_begin(cb)
    with caplog.at_level("WARNING"):
        trainer.train()
    assert trainer.state.global_step == 5 and len(cb.rows) == 5
    [line] = _errors(caplog)  # one line: the file, the OS error, what happens next
    assert str(out / SELECTION_LOG) in line and "No space left on device" in line and "training goes on" in line
    # written once more, in full, at train end (the disk had room again)
    assert [r["step"] for r in read_selection_log(out / SELECTION_LOG)] == [1, 2, 3, 4, 5]
    assert json.loads((out / RUN_SUMMARY).read_text())["not_written"] == []


def test_log_that_cannot_be_written_at_all_is_listed_in_the_summary(tmp_path, monkeypatch):
    out = tmp_path / "out"
    trainer, cb = _trainer(out, max_steps=3)
    _fill_disk_after_train_begin(cb)

    def full(path, rows):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(callback_module, "_write_rows", full)
    trainer.train()
    assert trainer.state.global_step == 3
    run = json.loads((out / RUN_SUMMARY).read_text())
    assert [(e["file"], e.get("step")) for e in run["not_written"]] == [(str(out / SELECTION_LOG), 1),
                                                                         (str(out / SELECTION_LOG), None)]
    assert run["steps"] == 3


def test_checkpoint_state_write_failure_keeps_the_checkpoint(tmp_path, monkeypatch, caplog):
    real_save = callback_module.torch.save

    def full(obj, path, *args, **kwargs):  # the disk fills up while our state is written; the Trainer's go through
        if STATE_FILE not in str(path):
            return real_save(obj, path, *args, **kwargs)
        with open(path, "wb") as fh:
            fh.write(b"PK partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(callback_module.torch, "save", full)
    out = tmp_path / "out"
    trainer, _ = _trainer(out, save_strategy="steps", save_steps=2)
    with caplog.at_level("ERROR"):
        trainer.train()
    monkeypatch.undo()
    for step in (2, 4):
        ckpt = out / f"checkpoint-{step}"
        assert (ckpt / ADAPTER).is_file() and not (ckpt / STATE_FILE).exists()
        assert not any(p.name.endswith(".tmp") for p in ckpt.iterdir())  # no half-written state left behind
    assert any(str(out / "checkpoint-2" / STATE_FILE) in line for line in _errors(caplog))
    run = json.loads((out / RUN_SUMMARY).read_text())
    assert {(e["file"], e["step"]) for e in run["not_written"]} == {(str(out / f"checkpoint-{s}" / STATE_FILE), s)
                                                                   for s in (2, 4)}


def test_unwritable_run_summary_is_logged_and_the_run_ends_normally(tmp_path, caplog):
    out = tmp_path / "out"
    (out / RUN_SUMMARY).mkdir(parents=True)
    trainer, _ = _trainer(out, max_steps=2)
    with caplog.at_level("ERROR"):
        trainer.train()
    trainer.save_model()
    assert (out / ADAPTER).is_file()
    assert any(str(out / RUN_SUMMARY) in line for line in _errors(caplog))


def test_strategy_train_end_files_are_guarded(tmp_path, monkeypatch):
    from irtuning_plugin.strategies.random_layers import RandomLayersStrategy

    def broken(self, output_dir):
        raise OSError(errno.EACCES, "Permission denied", str(output_dir / "random_plot.png"))

    monkeypatch.setattr(RandomLayersStrategy, "on_train_end", broken, raising=False)
    out = tmp_path / "out"
    trainer, _ = _trainer(out, max_steps=2)
    trainer.train()
    run = json.loads((out / RUN_SUMMARY).read_text())
    assert run["not_written"][0]["file"] == str(out / "random_plot.png")
    assert "Permission denied" in run["not_written"][0]["error"]
    assert (out / HEATMAP).is_file()  # the files after it are still written
