"""frozen_optimizer_state: cpu through OptimizerStateOffload (irtuning_plugin/offload.py).

On a CPU-only machine parameters already live in host memory and no copy is needed, so these tests set
``always_copy``: every move then runs the code a GPU runs (host buffers, copies issued inside the
stream layer's context, events, the step pre-hook's wait), with host tensors standing in for device ones.
A fake stream layer records the order of calls. The CUDA test at the end runs only where a GPU is.
"""

import copy
import random

import pytest
import torch
from torch.utils.data import DataLoader

from irtuning_plugin.config import SelectionConfig
from irtuning_plugin.engine import LayerSelectionEngine
from irtuning_plugin.layer_map import build_layer_map
from irtuning_plugin.offload import NoCopyStreams, OptimizerStateOffload

from helpers_selection import engine_steps
from helpers_tiny import RandomTokens, tiny_peft_llama

L = 6


class FakeEvent:
    def __init__(self, n):
        self.n, self.done = n, False


class FakeStreams(NoCopyStreams):
    """Records every call into a shared log; events complete only when told (or synchronized)."""

    def __init__(self, log):
        self.log, self.events = log, []

    def prepare(self):
        self.log.append("prepare")

    def copies(self, direction):
        log = self.log

        class Ctx:
            def __enter__(self):
                log.append(("copies", direction))

            def __exit__(self, *exc):
                log.append("copies_end")
        return Ctx()

    def record(self):
        ev = FakeEvent(len(self.events))
        self.events.append(ev)
        self.log.append(("record", ev.n))
        return ev

    def wait(self, event):
        self.log.append(("wait", event.n))

    def query(self, event):
        return event.done

    def synchronize(self, event):
        event.done = True
        self.log.append(("sync", event.n))


def _engine(mode, seed=2, n_layers=2, model_seed=0, offload_kw=None):
    model = tiny_peft_llama(num_layers=L, seed=model_seed)
    lm = build_layer_map(model)
    opt = torch.optim.AdamW([p for ps in lm.params for p in ps], lr=1e-2)
    engine = LayerSelectionEngine(model, SelectionConfig(strategy="random", frozen_optimizer_state=mode,
                                                         strategy_options={"n_layers": n_layers}), seed=seed)
    if offload_kw is not None:  # injected before begin(): the engine keeps an offload made for its optimizer
        engine.offload = OptimizerStateOffload(opt, **offload_kw)
    return model, opt, engine


def _train(model, opt, engine, steps, state=None, log=None, check=None):
    engine.begin(opt, state=state)
    rows = []
    data = DataLoader(RandomTokens(n=4 * steps, seed=5), batch_size=4)
    for step, batch in enumerate(data, start=1):
        model(**batch).loss.backward()
        if log is not None:
            log.append("backward")
        engine.collect_scores()
        opt.step()
        opt.zero_grad(set_to_none=True)
        rows.append(engine.end_step(step))
        if check is not None:
            check(step)
    return rows


def _moments(opt, params):
    return [{k: v.clone() for k, v in opt.state[p].items()} if p in opt.state else None for p in params]


def _state_bytes(opt, params):
    return sum(v.numel() * v.element_size() for p in params if p in opt.state
               for k, v in opt.state[p].items() if k != "step")


