"""SALF-style freezing: calibration numerics, the cut rule, and engine runs on the tiny PEFT Llama."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from irtuning_plugin.callback import attach_layer_selection
from irtuning_plugin.config import SelectionConfig, config_from_flat
from irtuning_plugin.engine import LayerSelectionEngine
from irtuning_plugin.layer_map import build_layer_map
from irtuning_plugin.salf_calibration import (
    choose_cut,
    cut_range,
    deviation_curve,
    find_final_norm,
    fit_power_law,
    layer_gains,
)
from irtuning_plugin.strategies import StrategyConfigError
from irtuning_plugin.strategies.runtime import StrategyRuntime, TrainBatches
from irtuning_plugin.strategies.salf import PLOT, SALFOptions, SALFStrategy

from helpers_tiny import RandomTokens, make_trainer, tiny_peft_llama

L = 6  # layers of the tiny model


@pytest.fixture(scope="module")
def tiny():
    return tiny_peft_llama()


def _batches(n=2, batch_size=4):
    data = RandomTokens()
    return [torch.utils.data.default_collate([data[i] for i in range(b * batch_size, (b + 1) * batch_size)])
            for b in range(n)]


# ---- calibration -----------------------------------------------------------------------------------
def _reference_curve(model, batch, metric):
    """Independent recomputation from HF's output_hidden_states and torch.linalg.pinv."""
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True)
    targets = batch["labels"][:, 1:].reshape(-1)
    norm = find_final_norm(model)
    W = model.get_output_embeddings().weight.detach().float()
    bases = F.normalize(torch.linalg.pinv(W.T.double()).float(), dim=-1)  # row v: e_v · (Wᵀ)⁺
    curve = []
    for k, h in enumerate(out.hidden_states):
        h = h[:, :-1].reshape(-1, h.shape[-1])
        h = h if k == len(out.hidden_states) - 1 else norm(h)  # HF's last slot is already normed
        if metric == "logit_lens":
            logits = h @ W.T
        else:
            logits = F.normalize(h, dim=-1) @ bases.T * math.sqrt(W.shape[1])
        curve.append(F.cross_entropy(logits, targets).item())
    return curve


@pytest.mark.parametrize("metric", ["logit_lens", "vocab_semantics"])
def test_calibration_curve_matches_a_reference(tiny, metric):
    layers = build_layer_map(tiny).layers
    tiny.train()
    batches = _batches()
    curve = deviation_curve(tiny, layers, batches, metric=metric)
    assert len(curve.deviation) == L + 1 and all(math.isfinite(v) for v in curve.deviation)
    assert curve.tokens == 2 * 4 * 15 and curve.batches == 2
    assert all(m.training for m in tiny.modules())  # train/eval flags restored
    ref = np.mean([_reference_curve(tiny, b, metric) for b in batches], axis=0)  # equal token counts
    np.testing.assert_allclose(curve.deviation, ref, rtol=1e-4)
    if metric == "logit_lens":
        with torch.no_grad():
            losses = [tiny(**b).loss.item() for b in batches]
        assert curve.deviation[-1] == pytest.approx(np.mean(losses), rel=1e-5)  # the last point: the model's loss


def test_calibration_in_bf16_is_close_to_fp32(tiny):
    low = copy.deepcopy(tiny).to(torch.bfloat16)
    for metric in ("logit_lens", "vocab_semantics"):
        ref = deviation_curve(tiny, build_layer_map(tiny).layers, _batches(), metric=metric).deviation
        got = deviation_curve(low, build_layer_map(low).layers, _batches(), metric=metric).deviation
        np.testing.assert_allclose(got, ref, rtol=5e-3)


@pytest.mark.parametrize("own_generator", [False, True])
def test_reading_calibration_batches_leaves_the_data_order_alone(own_generator):
    def loader():
        g = torch.Generator().manual_seed(3) if own_generator else None
        return torch.utils.data.DataLoader(range(20), batch_size=4, shuffle=True, generator=g)

    torch.manual_seed(5)
    expected = [b.tolist() for b in loader()]
    torch.manual_seed(5)
    dl = loader()
    runtime = StrategyRuntime(model=torch.nn.Identity(), layers=(), scope="adapter", seed=0,
                              batches=TrainBatches(dl))
    with runtime.peek_batches(2) as batches:
        assert [b.tolist() for b in batches] == expected[:2]  # the same first batches training will see
    assert [b.tolist() for b in dl] == expected


