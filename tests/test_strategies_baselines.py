"""The baseline strategies (lisa, ist, random, fixed) and the engine's frozen-optimizer-state option."""

import math

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import TrainerCallback

from irtuning_plugin.callback import attach_layer_selection
from irtuning_plugin.config import SelectionConfig, config_from_flat
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

from helpers_tiny import RandomTokens, make_trainer, tiny_peft_llama
from test_engine import Recorder, run_tiny

L = 6  # layers of the tiny model


def assert_only_selected_layers_trained(rows, rec):
    for step, row in enumerate(rows):
        for layer in range(L):
            changed, grads = rec.changed[step][layer], rec.has_grad[step][layer]
            if layer in row["active"]:
                assert all(changed) and all(grads), (step, layer)
            else:
                assert not any(changed) and not any(grads), f"frozen layer {layer} trained at step {step + 1}"


def selections(strategy, seed=0, steps=8, dataloader=None, **options):
    """The layers each step trains, from an engine driven without training (begin + end_step)."""
    engine = LayerSelectionEngine(tiny_peft_llama(), SelectionConfig(strategy=strategy, strategy_options=options),
                                  seed=seed)
    out = [engine.begin(None, dataloader, check_optimizer=False)]
    rows = [engine.end_step(step, dataloader) for step in range(1, steps + 1)]
    return out + [r["next_active"] for r in rows], rows


# ---- IST: pure parts ---------------------------------------------------------------------------------
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


# ---- engine runs on the tiny PEFT Llama: exactly the chosen layers train ------------------------------
def test_lisa_trains_its_layers_and_redraws_every_interval(tmp_path):
    cb, rec, _ = run_tiny(tmp_path, strategy="lisa", max_steps=7, strategy_options={"n_layers": 2, "interval": 3})
    actives = [r["active"] for r in cb.rows]
    assert all(len(a) == 2 for a in actives)
    assert actives[0] == actives[1] == actives[2] and actives[3] == actives[4] == actives[5]
    assert_only_selected_layers_trained(cb.rows, rec)


def test_random_trains_n_fresh_layers_each_step(tmp_path):
    cb, rec, _ = run_tiny(tmp_path, strategy="random", max_steps=5, strategy_options={"n_layers": 2})
    assert all(r["n_active"] == 2 for r in cb.rows) and len({tuple(r["active"]) for r in cb.rows}) > 1
    assert_only_selected_layers_trained(cb.rows, rec)


def test_fixed_trains_its_list(tmp_path):
    cb, rec, _ = run_tiny(tmp_path, strategy="fixed", max_steps=3, strategy_options={"layers": [4, 1]})
    assert all(r["active"] == [1, 4] for r in cb.rows)
    assert_only_selected_layers_trained(cb.rows, rec)


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


# ---- seeding: every rank (every engine with the same seed) picks the same layers -----------------------
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


def test_lisa_changes_layers_only_every_interval():
    seq, _ = selections("lisa", steps=11, n_layers=3, interval=4)
    # seq[k] = layers of step k+1; draws at steps 0, 4, 8 -> blocks of 4 steps
    assert seq[0:4] == [seq[0]] * 4 and seq[4:8] == [seq[4]] * 4 and seq[8:12] == [seq[8]] * 4
    assert len({tuple(seq[0]), tuple(seq[4]), tuple(seq[8])}) > 1
    assert all(len(x) == 3 for x in seq)


def test_random_count_is_exact():
    seq, _ = selections("random", steps=10, n_layers=5)
    assert all(len(x) == 5 for x in seq) and len({tuple(x) for x in seq}) > 1


# ---- LISA over full fine-tuning -----------------------------------------------------------------------
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


# ---- frozen layers' optimizer state -------------------------------------------------------------------
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
    for step, batch in enumerate(data, start=1):
        before = set(engine.active)
        model(**{k: v.to(device) for k, v in batch.items()}).loss.backward()
        engine.collect_scores()
        opt.step()
        opt.zero_grad(set_to_none=True)
        engine.end_step(step)
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


