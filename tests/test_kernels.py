"""Per-layer gradient norms: the Triton kernel (under TRITON_INTERPRET=1), its PTX, the torch path."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/conftest.py: before the kernel module is imported

import json
import re
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch

from irtuning_kernels import LayerGradNorms, layer_grad_norms

triton = pytest.importorskip("triton")
gk = pytest.importorskip("irtuning_kernels.grad_norm_triton")

RTOL = 1e-5
MIXED = (torch.float32, torch.bfloat16, torch.float16)


def _fp64(tensors, layer_ids, num_layers):
    per_tensor = torch.stack([t.double().pow(2).sum() for t in tensors])
    per_layer = torch.full((num_layers,), float("nan"), dtype=torch.float64)
    for lid in sorted(set(layer_ids)):
        per_layer[lid] = sum(per_tensor[i] for i, x in enumerate(layer_ids) if x == lid)
    return per_tensor, per_layer


def _check(res: LayerGradNorms, tensors, layer_ids, num_layers, rtol=RTOL):
    assert res.per_tensor_sq.dtype == torch.float32 and res.per_layer_sq.dtype == torch.float32
    assert res.measured.dtype == torch.bool
    assert res.per_tensor_sq.shape == (len(tensors),) and res.per_layer_sq.shape == (num_layers,)
    per_tensor, per_layer = _fp64(tensors, layer_ids, num_layers)
    torch.testing.assert_close(res.per_tensor_sq.double(), per_tensor, rtol=rtol, atol=0)
    measured = torch.zeros(num_layers, dtype=torch.bool)
    measured[list(set(layer_ids))] = True
    assert torch.equal(res.measured, measured)
    assert torch.isnan(res.per_layer_sq[~measured]).all()
    torch.testing.assert_close(res.per_layer_sq[measured].double(), per_layer[measured], rtol=rtol, atol=0)


def _make(sizes, dtypes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=g) * (1 + i % 3)).to(dtypes[i % len(dtypes)]) for i, n in enumerate(sizes)]


# ---- Triton kernel, interpreted ------------------------------------------------------------------

@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.bfloat16,), (torch.float16,), MIXED],
                         ids=["fp32", "bf16", "fp16", "mixed"])
def test_triton_odd_sizes_match_fp64(dtypes):
    tensors = _make([1, 7, 1023, 65537, 4096], dtypes)  # 65537: two chunks, the second of 1 element
    ids = [0, 0, 3, 1, 3]
    _check(layer_grad_norms(tensors, ids, 5, backend="triton"), tensors, ids, 5)


def test_triton_multi_chunk_partials_loop():
    # Small chunks and reduction tiles so that one tensor spans more than rblock chunks: the tensor's
    # finishing program then sums its partials over several reduction steps.
    tensors = _make([16 * 40 + 5, 33, 16 * 3], MIXED, seed=1)
    ids = [2, 0, 2]
    res = gk.layer_grad_norms_triton(tensors, ids, 4, chunk=16, block=16, rblock=16)
    _check(res, tensors, ids, 4)


def test_triton_many_tiny_tensors_and_empty_layers():
    sizes = [1 + (i * 7) % 13 for i in range(100)] + [0]  # one empty tensor too
    tensors = _make(sizes, MIXED, seed=2)
    ids = [(i * 3) % 70 for i in range(len(sizes))]  # 70 layers: more than LBLOCK; 10 never used
    res = layer_grad_norms(tensors, ids, 80, backend="triton")
    _check(res, tensors, ids, 80)
    assert res.per_tensor_sq[-1] == 0
    assert not res.measured[70:].any() and torch.isnan(res.per_layer_sq[70:]).all()


def test_triton_layer_with_more_tensors_than_mblock():
    tensors = _make([3 + i for i in range(40)], MIXED, seed=3)
    ids = [1] * 37 + [0, 2, 1]  # layer 1 has 38 tensors: three MBLOCK steps
    _check(layer_grad_norms(tensors, ids, 3, backend="triton"), tensors, ids, 3)


def test_triton_unaligned_and_non_contiguous_inputs():
    base = torch.randn(5000)
    unaligned = base[1:4097]  # 4-byte offset: the kernel drops its alignment hint
    strided = torch.randn(64, 48)[:, ::2]  # copied to contiguous by the host wrapper
    half = torch.randn(999, dtype=torch.float64).half()[3:]
    tensors = [unaligned, strided, half]
    ids = [0, 1, 1]
    _check(layer_grad_norms(tensors, ids, 2, backend="triton"), tensors, ids, 2)


def test_triton_deterministic_20_repeats():
    tensors = _make([70000, 513, 4097, 1], MIXED, seed=4)
    ids = [0, 1, 1, 2]
    first = layer_grad_norms(tensors, ids, 3, backend="triton", deterministic=True)
    for _ in range(19):
        res = layer_grad_norms(tensors, ids, 3, backend="triton", deterministic=True)
        assert torch.equal(res.per_tensor_sq.view(torch.int32), first.per_tensor_sq.view(torch.int32))
        assert torch.equal(res.per_layer_sq.view(torch.int32), first.per_layer_sq.view(torch.int32))
        assert torch.equal(res.measured, first.measured)


def test_plan_cache_reused_for_new_pointers_rebuilt_for_new_structure():
    gk.clear_plan_cache()
    sizes, ids = [100, 5000, 3], [0, 1, 1]
    a = _make(sizes, MIXED, seed=5)
    _check(layer_grad_norms(a, ids, 2, backend="triton"), a, ids, 2)
    assert gk.plan_cache_info()["builds"] == 1
    b = _make(sizes, MIXED, seed=6)  # new allocations, same structure: only the pointers change
    assert [t.data_ptr() for t in a] != [t.data_ptr() for t in b]
    _check(layer_grad_norms(b, ids, 2, backend="triton"), b, ids, 2)
    assert gk.plan_cache_info() == {"builds": 1, "hits": 1, "size": 1}

    for tensors, lids in [
        (_make([100, 5001, 3], MIXED), ids),  # a size changes
        (_make(sizes, MIXED), [1, 1, 0]),  # layer ids change
        (_make(sizes, (torch.float16,)), ids),  # dtypes change
    ]:
        builds = gk.plan_cache_info()["builds"]
        _check(layer_grad_norms(tensors, lids, 2, backend="triton"), tensors, lids, 2)
        assert gk.plan_cache_info()["builds"] == builds + 1
    assert gk.plan_cache_info()["size"] == 4


def test_triton_empty_list():
    res = layer_grad_norms([], [], 3, backend="triton")
    assert res.per_tensor_sq.shape == (0,) and not res.measured.any() and torch.isnan(res.per_layer_sq).all()


def test_auto_uses_torch_on_cpu():
    gk.clear_plan_cache()
    tensors = _make([10, 20], MIXED)
    _check(layer_grad_norms(tensors, [0, 1], 2), tensors, [0, 1], 2)
    assert gk.plan_cache_info()["builds"] == 0


# ---- PTX for sm_90, compiled offline -------------------------------------------------------------

_PTX_SCRIPT = textwrap.dedent(r"""
    import json, os, re, sys
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from irtuning_kernels import layer_grad_norms
    from irtuning_kernels import grad_norm_triton as g

    target = GPUTarget("cuda", 90, 32)
    try:
        triton.compiler.compiler.make_backend(target)
    except Exception as e:  # this triton build has no CUDA backend
        json.dump({"skip": f"{type(e).__name__}: {e}"}, sys.stdout)
        sys.exit(0)
    k = g._layer_grad_norms_kernel
    ptr_types = {"ptrs": "*i64", "chunks": "*i32", "tensor_chunks": "*i32", "layer_members": "*i32",
                 "layer_count": "*i32", "partials": "*fp32", "counters": "*i32", "per_tensor_out": "*fp32",
                 "per_layer_out": "*fp32", "measured_out": "*i8"}
    sig = dict(ptr_types, num_tensors="i32", num_layers="i32", max_members="i32")
    out = {}
    for aligned in (True, False):
        const = dict(CHUNK=g.CHUNK, BLOCK=g.BLOCK, RBLOCK=g.RBLOCK, LBLOCK=g.LBLOCK, MBLOCK=g.MBLOCK,
                     ALIGNED=aligned)
        sig.update({c: "constexpr" for c in const})
        attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(ptr_types))}
        src = triton.compiler.ASTSource(fn=k, signature=sig, constexprs=const, attrs=attrs)
        ck = triton.compile(src, target=target, options={"num_warps": g.NUM_WARPS})
        out[str(aligned)] = ck.asm["ptx"]
    # Without TRITON_INTERPRET the dispatcher must refuse a forced triton backend on CPU tensors
    # (launching would fail with "0 active drivers") and "auto" must use torch.
    try:
        layer_grad_norms([torch.ones(3)], [0], 1, backend="triton")
        out["cpu_forced"] = "no error"
    except ValueError as e:
        out["cpu_forced"] = "ValueError: " + str(e)
    out["cpu_auto"] = float(layer_grad_norms([torch.ones(3)], [0], 1).per_layer_sq[0])
    json.dump(out, sys.stdout)
