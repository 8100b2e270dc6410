"""The LISA strategy (irtuning_plugin/strategies/lisa.py): layers redrawn every interval, over adapters and full fine-tuning."""

import pytest
import torch

from irtuning_plugin.callback import attach_layer_selection
from irtuning_plugin.config import SelectionConfig
from irtuning_plugin.layer_map import build_layer_map

from helpers_selection import L, Recorder, assert_only_selected_layers_trained, run_tiny, selections
from helpers_tiny import make_trainer


def test_lisa_trains_its_layers_and_redraws_every_interval(tmp_path):
    cb, rec, _ = run_tiny(tmp_path, strategy="lisa", max_steps=7, strategy_options={"n_layers": 2, "interval": 3})
    actives = [r["active"] for r in cb.rows]
    assert all(len(a) == 2 for a in actives)
    assert actives[0] == actives[1] == actives[2] and actives[3] == actives[4] == actives[5]
    assert_only_selected_layers_trained(cb.rows, rec)


def test_lisa_changes_layers_only_every_interval():
    seq, _ = selections("lisa", steps=11, n_layers=3, interval=4)
    # seq[k] = layers of step k+1; draws at steps 0, 4, 8 -> blocks of 4 steps
    assert seq[0:4] == [seq[0]] * 4 and seq[4:8] == [seq[4]] * 4 and seq[8:12] == [seq[8]] * 4
    assert len({tuple(seq[0]), tuple(seq[4]), tuple(seq[8])}) > 1
    assert all(len(x) == 3 for x in seq)


@pytest.mark.parametrize("train_outside", [True, False])
def test_lisa_full_finetuning_and_outside_parameters(tmp_path, train_outside):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=L,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    trainer = make_trainer(model, tmp_path, max_steps=4, max_grad_norm=1.0)
    opts = {"n_layers": 2, "interval": 2, "train_outside": train_outside}
    cb = attach_layer_selection(trainer, SelectionConfig(strategy="lisa", scope="full", strategy_options=opts))
    rec = Recorder(build_layer_map(model, scope="full"))
    trainer.add_callback(rec)
    outside = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("model.layers.")}
    assert set(outside) == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    trainer.train()
    assert_only_selected_layers_trained(cb.rows, rec)
    after = dict(model.named_parameters())
    changed = {n for n, before in outside.items() if not torch.equal(before, after[n].detach())}
    assert changed == (set(outside) if train_outside else set())
