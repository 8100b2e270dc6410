"""trainer_patches: each patch restores exactly what it replaced, when training ends and when it raises."""

import shutil
import sys
from types import SimpleNamespace

import pytest
import torch
import transformers
from transformers import TrainerCallback

from irtuning_plugin.callback import attach_layer_selection
from irtuning_plugin.config import SelectionConfig
from irtuning_plugin.trainer_patches import Patch, TrainerPatches, capture_new_trainers

from helpers_tiny import make_trainer, tiny_peft_llama

_ABSENT = object()


# ---- Patch -------------------------------------------------------------------------------------
class Owner:
    def method(self):
        return "class"


def test_patch_deletes_an_instance_attribute_that_was_not_there():
    obj = Owner()
    patch = Patch(obj, "method", lambda original: lambda: "ours+" + original())
    patch.install()
    patch.install()  # a second install does not wrap ours again
    assert obj.method() == "ours+class"
    patch.undo()
    assert "method" not in vars(obj) and obj.method() == "class"
    patch.undo()  # nothing left to undo
    assert "method" not in vars(obj)


def test_patch_restores_an_own_attribute_and_a_class_attribute_by_identity():
    obj = Owner()
    own = obj.method = lambda: "own"
    patch = Patch(obj, "method", lambda original: lambda: "ours+" + original())
    patch.install()
    assert obj.method() == "ours+own"
    patch.undo()
    assert vars(obj)["method"] is own

    function = Owner.__dict__["method"]
    on_class = Patch(Owner, "method", lambda original: lambda self: "ours+" + original(self))
    on_class.install()
    assert Owner().method() == "ours+class"
    on_class.undo()
    assert Owner.__dict__["method"] is function


def test_patch_leaves_a_later_wrapper_in_place():
    """Undoing ours must not drop a wrapper someone put over it; ours is then idle (TrainerPatches checks)."""
    obj = Owner()
    patch = Patch(obj, "method", lambda original: lambda: "ours+" + original())
    patch.install()
    ours = obj.method
    theirs = obj.method = lambda: "theirs+" + ours()
    patch.undo()
    assert vars(obj)["method"] is theirs and not patch.installed


# ---- the Trainer's attributes before and after --------------------------------------------------
def attributes(trainer):
    """What the patches touch: each object's own attribute (or _ABSENT) and the class's function."""
    acc = trainer.accelerator
    return {"train": vars(trainer).get("train", _ABSENT), "log": vars(trainer).get("log", _ABSENT),
            "clip_grad_norm_": vars(acc).get("clip_grad_norm_", _ABSENT),
            "unscale_gradients": vars(acc).get("unscale_gradients", _ABSENT),
            "Trainer.__init__": transformers.Trainer.__dict__["__init__"],
            "Trainer.train": transformers.Trainer.__dict__["train"]}


def assert_restored(trainer, before, entry):
    """Everything is as before attach, except the entry wrapper on ``train``, which is the same one."""
    after = attributes(trainer)
    assert after["train"] is entry and entry is not _ABSENT
    assert {k: v for k, v in after.items() if k != "train"} == {k: v for k, v in before.items() if k != "train"}
    for name in ("log", "clip_grad_norm_", "unscale_gradients"):  # identity, not only equality
        assert after[name] is before[name]


class Probe(TrainerCallback):
    """During each step: whether our patches are in place (once, over the originals); scoring calls per step."""

    def __init__(self, trainer, before):
        self.trainer, self.before = trainer, before
        self.seen = []

    def on_step_begin(self, args, state, control, **kw):
        acc = self.trainer.accelerator
        self.seen.append((vars(self.trainer).get("log") is not self.before["log"],
                          vars(acc).get("clip_grad_norm_") is not self.before["clip_grad_norm_"]))


class Boom(TrainerCallback):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.at_step:
            self.at_step = None  # once
            raise RuntimeError("boom at step %d" % state.global_step)


def count_scoring(engine, per_call: list):
    original = engine.collect_scores

    def collect_scores(*args, **kwargs):
        per_call.append(1)
        return original(*args, **kwargs)

    engine.collect_scores = collect_scores


