"""LayerSelectionEngine: seeding (every engine with the same seed picks the same layers), options checked against
the model's layer count, and the frozen layers' optimizer state (keep, cpu, drop)."""

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import TrainerCallback

from irtuning_plugin.callback import attach_layer_selection
from irtuning_plugin.config import SelectionConfig
from irtuning_plugin.engine import LayerSelectionEngine
from irtuning_plugin.layer_map import build_layer_map
from irtuning_plugin.strategies.base import StrategyConfigError

from helpers_selection import L, engine_steps, selections
from helpers_tiny import RandomTokens, make_trainer, tiny_peft_llama


@pytest.mark.parametrize("strategy,options", [
    ("lisa", {"n_layers": 2, "interval": 1}),
    ("random", {"n_layers": 3}),
    ("ist", {"update_every": 2, "first_update": 2, "estimation_batch": 4, "train_fraction": 0.5}),
])
def test_same_seed_same_layers_different_seed_differs(strategy, options):
    loader = DataLoader(RandomTokens(n=16), batch_size=4)
    a, rows_a = selections(strategy, seed=3, dataloader=loader, **options)
    b, rows_b = selections(strategy, seed=3, dataloader=loader, **options)
    c, _ = selections(strategy, seed=4, dataloader=loader, **options)
    assert a == b and a != c
    if strategy == "ist":
        assert [r.get("ist_update") for r in rows_a] == [r.get("ist_update") for r in rows_b]


@pytest.mark.parametrize("strategy,options,fragment", [
    ("lisa", {"n_layers": 7}, "irtuning_lisa_n_layers=7 exceeds the model's 6 layers"),
    ("random", {"n_layers": 40}, "irtuning_random_n_layers=40 exceeds the model's 6 layers"),
    ("fixed", {"layers": [0, 6]}, "irtuning_fixed_layers=[0, 6]: layer 6 is outside 0..5 (the model has 6 layers)"),
    ("ist", {"train_fraction": 0.1}, "irtuning_ist_train_fraction=0.1 selects int(0.1 * 6) = 0 of the model's 6"),
    ("ist", {"candidates": 30}, "irtuning_ist_candidates=30: only 20 distinct sets of 3"),
])
def test_options_checked_against_the_layer_count(strategy, options, fragment):
    with pytest.raises(StrategyConfigError) as err:
        LayerSelectionEngine(tiny_peft_llama(), SelectionConfig(strategy=strategy, strategy_options=options))
    assert fragment in str(err.value)


# ---- frozen layers' optimizer state (irtuning_frozen_optimizer_state) -----------------------------------
class StateProbe(TrainerCallback):
    """After each optimizer step: AdamW's step count of every trained layer; after our selection: where
    the state of every frozen layer is."""

    def __init__(self, cb, trainer):
        self.cb, self.trainer = cb, trainer
        self.steps, self.frozen_state, self.accounts = [], [], []

    def opt_state(self):
        return self.trainer.optimizer.optimizer.state

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.accounts.append(self.cb.engine.memory_account())

    def on_optimizer_step(self, args, state, control, **kw):
        st, params = self.opt_state(), self.cb.engine.layer_map.params
        self.steps.append({i: int(st[params[i][0]]["step"]) for i in self.cb.engine.active})

    def on_step_end(self, args, state, control, **kw):  # runs after ours: the next selection is applied
        st, eng = self.opt_state(), self.cb.engine
        frozen = [i for i in range(L) if i not in eng.active]
        self.frozen_state.append({i: [st[p] if p in st else None for p in eng.layer_map.params[i]] for i in frozen})


def run_state(tmp_path, mode, steps=8):
    model = tiny_peft_llama()
    trainer = make_trainer(model, tmp_path, max_steps=steps)
    cfg = SelectionConfig(strategy="random", frozen_optimizer_state=mode, seed=1, strategy_options={"n_layers": 2})
    cb = attach_layer_selection(trainer, cfg)
    probe = StateProbe(cb, trainer)
    trainer.add_callback(probe)
    trainer.train()
    lora = [p.detach().clone() for ps in cb.engine.layer_map.params for p in ps]
    return cb, probe, lora


def expected_adam_steps(rows, reset_on_freeze):
    count, out = {}, []
    for row in rows:
        active = set(row["active"])
        if reset_on_freeze:
            count = {i: c for i, c in count.items() if i in active}
        for i in active:
            count[i] = count.get(i, 0) + 1
        out.append({i: count[i] for i in active})
    return out