def test_calibration_without_labels_reads_every_attended_token(tiny):
    layers = build_layer_map(tiny).layers
    batch = _batches(1)[0]
    with_labels = deviation_curve(tiny, layers, [batch])
    unlabeled = deviation_curve(tiny, layers, [{k: v for k, v in batch.items() if k != "labels"}])
    assert unlabeled.tokens == with_labels.tokens
    np.testing.assert_allclose(unlabeled.deviation, with_labels.deviation)
    masked = dict(batch, labels=torch.full_like(batch["labels"], -100))
    with pytest.raises(RuntimeError, match="no trained"):
        deviation_curve(tiny, layers, [masked])


# ---- from a curve to a cut -------------------------------------------------------------------------
def test_raw_gain_and_bounds():
    d = [5.0, 4.5, 4.0, 2.0, 1.5, 1.0, 0.5]  # the big drop is across layer 2
    gains, fit = layer_gains(d, "raw")
    assert fit is None and gains == [0.5, 0.5, 2.0, 0.5, 0.5, 0.5]
    assert choose_cut(gains) == 2  # layers 0..2 freeze, 3 train
    assert choose_cut(gains, max_trainable=2) == 3  # cuts 3..4 allowed; tie -> lower cut
    assert choose_cut(gains, min_trainable=4) == 0  # cuts 0..1 allowed
    assert choose_cut(gains, min_trainable=6) == -1  # all six train
    assert choose_cut([0.0, 0.0, 0.0, 0.0, 1.0, 9.0]) == 4  # min_trainable=1: layer 5 is never the cut
    assert cut_range(6) == (-1, 4) and cut_range(6, 2, 3) == (2, 3)


def test_power_law_fit_and_gain():
    k = np.arange(7)
    d = 2.0 * (k + 1.0) ** -0.8 + 1.0
    fit = fit_power_law(d)
    assert (fit.a, fit.b, fit.c) == pytest.approx((2.0, 0.8, 1.0), abs=1e-3)
    bumped = d.copy()
    bumped[5:] -= 0.3  # layer 4 drops more than the trend
    assert choose_cut(layer_gains(bumped, "raw")[0]) == 0  # the steep start of the power law wins raw
    gains, fit = layer_gains(bumped, "power_law")
    assert fit is not None and choose_cut(gains) == 4
    assert choose_cut(gains, max_trainable=3) == 4 and choose_cut(gains, min_trainable=2) < 4
    flat, fit = layer_gains([3.0] * 7, "power_law")
    assert flat == [0.0] * 6 and choose_cut(flat) == 0


def test_manual_cut_skips_calibration():
    strat = SALFStrategy(L, SALFOptions(cut=3))

    class Ctx:
        step, num_layers = 0, L

    assert strat.select(Ctx()) == [4, 5]
    assert strat.log_fields() == {"salf_cut": 3, "salf_source": "option"} and strat.log_fields() == {}
    with pytest.raises(RuntimeError, match="irtuning_salf_cut"):  # no dataloader, no cut: cannot calibrate
        SALFStrategy(L).select(Ctx())


# ---- engine runs -------------------------------------------------------------------------------------
class Changed(TrainerCallback):
    def __init__(self, layer_map):
        self.lm, self.changed = layer_map, []

    def on_step_begin(self, args, state, control, **kw):
        self.before = [[p.detach().clone() for p in ps] for ps in self.lm.params]

    def on_step_end(self, args, state, control, **kw):
        self.changed.append([[not torch.equal(b, p.detach()) for b, p in zip(bs, ps, strict=True)]
                             for bs, ps in zip(self.before, self.lm.params, strict=True)])