# ---- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("flat,fragment", [
    ({"irtuning_strategy": "lisa", "irtuning_lisa_n_layers": 0}, "irtuning_lisa_n_layers=0; must be >= 1"),
    ({"irtuning_strategy": "lisa", "irtuning_lisa_interval": 0}, "irtuning_lisa_interval=0; must be"),
    ({"irtuning_strategy": "lisa", "irtuning_lisa_train_outside": "no"}, "irtuning_lisa_train_outside='no'"),
    ({"irtuning_strategy": "random", "irtuning_random_n_layers": "4"}, "irtuning_random_n_layers='4'; must be"),
    ({"irtuning_strategy": "fixed"}, "irtuning_fixed_layers is required"),
    ({"irtuning_strategy": "fixed", "irtuning_fixed_layers": []}, "irtuning_fixed_layers=[]; must be a non-empty"),
    ({"irtuning_strategy": "fixed", "irtuning_fixed_layers": [1, 1]}, "irtuning_fixed_layers=[1, 1] lists a layer"),
    ({"irtuning_strategy": "fixed", "irtuning_fixed_layers": [-1]}, "layer -1 is outside"),
    ({"irtuning_strategy": "fixed", "irtuning_fixed_layers": ["a"]}, "irtuning_fixed_layers=['a']; must be a list of whole numbers ('a' is not"),
    ({"irtuning_strategy": "ist", "irtuning_ist_train_fraction": 0}, "irtuning_ist_train_fraction=0; must be a "),
    ({"irtuning_strategy": "ist", "irtuning_ist_candidates": 1}, "irtuning_ist_candidates=1; must be a whole"),
    ({"irtuning_strategy": "ist", "irtuning_ist_suppress_factor": 1.0}, "irtuning_ist_suppress_factor=1.0"),
    ({"irtuning_strategy": "ist", "irtuning_ist_lr": -1}, "irtuning_ist_lr=-1; must be > 0"),
    ({"irtuning_frozen_optimizer_state": "gpu"}, "irtuning_frozen_optimizer_state='gpu'; allowed: keep, cpu, drop"),
    ({"irtuning_strategy": "random", "irtuning_lisa_n_layers": 2}, "irtuning_lisa_n_layers is an option of"),
])
def test_bad_config_is_refused_with_the_key(flat, fragment):
    with pytest.raises(StrategyConfigError) as err:
        config_from_flat(flat)
    assert fragment in str(err.value) and "\n" not in str(err.value)


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


# ---- Axolotl's config path ---------------------------------------------------------------------------
@pytest.mark.parametrize("over,fragment", [
    ({"irtuning_strategy": "lisa", "irtuning_lisa_n_layers": 99}, "irtuning_lisa_n_layers=99 exceeds the model's 8"),
    ({"irtuning_strategy": "random", "irtuning_random_n_layers": 9}, "irtuning_random_n_layers=9 exceeds the model's"),
    ({"irtuning_strategy": "fixed", "irtuning_fixed_layers": [0, 8]}, "layer 8 is outside 0..7"),
    ({"irtuning_strategy": "fixed"}, "irtuning_fixed_layers is required"),
    ({"irtuning_strategy": "ist", "irtuning_ist_train_fraction": 0.1}, "irtuning_ist_train_fraction=0.1 selects"),
    ({"irtuning_strategy": "ist", "irtuning_scope": "full", "adapter": None},
     "irtuning_strategy='ist' works only with irtuning_scope: adapter"),
    ({"irtuning_frozen_optimizer_state": "gpu"}, "irtuning_frozen_optimizer_state='gpu'"),
])
def test_axolotl_validation_refuses_bad_baseline_options(tiny_model_dir, over, fragment):
    from helpers_axolotl import base_cfg, validate

    with pytest.raises(Exception) as err:
        validate(base_cfg(tiny_model_dir, **over))
    assert fragment in str(err.value), str(err.value)


def test_axolotl_validation_accepts_baseline_options(tiny_model_dir):
    from helpers_axolotl import base_cfg, validate

    cfg = validate(base_cfg(tiny_model_dir, irtuning_strategy="lisa", irtuning_lisa_n_layers=8,
                            irtuning_frozen_optimizer_state="drop"))
    assert cfg.irtuning_lisa_n_layers == 8 and cfg.irtuning_frozen_optimizer_state == "drop"