def test_cpu_offload_places_state_and_trains_bit_identically_to_keep():
    model_k, opt_k, eng_k = _engine("keep")
    rows_k = _train(model_k, opt_k, eng_k, steps=10)
    model_c, opt_c, eng_c = _engine("cpu", offload_kw={"always_copy": True})
    off = eng_c.offload
    lm = eng_c.layer_map

    def check(step):
        for i in range(L):
            for p in lm.params[i]:
                if p not in opt_c.state:
                    continue
                for key in ("exp_avg", "exp_avg_sq"):
                    v = opt_c.state[p][key]
                    assert v.device.type == "cpu"
                    # frozen: the state IS its host buffer; active: a separate tensor on the parameter's device
                    assert off._is_buffer(p, key, v) == (i not in eng_c.active), (step, i, key)
    rows_c = _train(model_c, opt_c, eng_c, steps=10, check=check)
    eng_c.close()
    assert [r["next_active"] for r in rows_k] == [r["next_active"] for r in rows_c]
    assert len({tuple(r["active"]) for r in rows_c}) > 2
    params_k = [p for ps in eng_k.layer_map.params for p in ps]
    params_c = [p for ps in lm.params for p in ps]
    for a, b in zip(params_k, params_c, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(_moments(opt_k, params_k), _moments(opt_c, params_c), strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert all(torch.equal(a[k], b[k]) for k in a)
    moved_out = moved_in = 0
    for row in rows_c:
        assert {"offload_d2h_bytes", "offload_h2d_bytes"} <= set(row)
        moved_out += row["offload_d2h_bytes"]
        moved_in += row["offload_h2d_bytes"]
    assert moved_out > 0 and moved_in > 0
    facts = eng_c.run_facts()
    assert facts["offload_d2h_bytes_total"] == moved_out and facts["offload_h2d_bytes_total"] == moved_in
    assert "offload_d2h_bytes" not in rows_k[0] and "offload_d2h_bytes_total" not in eng_k.run_facts()


def test_row_bytes_are_the_moments_of_the_layers_that_moved():
    model, opt, engine = _engine("cpu", offload_kw={"always_copy": True})
    lm = engine.layer_map
    expected = []

    def check(step):
        row_active = set(prev_active[0])
        new = set(engine.active)
        # the state that existed when this selection ran: everything trained up to this step
        out = [p for i in sorted(row_active - new) for p in lm.params[i]]
        back = [p for i in sorted(new - row_active) for p in lm.params[i]]
        expected.append((_state_bytes(opt, out), _state_bytes(opt, back)))
        prev_active[0] = list(engine.active)
    prev_active = [None]
    orig_begin = engine.begin

    def begin(*a, **k):
        out = orig_begin(*a, **k)
        prev_active[0] = list(engine.active)
        return out
    engine.begin = begin
    rows = _train(model, opt, engine, steps=8, check=check)
    assert [(r["offload_d2h_bytes"], r["offload_h2d_bytes"]) for r in rows] == expected
    assert any(b for _, b in expected)


def test_without_a_device_no_copy_is_made():
    model, opt, engine = _engine("cpu")
    rows = _train(model, opt, engine, steps=4)
    assert all(r["offload_d2h_bytes"] == r["offload_h2d_bytes"] == 0 for r in rows)
    assert engine.offload.host_buffer_bytes() == 0
    assert engine.memory_account()["offload_host_buffer_bytes"] == 0


def test_host_buffers_are_reused_and_bounded_over_100_random_selections():
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=g)) for n in (7, 300, 64, 1, 129, 1000)]
    opt = torch.optim.AdamW(params, lr=1e-2)
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ref_opt = torch.optim.AdamW(ref_params, lr=1e-2)
    log = []
    off = OptimizerStateOffload(opt, streams_for=lambda d: FakeStreams(log), always_copy=True)
    rng = random.Random(1)
    active = set(range(len(params)))
    ptrs: dict = {}
    state_bytes = 0
    for sel in range(100):
        for ps, o in ((params, opt), (ref_params, ref_opt)):
            for i, p in enumerate(ps):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(sel * 10 + i)) \
                    if i in active else None
            o.step()
        state_bytes = _state_bytes(opt, params)
        new = set(rng.sample(range(len(params)), rng.randint(1, len(params))))
        d2h, h2d = off.move(to_host=[params[i] for i in sorted(active - new)],
                            to_device=[params[i] for i in sorted(new - active)])
        assert d2h == _state_bytes(opt, [params[i] for i in active - new])
        for key, buf in off.host_buffers().items():
            assert ptrs.setdefault(key, buf.data_ptr()) == buf.data_ptr()  # one buffer per state tensor, reused
        assert len(off.host_buffers()) <= 2 * len(params)
        assert off.host_buffer_bytes() <= state_bytes
        off._before_step(opt, (), {})
        active = new
    assert len(ptrs) == 2 * len(params)  # every state tensor left at least once
    off.close()
    for p, q in zip(params, ref_params, strict=True):  # the same values as without any move
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], ref_opt.state[q][key])


def test_copies_are_issued_at_selection_and_waited_on_before_the_step():
    log = []
    model, opt, engine = _engine("cpu", offload_kw={"always_copy": True,
                                                    "streams_for": lambda d: FakeStreams(log)})
    post = opt.register_step_post_hook(lambda o, a, k: log.append("step"))  # after our pre-hook and the step
    rows = _train(model, opt, engine, steps=6, log=log)
    post.remove()
    steps = [i for i, x in enumerate(log) if x == "step"]
    assert len(steps) == 6
    # A selection that moves something orders its copies (prepare), issues each direction inside the stream
    # layer's context and records an event right after; the next optimizer step first makes the training
    # stream wait on that event.
    pending = None
    for i, x in enumerate(log):
        if isinstance(x, tuple) and x[0] == "record":
            assert log[i - 5:i] == ["prepare", ("copies", "d2h"), "copies_end", ("copies", "h2d"), "copies_end"]
            pending = x[1]
        elif isinstance(x, tuple) and x[0] == "wait":
            assert x[1] == pending and log[i + 1] == "step"
            pending = None
        elif x == "step":
            assert pending is None  # never a step with copies not waited on
        elif x == "backward" and i:
            # the copies of the previous selection were issued before this forward/backward
            prev_step = max(s for s in steps if s < i)
            moved = rows[steps.index(prev_step)]
            if moved["offload_d2h_bytes"] or moved["offload_h2d_bytes"]:
                assert log[prev_step + 1] == "prepare" and pending is not None
    assert sum(1 for x in log if isinstance(x, tuple) and x[0] == "wait") >= 4