def run_salf(out_dir, max_steps=2, grad_ckpt=False, cut_backward=True, axolotl_hook=True, **options):
    model = tiny_peft_llama()
    if axolotl_hook:
        model.enable_input_require_grads()  # what Axolotl does for every adapter run
    kw = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}} if grad_ckpt else {}
    trainer = make_trainer(model, out_dir, max_steps=max_steps, **kw)
    cfg = SelectionConfig(strategy="salf", cut_backward=cut_backward,
                          strategy_options={"calibration_batches": 2, **options})
    cb = attach_layer_selection(trainer, cfg)
    lm = build_layer_map(model)
    changed = Changed(lm)
    trainer.add_callback(changed)
    backward_seen = []
    for i, layer in enumerate(lm.layers):
        layer.register_full_backward_hook(lambda m, gi, go, i=i: backward_seen.append(i))
    trainer.train()
    return cb, changed, set(backward_seen), trainer


def test_engine_run_freezes_below_the_calibrated_cut(tmp_path):
    cb, changed, _, trainer = run_salf(tmp_path / "a", max_trainable=3)
    first = cb.rows[0]
    cut = first["salf_cut"]
    assert 2 <= cut <= 4 and first["salf_source"] == "calibration"
    assert len(first["salf_deviation"]) == L + 1 and len(first["salf_gains"]) == L
    assert all(math.isfinite(v) for v in first["salf_deviation"])
    assert cut == choose_cut(first["salf_gains"], 1, 3)
    assert "salf_deviation" not in cb.rows[1]  # logged once
    for row, step in zip(cb.rows, changed.changed, strict=True):
        assert row["active"] == list(range(cut + 1, L)) and row["lowest_active"] == cut + 1
        for layer in range(L):
            assert all(step[layer]) if layer > cut else not any(step[layer]), (layer, cut)
    png = tmp_path / "a" / PLOT
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    # the calibration pass leaves the training data order and RNG alone: the same cut given by hand
    # (no calibration) trains to bit-identical losses
    manual, _, _, trainer_manual = run_salf(tmp_path / "b", cut=cut)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses == [h["loss"] for h in trainer_manual.state.log_history if "loss" in h]
    assert not (tmp_path / "b" / PLOT).exists()  # nothing to plot without a calibration


@pytest.mark.parametrize("grad_ckpt,cut_backward,axolotl_hook", [
    (False, True, True),
    (True, True, False),  # the Trainer's gradient_checkpointing_enable() registers the input-grad hook itself
    # enable_input_require_grads() twice (Axolotl, then the Trainer for checkpointing): both hooks must go
    (True, True, True),
    (False, False, True),  # control: the hook stays, backprop runs to layer 0
])
def test_no_backward_below_the_cut(tmp_path, grad_ckpt, cut_backward, axolotl_hook):
    cb, _, seen, _ = run_salf(tmp_path, max_steps=1, grad_ckpt=grad_ckpt, cut_backward=cut_backward,
                              axolotl_hook=axolotl_hook, metric="vocab_semantics", estimator="raw", max_trainable=3)
    cut = cb.rows[0]["salf_cut"]
    assert cb.engine.backward_cut is cut_backward
    assert cut + 1 in seen  # the hooks do fire on trained layers
    if cut_backward:
        assert cut not in seen and min(seen) == cut + 1  # no backward at or below the cut
    else:
        assert min(seen) == 0


# ---- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value,message", [
    ("metric", "kl", "irtuning_salf_metric='kl'; allowed: logit_lens, vocab_semantics"),
    ("estimator", "spline", "irtuning_salf_estimator='spline'; allowed: power_law, raw"),
    ("calibration_batches", 0, "irtuning_salf_calibration_batches=0; must be an integer >= 1"),
    ("min_trainable", 0, "irtuning_salf_min_trainable=0; allowed 1..L"),
    ("max_trainable", -2, "irtuning_salf_max_trainable=-2; allowed 1..L"),
    ("cut", -1, "irtuning_salf_cut=-1; allowed 0..L-2 (L-1 would train nothing)"),
    ("semantics_temperature", 0.0, "irtuning_salf_semantics_temperature=0.0; must be a number > 0"),
])
def test_bad_options_refused_with_one_line(key, value, message):
    with pytest.raises(StrategyConfigError) as err:
        config_from_flat({"irtuning_strategy": "salf", f"irtuning_salf_{key}": value})
    assert str(err.value) == message


