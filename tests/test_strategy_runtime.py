"""StrategyRuntime: what a strategy is given at train start instead of the engine."""

import gc
import math
import types

import pytest
import torch
from torch.utils.data import DataLoader

from irtuning_plugin.config import SelectionConfig
from irtuning_plugin.depth_floor import FlooredStrategy
from irtuning_plugin.engine import LayerSelectionEngine
from irtuning_plugin.strategies import SENTINEL_SCORE
from irtuning_plugin.strategies.ir import hidden_state_cosine
from irtuning_plugin.strategies.runtime import StrategyRuntime, TrainBatches

from helpers_tiny import RandomTokens, tiny_peft_llama

L, FLOOR = 8, 3


def _ids():
    return RandomTokens(n=4)[0]["input_ids"][None].repeat(2, 1)


def test_sliced_runtime_hooks_the_layers_above_with_their_own_numbers():
    model = tiny_peft_llama(num_layers=L)
    engine = LayerSelectionEngine(model, SelectionConfig(strategy="random"))
    full = engine.strategy_runtime()
    upper = full.above(FLOOR)
    assert upper.num_layers == L - FLOOR and upper.first_layer == FLOOR
    assert all(a is b for a, b in zip(upper.layers, list(engine.layer_map.layers)[FLOOR:], strict=True))
    assert upper.above(2).first_layer == FLOOR + 2 and upper.above(2).layers == upper.layers[2:]
    seen = []
    upper.add_layer_forward_hook(lambda i, module, args, kwargs, output: seen.append((i, module)))
    model(input_ids=_ids())
    assert [i for i, _ in seen] == list(range(L - FLOOR))
    assert all(module is engine.layer_map.layers[FLOOR + i] for i, module in seen)
    assert len(engine._forward_hooks) == L - FLOOR  # the handles are the engine's: close() removes them
    engine.close()
    assert all(not layer._forward_hooks for layer in engine.layer_map.layers)
    with pytest.raises(ValueError, match="leaves no layer"):
        full.above(L)


def test_runtime_holds_the_runs_facts():
    model = tiny_peft_llama(num_layers=L)
    engine = LayerSelectionEngine(model, SelectionConfig(strategy="lisa", seed=7))
    runtime = engine.strategy_runtime()
    assert runtime.model is model and runtime.scope == "adapter" and runtime.seed == 7
    assert runtime.outside_trainable == tuple(engine.layer_map.outside_trainable)
    assert runtime.train_dataloader is None
    with pytest.raises(ValueError, match="no training dataloader"):
        with runtime.peek_batches(1):
            pass
    loader = DataLoader(RandomTokens(n=8), batch_size=4)
    engine.begin(None, loader, check_optimizer=False)
    assert engine.strategy.runtime.train_dataloader is loader  # the dataloader of the selection under way
    assert runtime.train_dataloader is loader  # shared by every runtime of the engine


def test_peeked_batches_leave_the_training_order_alone():
    torch.manual_seed(11)
    expected = [b["input_ids"].tolist() for b in DataLoader(RandomTokens(n=12), batch_size=4, shuffle=True)]
    torch.manual_seed(11)
    loader = DataLoader(RandomTokens(n=12), batch_size=4, shuffle=True)
    runtime = StrategyRuntime(model=torch.nn.Identity(), layers=(), scope="full", seed=0, batches=TrainBatches(loader))
    with runtime.peek_batches(2) as batches:
        assert [b["input_ids"].tolist() for b in batches] == expected[:2]
    assert [b["input_ids"].tolist() for b in loader] == expected


