"""The depth floor (irtuning_depth_floor): layers below it never train and backward never reaches them."""

import pytest
import torch
from transformers import TrainerCallback

from irtuning_plugin.callback import attach_layer_selection
from irtuning_plugin.config import SelectionConfig, config_from_flat
from irtuning_plugin.engine import LayerSelectionEngine
from irtuning_plugin.layer_map import build_layer_map
from irtuning_plugin.strategies import SENTINEL_SCORE, StrategyConfigError
from irtuning_plugin.strategies.ir import split_high_group

from helpers_tiny import make_trainer, tiny_peft_llama

L, FLOOR = 8, 3
OPTIONS = {
    "all": {},
    "ir": {},
    "ist": {"train_fraction": 0.4, "first_update": 2, "update_every": 2, "estimation_batch": 4},
    "lisa": {"n_layers": 2, "interval": 2},
    "random": {"n_layers": 2},
}


class Watch(TrainerCallback):
    """Per step: which layers' outputs required grad (so backward can reach them), how many tensors each
    layer saved for backward, and which layers held gradients before the optimizer step."""

    def __init__(self, layers):
        self.layers = layers
        self.out_requires_grad, self.saved, self.with_grad = [], [], []
        self.current = None
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(lambda m, a, i=i: setattr(self, "current", i))
            layer.register_forward_hook(self._post(i))

    def _post(self, i):
        def hook(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            if torch.is_grad_enabled():
                self.out_requires_grad[-1][i] = bool(out.requires_grad)
            self.current = None
        return hook

    def _pack(self, t):
        if self.current is not None:
            self.saved[-1][self.current] += 1
        return t

    def on_step_begin(self, args, state, control, **kw):
        self.out_requires_grad.append([None] * len(self.layers))
        self.saved.append([0] * len(self.layers))
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self._ctx.__exit__(None, None, None)
        self.with_grad.append(sorted({i for i, layer in enumerate(self.layers)
                                      for p in layer.parameters() if p.grad is not None}))


def run(tmp_path, strategy, floor=FLOOR, steps=4, **engine):
    model = tiny_peft_llama(num_layers=L)
    model.enable_input_require_grads()  # what Axolotl does for every adapter run: the engine must cut it
    trainer = make_trainer(model, tmp_path, max_steps=steps)
    cb = attach_layer_selection(trainer, SelectionConfig(strategy=strategy, depth_floor=floor, heatmap=False,
                                                         strategy_options=OPTIONS.get(strategy, {}), **engine))
    watch = Watch(build_layer_map(model).layers)
    trainer.add_callback(watch)
    trainer.train()
    return cb, watch


@pytest.mark.parametrize("strategy", ["all", "ir", "ist", "lisa", "random"])
def test_backward_never_reaches_below_the_floor(tmp_path, strategy):
    cb, watch = run(tmp_path, strategy)
    assert len(cb.rows) == 4
    for row, req, saved, grads in zip(cb.rows, watch.out_requires_grad, watch.saved, watch.with_grad, strict=True):
        active = row["active"]
        assert active and min(active) >= FLOOR, (strategy, active)
        lowest = min(active)
        # autograd graph: no layer below the lowest trained one is part of it ...
        assert req[:lowest] == [False] * lowest and all(req[lowest:]), (strategy, active, req)
        # ... so none of them saved a tensor for backward, and the trained ones did
        assert saved[:FLOOR] == [0] * FLOOR and saved[lowest] > 0, (strategy, saved)
        assert grads == active
    assert cb.rows[0]["depth_floor"] == FLOOR and "depth_floor" not in cb.rows[1]


def test_control_without_floor_reaches_layer_zero(tmp_path):
    """The same check sees backward at layer 0 when the strategy may pick it (all, no floor)."""
    cb, watch = run(tmp_path, "all", floor=None, steps=1)
    assert watch.saved[0][0] > 0 and all(watch.out_requires_grad[0])


def test_ir_window_and_split_apply_to_the_layers_above(tmp_path):
    cb, _ = run(tmp_path, "ir", steps=5)
    inner = cb.engine.strategy.inner
    assert inner.num_layers == L - FLOOR
    for prev, row in zip(cb.rows, cb.rows[1:]):
        assert row["scores"][:FLOOR] == [SENTINEL_SCORE] * FLOOR  # never scored below the floor
        assert all(i >= FLOOR for i in row["fresh"])
        expected, _ = split_high_group(prev["scores"][FLOOR:])  # the reference split over L - FLOOR layers
        assert prev["next_active"] == sorted(i + FLOOR for i in expected)


def test_ist_importance_covers_the_layers_above(tmp_path):
    cb, _ = run(tmp_path, "ist", steps=3)
    assert len(cb.engine.strategy.inner.importance) == L - FLOOR
    update = next(r["ist_update"] for r in cb.rows if "ist_update" in r)
    assert all(0 <= i < L - FLOOR for s in update["suppressed"] for i in s)  # the strategy's own numbering


def test_floor_from_salf_is_the_salf_cut_plus_one(tmp_path):
    model = tiny_peft_llama(num_layers=L)
    trainer = make_trainer(model, tmp_path / "salf", max_steps=1)
    cb_salf = attach_layer_selection(trainer, SelectionConfig(strategy="salf", heatmap=False))
    trainer.train()
    cut = cb_salf.rows[0]["salf_cut"]
    model = tiny_peft_llama(num_layers=L)
    trainer = make_trainer(model, tmp_path / "floor", max_steps=2)
    cb = attach_layer_selection(trainer, SelectionConfig(strategy="random", depth_floor="salf", heatmap=False,
                                                         strategy_options={"n_layers": 1}))
    trainer.train()
    first = cb.rows[0]
    # the same calibration as the salf strategy's (default options, the same first batches)
    assert first["salf_cut"] == cut and first["depth_floor"] == cut + 1 and first["salf_source"] == "calibration"
    assert all(min(r["active"]) >= first["depth_floor"] for r in cb.rows)


@pytest.mark.parametrize("value,message", [
    (-1, "irtuning_depth_floor=-1; allowed: a whole number of layers >= 0, or 'salf'"),
    (True, "irtuning_depth_floor=True; must be a whole number or salf"),  # the key's type (config.py)
    ("deep", "irtuning_depth_floor='deep'; must be a whole number or salf"),
])
def test_bad_floor_refused_with_one_line(value, message):
    with pytest.raises(StrategyConfigError) as err:
        config_from_flat({"irtuning_strategy": "ir", "irtuning_depth_floor": value})
    assert str(err.value) == message


@pytest.mark.parametrize("strategy", ["salf", "fixed"])
def test_floor_refused_with_strategies_that_fix_their_layers(strategy):
    flat = {"irtuning_strategy": strategy, "irtuning_depth_floor": 2}
    if strategy == "fixed":
        flat["irtuning_fixed_layers"] = [5]
    with pytest.raises(StrategyConfigError, match=rf"^irtuning_depth_floor=2 cannot be combined with "
                                                   rf"irtuning_strategy='{strategy}'"):
        config_from_flat(flat)


def test_floor_checked_against_the_model():
    model = tiny_peft_llama(num_layers=L)
    with pytest.raises(StrategyConfigError, match=r"^irtuning_depth_floor=8 leaves no layer to train in a 8-layer"):
        LayerSelectionEngine(model, config_from_flat({"irtuning_strategy": "ir", "irtuning_depth_floor": 8}))
    cfg = config_from_flat({"irtuning_strategy": "lisa", "irtuning_depth_floor": 7, "irtuning_lisa_n_layers": 2})
    with pytest.raises(StrategyConfigError, match=r"exceeds the model's 1 layers \(with irtuning_depth_floor=7 the "
                                                   r"strategy works over the 1 layers 7\.\.7\)"):
        LayerSelectionEngine(model, cfg)
    assert LayerSelectionEngine(model, config_from_flat({"irtuning_strategy": "ir", "irtuning_depth_floor": 0})
                                ).strategy.name == "ir"


def test_floor_from_salf_survives_a_checkpoint(tmp_path):
    """A resumed run keeps the floor it calibrated (no new calibration: none is possible without data)."""
    cb, _ = run(tmp_path, "ir", floor="salf", steps=3)
    state = cb.engine.state_dict()
    model = tiny_peft_llama(num_layers=L)
    engine = LayerSelectionEngine(model, SelectionConfig(strategy="ir", depth_floor="salf"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    engine.begin(opt, None, state=state)
    assert engine.strategy.floor == cb.engine.strategy.floor == state["strategy_state"]["depth_floor"]
    assert engine.active == cb.engine.active and min(engine.active) >= engine.strategy.floor
    assert engine.end_step(4)["next_active"] == cb.engine.end_step(4)["next_active"]


def test_axolotl_checks_strategy_options_against_the_layers_above_the_floor(tiny_model_dir):
    from helpers_axolotl import base_cfg, validate

    # the tiny model has 8 layers: 4 random layers fit above a floor of 4, 5 do not -- refused before loading
    validate(base_cfg(tiny_model_dir, irtuning_strategy="random", irtuning_random_n_layers=4,
                      irtuning_depth_floor=4))
    with pytest.raises(Exception) as err:
        validate(base_cfg(tiny_model_dir, irtuning_strategy="random", irtuning_random_n_layers=5,
                          irtuning_depth_floor=4))
    assert "irtuning_random_n_layers" in str(err.value)
    with pytest.raises(Exception) as err:
        validate(base_cfg(tiny_model_dir, irtuning_depth_floor=8))
    assert "irtuning_depth_floor=8 leaves no layer to train" in str(err.value)