def test_min_above_max_refused():
    with pytest.raises(StrategyConfigError, match=r"^irtuning_salf_min_trainable=4 > irtuning_salf_max_trainable=2;"):
        config_from_flat({"irtuning_strategy": "salf", "irtuning_salf_min_trainable": 4,
                          "irtuning_salf_max_trainable": 2})


@pytest.mark.parametrize("options,message", [
    ({"cut": 5}, "irtuning_salf_cut=5; allowed 0..4 for a 6-layer model"),
    ({"max_trainable": 7}, "irtuning_salf_max_trainable=7; allowed 1..6 for a 6-layer model"),
    ({"min_trainable": 9}, "irtuning_salf_min_trainable=9; allowed 1..6 for a 6-layer model"),
    ({"cut": 0, "max_trainable": 2}, "irtuning_salf_cut=0 trains 5 of 6 layers, outside "
                                     "irtuning_salf_min_trainable=1..irtuning_salf_max_trainable=2"),
])
def test_layer_count_checked_by_the_engine(tiny, options, message):
    config = config_from_flat({"irtuning_strategy": "salf", **{f"irtuning_salf_{k}": v for k, v in options.items()}})
    with pytest.raises(StrategyConfigError) as err:
        LayerSelectionEngine(tiny, config)
    assert str(err.value) == message and "\n" not in message


# ---- latent space 0 under a tied head ----------------------------------------------------------------
def _tied_peft_llama():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=L, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False, task_type="CAUSAL_LM"))


def test_tied_head_reads_latent_space_zero_as_the_input_token():
    """Why 'auto' drops latent space 0 with a tied head: the logit lens of the embedding output ranks the
    input token itself first (a copy, not a prediction), whatever the next token is."""
    from irtuning_plugin.salf_calibration import head_is_tied

    model = _tied_peft_llama()
    assert head_is_tied(model) and not head_is_tied(tiny_peft_llama())
    ids = _batches(1)[0]["input_ids"]
    with torch.no_grad():
        h0 = model.get_input_embeddings()(ids)
        logits = find_final_norm(model)(h0) @ model.get_output_embeddings().weight.T
    assert (logits.argmax(-1) == ids).float().mean() == 1.0


@pytest.mark.parametrize("space,tied,excluded", [
    ("auto", True, True), ("auto", False, False), ("include", True, False), ("exclude", False, True),
])
def test_embedding_space_option(space, tied, excluded):
    model = _tied_peft_llama() if tied else tiny_peft_llama()
    layers = build_layer_map(model).layers
    strat = SALFStrategy(L, SALFOptions(embedding_space=space, estimator="raw"))
    batches = _batches()
    cut = strat.calibrate(model, layers, batches)
    d = strat.deviation
    assert strat.report["salf_embedding_space"] == ("excluded" if excluded else "included")
    if excluded:
        assert strat.report["salf_gains"][0] is None and math.isnan(strat.gains[0])
        expected = 1 + int(np.argmax([d[k] - d[k + 1] for k in range(1, L - 1)]))  # layers 1..L-2 are candidates
    else:
        expected = int(np.argmax([d[k] - d[k + 1] for k in range(L - 1)]))
    assert cut == expected


def test_embedding_space_refused_when_unknown():
    with pytest.raises(StrategyConfigError) as err:
        config_from_flat({"irtuning_strategy": "salf", "irtuning_salf_embedding_space": "skip"})
    assert str(err.value) == "irtuning_salf_embedding_space='skip'; allowed: auto, include, exclude"


def test_calibration_batches_beyond_what_islice_takes_is_refused_at_config_time():
    """A value above sys.maxsize used to pass the config and fail inside itertools.islice at train start."""
    import sys

    from irtuning_plugin.config import config_from_flat
    from irtuning_plugin.strategies import StrategyConfigError

    with pytest.raises(StrategyConfigError, match=rf"^irtuning_salf_calibration_batches={sys.maxsize + 1}; .*"
                                                  rf"<= {sys.maxsize}"):
        config_from_flat({"irtuning_strategy": "salf", "irtuning_salf_calibration_batches": sys.maxsize + 1})
    assert config_from_flat({"irtuning_strategy": "salf", "irtuning_salf_calibration_batches": 3}
                            ).strategy_options == {"calibration_batches": 3}
