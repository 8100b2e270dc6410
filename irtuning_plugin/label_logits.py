"""Vocabulary logits only where a label is scored (``irtuning_label_logits_only``).

With the prompt masked (``train_on_inputs: false``, labels ``-100`` on the prompt), a causal LM still
projects every position onto the vocabulary and runs the softmax over all of them; only the positions
that predict a label token enter the loss. On SmolLM2-135M (vocabulary 49,152, hidden 576) that
projection is about a fifth of a training step's FLOPs for a 5-class label of one or two tokens.

:func:`install` puts a forward pre-hook on the model the Trainer calls that turns ``labels`` into transformers' own
``logits_to_keep`` (a tensor of sequence positions: every position that predicts a label token in some row
of the batch) and ``shift_labels`` (the labels those positions predict). The model's own loss function
then computes the very same loss, and the same gradients, from the kept positions alone; everything
else about the step is unchanged. Forward calls in eval mode (the Trainer's evaluation, whose predictions
must keep every position) and calls without labels (generation) pass through.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

IGNORE_INDEX = -100


def _below_ddp(model: nn.Module) -> nn.Module:
    """The module a DDP (or DataParallel) wrapper holds, else ``model`` itself."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def _causal_lm(model: nn.Module) -> nn.Module:
    """The module whose forward takes ``labels`` and ``logits_to_keep`` (under a PEFT wrapper, its base)."""
    inner = model
    while True:
        nxt = inner.get_base_model() if hasattr(inner, "get_base_model") else _below_ddp(inner)
        if nxt is inner:
            break
        inner = nxt
    return inner


def check_supported(model: nn.Module) -> nn.Module:
    """The causal LM to hook, or a clear error naming the key when the model cannot keep selected logits."""
    lm = _causal_lm(model)
    params = inspect.signature(lm.forward).parameters
    missing = [p for p in ("labels", "logits_to_keep") if p not in params]
    if missing or not hasattr(lm, "loss_function"):
        raise ValueError(
            f"irtuning_label_logits_only: true needs a transformers causal LM whose forward takes labels and "
            f"logits_to_keep and computes its loss with loss_function; {type(lm).__name__} "
            f"{'lacks ' + ', '.join(missing) if missing else 'has no loss_function'}. Set it to false")
    return lm


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep, shift_labels)`` for a ``[batch, seq]`` label tensor: the positions ``p`` whose next label
    ``labels[:, p + 1]`` is scored in at least one row, and ``labels[:, keep + 1]`` (``-100`` where a row
    scores nothing there). A batch with no scored label keeps position 0, so the loss stays defined."""
    scored = (labels[:, 1:] != IGNORE_INDEX).any(dim=0)
    keep = scored.nonzero(as_tuple=True)[0]
    if keep.numel() == 0:
        keep = torch.zeros(1, dtype=torch.long, device=labels.device)
        return keep, torch.full((labels.shape[0], 1), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
    return keep, labels[:, keep + 1].contiguous()


class LabelLogitsHook:
    """The installed hook, with its counts: training forwards cut, and positions kept of the positions there
    were (what the run summary reports)."""

    def __init__(self, outer: nn.Module):
        self.forwards = 0
        self.positions_kept = 0
        self.positions = 0
        self._handle = outer.register_forward_pre_hook(self._pre_hook, with_kwargs=True)

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        labels, keep_asked = kwargs.get("labels"), kwargs.get("logits_to_keep")
        if not module.training or labels is None or kwargs.get("shift_labels") is not None or \
                isinstance(keep_asked, torch.Tensor) or keep_asked:
            return None  # evaluation, no loss asked for, or the caller already chose its positions
        keep, shift = label_positions(labels)
        kwargs["logits_to_keep"] = keep
        kwargs["shift_labels"] = shift
        self.forwards += 1
        self.positions_kept += int(keep.numel())
        self.positions += int(labels.shape[1])
        return args, kwargs

    def counts(self) -> dict[str, int]:
        return {"training_forwards": self.forwards, "positions_kept": self.positions_kept,
                "positions": self.positions}

    def remove(self) -> None:
        self._handle.remove()


def install(model: nn.Module) -> LabelLogitsHook:
    """Hook the model the Trainer calls (see the module doc); ``.remove()`` takes the hook off again.

    The hook sits on the outermost module below a DDP wrapper, not on the causal LM itself: PEFT's
    wrappers call the base model's ``forward`` directly, which skips the base model's hooks, and pass
    unknown keyword arguments through to it."""
    check_supported(model)
    return LabelLogitsHook(_below_ddp(model))
