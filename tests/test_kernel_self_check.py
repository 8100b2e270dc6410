"""The Triton kernel's first-use self-check (CheckedLayerGradNorms), driven through the CPU interpreter.

Faults are injected into the kernel launch: a chunk's partial sum corrupted (the chunk table handed to
the kernel loses one chunk), an output perturbed after the launch, a launch that raises. Each must end
in the torch path for the rest of the run, one ERROR line with both values, and a kernel_fallback record.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/conftest.py: before the kernel module is imported

import logging

import pytest
import torch

from irtuning_kernels import dispatch
from irtuning_kernels.dispatch import SELF_CHECK_RTOL, CheckedLayerGradNorms, layer_grad_norms

pytest.importorskip("triton")
gk = pytest.importorskip("irtuning_kernels.grad_norm_triton")

MIXED = (torch.float32, torch.bfloat16, torch.float16)


def _grads(sizes=(70000, 513, 4097, 1), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g).to(MIXED[i % 3]) for i, n in enumerate(sizes)]


class KernelSpy:
    """Wraps the jitted kernel: counts launches, optionally changes what the launch sees or produces."""

    def __init__(self, real, *, corrupt_chunk=False, perturb_output=False, raise_error=False):
        self.real, self.calls = real, 0
        self.corrupt_chunk, self.perturb_output, self.raise_error = corrupt_chunk, perturb_output, raise_error

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls += 1
            if self.raise_error:
                raise RuntimeError("simulated launch failure")
            args = list(args)
            if self.corrupt_chunk:  # chunk row 1 (tensor 0's second chunk) sums nothing: a lost partial
                chunks = args[1].clone()
                chunks[1, 3] = 0
                args[1] = chunks
            out = self.real[grid](*args, **kwargs)
            if self.perturb_output:
                args[8][1] *= 1.01  # layer 1's norm, 1% off
            return out
        return launch


@pytest.fixture
def spy(monkeypatch):
    def install(**kw):
        s = KernelSpy(gk._layer_grad_norms_kernel, **kw)
        monkeypatch.setattr(gk, "_layer_grad_norms_kernel", s)
        return s
    gk.clear_plan_cache()
    return install


@pytest.fixture
def torch_calls(monkeypatch):
    calls = []
    real = dispatch.layer_grad_norms_torch

    def counted(*a, **k):
        calls.append(len(a[0]))
        return real(*a, **k)
    monkeypatch.setattr(dispatch, "layer_grad_norms_torch", counted)
    return calls


def test_agreeing_kernel_is_checked_once_per_structure(spy, torch_calls):
    s = spy()
    norms = CheckedLayerGradNorms("triton")
    tensors, ids = _grads(), [0, 1, 1, 2]
    first = norms(tensors, ids, 3)
    assert (s.calls, len(torch_calls), norms.checks_passed, norms.fallback) == (1, 1, 1, None)
    again = norms(_grads(seed=1), ids, 3)  # same structure, new values: the kernel alone
    assert (s.calls, len(torch_calls)) == (2, 1)
    ref = layer_grad_norms(_grads(seed=1), ids, 3, backend="reference")
    torch.testing.assert_close(again.per_layer_sq, ref.per_layer_sq, rtol=1e-5, atol=0)
    norms(tensors, [0, 1, 2, 2], 3)  # other layer ids: a new structure, checked again
    norms(tensors[:3], ids[:3], 3)  # other tensor list
    norms([t.float() for t in tensors], ids, 3)  # other dtypes
    assert (s.calls, len(torch_calls), norms.checks_passed) == (5, 4, 4)
    base = torch.randn(5000)
    norms([base[1:4097]], [0], 1)  # an unaligned view: the kernel's other variant
    norms([base[:4096]], [0], 1)
    assert norms.checks_passed == 6
    assert torch.equal(first.per_tensor_sq, norms(tensors, ids, 3).per_tensor_sq)
    assert norms.facts() == {"kernel_backend": "triton", "kernel_self_check": True, "kernel_calls": 8,
                             "kernel_self_checks_passed": 6, "kernel_fallback": None}


@pytest.mark.parametrize("fault", ["corrupt_chunk", "perturb_output"])
def test_wrong_kernel_result_falls_back_to_torch_for_good(spy, torch_calls, caplog, fault):
    s = spy(**{fault: True})
    norms = CheckedLayerGradNorms("triton")
    tensors, ids = _grads(), [0, 1, 1, 2]
    with caplog.at_level(logging.ERROR, logger="irtuning_kernels.dispatch"):
        res = norms(tensors, ids, 3)
    ref = layer_grad_norms(tensors, ids, 3, backend="torch")
    assert torch.equal(res.per_tensor_sq, ref.per_tensor_sq) and torch.equal(res.measured, ref.measured)
    fb = norms.fallback
    assert fb["reason"] == "mismatch" and fb["rtol"] == SELF_CHECK_RTOL
    if fault == "corrupt_chunk":  # tensor 0 (layer 0) lost a chunk
        assert fb["first_tensor"]["index"] == 0 and fb["first_tensor"]["layer"] == 0
        assert fb["first_tensor"]["kernel"] < fb["first_tensor"]["torch"]
        assert fb["first_layer"]["layer"] == 0
        shown = fb["first_tensor"]
    else:  # only layer 1's total is off
        assert "first_tensor" not in fb
        assert fb["first_layer"]["layer"] == 1
        assert fb["first_layer"]["kernel"] == pytest.approx(fb["first_layer"]["torch"] * 1.01, rel=1e-5)
        shown = fb["first_layer"]
    [line] = [r for r in caplog.records if r.levelno == logging.ERROR]
    msg = line.getMessage()
    assert "KERNEL SELF-CHECK FAILED" in msg and "torch path" in msg
    assert repr(shown["kernel"]) in msg and repr(shown["torch"]) in msg
    launches = s.calls
    for seed in range(3):  # the rest of the run: torch only, whatever the structure, no new log line
        more = _grads(seed=seed)
        out = norms(more, ids, 3)
        torch.testing.assert_close(out.per_tensor_sq, layer_grad_norms(more, ids, 3, backend="torch").per_tensor_sq)
        norms(more[:2], [0, 0], 1)
    assert s.calls == launches
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
    assert norms.facts()["kernel_fallback"] is fb


def test_raising_launch_falls_back_to_torch(spy, caplog):
    s = spy(raise_error=True)
    norms = CheckedLayerGradNorms("triton")
    tensors, ids = _grads(), [0, 1, 1, 2]
    with caplog.at_level(logging.ERROR, logger="irtuning_kernels.dispatch"):
        res = norms(tensors, ids, 3)
        norms(tensors, ids, 3)
    torch.testing.assert_close(res.per_layer_sq, layer_grad_norms(tensors, ids, 3, backend="torch").per_layer_sq)
    assert norms.fallback["reason"] == "exception"
    assert norms.fallback["error"] == "RuntimeError: simulated launch failure"
    assert s.calls == 1
    [line] = caplog.records
    assert "KERNEL SELF-CHECK FAILED" in line.getMessage() and "simulated launch failure" in line.getMessage()


def test_self_check_off_launches_the_kernel_alone(spy, torch_calls):
    s = spy(perturb_output=True)
    norms = CheckedLayerGradNorms("triton", self_check=False)
    tensors, ids = _grads(), [0, 1, 1, 2]
    res = norms(tensors, ids, 3)
    assert s.calls == 1 and torch_calls == [] and norms.fallback is None
    assert res.per_layer_sq[1] != layer_grad_norms(tensors, ids, 3, backend="torch").per_layer_sq[1]


def test_auto_on_cpu_never_takes_the_kernel_so_never_checks(spy, torch_calls):
    s = spy(raise_error=True)
    norms = CheckedLayerGradNorms("auto")
    norms(_grads(), [0, 1, 1, 2], 3)
    assert s.calls == 0 and norms.checks_passed == 0 and norms.kernel_calls == 0 and norms.fallback is None


def test_bad_input_still_raises_and_is_no_kernel_fault(spy):
    spy()
    norms = CheckedLayerGradNorms("triton")
    with pytest.raises(ValueError, match=r"layer_ids\[1\]=5"):
        norms([torch.ones(3), torch.ones(2)], [0, 5], 2)
    with pytest.raises(ValueError, match="backend='triton' takes fp32, bf16 and fp16"):
        norms([torch.ones(3, dtype=torch.float64)], [0], 1)
    assert norms.fallback is None
    with pytest.raises(ValueError, match="backend='gpu'"):
        CheckedLayerGradNorms("gpu")


def test_checks_stop_after_max_structures(spy, torch_calls, monkeypatch):
    monkeypatch.setattr(dispatch, "MAX_SELF_CHECKS", 2)
    spy()
    norms = CheckedLayerGradNorms("triton")
    for n in (3, 4, 5, 6):
        norms([torch.ones(n)], [0], 1)
    assert norms.checks_passed == 2 and len(torch_calls) == 2 and norms.kernel_calls == 4


def test_engine_records_the_fallback_and_keeps_selecting(spy, caplog):
    from irtuning_plugin.config import SelectionConfig
    from irtuning_plugin.engine import LayerSelectionEngine

    from helpers_tiny import RandomTokens, tiny_peft_llama

    spy(perturb_output=True)
    model = tiny_peft_llama(num_layers=4)
    engine = LayerSelectionEngine(model, SelectionConfig(strategy="ir", kernel_backend="triton"), seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    engine.begin(opt)
    batches = torch.utils.data.DataLoader(RandomTokens(n=12), batch_size=4)
    with caplog.at_level(logging.ERROR):
        for step, batch in enumerate(batches, start=1):
            model(**batch).loss.backward()
            engine.collect_scores()
            opt.step()
            opt.zero_grad(set_to_none=True)
            engine.end_step(step)
    facts = engine.run_facts()
    assert facts["kernel_fallback"]["reason"] == "mismatch" and facts["kernel_self_check"] is True
    assert sum("KERNEL SELF-CHECK FAILED" in r.getMessage() for r in caplog.records) == 1
    assert bool(engine.ever_measured.any())