def test_frozen_optimizer_state_keep_cpu_drop(tmp_path):
    keep, pk, wk = run_state(tmp_path / "keep", "keep")
    cpu, pc, wc = run_state(tmp_path / "cpu", "cpu")
    drop, pd, wd = run_state(tmp_path / "drop", "drop")
    assert [r["active"] for r in keep.rows] == [r["active"] for r in cpu.rows] == [r["active"] for r in drop.rows]
    rows = keep.rows
    assert len({tuple(r["active"]) for r in rows}) > 2  # layers leave and come back
    # keep and cpu: AdamW's moments survive a frozen spell; drop: they restart when a layer returns
    assert pk.steps == pc.steps == expected_adam_steps(rows, reset_on_freeze=False)
    assert pd.steps == expected_adam_steps(rows, reset_on_freeze=True) != pk.steps
    # cpu changes where the state lives, never its values: the same weights as keep; drop differs
    assert all(torch.equal(a, b) for a, b in zip(wk, wc, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(wk, wd, strict=True))
    for step_states in pd.frozen_state:  # drop: no state for any frozen layer
        assert all(s is None or s == {} for states in step_states.values() for s in states)
    for step_states in pc.frozen_state:  # cpu: moments of frozen layers in CPU memory, step untouched
        for states in step_states.values():
            for s in states:
                if s:
                    assert s["exp_avg"].device.type == "cpu" and s["exp_avg_sq"].device.type == "cpu"
    # exact account before each optimizer step: 2 active layers x 10 LoRA tensors (fp32), their grads;
    # the state of the layers trained so far (2 moments + a 4-byte step each); nothing on an accelerator here
    lm = drop.engine.layer_map
    for account, row, prev in zip(pd.accounts, rows, [None] + rows[:-1], strict=True):
        active_bytes = sum(p.numel() * 4 for i in row["active"] for p in lm.params[i])
        assert account["trainable_param_bytes_host"] == account["grad_bytes_host"] == active_bytes
        held = [] if prev is None else [i for i in prev["active"] if i in row["active"]]
        assert account["optimizer_state_bytes_host"] == sum(2 * p.numel() * 4 + 4 for i in held for p in lm.params[i])
        assert account["trainable_param_bytes_accelerator"] == account["optimizer_state_bytes_accelerator"] == 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_frozen_optimizer_state_cpu_moves_moments_off_the_device(device):
    """A manual training loop with the engine: frozen layers' moments move to the CPU and come back."""
    model = tiny_peft_llama().to(device)
    lm = build_layer_map(model)
    opt = torch.optim.AdamW([p for ps in lm.params for p in ps], lr=1e-2)
    engine = LayerSelectionEngine(model, SelectionConfig(strategy="random", frozen_optimizer_state="cpu",
                                                         strategy_options={"n_layers": 2}), seed=2)
    engine.begin(opt)
    data = DataLoader(RandomTokens(n=32), batch_size=4)
    returned = 0
    for step, before in engine_steps(model, engine, opt, data, device):
        for i in range(L):
            for p in lm.params[i]:
                if p in opt.state:
                    where = device if i in engine.active else "cpu"
                    assert opt.state[p]["exp_avg"].device.type == where, (step, i)
                    assert opt.state[p]["exp_avg_sq"].device.type == where
        returned += len((set(engine.active) - before) & {i for i in range(L) if lm.params[i][0] in opt.state})
        acc = engine.memory_account()
        on_device = sum(2 * p.numel() * 4 for i in engine.active for p in lm.params[i] if p in opt.state)
        if device == "cuda":
            assert acc["optimizer_state_bytes_accelerator"] == on_device
            assert acc["trainable_param_bytes_accelerator"] == sum(p.numel() * 4 for i in engine.active
                                                                   for p in lm.params[i])
    assert returned > 0  # some layer came back and got its moments back on the device


@pytest.mark.parametrize("strategy,options,floor,averaged", [
    ("ir", {"score": "cosine"}, 0, True),
    ("ir", {"score": "cosine"}, 2, True),  # the floor wraps ir; the rule is ir's
    ("ir", {"score": "l2"}, 0, False),
    ("ir", {"score": "weight"}, 0, False),
    ("lisa", {}, 0, False),
    ("ist", {}, 0, False),
])
def test_only_scores_from_a_rank_s_own_batch_are_averaged_over_ranks(monkeypatch, strategy, options, floor,
                                                                      averaged):
    """The strategy says (scores_from_own_batch) whether its scores differ by rank; one process never averages."""
    import irtuning_plugin.engine as engine_module

    config = SelectionConfig(strategy=strategy, strategy_options=options, depth_floor=floor, selection_log=False,
                             heatmap=False)
    model = tiny_peft_llama()
    assert LayerSelectionEngine(model, config)._per_rank_scores is False
    monkeypatch.setattr(engine_module, "_dist_world", lambda: (2, 0))
    assert LayerSelectionEngine(model, config)._per_rank_scores is averaged
