"""IR-Tuning against the reference code's rules (ZhexiongLiu/IR-Tuning, ir.py; docs/strategies.md, "What happens in a step"):
the cut rule with ties and sentinels, split_num 2, the cosine and weight metrics, fp16 loss scaling."""

import math

import numpy as np
import pytest
import torch

from irtuning_plugin.callback import LayerSelectionCallback
from irtuning_plugin.config import SelectionConfig, config_from_flat
from irtuning_plugin.strategies import SENTINEL_SCORE, SelectionContext
from irtuning_plugin.strategies.ir import (
    METRIC_RULES,
    IROptions,
    IRStrategy,
    attention_output_weight,
    hidden_state_cosine,
    split_high_group,
)

from helpers_reference import reference_select
from helpers_tiny import RandomTokens, tiny_peft_llama


def ctx_for(scores, step=1, seed=0):
    scores = torch.tensor(scores, dtype=torch.float64)
    measured = scores != SENTINEL_SCORE
    return SelectionContext(step=step, num_layers=len(scores), scores=scores, ever_measured=measured,
                            fresh=measured, active=[], generator=torch.Generator().manual_seed(seed))


def random_score_vector(rng):
    """Continuous, tied (few distinct values), partly never-measured (sentinel), or all-equal scores."""
    n = int(rng.integers(16, 41))
    kind = rng.integers(0, 5)
    if kind == 0:
        s = rng.random(n) * 5
    elif kind == 1:
        s = rng.integers(0, 4, n).astype(float)
    elif kind == 2:
        s = rng.random(n) * 5
        s[rng.random(n) < rng.random()] = SENTINEL_SCORE
    elif kind == 3:
        s = np.full(n, float(rng.integers(1, 9)))
    else:
        s = np.round(rng.random(n), 1)
        s[rng.random(n) < 0.5] = SENTINEL_SCORE
    if (s == SENTINEL_SCORE).all():
        s[0] = 1.0
    return s.tolist()


@pytest.mark.parametrize("split_num", [1, 2])
def test_select_matches_the_reference_rule_on_thousands_of_vectors(split_num):
    rng = np.random.default_rng(split_num)
    strat = IRStrategy(40, IROptions(split_num=split_num))
    kinds_seen = 0
    for _ in range(3000):
        s = random_score_vector(rng)
        strat.num_layers = len(s)
        assert strat.select(ctx_for(s)) == reference_select(s, split_num)
        kinds_seen += len(set(s)) == 1
    assert kinds_seen > 100  # the all-equal case really was exercised


@pytest.mark.parametrize("metric", ["weight", "cosine"])
def test_other_metrics_split_as_the_reference_does(metric):
    rng = np.random.default_rng(7)
    rule = METRIC_RULES[metric]
    cases_where_reference_fails = 0
    for _ in range(2000):
        s = random_score_vector(rng)
        for split_num in (1, 2):
            got, kept = split_high_group(s, rule=rule)
            if split_num == 2:
                got, _ = split_high_group(kept, got, rule=rule)
            try:
                want = reference_select(s, split_num, metric)
            except ValueError:  # the reference's min([]): an empty group or window it cannot split
                want = None
            if want:
                assert sorted(got) == want
            else:  # the reference would train nothing or fail (cosine, all tied): we train the cut's group
                assert 1 <= len(got)
                cases_where_reference_fails += 1
    assert cases_where_reference_fails < 2000 * 2


def test_all_equal_scores_train_every_layer():
    assert split_high_group([5.0, 5.0, 5.0, 5.0])[0] == [0, 1, 2, 3]
    assert split_high_group([5.0] * 4, cut="in_window")[0] == [1, 2, 3]  # the bounded variant


def simulate(select, L, seed, steps=30, split_num=2):
    """A training run's selections with random fresh scores for the layers that trained."""
    rng = np.random.default_rng(seed)
    scores, out = [SENTINEL_SCORE] * L, []
    for _ in range(steps):
        s = rng.random(L).tolist() if all(x == SENTINEL_SCORE for x in scores) else scores
        chosen = select(s, split_num)
        out.append(chosen)
        for i in chosen:
            scores[i] = float(rng.random() * 5)
    return out


@pytest.mark.parametrize("L", [16, 32, 40])
def test_split_twice_runs_match_the_reference_step_for_step(L):
    strat = IRStrategy(L, IROptions(split_num=2))

    def ours(s, _):
        return strat.select(ctx_for(s))

    window_only = IRStrategy(L, IROptions(split_num=2, cut="in_window"))
    differs = 0
    for seed in range(40):
        ref = simulate(reference_select, L, seed)
        assert simulate(ours, L, seed) == ref
        differs += simulate(lambda s, _: window_only.select(ctx_for(s)), L, seed) != ref
    # Step 2: the first split returns only never-measured layers; the reference trains that block whole.
    assert differs > 20


def test_cosine_score_hand_computed():
    before = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[3.0, 0.0], [0.0, 2.0]]])  # [B=2, T=2, H=2]
    after = torch.tensor([[[1.0, 1.0], [0.0, 1.0]], [[1.0, 1.0], [2.0, 1.0]]])
    # batch means: before t0=(2,0) t1=(0,2); after t0=(1,1) t1=(1,1) -> cos = 1/sqrt2 at both positions
    assert hidden_state_cosine(before, after) == pytest.approx(1 / math.sqrt(2), abs=1e-7)


