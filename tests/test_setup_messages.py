"""Refusals that say what to change: scope full on a LoRA model, options above a depth floor, seed ranges."""

import pytest
import torch

from irtuning_plugin.callback import attach_layer_selection
from irtuning_plugin.config import SEED_MAX, SelectionConfig, config_from_flat
from irtuning_plugin.depth_floor import check_options_above_floor
from irtuning_plugin.engine import SelectionError
from irtuning_plugin.strategies.base import StrategyConfigError
from irtuning_plugin.strategies.random_layers import RandomOptions

from helpers_tiny import make_trainer, tiny_peft_llama


def test_scope_full_on_a_lora_model_says_what_to_change(tmp_path):
    trainer = make_trainer(tiny_peft_llama(), tmp_path, max_steps=1)
    attach_layer_selection(trainer, SelectionConfig(scope="full"))
    with pytest.raises(SelectionError) as err:
        trainer.train()
    message = str(err.value)
    assert "\n" not in message
    assert "irtuning_scope='full'" in message and "LoRA/PEFT adapters" in message
    assert "use irtuning_scope: adapter" in message and "without an adapter" in message


def test_option_above_the_floor_names_the_floor_and_the_layers_above_it():
    with pytest.raises(StrategyConfigError) as err:
        check_options_above_floor(RandomOptions(n_layers=5), "irtuning_random_", 8, 4)
    message = str(err.value)
    assert message.startswith("irtuning_random_n_layers=5 exceeds")
    assert "irtuning_depth_floor=4" in message and "4 layers 4..7" in message and "the model has 8" in message
    check_options_above_floor(RandomOptions(n_layers=4), "irtuning_random_", 8, 4)  # fits


@pytest.mark.parametrize("seed", [-1, SEED_MAX + 1, 2**64])
def test_seed_outside_the_generator_range_is_refused_naming_the_key(seed):
    with pytest.raises(StrategyConfigError) as err:
        config_from_flat({"irtuning_seed": seed})
    assert str(err.value) == f"irtuning_seed={seed}; must be a whole number in 0..{SEED_MAX}"


@pytest.mark.parametrize("seed", [0, SEED_MAX])
def test_seeds_at_the_ends_of_the_range_work(seed):
    from irtuning_plugin.engine import LayerSelectionEngine

    config = config_from_flat({"irtuning_seed": seed, "irtuning_strategy": "random"})
    engine = LayerSelectionEngine(tiny_peft_llama(), config, seed=config.seed)
    assert engine.seed == seed
    torch.Generator().manual_seed(seed + 1)  # ist derives seed + 1 for its data order


def test_engine_takes_irtuning_seed_when_no_seed_is_passed():
    from irtuning_plugin.engine import LayerSelectionEngine

    assert LayerSelectionEngine(tiny_peft_llama(), SelectionConfig(strategy="random", seed=9)).seed == 9
    assert LayerSelectionEngine(tiny_peft_llama(), SelectionConfig(strategy="random", seed=9), seed=4).seed == 4
