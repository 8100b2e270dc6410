"""Layer selection on an FSDP2-sharded model (``fully_shard``): 2 gloo ranks on CPU against one process.

One spawn of two ranks trains every case of ``CASES`` in turn on a tiny Llama whose decoder layers and
root are ``fully_shard``-ed (fsdp2_worker.py drives the engine by hand, as the callback does); the same
cases run again in this process, unsharded, on both ranks' batches at once. The test checks that:

* every rank selects the same layers with the same scores and ends with the same weights;
* gradient scores (ir's reference and l2 norms, from local shards plus one all_reduce), weight scores,
  and the layers and weights that follow equal the one-process run's, to fp32 rounding;
* frozen layers get no gradient, the depth floor and the backward cut stop backprop as in one process,
  and ``drop`` / ``cpu`` / ``keep`` leave the optimizer state each says;
* ist's importance updates and salf's calibration run on every rank together, and ir's cosine (from each
  rank's own batch) is averaged so the ranks agree;
* a run resumed from a torch.distributed.checkpoint of the sharded model and optimizer (plus the engine's
  state written by rank 0) selects and trains exactly as the uninterrupted run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import fsdp2_worker as worker
import pytest
import torch

LORA_R1 = {"rank": 1}  # lora_A is [1, 32]: Shard(0) over 2 ranks leaves rank 1 an empty local shard
CASES = [
    # compared with the one-process run: the scores come from the mean gradient both runs share
    {"name": "ir_drop", "config": {"strategy": "ir", "frozen_optimizer_state": "drop"}, "steps": 4, **LORA_R1},
    {"name": "ir_drop_resumed", "config": {"strategy": "ir", "frozen_optimizer_state": "drop"}, "steps": 4,
     "resume_at": 2, **LORA_R1},
    {"name": "ir_l2_floor_cut", "config": {"strategy": "ir", "depth_floor": 2, "frozen_optimizer_state": "cpu",
                                           "strategy_options": {"score": "l2"}}, "steps": 3, "input_grad_hook": True},
    {"name": "ir_full", "config": {"strategy": "ir", "scope": "full"}, "steps": 3, "model": "full"},
    {"name": "ir_weight", "config": {"strategy": "ir", "strategy_options": {"score": "weight"}}, "steps": 2},
    {"name": "lisa", "config": {"strategy": "lisa", "strategy_options": {"n_layers": 2, "interval": 2}}, "steps": 4},
    {"name": "random", "config": {"strategy": "random", "strategy_options": {"n_layers": 2}}, "steps": 3},
    {"name": "fixed", "config": {"strategy": "fixed", "strategy_options": {"layers": [3, 5]}}, "steps": 2},
    # signals of each rank's own batch, combined over ranks: the ranks agree (a one-process run differs)
    {"name": "ir_cosine", "config": {"strategy": "ir", "strategy_options": {"score": "cosine"}}, "steps": 3},
    {"name": "ist", "config": {"strategy": "ist", "strategy_options": {"first_update": 1, "update_every": 2,
                                                                       "estimation_batch": 4}}, "steps": 3},
    {"name": "salf", "config": {"strategy": "salf", "strategy_options": {"calibration_batches": 2}}, "steps": 2},
]
PER_RANK = {"ir_cosine", "ist", "salf"}
ONE_PROCESS = [c for c in CASES if c["name"] not in PER_RANK and "resume_at" not in c]
SECONDS: dict[str, float] = {}


def _load(out: Path, name: str, rank: int) -> tuple[dict, dict]:
    return (json.loads((out / f"{name}.rank{rank}.json").read_text()),
            torch.load(out / f"{name}.rank{rank}.pt", weights_only=True))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("fsdp2")
    t0 = time.perf_counter()
    mp.spawn(worker.run_cases, args=(2, CASES, str(out), str(out / "pg")), nprocs=2)
    SECONDS["two ranks"] = time.perf_counter() - t0
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2_one")
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    try:
        worker.run_cases(0, 1, ONE_PROCESS, str(out), "")
    finally:
        torch.set_num_threads(threads)
    SECONDS["one process"] = time.perf_counter() - t0
    return out


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_every_rank_selects_and_trains_the_same(sharded, case):
    (r0, w0), (r1, w1) = (_load(sharded, case["name"], r) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert len(r0["rows"]) == case["steps"]
    assert r0["rows"] == r1["rows"]  # layers, scores, strategy fields, every step
    assert w0.keys() == w1.keys() and w0 and all(torch.equal(w0[k], w1[k]) for k in w0)
    assert r0["facts"][0]["loss"] != r1["facts"][0]["loss"]  # each rank trained on its own batch
    for row, facts in zip(r0["rows"], r0["facts"]):
        # the layers that trained this step are exactly those with gradients (frozen ones: None)
        assert facts["with_grad"] == row["active"]


@pytest.mark.parametrize("case", ONE_PROCESS, ids=[c["name"] for c in ONE_PROCESS])
def test_scores_layers_and_weights_equal_one_process(sharded, one_process, case):
    (two, w_two), (one, w_one) = _load(sharded, case["name"], 0), _load(one_process, case["name"], 0)
    assert one["world"] == 1
    assert [r["active"] for r in two["rows"]] == [r["active"] for r in one["rows"]]
    assert [r["fresh"] for r in two["rows"]] == [r["fresh"] for r in one["rows"]]
    for a, b in zip(two["rows"], one["rows"]):
        assert a["scores"] == pytest.approx(b["scores"], rel=1e-5, abs=2e-6)
    # the mean of the two ranks' losses is the one-process loss over both batches
    for a, b in zip(two["facts"], one["facts"]):
        assert a["out_requires_grad"] == b["out_requires_grad"]
        assert a["state_layers"] == b["state_layers"]
    mean_loss = [(x["loss"] + y["loss"]) / 2 for x, y in zip(two["facts"], _load(sharded, case["name"], 1)[0]["facts"])]
    assert mean_loss == pytest.approx([f["loss"] for f in one["facts"]], rel=1e-5)
    assert w_two.keys() == w_one.keys()
    worst = max(float((w_two[k] - w_one[k]).abs().max()) for k in w_two)
    assert worst < 1e-4, worst
    if case["config"].get("scope") == "full" or case.get("model") == "full":
        assert any(k.endswith("o_proj.weight") for k in w_two)  # whole layers trained, not adapters


def test_depth_floor_and_backward_cut_as_in_one_process(sharded):
    rows, facts = (lambda d: (d["rows"], d["facts"]))(_load(sharded, "ir_l2_floor_cut", 0)[0])
    for row, f in zip(rows, facts):
        assert f["backward_cut"]  # the enable_input_require_grads hook was removed
        assert min(row["active"]) >= 2  # the floor: layers 0 and 1 never train
        lowest = min(row["active"])
        # backward reaches exactly the layers from the lowest trained one up
        assert f["out_requires_grad"] == [i >= lowest for i in range(worker.LAYERS)]


def test_frozen_optimizer_state_drop_keep_cpu(sharded):
    dropped = _load(sharded, "ir_drop", 0)[0]
    for row, f in zip(dropped["rows"], dropped["facts"]):
        assert f["state_layers"] == row["active"]  # a frozen layer's (sharded) moments are deleted
    assert any(r["active"] != dropped["rows"][0]["active"] for r in dropped["rows"])  # layers did change
    for name in ("ir_l2_floor_cut", "lisa"):  # cpu / keep: every layer that ever trained keeps its state
        d = _load(sharded, name, 0)[0]
        seen = set()
        for row, f in zip(d["rows"], d["facts"]):
            seen |= set(row["active"])
            assert f["state_layers"] == sorted(seen)


def test_resume_from_a_distributed_checkpoint_matches_the_uninterrupted_run(sharded):
    (full, w_full), (resumed, w_res) = _load(sharded, "ir_drop", 0), _load(sharded, "ir_drop_resumed", 0)
    assert resumed["rows"] == full["rows"]
    assert [f["loss"] for f in resumed["facts"]] == [f["loss"] for f in full["facts"]]
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)
    assert (sharded / "ir_drop_resumed.ckpt" / "dcp" / ".metadata").is_file()


def test_per_rank_signals_are_combined(sharded):
    cosine = _load(sharded, "ir_cosine", 0)[0]["rows"]
    assert all(len(r["fresh"]) == worker.LAYERS for r in cosine)  # every layer measured on both ranks
    updates = [r["ist_update"] for r in _load(sharded, "ist", 0)[0]["rows"] if "ist_update" in r]
    assert len(updates) == 2  # steps 1 and 3; losses are the mean of both ranks' damped passes
    calib = _load(sharded, "salf", 0)[0]["rows"][0]
    assert calib["salf_source"] == "calibration" and calib["salf_batches"] == 2 and calib["salf_tokens"] > 0



@pytest.mark.parametrize("options", [{}, {"foreach": False}, {"amsgrad": True}, {"weight_decay": 0.1}],
                         ids=["foreach", "for_loop", "amsgrad", "weight_decay"])
def test_adamw_initial_state_steps_exactly_as_no_state(options):
    """The state filled in for an FSDP2 save (step 0, zero moments) is the one AdamW creates itself, and the
    next step from it gives bit-identical parameters and state to a step from no state."""
    from irtuning_plugin.config import SelectionConfig
    from irtuning_plugin.engine import LayerSelectionEngine

    from helpers_tiny import tiny_peft_llama

    runs = []
    for fill in (False, True):
        model = tiny_peft_llama(num_layers=4)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, **options)
        engine = LayerSelectionEngine(model, SelectionConfig(strategy="fixed", strategy_options={"layers": [1, 2]}))
        engine.begin(opt)
        ids = torch.arange(24).reshape(2, 12) % 128
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()  # layers 1 and 2 now hold state; 0 and 3 (frozen) none
        opt.zero_grad(set_to_none=True)
        stateless = engine.stateless_optimizer_params()
        assert stateless and all(opt.state.get(p) is None for p in stateless)
        if fill:
            assert engine.fill_initial_optimizer_state() == stateless
            assert engine.stateless_optimizer_params() == []
            made = {k: (v.dtype, v.device, tuple(v.shape)) for k, v in opt.state[stateless[0]].items()}
        for p in model.parameters():  # every layer trains the next step: the filled ones step from step 0
            p.requires_grad_(p in set(opt.param_groups[0]["params"]))
        model(input_ids=ids.flip(1), labels=ids.flip(1)).loss.backward()
        opt.step()
        runs.append((model, opt, stateless))
    (m0, o0, s0), (m1, o1, s1) = runs
    for a, b in zip(m0.parameters(), m1.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(s0, s1, strict=True):
        assert o0.state[a].keys() == o1.state[b].keys() and all(torch.equal(o0.state[a][k], o1.state[b][k])
                                                               for k in o0.state[a])
    # what AdamW made itself for a parameter that had none, the fill made too (dtype, device, shape)
    assert made == {k: (v.dtype, v.device, tuple(v.shape)) for k, v in o0.state[s0[0]].items()}


def test_initial_optimizer_state_is_dropped_again_and_only_it():
    from irtuning_plugin.config import SelectionConfig
    from irtuning_plugin.engine import LayerSelectionEngine

    from helpers_tiny import tiny_peft_llama

    model = tiny_peft_llama(num_layers=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    engine = LayerSelectionEngine(model, SelectionConfig(strategy="fixed", strategy_options={"layers": [1]}))
    engine.begin(opt)
    ids = torch.arange(24).reshape(2, 12) % 128
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    trained = [p for p in opt.param_groups[0]["params"] if opt.state.get(p)]
    filled = engine.fill_initial_optimizer_state()
    assert len(filled) + len(trained) == len(opt.param_groups[0]["params"])
    assert engine.drop_initial_optimizer_state(filled) == len(filled)
    assert [p for p in opt.param_groups[0]["params"] if opt.state.get(p)] == trained  # the stepped ones stay
    engine.fill_initial_optimizer_state()
    assert engine.drop_initial_optimizer_state() == len(filled)  # every step-0 state, none that stepped
    assert engine.stateless_optimizer_params() == filled


def test_a_checkpoint_that_cannot_be_resumed_under_fsdp2_is_named_at_save_time(caplog):
    """An optimizer other than Adam/AdamW: its initial state is not known, so nothing is filled in and the
    save says, in one line, which layers lack state and what to do."""
    from irtuning_plugin.callback import LayerSelectionCallback
    from irtuning_plugin.config import SelectionConfig
    from irtuning_plugin.engine import LayerSelectionEngine

    from helpers_tiny import tiny_peft_llama

    model = tiny_peft_llama(num_layers=4)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2, momentum=0.9)
    config = SelectionConfig(strategy="fixed", strategy_options={"layers": [1]})
    engine = LayerSelectionEngine(model, config)
    engine.begin(opt)
    ids = torch.arange(24).reshape(2, 12) % 128
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    cb = LayerSelectionCallback(config, model, engine=engine)
    with caplog.at_level("WARNING", logger="irtuning_plugin.callback"):
        cb._fill_for_save(2)
    assert cb._filled_for_save == [] and len(opt.state) == len(engine.layer_map.params[1])
    (record,) = caplog.records
    assert record.getMessage().startswith("irtuning: the checkpoint of step 2 cannot be resumed under FSDP2: ")
    assert "(layers [0, 2, 3]) have no optimizer state and SGD is not Adam/AdamW" in record.getMessage()
    assert "use AdamW" in record.getMessage()


# ---- the plain-Trainer recipe under accelerate launch ------------------------------------------------
RECIPE_DIR = Path(__file__).resolve().parents[2] / "yaml_recipes" / "fsdp2"


def _launch(out: Path, data: Path, model_dir: Path, *extra: str) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "IRTUNING_TEST_CPU_FSDP": "1", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
           str(RECIPE_DIR / "accelerate_fsdp2_cpu.yaml"), "--main_process_port", str(_free_port()),
           str(Path(__file__).with_name("fsdp2_trainer_probe.py")), "--model", str(model_dir), "--data", str(data),
           "--output_dir", str(out), "--lora", "4", "--max_steps", "4", "--max_length", "32",
           "--learning_rate", "5e-3", "--save_steps", "2", "--irtuning", "irtuning_strategy=ir", *extra]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _text_data(tmp_path: Path) -> Path:
    import random

    rng = random.Random(0)
    words = "the a cat dog sat on mat ran fast slow red blue green house tree river stone".split()
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(8, 20)))}) + "\n"
                            for _ in range(64)))
    return data


def test_trainer_recipe_under_accelerate_fsdp2_and_its_resume(tmp_path, tiny_model_dir):
    data = _text_data(tmp_path)
    out = tmp_path / "out"
    _launch(out, data, tiny_model_dir)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    weights = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for r, info in enumerate(ranks):
        assert info["rank"] == r and info["world"] == 2 and info["backend"] == "gloo"
        # really FSDP2: accelerate's plugin says 2, the decoder layers and root are fully_shard-ed, the trained
        # tensors are DTensors sharded on dim 0, and the irtuning callback accepted the set-up
        assert info["fsdp_enabled"] and info["fsdp_version"] == 2 and info["dtensor_params"], info
        assert info["fsdp_modules"] == 9 and info["placements"] == "(Shard(dim=0),)", info
        assert info["global_step"] == 4 and len(info["rows"]) == 4
    assert ranks[0]["batches"] != ranks[1]["batches"]  # each rank read its own shard of the data
    assert ranks[0]["rows"] == ranks[1]["rows"]
    assert len({tuple(r["active"]) for r in ranks[0]["rows"]}) > 1
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    # memory_account counts each rank's local shards: over both ranks, the whole tensors once (the state's
    # scalar step is a plain tensor on every rank)
    def whole(layers):
        return sum(t.numel() * t.element_size() for k, t in weights[0].items()
                   if any(f".layers.{i}." in k for i in layers))

    def count(layers):
        return sum(1 for k in weights[0] if any(f".layers.{i}." in k for i in layers))

    mem = [info["memory_account"] for info in ranks]
    assert [m["trainable_param_bytes_host"] for m in mem] == [whole(ranks[0]["rows"][-1]["next_active"]) / 2] * 2
    assert sum(m["optimizer_state_bytes_host"] for m in mem) == (2 * whole(ranks[0]["state_layers"])
                                                               + 2 * 4 * count(ranks[0]["state_layers"]))
    ckpt = out / "checkpoint-2"
    assert (ckpt / "irtuning_state.pt").is_file() and (ckpt / "optimizer_0").is_dir()  # sharded (DCP) state

    # resumed from checkpoint-2 (FSDP2 sharded model and optimizer, the engine state of rank 0)
    for r in (0, 1):
        (out / f"rank{r}.json").rename(out / f"full{r}.json")
    _launch(out, data, tiny_model_dir, "--resume", str(ckpt))
    resumed = json.loads((out / "rank0.json").read_text())
    assert resumed["resumes"] == [{"step": 2, "checkpoint": str(ckpt)}]
    assert resumed["rows"] == ranks[0]["rows"]
    again = torch.load(out / "rank0.pt", weights_only=True)
    assert all(torch.equal(again[k], weights[0][k]) for k in again)


@pytest.mark.parametrize("frozen_state", ["keep", "drop"])
def test_trainer_resume_when_layers_have_no_optimizer_state_at_the_checkpoint(tmp_path, tiny_model_dir, frozen_state):
    """lisa (2 of 8 layers, re-drawn every 2 steps): at checkpoint-2 six layers never trained (keep), or
    every layer frozen at that step lost its state too (drop), so they hold no AdamW state. The callback
    gives them AdamW's initial state (step 0, zero moments) for the save and deletes it again after, so
    accelerate's sharded optimizer load finds every key, and the resumed run selects, trains and holds
    optimizer state exactly as the uninterrupted one, on both ranks."""
    data = _text_data(tmp_path)
    out = tmp_path / "out"
    lisa = ("--irtuning", "irtuning_strategy=lisa", "--irtuning", "irtuning_lisa_n_layers=2",
            "--irtuning", "irtuning_lisa_interval=2", "--irtuning", f"irtuning_frozen_optimizer_state={frozen_state}")
    _launch(out, data, tiny_model_dir, *lisa)
    full = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    w_full = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    trained_by_2 = sorted({i for row in full[0]["rows"][:2] for i in row["active"]})
    assert len(trained_by_2) == 2 and len(full[0]["state_layers"]) < 8  # some layers had no state at the save
    # after the save, the filled-in states are gone: only layers that trained hold state (drop: the last ones)
    held = sorted({i for row in full[0]["rows"] for i in row["active"]} if frozen_state == "keep"
                  else set(full[0]["rows"][-1]["active"]) & set(full[0]["rows"][-1]["next_active"]))
    assert full[0]["state_layers"] == full[1]["state_layers"] == held
    ckpt = out / "checkpoint-2"
    for r in (0, 1):
        (out / f"rank{r}.json").rename(out / f"full{r}.json")
    _launch(out, data, tiny_model_dir, *lisa, "--resume", str(ckpt))
    for r in (0, 1):
        resumed = json.loads((out / f"rank{r}.json").read_text())
        assert resumed["resumes"] == [{"step": 2, "checkpoint": str(ckpt)}]
        assert resumed["rows"] == full[r]["rows"] == full[0]["rows"]
        assert resumed["state_layers"] == full[r]["state_layers"]
        again = torch.load(out / f"rank{r}.pt", weights_only=True)
        assert again.keys() == w_full[r].keys() and all(torch.equal(again[k], w_full[r][k]) for k in again)


# ---- what is refused ---------------------------------------------------------------------------------
def test_fsdp2_passes_the_shared_check_and_fsdp1_deepspeed_are_refused_naming_fsdp2():
    from irtuning_plugin.preflight import TRAINER, TrainingSetup, check
    from irtuning_plugin.strategies import StrategyConfigError

    def check_trainer_setup(**kw):  # a plain Trainer's set-up, as the callback describes it
        check(TrainingSetup(TRAINER, "ir", **kw))

    check_trainer_setup(fsdp="full_shard", fsdp_config={"version": 2})  # TrainingArguments' key
    check_trainer_setup(fsdp=True, fsdp_version=2)  # accelerate's plugin / Axolotl's key
    for kw in ({"fsdp": "full_shard"}, {"fsdp_config": {"fsdp_version": 1}}, {"fsdp": True, "fsdp_version": "1"}):
        with pytest.raises(StrategyConfigError) as err:
            check_trainer_setup(**kw)
        message = str(err.value)
        assert message.startswith("fsdp is set: irtuning does not support FSDP version 1 (FSDP1)")
        assert "use FSDP2 with a plain Trainer" in message and "\n" not in message
    with pytest.raises(StrategyConfigError, match=r"fsdp_version='two'; allowed: 1, 2"):
        check_trainer_setup(fsdp=True, fsdp_version="two")
    with pytest.raises(StrategyConfigError, match=r"or shard with FSDP2 instead \(fsdp_version: 2"):
        check_trainer_setup(deepspeed={"zero_optimization": {"stage": 3}})


def test_the_callback_reads_the_fsdp_version_from_accelerate():
    """A Trainer under accelerate's FSDP config has no fsdp arguments: the plugin tells the version."""
    from types import SimpleNamespace

    from irtuning_plugin.callback import LayerSelectionCallback
    from irtuning_plugin.config import SelectionConfig
    from irtuning_plugin.engine import SelectionError
    from irtuning_plugin.strategies import StrategyConfigError

    from helpers_tiny import tiny_peft_llama

    args = SimpleNamespace(torch_compile=False, deepspeed=None, fsdp="", fsdp_config=None, seed=0, max_grad_norm=0.0,
                           output_dir=None)
    for version in (1, 2):
        trainer = SimpleNamespace(is_fsdp_enabled=True, is_deepspeed_enabled=False, train=lambda *a, **k: None,
                                  log=lambda *a, **k: None, accelerator=SimpleNamespace(
                                      clip_grad_norm_=lambda *a, **k: None,
                                      state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version))))
        cb = LayerSelectionCallback(SelectionConfig(strategy="ir"), tiny_peft_llama(), trainer=trainer)
        if version == 1:
            with pytest.raises(StrategyConfigError, match="does not support FSDP version 1"):
                cb.on_train_begin(args, SimpleNamespace(is_world_process_zero=True, global_step=0), None)
        else:  # past the set-up check, up to the engine's own need of an optimizer
            with pytest.raises(SelectionError, match="the Trainer has no optimizer"):
                cb.on_train_begin(args, SimpleNamespace(is_world_process_zero=True, global_step=0), None)


