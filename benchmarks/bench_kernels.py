"""Per-layer gradient norms: our Triton kernel against torch ways of computing the same thing.

Not collected by ``pytest tests/``; run explicitly, for example:

    python -m pytest benchmarks/bench_kernels.py --benchmark-json=benchmarks/kernels.json

Without TRITON_INTERPRET. Providers: ``triton`` (ours, CUDA only), ``triton_host`` (our host wrapper
with the launch replaced by a no-op: the Python cost per call, any device), ``torch_foreach`` (our
torch path: ``torch._foreach_norm`` + a per-layer reduction), ``python_loop`` (one norm per tensor in
a Python loop, as the reference IR-Tuning code does), ``compiled_foreach`` (``torch.compile`` of the
foreach version; skipped when compilation fails), ``foreach_plain`` (``torch._foreach_norm`` on
whole tensors: what our torch path does on CUDA; on CPU it skips the fp32 8Ki-element pieces that
make our CPU path accurate). Each result stores bytes read, GB/s, the p20/p80 of the rounds and the
largest relative error of the per-tensor squared norms against fp64 in ``extra_info``.
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("benchmarks need compiled kernels: unset TRITON_INTERPRET", allow_module_level=True)

from irtuning_kernels import layer_grad_norms  # noqa: E402

try:
    from irtuning_kernels import grad_norm_triton as gk
except ImportError:  # triton not installed
    gk = None

pytestmark = pytest.mark.benchmark
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

from benchmarks.gpu_proof import ALL7, LLAMA8B, QKVUD, full_shapes, lora_shapes  # noqa: E402

SMOLLM2 = dict(layers=30, hidden=576, inter=1536, kv=192)
CASES = {
    "llama8b-lora-r32-qkvud-fp32": (lambda: lora_shapes(LLAMA8B, 32, QKVUD), torch.float32, False),
    "llama8b-lora-r8-all7-bf16": (lambda: lora_shapes(LLAMA8B, 8, ALL7), torch.bfloat16, False),
    "llama8b-lora-r8-all7-fp32": (lambda: lora_shapes(LLAMA8B, 8, ALL7), torch.float32, False),
    "smollm2-lora-r32-qkvud-fp32": (lambda: lora_shapes(SMOLLM2, 32, QKVUD), torch.float32, False),
    "smollm2-lora-r32-qkvud-bf16": (lambda: lora_shapes(SMOLLM2, 32, QKVUD), torch.bfloat16, False),
    "llama8b-full-32layers-bf16": (lambda: full_shapes(LLAMA8B), torch.bfloat16, True),  # ~14 GB: GPU only
}

_grads_cache: dict = {}


def grads_for(case):
    if case not in _grads_cache:
        _grads_cache.clear()  # one set alive at a time
        make, dtype, gpu_only = CASES[case]
        if gpu_only and not CUDA:
            pytest.skip(f"{case}: about 14 GB of gradients, GPU only")
        shapes, ids = make()
        g = torch.Generator(device=DEVICE).manual_seed(0)
        grads = [(torch.randn(s, generator=g, device=DEVICE, dtype=torch.float32) * 1e-3).to(dtype)
                 if len(s) > 1 else torch.randn(s, generator=g, device=DEVICE).to(dtype) for s in shapes]
        _grads_cache[case] = (grads, ids, max(ids) + 1)
    return _grads_cache[case]


def python_loop(grads, ids, num_layers):
    per_layer = [0.0] * num_layers
    per_tensor = []
    for g, lid in zip(grads, ids, strict=True):
        sq = g.detach().float().norm(2) ** 2
        per_tensor.append(sq)
        per_layer[lid] = per_layer[lid] + sq
    return torch.stack(per_tensor), per_layer


def _foreach_sq(grads):
    return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).pow(2)


_compiled = {}


def compiled_foreach(grads, ids, num_layers):
    fn = _compiled.setdefault("fn", torch.compile(_foreach_sq, dynamic=False))
    sq = fn(grads)
    idx = torch.as_tensor(ids, device=sq.device)
    return sq, torch.zeros(num_layers, device=sq.device).index_add_(0, idx, sq)


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _run_provider(provider, grads, ids, num_layers):
    if provider == "triton":
        return layer_grad_norms(grads, ids, num_layers, backend="triton")
    if provider == "triton_host":
        return gk.layer_grad_norms_triton(grads, ids, num_layers)
    if provider == "torch_foreach":
        return layer_grad_norms(grads, ids, num_layers, backend="torch")
    if provider == "python_loop":
        return python_loop(grads, ids, num_layers)
    if provider == "compiled_foreach":
        return compiled_foreach(grads, ids, num_layers)
    if provider == "foreach_plain":
        sq = _foreach_sq(grads)
        idx = torch.as_tensor(ids, device=sq.device)
        return sq, torch.zeros(num_layers, device=sq.device).index_add_(0, idx, sq)
    raise ValueError(provider)


def _percentile(data, q):
    data = sorted(data)
    pos = (len(data) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


PROVIDERS = ["triton", "triton_host", "torch_foreach", "foreach_plain", "python_loop", "compiled_foreach"]


def _max_rel_error(per_tensor_sq, grads):
    ref = torch.stack([g.double().pow(2).sum() for g in grads])
    return float(((per_tensor_sq.double() - ref).abs() / ref).max())


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", list(CASES))
def test_layer_grad_norms(benchmark, case, provider, monkeypatch):
    if provider.startswith("triton") and gk is None:
        pytest.skip("triton is not installed")
    if provider == "triton" and not CUDA:
        pytest.skip("the Triton kernel needs a CUDA GPU (no GPU in this run)")
    if provider == "python_loop" and CASES[case][2]:
        pytest.skip("the Python loop over a full model is not worth timing")
    grads, ids, num_layers = grads_for(case)
    if provider == "triton_host":
        monkeypatch.setattr(gk, "_layer_grad_norms_kernel", _NoLaunch())

    def run():
        out = _run_provider(provider, grads, ids, num_layers)
        if CUDA:
            torch.cuda.synchronize()
        return out

    try:
        first = run()  # warm-up: plan build, Triton/inductor compilation
    except Exception as e:  # noqa: BLE001
        if provider == "compiled_foreach":
            pytest.skip(f"torch.compile failed here: {type(e).__name__}: {str(e)[:200]}")
        raise

    nbytes = sum(g.numel() * g.element_size() for g in grads)
    rounds = 30 if CUDA else max(3, min(20, int(2e8 // max(nbytes, 1))))
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)
    data = benchmark.stats.stats.data
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if CUDA else f"cpu ({torch.get_num_threads()} threads)",
        tensors=len(grads), layers=num_layers, bytes_read=nbytes,
        gb_per_s=round(nbytes / median / 1e9, 3) if provider != "triton_host" else None,
        median_ms=round(median * 1e3, 4), p20_ms=round(_percentile(data, 0.2) * 1e3, 4),
        p80_ms=round(_percentile(data, 0.8) * 1e3, 4),
        max_rel_err=None if provider == "triton_host" else float(f"{_max_rel_error(first[0], grads):.2e}"),
        torch=torch.__version__, triton=getattr(__import__("triton"), "__version__", None) if gk else None,
    )