def test_cosine_metric_trains_the_low_similarity_side_on_a_real_model(tmp_path):
    from irtuning_plugin.engine import LayerSelectionEngine

    model = tiny_peft_llama(num_layers=8)
    engine = LayerSelectionEngine(model, SelectionConfig(strategy="ir", strategy_options={"score": "cosine"}))
    engine.begin(check_optimizer=False)
    model.train()
    batch = RandomTokens(n=4)[0]
    ids = batch["input_ids"][None].repeat(2, 1)
    seen = {}

    def spy(i, module, args, kwargs, output):
        if i not in seen:
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            seen[i] = hidden_state_cosine(h_in, h_out)

    engine.add_layer_forward_hook(spy)
    model(input_ids=ids, labels=ids).loss.backward()
    model(input_ids=ids, labels=ids)  # a second forward in the step is not the one the reference keeps
    engine.collect_scores()
    assert bool(engine.fresh.all())  # every layer ran forward, so every layer is measured
    assert engine.scores.tolist() == pytest.approx([seen[i] for i in range(8)], abs=1e-12)
    row = engine.end_step(1)
    want = reference_select(row["scores"], 1, "cosine")
    assert row["next_active"] == want
    assert max(engine.scores[i] for i in want) <= min(engine.scores[i] for i in range(8) if i not in want)
    engine.close()
    assert all(not layer._forward_hooks for layer in engine.layer_map.layers)


def test_weight_metric_is_the_o_proj_norm_through_peft():
    from irtuning_plugin.engine import LayerSelectionEngine

    model = tiny_peft_llama(num_layers=8)
    engine = LayerSelectionEngine(model, SelectionConfig(strategy="ir", strategy_options={"score": "weight"}))
    chosen = engine.begin(check_optimizer=False)
    base = model.get_base_model().model.layers
    norms = [float(layer.self_attn.o_proj.weight.double().norm()) for layer in base]
    assert chosen == reference_select(norms, 1, "weight")
    assert attention_output_weight(base[0]) is base[0].self_attn.o_proj.weight
    engine.collect_scores()
    assert engine.scores.tolist() == pytest.approx(norms, rel=1e-6)


@pytest.mark.parametrize("score", ["cosine", "weight"])
def test_new_metrics_validate_through_axolotl(tiny_model_dir, score):
    from helpers_axolotl import base_cfg, validate

    cfg = validate(base_cfg(tiny_model_dir, irtuning_ir_score=score, irtuning_ir_split_num=2))
    assert cfg.irtuning_ir_score == score
    assert config_from_flat(dict(cfg)).strategy_options["score"] == score


# ---- fp16: scores of unscaled gradients, unchanged on skipped steps ------------------------------------

class SimulatedFp16Accelerator:
    """accelerate's fp16 contract on the CPU with a real GradScaler: clip_grad_norm_ unscales first, and
    a second unscale_ in one step raises (as in accelerate 1.13)."""

    def __init__(self, optimizer, scale):
        self.scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1000)
        self.optimizer = optimizer

    def unscale_gradients(self, optimizer=None):
        self.scaler.unscale_(self.optimizer)

    def clip_grad_norm_(self, parameters, max_norm, norm_type=2):
        self.unscale_gradients()
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type=norm_type)


class FakeTrainer:
    def __init__(self, model, accelerator):
        self.model, self.accelerator = model, accelerator

    def log(self, logs, *a, **k):
        return logs


def scores_over_steps(scale, score, steps=4, poison_step=None):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    model = tiny_peft_llama(num_layers=6, seed=1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    acc = SimulatedFp16Accelerator(opt, scale) if scale else None
    trainer = FakeTrainer(model, acc or type("NoAmp", (), {"clip_grad_norm_": staticmethod(
        lambda ps, m, norm_type=2: torch.nn.utils.clip_grad_norm_(ps, m, norm_type=norm_type))})())
    cb = LayerSelectionCallback(SelectionConfig(strategy="ir", seed=3, selection_log=False, heatmap=False,
                                                strategy_options={"score": score}), trainer=trainer)
    args = TrainingArguments(output_dir="/tmp/irtuning-fp16-test", report_to=[], use_cpu=True, max_grad_norm=1.0)
    state, control = TrainerState(), TrainerControl()
    cb.on_train_begin(args, state, control, model=model, optimizer=opt)
    data = RandomTokens(n=8)
    history, skipped = [], []
    for step in range(1, steps + 1):
        ids = torch.stack([data[i]["input_ids"] for i in range(4)])
        loss = model(input_ids=ids, labels=ids).loss
        (acc.scaler.scale(loss) if acc else loss).backward()
        if step == poison_step:
            next(p for p in cb.engine.layer_map.params[cb.engine.active[0]]).grad[0, 0] = float("inf")
        trainer.accelerator.clip_grad_norm_(model.parameters(), 1.0)
        cb.on_pre_optimizer_step(args, state, control)
        if acc:
            acc.scaler.step(opt)
            acc.scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        state.global_step = step
        row = cb.engine.end_step(step)
        history.append(cb.engine.scores.clone())
        skipped.append(bool(row.get("optimizer_step_skipped")))
    return history, skipped


@pytest.mark.parametrize("score", ["reference", "l2"])
def test_fp16_scores_equal_fp32_scores_under_a_loss_scale(score):
    fp32, _ = scores_over_steps(None, score)
    fp16, skipped = scores_over_steps(2.0 ** 14, score)
    assert not any(skipped)
    for a, b in zip(fp32, fp16):
        assert torch.equal(a, b), (a, b)  # a power-of-two scale divides out exactly
    assert len({tuple(h.tolist()) for h in fp16}) > 1  # scores really changed between steps


def test_fp16_overflow_step_leaves_every_score_unchanged():
    history, skipped = scores_over_steps(2.0 ** 14, "reference", poison_step=3)
    assert skipped == [False, False, True, False]
    assert torch.equal(history[2], history[1])  # the step the scaler skips changes no score
    assert not torch.equal(history[3], history[2])