def test_normal_end_restores_everything_but_the_entry(tmp_path):
    trainer = make_trainer(tiny_peft_llama(), tmp_path, max_steps=3, max_grad_norm=1.0)
    before = attributes(trainer)
    cb = attach_layer_selection(trainer, SelectionConfig(strategy="ir"))
    entry = vars(trainer)["train"]
    probe = Probe(trainer, before)
    trainer.add_callback(probe)
    trainer.train()
    assert probe.seen == [(True, True)] * 3  # in place while training ran
    assert len(cb.rows) == 3 and any("irtuning/active_layers" in h for h in trainer.state.log_history)
    assert_restored(trainer, before, entry)


def test_second_train_installs_once_again_and_undoes_again(tmp_path):
    trainer = make_trainer(tiny_peft_llama(), tmp_path, max_steps=2, max_grad_norm=1.0)
    before = attributes(trainer)
    cb = attach_layer_selection(trainer, SelectionConfig(strategy="ir"))
    entry = vars(trainer)["train"]
    trainer.train()
    calls, per_step = [], []
    count_scoring(cb.engine, calls)

    class PerStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            per_step.append(len(calls))
            calls.clear()

    trainer.add_callback(PerStep())
    trainer.train()
    assert per_step == [1, 1]  # scored once per step: the clip patch is not stacked on a leftover one
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all("irtuning/active_layers" in h for h in logged)
    assert_restored(trainer, before, entry)


@pytest.mark.parametrize("where", ["callback", "loss"])
def test_training_that_raises_leaves_the_originals_and_resumes_on_the_same_trainer(tmp_path, where):
    """A run that stops with an error at step 3 (in a callback, or in the forward of the loss), then resumed
    on the same Trainer from its step-2 checkpoint moved elsewhere: the resume argument of this second call
    is what finds the selection state (the output folder no longer holds that checkpoint)."""
    model = tiny_peft_llama()
    trainer = make_trainer(model, tmp_path / "out", max_steps=4, max_grad_norm=1.0, save_strategy="steps",
                           save_steps=2)
    before = attributes(trainer)
    cb = attach_layer_selection(trainer, SelectionConfig(strategy="ir"))
    entry = vars(trainer)["train"]
    if where == "callback":
        trainer.add_callback(Boom(at_step=3))
    else:
        forwards = []

        def raise_on_third_step(module, args):
            forwards.append(1)
            if len(forwards) == 3:
                raise RuntimeError("boom in the loss of step 3")

        handle = model.register_forward_pre_hook(raise_on_third_step)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert_restored(trainer, before, entry)
    if where == "loss":
        handle.remove()

    moved = tmp_path / "elsewhere" / "checkpoint-2"
    shutil.move(str(tmp_path / "out" / "checkpoint-2"), str(moved))
    trainer.train(resume_from_checkpoint=str(moved))
    assert cb.resumes[-1] == {"step": 2, "checkpoint": str(moved)}
    assert [r["step"] for r in cb.rows] == [1, 2, 3, 4]
    assert_restored(trainer, before, entry)


def test_removed_callback_takes_its_entry_wrapper_away(tmp_path):
    trainer = make_trainer(tiny_peft_llama(), tmp_path, max_steps=1)
    before = attributes(trainer)
    cb = attach_layer_selection(trainer, SelectionConfig(strategy="ir"))
    trainer.remove_callback(cb)
    trainer.train()
    assert attributes(trainer) == before and cb.engine is None


def test_entry_left_under_another_wrapper_stays_idle_and_is_not_stacked():
    """Detached while someone's wrapper sits over ours, the entry cannot be taken out: it then passes calls
    through, and a later arm records each call once."""
    calls, recorded, handler = [], [], SimpleNamespace(callbacks=["ours"])
    trainer = SimpleNamespace(train=lambda resume_from_checkpoint=None: calls.append(resume_from_checkpoint),
                              callback_handler=handler)
    patches = TrainerPatches(trainer, attached=lambda: "ours" in handler.callbacks, on_train_call=recorded.append,
                             engine=lambda: None, score_unclipped=False, per_layer=False)
    patches.arm()
    ours = trainer.train
    trainer.train = lambda resume_from_checkpoint=None: ours(resume_from_checkpoint)  # someone else's wrapper
    handler.callbacks.clear()
    trainer.train("a")
    assert calls == ["a"] and recorded == [] and not patches.entry.installed
    handler.callbacks.append("ours")
    patches.arm()
    trainer.train("b")
    assert calls == ["a", "b"] and recorded == ["b"]
    assert patches.entry.installed and vars(trainer)["train"] is patches.entry.replacement  # the idle one left it


