"""Every change irtuning makes to someone else's Trainer objects, each installed and undone here.

Layer selection needs four things a ``TrainerCallback`` is not given:

- the checkpoint ``trainer.train(resume_from_checkpoint=...)`` resumes from (the Trainer does not keep it);
- the gradients before the Trainer clips them (the reference scores those) and, under fp16, before the
  loss scale is applied;
- a place in the Trainer's own log records for the selection's figures;
- under LLaMA-Factory, which builds the Trainer itself, the Trainer object.

Each is a :class:`Patch`: one attribute of one object replaced, and on ``undo`` put back exactly as it
was (the object's own attribute, or none, so that lookups reach its class again).

:class:`TrainerPatches` holds the patches of one Trainer. ``trainer.train`` is the entry: it is wrapped
when the callback gets its Trainer (it must be in place before training starts) and stays while the
callback is attached, so that every ``train()`` call, a second one included, records its resume argument
and ends with the other patches undone, whether training returns or raises. The other patches are
installed when training starts (``on_train_begin``) and undone when it ends (``on_train_end``, or the
entry's ``finally`` when training raises). Once the callback is no longer attached to the Trainer, the
next ``train()`` call removes the entry wrapper as well.

:func:`capture_new_trainers` wraps ``transformers.Trainer.__init__`` for the duration of a ``with`` block.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

_ABSENT = object()


class Patch:
    """``owner.name`` replaced by ``make(original)`` while installed; ``undo`` restores it exactly."""

    def __init__(self, owner: Any, name: str, make: Callable[[Callable], Callable]):
        self.owner, self.name, self.make = owner, name, make
        self.installed = False
        self.replacement: Callable | None = None
        self._own: Any = _ABSENT  # the owner's own attribute before install (_ABSENT: it had none)

    def install(self) -> None:
        if self.installed:
            return
        self._own = vars(self.owner).get(self.name, _ABSENT)
        self.replacement = self.make(getattr(self.owner, self.name))
        setattr(self.owner, self.name, self.replacement)
        self.installed = True

    def undo(self) -> None:
        if not self.installed:
            return
        self.installed = False
        if vars(self.owner).get(self.name, _ABSENT) is not self.replacement:
            return  # someone wrapped ours since: taking ours out would drop theirs; ours is idle now
        if self._own is _ABSENT:
            delattr(self.owner, self.name)
        else:
            setattr(self.owner, self.name, self._own)


class TrainerPatches:
    """The patches of one Trainer (see the module docstring for when each is in place).

    ``attached()`` says whether the callback is still among the Trainer's callbacks; ``on_train_call``
    receives each ``train()`` call's resume argument; ``engine()`` is the selection engine (None before
    it is built); ``score_unclipped`` asks for scoring before clipping; ``per_layer`` for per-layer
    figures in the log records.
    """

    def __init__(self, trainer: Any, *, attached: Callable[[], bool], on_train_call: Callable[[Any], None],
                 engine: Callable[[], Any], score_unclipped: bool, per_layer: bool):
        self.trainer = trainer
        self._attached, self._on_train_call, self._engine = attached, on_train_call, engine
        self._score_unclipped, self._per_layer = score_unclipped, per_layer
        self.entry = Patch(trainer, "train", self._train)
        self.training: list[Patch] = []
        self._active = False  # the training patches are installed

    # ---- the entry: trainer.train ----
    def arm(self) -> None:
        """Wrap ``trainer.train`` (no-op when it is not callable, or already wrapped)."""
        if callable(getattr(self.trainer, "train", None)):
            self.entry.install()

    def _train(self, original: Callable) -> Callable:
        def train(resume_from_checkpoint=None, *args, **kwargs):
            if not (self.entry.installed and self.entry.replacement is train):
                return original(resume_from_checkpoint, *args, **kwargs)  # an earlier one of ours, left idle
            if not self._attached():
                self.entry.undo()  # the callback was removed from this Trainer: leave it as it was
                return original(resume_from_checkpoint, *args, **kwargs)
            self._on_train_call(resume_from_checkpoint)
            try:
                return original(resume_from_checkpoint, *args, **kwargs)
            finally:
                self.end_training()

        return train

    # ---- the patches in place while training runs ----
    @property
    def logs_patched(self) -> bool:
        """True while our figures go into the Trainer's log records through ``trainer.log``."""
        return self._active and any(p.name == "log" for p in self.training)

    def start_training(self) -> None:
        """Install the training patches (again after a previous training undid them; never twice)."""
        if self._active:
            return
        accelerator = getattr(self.trainer, "accelerator", None)
        self.training = []
        if self._score_unclipped and accelerator is not None:
            clip = Patch(accelerator, "clip_grad_norm_", lambda original: self._clip(clip, accelerator, original))
            self.training.append(clip)
        log = Patch(self.trainer, "log", lambda original: self._log(log, original))
        self.training.append(log)
        for patch in self.training:
            patch.install()
        self._active = True

    def end_training(self) -> None:
        self._active = False
        for patch in reversed(self.training):
            patch.undo()

    def _clip(self, patch: Patch, accelerator: Any, original: Callable) -> Callable:
        """Score the gradients just before the Trainer clips them."""
        def clip_grad_norm_(parameters, *args, **kwargs):
            if not patch.installed:  # left under another wrapper after its training ended: pass through
                return original(parameters, *args, **kwargs)
            unscaled = unscale_fp16_gradients(accelerator)
            engine = self._engine()
            engine.collect_scores(step_skipped=fp16_step_will_be_skipped(accelerator, engine))
            if not unscaled:
                return original(parameters, *args, **kwargs)
            # accelerate's clip_grad_norm_ unscales first, and a second unscale_ in one step raises:
            # the gradients are unscaled already, so let that call pass.
            skip_unscale = Patch(accelerator, "unscale_gradients", lambda _original: _no_unscale)
            skip_unscale.install()
            try:
                return original(parameters, *args, **kwargs)
            finally:
                skip_unscale.undo()

        return clip_grad_norm_

    def _log(self, patch: Patch, original: Callable) -> Callable:
        """Add the selection's figures to each record that carries the training loss."""
        def log(logs, *args, **kwargs):
            engine = self._engine()
            if patch.installed and engine is not None and engine.started and "loss" in logs:
                logs.update(engine.metrics(per_layer=self._per_layer))
            return original(logs, *args, **kwargs)

        return log


