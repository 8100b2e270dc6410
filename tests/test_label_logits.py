"""irtuning_label_logits_only: the LM head runs only where a label is scored, with the same loss and gradients."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import Dataset

from irtuning_plugin import label_logits
from irtuning_plugin.config import SelectionConfig, config_from_flat
from irtuning_plugin.strategies import StrategyConfigError

from helpers_tiny import make_trainer, tiny_peft_llama

VOCAB = 128


class MaskedPrompts(Dataset):
    """Token rows whose prompt is masked (-100) and whose last two tokens are the label, at varying lengths."""

    def __init__(self, n=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.rows = []
        for i in range(n):
            length = 10 + i % 6
            ids = torch.randint(0, VOCAB, (16,), generator=g)
            labels = torch.full((16,), -100)
            labels[length - 2:length] = ids[length - 2:length]
            mask = torch.zeros(16, dtype=torch.long)
            mask[:length] = 1
            self.rows.append({"input_ids": ids, "labels": labels, "attention_mask": mask})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _batch(ds, idx):
    return {k: torch.stack([ds[i][k] for i in idx]) for k in ds[0]}


def _lm_head_widths(model):
    widths = []
    head = model.get_base_model().lm_head
    handle = head.register_forward_pre_hook(lambda m, args: widths.append(args[0].shape[1]))
    return widths, handle


def test_label_positions_keeps_every_scored_position_and_nothing_else():
    labels = torch.tensor([[-100, -100, -100, 5, 6, -100],
                           [-100, 7, -100, -100, -100, -100]])
    keep, shift = label_logits.label_positions(labels)
    assert keep.tolist() == [0, 2, 3]  # position p predicts labels[:, p + 1]
    assert shift.tolist() == [[-100, 5, 6], [7, -100, -100]]
    keep, shift = label_logits.label_positions(torch.full((2, 4), -100))
    assert keep.tolist() == [0] and shift.tolist() == [[-100], [-100]]


def test_same_loss_and_gradients_from_the_kept_positions_only():
    model = tiny_peft_llama(hidden=32, vocab=VOCAB)
    model.train()
    batch = _batch(MaskedPrompts(), range(4))

    def run():
        model.zero_grad(set_to_none=True)
        out = model(**batch)
        out.loss.backward()
        grads = {n: p.grad.double().clone() for n, p in model.named_parameters() if p.requires_grad}
        return out, grads

    widths, probe = _lm_head_widths(model)
    full, g_full = run()
    handle = label_logits.install(model)
    cut, g_cut = run()
    handle.remove()
    probe.remove()
    scored = int((batch["labels"][:, 1:] != -100).any(0).sum())
    assert widths == [16, scored] and scored < 16  # the head really saw fewer positions
    assert cut.logits.shape == (4, scored, VOCAB)
    torch.testing.assert_close(cut.loss, full.loss, rtol=1e-6, atol=0)
    assert g_full.keys() == g_cut.keys() and g_full
    for name in g_full:
        torch.testing.assert_close(g_cut[name], g_full[name], rtol=1e-5, atol=1e-7, msg=name)


def test_eval_forwards_and_forwards_without_labels_keep_every_position():
    model = tiny_peft_llama(hidden=32, vocab=VOCAB)
    batch = _batch(MaskedPrompts(), range(2))
    handle = label_logits.install(model)
    model.eval()
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 16, VOCAB)
        model.train()
        no_labels = {k: v for k, v in batch.items() if k != "labels"}
        assert model(**no_labels).logits.shape == (2, 16, VOCAB)
    handle.remove()


def test_trainer_run_with_the_key_trains_as_without_it(tmp_path):
    """Through the callback on a plain Trainer: the head sees only label positions, the run's losses match a
    run without the key step for step, and the hook is gone after training."""
    from irtuning_plugin.callback import attach_layer_selection

    losses = {}
    for on in (False, True):
        model = tiny_peft_llama(hidden=32, vocab=VOCAB, seed=3)
        trainer = make_trainer(model, tmp_path / str(on), max_steps=4)
        trainer.train_dataset = MaskedPrompts()
        attach_layer_selection(trainer, SelectionConfig(strategy="ir", label_logits_only=on, selection_log=False,
                                                        heatmap=False))
        widths, probe = _lm_head_widths(model)
        trainer.train()
        probe.remove()
        losses[on] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert (max(widths) < 16) == on, widths
        counts = json.loads((tmp_path / str(on) / "irtuning_run.json").read_text())["label_logits"]
        if on:  # the run summary says what was cut
            assert counts["training_forwards"] == 4 and counts["positions"] == 4 * 16
            assert 0 < counts["positions_kept"] < counts["positions"]
        else:
            assert counts is None
        model.train()
        assert model(**_batch(MaskedPrompts(), range(2))).logits.shape[1] == 16  # removed at train end
    assert len(losses[True]) == 4
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_bad_value_and_unsupported_model_are_refused_naming_the_key():
    with pytest.raises(StrategyConfigError, match="irtuning_label_logits_only"):
        config_from_flat({"irtuning_label_logits_only": "yes"})
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cls = LlamaForSequenceClassification(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=2, num_attention_heads=4,
                                                     num_key_value_heads=2, num_labels=3))
    with pytest.raises(ValueError, match="irtuning_label_logits_only.*logits_to_keep"):
        label_logits.install(cls)
