"""One Triton launch for every tensor's and every layer's squared gradient norm."""

from __future__ import annotations

import array
import functools
import operator
from typing import Sequence

import torch
import triton
import triton.language as tl

from irtuning_kernels.reference import LayerGradNorms, check_inputs, layer_grad_norms_torch

CHUNK = 65536  # elements per program; a multiple of BLOCK
BLOCK = 4096  # elements per main-loop iteration (16 per thread at num_warps=8)
NUM_WARPS = 8
RBLOCK = 1024  # chunk partials summed per step by a tensor's finishing program
LBLOCK = 64  # layers per step in the final per-layer reduction
MBLOCK = 16  # tensors of one layer per step in the final per-layer reduction
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_MAX_PLANS = 16

_NAN = tl.constexpr(float("nan"))


@triton.jit
def _sum_squares(addr, start, length, DTYPE: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    # Specialised once per DTYPE; the caller branches on the chunk's runtime dtype code.
    ptr = addr.to(tl.pointer_type(DTYPE))
    if ALIGNED:
        # A pointer made from a loaded int64 carries no alignment facts: without this hint every
        # load is scalar. The hint must sit on the int_to_ptr result itself.
        ptr = tl.multiple_of(ptr, 16)
    base = ptr + start
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    n_full = (length // BLOCK) * BLOCK
    for k in range(0, n_full, BLOCK):
        offs = tl.max_contiguous(tl.multiple_of(k + tl.arange(0, BLOCK), BLOCK), BLOCK)
        # In bounds by construction (k + BLOCK <= n_full): no mask, so loads vectorise.
        x = tl.load(base + offs).to(tl.float32)
        acc += x * x
    offs = n_full + tl.arange(0, BLOCK)
    x = tl.load(base + offs, mask=offs < length, other=0.0).to(tl.float32)
    acc += x * x
    return tl.sum(acc, axis=0)


@triton.jit
def _layer_grad_norms_kernel(
    ptrs,
    chunks,
    tensor_chunks,
    layer_members,
    layer_count,
    partials,
    counters,
    per_tensor_out,
    per_layer_out,
    measured_out,
    num_tensors,
    num_layers,
    max_members,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    RBLOCK: tl.constexpr,
    LBLOCK: tl.constexpr,
    MBLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """One program per chunk of CHUNK elements of one tensor; the grid is the chunk count.

    ptrs: int64 [T], ``data_ptr()`` of each tensor; the only input refreshed on every call.
    chunks: int32 [C, 4], one row per chunk: tensor index, dtype code (0 fp32, 1 bf16, 2 fp16),
        chunk index inside its tensor (first element = index * CHUNK), element count (<= CHUNK).
    tensor_chunks: int32 [T, 2], per tensor: first chunk row, number of chunks (>= 1; an empty
        tensor gets one chunk of length 0 so that every tensor has a finishing program).
    layer_members: int32 [L, max_members], tensor indices of each layer in list order, -1 padded.
    layer_count: int32 [L], tensors per layer; 0 means unmeasured (NaN norm).
    partials: fp32 [C] scratch, one fixed slot per chunk.
    counters: int32 [T + 1], zero between launches: arrivals per tensor, then finished tensors.
        The program that completes a count resets it, so no memset launch is needed.
    per_tensor_out: fp32 [T] output; per_layer_out: fp32 [L] output; measured_out: int8 [L] output.
    num_tensors, num_layers, max_members: T, L and the padded width of layer_members.
    CHUNK, BLOCK: elements per program and per main-loop iteration; RBLOCK, LBLOCK, MBLOCK: tile
        sizes of the two final reductions. ALIGNED: every pointer is 16-byte aligned (vector loads).

    Determinism: each chunk writes its partial to its own slot; the last program to finish a tensor
    (integer atomic counter) sums that tensor's slots in index order, and the last tensor to finish
    sums each layer's tensors in list order. No float atomics anywhere.
    """
    pid = tl.program_id(0).to(tl.int64)
    # Table reads below are scalar and in bounds by construction (pid < C, tid < T): no masks.
    row = chunks + pid * 4
    tid = tl.load(row).to(tl.int64)
    dcode = tl.load(row + 1)
    start = tl.load(row + 2).to(tl.int64) * CHUNK
    length = tl.load(row + 3)
    addr = tl.load(ptrs + tid)
    if dcode == 0:
        part = _sum_squares(addr, start, length, tl.float32, BLOCK, ALIGNED)
    elif dcode == 1:
        part = _sum_squares(addr, start, length, tl.bfloat16, BLOCK, ALIGNED)
    else:
        part = _sum_squares(addr, start, length, tl.float16, BLOCK, ALIGNED)
    tl.store(partials + pid, part)

    # Barrier, then a gpu-scope release: the partial is visible before the arrival is counted.
    tl.debug_barrier()
    arrived = tl.atomic_add(counters + tid, 1, sem="acq_rel", scope="gpu")
    first = tl.load(tensor_chunks + tid * 2)
    count = tl.load(tensor_chunks + tid * 2 + 1)
    if arrived == count - 1:
        tl.store(counters + tid, 0)
        racc = tl.zeros([RBLOCK], dtype=tl.float32)
        for c in range(0, count, RBLOCK):
            offs = c + tl.arange(0, RBLOCK)
            # .cg: read from L2, the partials were written by other programs of this launch.
            racc += tl.load(partials + first + offs, mask=offs < count, other=0.0, cache_modifier=".cg")
        tl.store(per_tensor_out + tid, tl.sum(racc, axis=0))

        tl.debug_barrier()
        done = tl.atomic_add(counters + num_tensors, 1, sem="acq_rel", scope="gpu")
        if done == num_tensors - 1:
            tl.store(counters + num_tensors, 0)
            for l0 in range(0, num_layers, LBLOCK):
                lay = l0 + tl.arange(0, LBLOCK)
                lmask = lay < num_layers
                lacc = tl.zeros([LBLOCK, MBLOCK], dtype=tl.float32)
                for m0 in range(0, max_members, MBLOCK):
                    mem = m0 + tl.arange(0, MBLOCK)
                    mmask = lmask[:, None] & (mem[None, :] < max_members)
                    idx = tl.load(layer_members + lay[:, None] * max_members + mem[None, :], mask=mmask, other=-1)
                    lacc += tl.load(per_tensor_out + idx, mask=idx >= 0, other=0.0, cache_modifier=".cg")
                lsum = tl.sum(lacc, axis=1)
                cnt = tl.load(layer_count + lay, mask=lmask, other=0)
                tl.store(per_layer_out + lay, tl.where(cnt > 0, lsum, _NAN), mask=lmask)
                tl.store(measured_out + lay, (cnt > 0).to(tl.int8), mask=lmask)


# triton.jit reads TRITON_INTERPRET once, when this module is imported: True = the CPU interpreter.
INTERPRETED = type(_layer_grad_norms_kernel).__name__ == "InterpretedFunction"


class _Plan:
    """Everything about one gradient-list structure (dtypes, sizes, layer ids) except the pointers."""

    def __init__(self, numels, dcodes, layer_ids, num_layers, device, chunk):
        T, L = len(numels), num_layers
        rows, tensor_chunks = [], []
        for t, (n, code) in enumerate(zip(numels, dcodes, strict=True)):
            nchunks = max(1, -(-n // chunk))
            tensor_chunks.append((len(rows), nchunks))
            rows.extend((t, code, c, min(chunk, n - c * chunk)) for c in range(nchunks))
        members = [[] for _ in range(L)]
        for t, lid in enumerate(layer_ids):
            members[lid].append(t)
        self.max_members = max(1, max(len(m) for m in members)) if L else 1
        table = [m + [-1] * (self.max_members - len(m)) for m in members]

        def dev(x, dtype):
            return torch.tensor(x, dtype=dtype).to(device)

        self.num_tensors, self.num_layers, self.num_chunks = T, L, len(rows)
        self.chunk = chunk
        self.chunks = dev(rows, torch.int32)
        self.tensor_chunks = dev(tensor_chunks, torch.int32)
        self.layer_members = dev(table if L else [[-1]], torch.int32)
        self.layer_count = dev([len(m) for m in members] if L else [0], torch.int32)
        self.partials = torch.empty(len(rows), dtype=torch.float32, device=device)
        self.counters = torch.zeros(T + 1, dtype=torch.int32, device=device)
        self.device = device


_PLANS: dict = {}  # first in, first evicted
_MISSING = object()
_STATS = {"builds": 0, "hits": 0}


def plan_cache_info() -> dict:
    """Plan builds and hits so far, and how many plans are cached (for tests and benchmarks)."""
    return {**_STATS, "size": len(_PLANS)}


def clear_plan_cache() -> None:
    _PLANS.clear()
    _STATS.update(builds=0, hits=0)


_dtype_of = operator.attrgetter("dtype")


def _get_plan(tensors, layer_ids, num_layers, chunk):
    # map() over unbound methods: the cheapest per-tensor reads from Python (~0.15 us each here).
    device = tensors[0].device
    dtypes = tuple(map(_dtype_of, tensors))
    numels = tuple(map(torch.Tensor.numel, tensors))
    key = (device, num_layers, chunk, dtypes, numels, tuple(layer_ids))
    plan = _PLANS.get(key, _MISSING)  # hashing the key costs ~10 us: once per call
    if plan is not _MISSING:
        _STATS["hits"] += 1
        return plan
    check_inputs(tensors, layer_ids, num_layers)
    plan = None  # cached too: this structure goes to the torch path
    if all(t.device == device for t in tensors) and all(d in DTYPE_CODES for d in dtypes):
        plan = _Plan(numels, [DTYPE_CODES[d] for d in dtypes], [int(x) for x in layer_ids], num_layers, device, chunk)
    _STATS["builds"] += 1
    _PLANS[key] = plan
    if len(_PLANS) > _MAX_PLANS:
        del _PLANS[next(iter(_PLANS))]
    return plan


def layer_grad_norms_triton(
    tensors: Sequence[torch.Tensor],
    layer_ids: Sequence[int],
    num_layers: int,
    *,
    chunk: int = CHUNK,
    block: int = BLOCK,
    rblock: int = RBLOCK,
    strict: bool = True,
) -> LayerGradNorms | None:
    """Host wrapper: cached plan + fresh pointer vector, one kernel launch, deterministic.

    ``layer_ids`` is a sequence of ints, ``tensors`` a non-empty list on one device (CUDA, or CPU
    under TRITON_INTERPRET=1). Bad lengths or layer ids raise ValueError (checked when a structure
    is first seen). Tensors on several devices or of another dtype than fp32/bf16/fp16: ValueError,
    or None when ``strict`` is False (the caller then uses the torch path). ``chunk``, ``block`` and
    ``rblock`` (powers of two) override the tile sizes, for tests."""
    if block < 16 or block & (block - 1) or chunk % block or rblock & (rblock - 1):
        raise ValueError(f"chunk={chunk}, block={block}, rblock={rblock}: block and rblock must be powers "
                         "of two, block >= 16 (16-byte aligned chunk starts), chunk a multiple of block")
    if not len(tensors):
        return layer_grad_norms_torch(tensors, layer_ids, num_layers)
    if not all(map(torch.Tensor.is_contiguous, tensors)):
        tensors = [t.contiguous() for t in tensors]
    plan = _get_plan(tensors, layer_ids, num_layers, chunk)
    if plan is None:
        if strict:
            raise ValueError("backend='triton' takes fp32, bf16 and fp16 tensors on one device")
        return None
    addrs = list(map(torch.Tensor.data_ptr, tensors))
    aligned = not functools.reduce(operator.or_, addrs) & 15
    # Pageable source: the copy has read it when .to() returns, so non_blocking is safe here.
    ptrs = torch.frombuffer(array.array("q", addrs), dtype=torch.int64).to(plan.device, non_blocking=True)
    T, L = plan.num_tensors, plan.num_layers
    out = torch.empty(T + L, dtype=torch.float32, device=plan.device)
    measured = torch.empty(L, dtype=torch.bool, device=plan.device)
    _layer_grad_norms_kernel[(plan.num_chunks,)](
        ptrs, plan.chunks, plan.tensor_chunks, plan.layer_members, plan.layer_count, plan.partials,
        plan.counters, out, out[T:], measured.view(torch.int8), T, L, plan.max_members,
        CHUNK=chunk, BLOCK=block, RBLOCK=rblock, LBLOCK=LBLOCK, MBLOCK=MBLOCK, ALIGNED=aligned,
        num_warps=NUM_WARPS,
    )
    return LayerGradNorms(out[:T], out[T:], measured)