# ---- fp16: unscale_gradients is set aside for one clip call only --------------------------------
class FakeScaler:
    def __init__(self):
        self.unscaled = 0

    def is_enabled(self):
        return True


def test_fp16_clip_unscales_once_and_restores_unscale_gradients():
    scaler = FakeScaler()
    calls = []

    def unscale_gradients(optimizer=None):
        scaler.unscaled += 1

    def clip_grad_norm_(parameters, max_norm):
        calls.append("clip")
        acc.unscale_gradients()  # as accelerate's does: a second unscale would raise in torch
        return torch.tensor(0.0)

    acc = SimpleNamespace(scaler=scaler, unscale_gradients=unscale_gradients, clip_grad_norm_=clip_grad_norm_)
    scored = []
    engine = SimpleNamespace(optimizer=None, started=True, collect_scores=lambda step_skipped: scored.append(step_skipped))
    trainer = SimpleNamespace(accelerator=acc, log=lambda logs: None, train=lambda *a, **k: None)
    patches = TrainerPatches(trainer, attached=lambda: True, on_train_call=lambda arg: None, engine=lambda: engine,
                             score_unclipped=True, per_layer=False)
    patches.start_training()
    patches.start_training()  # never twice
    acc.clip_grad_norm_([], 1.0)
    assert scaler.unscaled == 1 and scored == [False] and calls == ["clip"]
    assert vars(acc)["unscale_gradients"] is unscale_gradients
    patches.end_training()
    assert vars(acc)["clip_grad_norm_"] is clip_grad_norm_ and vars(acc)["unscale_gradients"] is unscale_gradients


# ---- LLaMA-Factory: Trainer.__init__ wrapped only inside the block ------------------------------
def test_capture_new_trainers_restores_trainer_init_also_on_error(tmp_path):
    original = transformers.Trainer.__dict__["__init__"]
    seen = []
    with capture_new_trainers(seen.append):
        assert transformers.Trainer.__dict__["__init__"] is not original
        trainer = make_trainer(tiny_peft_llama(), tmp_path, max_steps=1)
    assert seen == [trainer] and transformers.Trainer.__dict__["__init__"] is original
    with pytest.raises(RuntimeError, match="inside"):
        with capture_new_trainers(seen.append):
            raise RuntimeError("inside")
    assert transformers.Trainer.__dict__["__init__"] is original


def test_launcher_capture_binds_our_callback_and_is_undone(tmp_path):
    from irtuning_plugin.callback import LayerSelectionCallback
    from irtuning_plugin.llamafactory_integration.launcher import trainer_capture

    original = transformers.Trainer.__dict__["__init__"]
    cb = LayerSelectionCallback(SelectionConfig(strategy="ir"))
    with pytest.raises(RuntimeError, match="after the Trainer"):
        with trainer_capture(cb):
            trainer = make_trainer(tiny_peft_llama(), tmp_path, max_steps=1)
            other = make_trainer(tiny_peft_llama(), tmp_path, max_steps=1)  # without our callback: untouched
            trainer.add_callback(cb)  # too late for the capture: it binds at construction only
            raise RuntimeError("after the Trainer was built")
    assert transformers.Trainer.__dict__["__init__"] is original
    assert cb.trainer is None and "train" not in vars(trainer) and "train" not in vars(other)

    from transformers import Trainer, TrainingArguments

    from helpers_tiny import RandomTokens

    cb = LayerSelectionCallback(SelectionConfig(strategy="ir"))
    with trainer_capture(cb):
        args = TrainingArguments(output_dir=str(tmp_path / "lf"), max_steps=2, per_device_train_batch_size=4,
                                 report_to=[], use_cpu=True, save_strategy="no", logging_steps=1)
        trainer = Trainer(model=tiny_peft_llama(), args=args, train_dataset=RandomTokens(), callbacks=[cb])
    assert transformers.Trainer.__dict__["__init__"] is original
    assert cb.trainer is trainer and callable(vars(trainer)["train"])
    trainer.train()
    assert len(cb.rows) == 2 and "log" not in vars(trainer)


# ---- Axolotl: no process-wide hook --------------------------------------------------------------
def test_loading_the_axolotl_plugin_leaves_sys_excepthook_alone(tiny_model_dir):
    from helpers_axolotl import base_cfg, validate

    hook = sys.excepthook
    cfg = validate(base_cfg(tiny_model_dir))  # Axolotl registers the plugin (register()) and validates
    assert cfg.irtuning_strategy == "ir" and sys.excepthook is hook
