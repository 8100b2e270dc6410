"""The IST strategy (irtuning_plugin/strategies/ist.py): its pure parts, runs on the tiny PEFT Llama, its refusals."""

import math

import pytest
import torch
from torch.utils.data import DataLoader

from irtuning_plugin.callback import attach_layer_selection
from irtuning_plugin.config import SelectionConfig
from irtuning_plugin.engine import LayerSelectionEngine
from irtuning_plugin.layer_map import build_layer_map
from irtuning_plugin.strategies.base import StrategyConfigError
from irtuning_plugin.strategies.ist import (
    ISTOptions,
    ISTStrategy,
    ist_score_update,
    lora_modules,
    sample_suppression_sets,
    scaled_lora_output,
)

from helpers_selection import assert_only_selected_layers_trained, run_tiny
from helpers_tiny import RandomTokens, make_trainer, tiny_peft_llama


def test_ist_score_update_hand_computed():
    s = torch.tensor([0.0, math.log(3), -math.log(3), 0.0], dtype=torch.float64)  # p = .5, .75, .25, .5
    sets = [[0, 1], [1, 2], [2, 3]]
    losses = [-math.log(0.6), -math.log(0.3), -math.log(0.3)]  # R = .6, .3, .3; mean .4; A = .2, -.1, -.1
    new = ist_score_update(s, sets, losses, lr=10.0)
    # p(1-p) = .25, .1875, .1875, .25 (taken before the update); layer 1 is in sets 0 and 1: A = .2 - .1
    expected = [0.2 * 0.25 * 10, math.log(3) + 0.1 * 0.1875 * 10, -math.log(3) - 0.2 * 0.1875 * 10,
                -0.1 * 0.25 * 10]
    assert new.tolist() == pytest.approx(expected, abs=1e-12)
    assert s[0] == 0.0  # the input is not modified
    assert ist_score_update(s, sets, [1.0, 1.0, 1.0]).tolist() == s.tolist()  # equal losses: no change


def test_ist_candidate_sets_are_distinct_and_of_the_right_size():
    combos = {(0, 1), (0, 2), (1, 2)}
    for seed in range(20):  # 3 sets of 2 of 3 layers: only possible with the resample rule
        sets = sample_suppression_sets(torch.zeros(3), 2, 3, torch.Generator().manual_seed(seed))
        assert {tuple(x) for x in sets} == combos
    # weights sigmoid(s) = .95, .95, .05, .05: {0, 1} is the likely draw, yet every set differs
    s = torch.tensor([3.0, 3.0, -3.0, -3.0])
    firsts = []
    for seed in range(20):
        sets = sample_suppression_sets(s, 2, 3, torch.Generator().manual_seed(seed))
        assert len({tuple(x) for x in sets}) == 3 and all(len(x) == 2 for x in sets)
        firsts.append(sets[0])
    assert firsts.count([0, 1]) > 10


def test_ist_gives_up_resampling_when_no_new_set_exists(caplog):
    sets = sample_suppression_sets(torch.zeros(2), 1, 3, torch.Generator().manual_seed(0), max_tries=50)
    assert sorted(map(tuple, sets[:2])) == [(0,), (1,)] and len(sets) == 3
    assert "no new suppression set" in caplog.text


def test_ist_samples_train_fraction_weighted_by_low_score():
    strat = ISTStrategy(8, ISTOptions())
    strat.importance = torch.tensor([-30.0, -30.0] + [30.0] * 6, dtype=torch.float64)
    strat.data = object()  # no update at this step, so no data is read
    from irtuning_plugin.strategies.base import SelectionContext

    ctx = SelectionContext(step=3, num_layers=8, scores=torch.zeros(8), ever_measured=torch.zeros(8, dtype=torch.bool),
                           fresh=torch.zeros(8, dtype=torch.bool), active=[], generator=torch.Generator().manual_seed(1))
    assert strat.select(ctx) == [0, 1]  # int(0.25 * 8) = 2 layers, the two with low scores
    assert [strat._is_update_step(k) for k in (0, 9, 10, 15, 20, 30)] == [False, False, True, False, True, True]