def _no_unscale(optimizer=None) -> None:
    return None


@contextlib.contextmanager
def capture_new_trainers(on_new: Callable[[Any], None]) -> Iterator[None]:
    """While active, every ``transformers.Trainer`` is handed to ``on_new`` right after its ``__init__``;
    the class is restored on leaving the block, also when it raises."""
    from transformers import Trainer

    def make(original: Callable) -> Callable:
        @functools.wraps(original)
        def __init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            on_new(self)

        return __init__

    patch = Patch(Trainer, "__init__", make)
    patch.install()
    try:
        yield
    finally:
        patch.undo()


# ---- fp16: the loss scaler of accelerate ----
def fp16_scaler(accelerator: Any):
    scaler = getattr(accelerator, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def unscale_fp16_gradients(accelerator: Any) -> bool:
    """Under fp16 mixed precision, unscale the gradients now (as accelerate's clip_grad_norm_ would do a
    moment later), so scores are of the true gradients, not of gradients times the loss scale.
    True when this call unscaled them."""
    if fp16_scaler(accelerator) is None:
        return False
    accelerator.unscale_gradients()
    return True


def fp16_step_will_be_skipped(accelerator: Any, engine: Any) -> bool:
    """True when the fp16 loss scaler found inf/NaN gradients while unscaling: it will skip this step."""
    scaler = fp16_scaler(accelerator)
    if scaler is None or engine.optimizer is None:
        return False
    state = getattr(scaler, "_per_optimizer_states", {}).get(id(engine.optimizer), {})
    return any(float(v.sum()) > 0 for v in state.get("found_inf_per_device", {}).values())