""")


@pytest.fixture(scope="module")
def ptx():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    proc = subprocess.run([sys.executable, "-c", _PTX_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    out = json.loads(proc.stdout)
    if "skip" in out:
        pytest.skip(f"installed triton cannot target CUDA offline: {out['skip']}")
    return out


def _main_loop_body(text):
    # The unmasked main loop is the first loop of each dtype branch: a labelled block that ends in a
    # conditional branch back to its own label.
    return [body for label, body in re.findall(r"^(\$L__BB\d+_\d+):[^\n]*\n(.*?)^\s*@%p\d+ bra\s+\1;", text,
                                               re.M | re.S)]


def test_ptx_one_entry_and_vector_loads_in_main_loop(ptx):
    text = ptx["True"]
    assert len(re.findall(r"^\s*\.visible\s+\.entry\s", text, re.M)) == 1
    loops = [b for b in _main_loop_body(text) if re.search(r"ld\.global(\.nc)?(\.[a-z0-9:_]+)*\.v4\.", b)]
    # One vectorised loop per dtype (fp32, bf16, fp16); every global load in them is a 16-byte one.
    assert len(loops) == 3, text
    for body in loops:
        assert all(".v4." in ld for ld in re.findall(r"ld\.global\S*", body)), body
    # Only integer atomics (arrival counters), never float ones.
    atoms = re.findall(r"atom\.[\w.]+", text)
    assert atoms and all(a.endswith((".u32", ".s32")) for a in atoms), atoms


def test_ptx_unaligned_variant_compiles_without_vector_loads(ptx):
    text = ptx["False"]
    assert len(re.findall(r"^\s*\.visible\s+\.entry\s", text, re.M)) == 1
    assert not re.search(r"ld\.global(\.nc)?(\.[a-z0-9:_]+)*\.v4\.", text)


def test_forced_triton_on_cpu_without_interpreter_is_refused(ptx):
    assert ptx["cpu_forced"].startswith("ValueError: backend='triton'")
    assert ptx["cpu_auto"] == 3.0


# ---- compiled kernel on a GPU (run with TRITON_INTERPRET=0 where CUDA is available) --------------

_COMPILED_CUDA = torch.cuda.is_available() and type(gk._layer_grad_norms_kernel).__name__ != "InterpretedFunction"
needs_gpu = pytest.mark.skipif(not _COMPILED_CUDA, reason="needs a CUDA GPU and TRITON_INTERPRET=0")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_llama8b_lora_matches_fp64_and_is_deterministic(dtype):
    gk.clear_plan_cache()
    shapes, ids = _llama_lora_shapes(32)
    g = torch.Generator(device="cuda").manual_seed(8)
    tensors = [(torch.randn(s, generator=g, device="cuda") * 1e-3).to(dtype) for s in shapes]
    tensors += [torch.randn(1, device="cuda"), torch.randn(65537, device="cuda").half()]  # odd sizes, mixed
    ids += [0, 33]
    res = layer_grad_norms(tensors, ids, 35)  # auto: the Triton kernel on CUDA
    assert gk.plan_cache_info()["builds"] == 1
    ref = layer_grad_norms(tensors, ids, 35, backend="reference")
    torch.testing.assert_close(res.per_tensor_sq, ref.per_tensor_sq, rtol=RTOL, atol=0)
    torch.testing.assert_close(res.per_layer_sq, ref.per_layer_sq, rtol=RTOL, atol=0, equal_nan=True)
    assert torch.equal(res.measured, ref.measured)
    for _ in range(20):
        again = layer_grad_norms(tensors, ids, 35)
        assert torch.equal(again.per_tensor_sq.view(torch.int32), res.per_tensor_sq.view(torch.int32))
        assert torch.equal(again.per_layer_sq.view(torch.int32), res.per_layer_sq.view(torch.int32))
    fresh = [t.clone() * 2 for t in tensors]  # new pointers, same structure
    res2 = layer_grad_norms(fresh, ids, 35)
    assert gk.plan_cache_info()["builds"] == 1
    torch.testing.assert_close(res2.per_tensor_sq, res.per_tensor_sq * 4, rtol=RTOL, atol=0)


@needs_gpu
def test_cuda_large_tensor_and_unaligned_view():
    big = torch.randn(300_000_000 + 3, device="cuda", dtype=torch.bfloat16)
    view = torch.randn(1 << 20, device="cuda")[1:]
    tensors, ids = [big, view], [0, 1]
    res = layer_grad_norms(tensors, ids, 2, backend="triton")
    _check(res.__class__(*(x.cpu() for x in res)), [t.cpu() for t in tensors], ids, 2)


# ---- torch fallback on realistic shapes ----------------------------------------------------------

def _llama_lora_shapes(layers, hidden=4096, inter=14336, kv=1024, r=32):
    shapes, ids = [], []
    for layer in range(layers):
        for din, dout in [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, inter), (inter, hidden)]:
            shapes += [(r, din), (dout, r)]  # lora_A, lora_B
            ids += [layer, layer]
    return shapes, ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_path_llama8b_lora_shapes(dtype):
    # Llama-3.1-8B LoRA r=32 on q,k,v,up,down with real per-tensor shapes; 4 of the 32 layers to keep
    # CPU time and memory small (the layer count only repeats the same shapes); layers 4 and 5 of 6
    # get no tensor.
    shapes, ids = _llama_lora_shapes(4)
    g = torch.Generator().manual_seed(7)
    tensors = [(torch.randn(s, generator=g) * 1e-3).to(dtype) for s in shapes]
    res = layer_grad_norms(tensors, ids, 6, backend="torch")
    ref = layer_grad_norms(tensors, ids, 6, backend="reference")
    torch.testing.assert_close(res.per_tensor_sq, ref.per_tensor_sq, rtol=RTOL, atol=0)
    torch.testing.assert_close(res.per_layer_sq, ref.per_layer_sq, rtol=RTOL, atol=0, equal_nan=True)
    assert torch.equal(res.measured, ref.measured) and not res.measured[4:].any()
    _check(res, tensors, ids, 6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_path_accurate_on_a_long_tensor(dtype):
    # A plain CPU _foreach_norm is off by 6e-5 (fp32) and 1e-4 (bf16) here (torch 2.13); the
    # piecewise CPU path is not.
    g = torch.Generator().manual_seed(9)
    tensors = [torch.randn(1 << 21, generator=g).to(dtype), torch.randn(8191, generator=g).to(dtype)]
    _check(layer_grad_norms(tensors, [0, 0], 1, backend="torch"), tensors, [0, 0], 1)


@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
def test_torch_and_reference_agree_on_inf_and_nan(backend):
    tensors = [torch.tensor([1.0, float("inf")]), torch.tensor([2.0]), torch.tensor([float("nan")]), torch.ones(4)]
    res = layer_grad_norms(tensors, [0, 0, 1, 2], 3, backend=backend)
    assert res.per_layer_sq[0] == float("inf") and torch.isnan(res.per_layer_sq[1]) and res.per_layer_sq[2] == 4
    assert res.measured.all()


# ---- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["auto", "torch", "reference", "triton"])
def test_bad_input_names_the_argument(backend):
    t = [torch.ones(3), torch.ones(2)]
    with pytest.raises(ValueError, match="layer_ids"):
        layer_grad_norms(t, [0], 2, backend=backend)
    with pytest.raises(ValueError, match=r"layer_ids\[1\]=2"):
        layer_grad_norms(t, [0, 2], 2, backend=backend)
    with pytest.raises(ValueError, match=r"layer_ids\[0\]=-1"):
        layer_grad_norms(t, [-1, 0], 2, backend=backend)
    with pytest.raises(ValueError, match="num_layers"):
        layer_grad_norms(t, [0, 0], -1, backend=backend)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend='cuda'"):
        layer_grad_norms([torch.ones(2)], [0], 1, backend="cuda")


def test_triton_rejects_unsupported_dtype_auto_falls_back():
    t = [torch.ones(3, dtype=torch.float64)]
    with pytest.raises(ValueError, match="backend='triton'"):
        layer_grad_norms(t, [0], 1, backend="triton")
    assert layer_grad_norms(t, [0], 1).per_tensor_sq.item() == 3.0


@needs_gpu
def test_cuda_self_check_passes_on_the_compiled_kernel():
    from irtuning_kernels.dispatch import CheckedLayerGradNorms

    shapes, ids = _llama_lora_shapes(32)
    g = torch.Generator(device="cuda").manual_seed(3)
    tensors = [(torch.randn(s, generator=g, device="cuda") * 1e-3).bfloat16() for s in shapes]
    norms = CheckedLayerGradNorms("auto")
    for _ in range(3):
        norms(tensors, ids, 32)
    assert norms.fallback is None and norms.checks_passed == 1 and norms.kernel_calls == 3