def _reaches(start, target, limit=200_000) -> bool:
    """Whether ``target`` is reachable from ``start`` through object references (functions are followed
    through their closures and defaults only, modules and classes not at all: they are shared code)."""
    seen, todo = {id(start)}, [start]
    while todo:
        obj = todo.pop()
        if obj is target:
            return True
        if isinstance(obj, (types.ModuleType, type)):
            continue
        if isinstance(obj, types.FunctionType):
            refs = [c.cell_contents for c in (obj.__closure__ or ()) if c.cell_contents is not None]
            refs += list(obj.__defaults__ or ())
        else:
            refs = gc.get_referents(obj)
        for r in refs:
            if id(r) not in seen:
                seen.add(id(r))
                todo.append(r)
        assert len(seen) < limit, "object graph too large to search"
    return False


@pytest.mark.parametrize("strategy,options,floor", [
    ("ir", {"score": "cosine"}, None),
    ("ir", {"score": "cosine"}, FLOOR),
    ("ir", {"score": "weight"}, FLOOR),
    ("ist", {"first_update": 1, "update_every": 1, "estimation_batch": 4}, FLOOR),
    ("lisa", {"train_outside": False}, None),
    ("salf", {"calibration_batches": 1}, None),
    ("random", {"n_layers": 2}, "salf"),
])
def test_a_strategy_cannot_reach_the_engine(strategy, options, floor):
    model = tiny_peft_llama(num_layers=L)
    config = SelectionConfig(strategy=strategy, strategy_options=options, depth_floor=floor)
    engine = LayerSelectionEngine(model, config)
    loader = DataLoader(RandomTokens(n=8), batch_size=4)
    engine.begin(None, loader, check_optimizer=False)
    model.train()
    model(input_ids=_ids())
    engine.collect_scores()
    engine.end_step(1, loader)
    assert engine.strategy.runtime is not None
    assert not _reaches(engine.strategy, engine)
    assert _reaches(engine, engine.strategy)  # the search does find what is there
    engine.close()


def test_the_floored_wrapper_forwards_nothing_implicitly():
    assert "__getattr__" not in vars(FlooredStrategy) and not hasattr(FlooredStrategy, "__getattr__")
    model = tiny_peft_llama(num_layers=L)
    engine = LayerSelectionEngine(model, SelectionConfig(strategy="ist", depth_floor=FLOOR))
    engine.begin(None, DataLoader(RandomTokens(n=8), batch_size=4), check_optimizer=False)
    assert len(engine.strategy.inner.importance) == L - FLOOR
    with pytest.raises(AttributeError):
        engine.strategy.importance  # noqa: B018 - the inner strategy's state is read through .inner
    assert engine.strategy.inner.runtime.first_layer == FLOOR and engine.strategy.runtime.first_layer == 0


def test_ir_cosine_above_a_floor_scores_the_layers_above():
    """Hooked through the sliced runtime, layer i of the strategy is the model's layer FLOOR + i (through the
    engine itself the hook numbered the model's layers and indexed past the strategy's scores)."""
    model = tiny_peft_llama(num_layers=L)
    engine = LayerSelectionEngine(model, SelectionConfig(strategy="ir", depth_floor=FLOOR,
                                                         strategy_options={"score": "cosine"}))
    engine.begin(check_optimizer=False)
    model.train()
    seen = {}

    def spy(i, module, args, kwargs, output):
        if i not in seen:
            h_in = args[0] if args else kwargs["hidden_states"]
            seen[i] = hidden_state_cosine(h_in, output[0] if isinstance(output, tuple) else output)

    engine.add_layer_forward_hook(spy)  # the engine's numbering: every layer
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()
    engine.collect_scores()
    assert engine.fresh.tolist() == [False] * FLOOR + [True] * (L - FLOOR)
    assert engine.scores[:FLOOR].tolist() == [SENTINEL_SCORE] * FLOOR
    assert engine.scores[FLOOR:].tolist() == pytest.approx([seen[i] for i in range(FLOOR, L)], abs=1e-12)
    assert all(not math.isnan(seen[i]) for i in range(L))
    row = engine.end_step(1)
    assert row["next_active"] and min(row["next_active"]) >= FLOOR
    engine.close()
    assert all(not layer._forward_hooks for layer in engine.layer_map.layers)