def test_device_copy_source_lives_until_the_training_stream_waited():
    log = []
    params = [torch.nn.Parameter(torch.randn(50)) for _ in range(3)]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    off = OptimizerStateOffload(opt, streams_for=lambda d: FakeStreams(log), always_copy=True)
    src = opt.state[params[0]]["exp_avg"]
    off.move(to_host=[params[0]], to_device=[])
    assert opt.state[params[0]]["exp_avg"] is not src
    held = [t for _, ts in off._sources[torch.device("cpu")] for t in ts]
    assert any(t is src for t in held)  # the copy's source is referenced while the copy may run
    off.move(to_host=[params[1]], to_device=[])  # events not complete: both sources still held
    assert len(off._sources[torch.device("cpu")]) == 2
    opt.step()  # the pre-hook: the training stream waits, then the sources may go
    assert ("wait", 1) in log and not off._sources
    off.move(to_host=[params[2]], to_device=[params[0]])
    opt.state_dict()  # reading host state on the host: every pending copy is waited for first
    assert log[-1][0] == "sync"
    off.close()
    assert opt._optimizer_step_pre_hooks == {} and not opt._optimizer_state_dict_pre_hooks


def test_resume_restores_the_placement():
    steps = 5
    model_a, opt_a, eng_a = _engine("cpu", offload_kw={"always_copy": True})
    _train(model_a, opt_a, eng_a, steps=steps)
    eng_a.close()
    saved_engine = eng_a.state_dict()
    saved_opt = copy.deepcopy(opt_a.state_dict())
    saved_weights = copy.deepcopy(model_a.state_dict())
    # a new process: the same model and optimizer loaded from the checkpoint (all state where the params are)
    model_b, opt_b, eng_b = _engine("cpu", offload_kw={"always_copy": True})
    model_b.load_state_dict(saved_weights)
    opt_b.load_state_dict(saved_opt)
    lm = eng_b.layer_map
    assert not any(eng_b.offload._is_buffer(p, k, v) for p, st in opt_b.state.items() for k, v in st.items())
    eng_b.begin(opt_b, state=saved_engine)
    assert eng_b.active == eng_a.active
    with_state = 0
    for i in range(L):
        for p in lm.params[i]:
            if p in opt_b.state:
                with_state += 1
                for key in ("exp_avg", "exp_avg_sq"):
                    assert eng_b.offload._is_buffer(p, key, opt_b.state[p][key]) == (i not in eng_b.active)
    assert with_state and eng_b.offload.total_d2h_bytes > 0
    eng_b.offload.synchronize()
    params_a = [p for ps in eng_a.layer_map.params for p in ps]
    params_b = [p for ps in lm.params for p in ps]
    for a, b in zip(_moments(opt_a, params_a), _moments(opt_b, params_b), strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_offload_uses_pinned_buffers_and_matches_keep():
    def run(mode):
        torch.manual_seed(0)
        model = tiny_peft_llama(num_layers=L).cuda()
        lm = build_layer_map(model)
        opt = torch.optim.AdamW([p for ps in lm.params for p in ps], lr=1e-2)
        engine = LayerSelectionEngine(model, SelectionConfig(strategy="random", frozen_optimizer_state=mode,
                                                             strategy_options={"n_layers": 2}), seed=2)
        engine.begin(opt)
        data = DataLoader(RandomTokens(n=32, seed=5), batch_size=4)
        for _step, _trained in engine_steps(model, engine, opt, data, "cuda"):
            for i in range(L):
                for p in lm.params[i]:
                    if p in opt.state and mode == "cpu":
                        v = opt.state[p]["exp_avg"]
                        assert v.device.type == ("cuda" if i in engine.active else "cpu")
                        assert i in engine.active or v.is_pinned()
        engine.close()
        return [p.detach().cpu() for ps in lm.params for p in ps]

    for a, b in zip(run("keep"), run("cpu"), strict=True):
        assert torch.equal(a, b)


def test_trainer_run_summary_carries_offload_totals_and_kernel_facts(tmp_path):
    import json

    from irtuning_plugin.callback import RUN_SUMMARY, SELECTION_LOG, attach_layer_selection, read_selection_log

    from helpers_tiny import make_trainer

    trainer = make_trainer(tiny_peft_llama(num_layers=L), tmp_path, max_steps=3)
    attach_layer_selection(trainer, SelectionConfig(strategy="random", frozen_optimizer_state="cpu",
                                                    strategy_options={"n_layers": 2}))
    trainer.train()
    rows = read_selection_log(tmp_path / SELECTION_LOG)
    run = json.loads((tmp_path / RUN_SUMMARY).read_text())
    assert run["offload_d2h_bytes_total"] == sum(r["offload_d2h_bytes"] for r in rows)
    assert run["offload_h2d_bytes_total"] == sum(r["offload_h2d_bytes"] for r in rows)
    assert run["kernel_fallback"] is None and run["kernel_self_check"] is True
    assert run["memory_account_at_end"]["offload_host_buffer_bytes"] == run["offload_host_buffer_bytes"]