def test_scaled_lora_output_scales_and_restores():
    model = tiny_peft_llama()
    layers = build_layer_map(model).layers
    mods = lora_modules(layers[2])
    assert len(mods) == 5 and all(m.scaling == {"default": 2.0} for m in mods)  # alpha 8 / r 4
    with scaled_lora_output([layers[2]], 0.25) as n:
        assert n == 5 and all(m.scaling["default"] == 0.5 for m in mods)
        assert all(m.scaling["default"] == 2.0 for m in lora_modules(layers[3]))
    assert all(m.scaling == {"default": 2.0} for m in mods)


def test_ist_trains_its_layers_and_updates_importance(tmp_path):
    opts = {"train_fraction": 0.5, "update_every": 2, "first_update": 2, "estimation_batch": 6}
    cb, rec, trainer = run_tiny(tmp_path, strategy="ist", max_steps=6, strategy_options=opts)
    assert all(r["n_active"] == 3 for r in cb.rows)  # int(0.5 * 6)
    assert_only_selected_layers_trained(cb.rows, rec)
    updates = {r["step"]: r["ist_update"] for r in cb.rows if "ist_update" in r}
    assert sorted(updates) == [2, 4, 6]
    for u in updates.values():
        assert len(u["suppressed"]) == 3 and all(len(x) == 3 for x in u["suppressed"])
        assert len({tuple(x) for x in u["suppressed"]}) == 3
        assert len(set(u["losses"])) > 1  # the damped layers differ, so do the losses
    assert any(x != 0 for x in updates[6]["importance"])
    assert cb.engine.strategy.importance.tolist() == pytest.approx(updates[6]["importance"], abs=1e-6)
    assert trainer.model.training
    assert all(m.scaling == {"default": 2.0} for layer in cb.engine.layer_map.layers for m in lora_modules(layer))
    # the estimation examples came through the Trainer's dataloader: micro-batches of 4 (4 + 2 of 6)
    assert cb.engine.strategy.data.micro_batch == 4


def test_ist_update_loss_is_the_damped_models_loss():
    model = tiny_peft_llama()
    loader = DataLoader(RandomTokens(n=8), batch_size=8)
    engine = LayerSelectionEngine(model, SelectionConfig(strategy="ist", strategy_options={"estimation_batch": 8}))
    engine.begin(None, loader, check_optimizer=False)
    strat = engine.strategy
    strat.data._order = list(range(8))  # the next estimation batch is the whole (shuffle-free) dataset
    info = strat.update_importance(model, engine.layer_map.layers, torch.Generator().manual_seed(0))
    batch = next(iter(loader))
    model.eval()
    with torch.no_grad(), scaled_lora_output([engine.layer_map.layers[i] for i in info["suppressed"][0]], 0.25):
        expected = model(**batch).loss.item()
    assert info["losses"][0] == pytest.approx(expected, abs=1e-6)


def test_ist_refuses_full_scope_and_a_missing_dataloader(tmp_path):
    # the plain Trainer refuses it at train start (preflight's strategy-scope rule, as Axolotl and LLaMA-Factory)
    trainer = make_trainer(tiny_peft_llama(), tmp_path, max_steps=1)
    attach_layer_selection(trainer, SelectionConfig(strategy="ist", scope="full"))
    with pytest.raises(StrategyConfigError, match="irtuning_strategy='ist' works only with irtuning_scope: adapter, "
                                                  "not irtuning_scope='full'"):
        trainer.train()
    # a direct engine user gets the same line, when the engine is built (before any layer is touched)
    with pytest.raises(StrategyConfigError, match="irtuning_strategy='ist' works only with irtuning_scope: adapter, "
                                                  "not irtuning_scope='full'"):
        LayerSelectionEngine(tiny_peft_llama(), SelectionConfig(strategy="ist", scope="full"))
    engine = LayerSelectionEngine(tiny_peft_llama(), SelectionConfig(strategy="ist"))
    with pytest.raises(StrategyConfigError, match="needs the Trainer's training dataloader"):
        engine.begin(None, None, check_optimizer=False)