def test_axolotl_fsdp2_is_refused_with_the_reason(tiny_model_dir):
    from helpers_axolotl import base_cfg, validate

    over = {"fsdp_version": 2, "fsdp_config": {"auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                               "transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}}
    with pytest.raises(Exception) as err:
        validate(base_cfg(tiny_model_dir, **over))
    message = str(err.value)
    assert "irtuning does not support FSDP2 under Axolotl yet" in message
    assert "build_device_mesh('cuda')" in message and "_cuda_setDevice" in message
    with pytest.raises(Exception, match="does not support FSDP version 1"):
        validate(base_cfg(tiny_model_dir, fsdp_config={"transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}))


def test_llamafactory_fsdp2_is_refused():
    from irtuning_plugin.llamafactory_integration.launcher import (
        LlamaFactoryConfigError,
        check_recipe,
        load_recipe,
        resolve_recipe,
    )

    cfg = load_recipe(Path(__file__).resolve().parents[2] / "yaml_recipes" / "llamafactory" / "smollm2-ir-lora.yaml")
    cfg.update({"model_name_or_path": "irtuning://tiny-llama", "fsdp": "full_shard", "fsdp_config": {"version": 2}})
    with pytest.raises(LlamaFactoryConfigError, match="does not support FSDP2 under LLaMA-Factory yet"):
        check_recipe(resolve_recipe(cfg))
    cfg["fsdp_config"] = {"version": 1}
    with pytest.raises(ValueError, match="does not support FSDP version 1"):  # the shared check's refusal
        check_recipe(resolve_recipe(cfg))
