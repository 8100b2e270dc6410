"""Torch implementations of the per-layer gradient norms: the fp64 reference and the fast fallback."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch


class LayerGradNorms(NamedTuple):
    """Squared L2 norms, fp32. ``per_layer_sq[l]`` is NaN where ``measured[l]`` is False."""

    per_tensor_sq: torch.Tensor  # [T] fp32
    per_layer_sq: torch.Tensor  # [num_layers] fp32
    measured: torch.Tensor  # [num_layers] bool


def check_inputs(tensors: Sequence[torch.Tensor], layer_ids, num_layers: int) -> None:
    """ValueError naming the offending argument; shared by every backend."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
        raise ValueError(f"num_layers={num_layers!r} must be an int >= 0")
    if len(tensors) != len(layer_ids):
        raise ValueError(f"tensors and layer_ids differ in length: {len(tensors)} tensors, {len(layer_ids)} layer_ids")
    for i, lid in enumerate(layer_ids):
        if not 0 <= int(lid) < num_layers:
            raise ValueError(f"layer_ids[{i}]={int(lid)} outside 0..num_layers-1 (num_layers={num_layers})")


def _finish(per_tensor_sq: torch.Tensor, layer_ids, num_layers: int) -> LayerGradNorms:
    # A [L, T] membership mask summed along T: deterministic on every device (index_add_ uses float
    # atomics on CUDA) and a NaN/inf in one tensor stays in its own layer (unlike a 0/1 matmul).
    device = per_tensor_sq.device
    idx = torch.as_tensor(layer_ids, dtype=torch.long).to(device)
    member = idx[None, :] == torch.arange(num_layers, device=device)[:, None]
    per_layer = torch.where(member, per_tensor_sq[None, :], 0).sum(dim=1)
    measured = member.any(dim=1)
    per_layer = torch.where(measured, per_layer, float("nan"))
    return LayerGradNorms(per_tensor_sq, per_layer, measured)


def layer_grad_norms_fp64(tensors: Sequence[torch.Tensor], layer_ids, num_layers: int) -> LayerGradNorms:
    """Reference: every tensor upcast to fp64, one norm each; results cast to fp32 at the end."""
    check_inputs(tensors, layer_ids, num_layers)
    if not len(tensors):
        return layer_grad_norms_torch(tensors, layer_ids, num_layers)
    sq = torch.stack([t.detach().to(torch.float64).pow(2).sum() for t in tensors])
    res = _finish(sq, layer_ids, num_layers)
    return LayerGradNorms(res.per_tensor_sq.float(), res.per_layer_sq.float(), res.measured)


_CUDA_FOREACH_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CPU_PIECE = 1 << 13


def _per_tensor_sq(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    ts = [t.detach() for t in tensors]
    if ts[0].is_cuda and all(t.dtype in _CUDA_FOREACH_DTYPES for t in ts):
        # dtype=float32: without it bf16 grads give bf16 norms (about 2e-3 relative error). The CUDA
        # kernel reduces 64Ki-element chunks in fp32 and then the chunk results: accurate.
        return torch.stack(torch._foreach_norm(ts, 2, dtype=torch.float32)).pow(2)
    # The CPU norm kernels accumulate almost sequentially (torch 2.13: 9e-3 relative error on 58M
    # fp32 elements, 4e-5 on 459K bf16 ones), so: upcast to fp32, one _foreach_norm over pieces of
    # at most 8Ki elements (1e-6 at worst), squares summed per tensor in fp64 (index_add_ on CPU adds
    # in index order: deterministic). Costs 2-3x a plain _foreach_norm; reductions along a dim of a
    # [-1, 8Ki] view, the other way to get short sums, are slower still on CPU.
    pieces, owner = [], []
    for i, t in enumerate(ts):
        flat = t.reshape(-1)
        if flat.dtype not in (torch.float32, torch.float64):
            flat = flat.float()
        n = flat.numel()
        if n <= _CPU_PIECE:
            pieces.append(flat)
            owner.append(i)
            continue
        m = n - n % _CPU_PIECE
        split = flat[:m].view(-1, _CPU_PIECE).unbind(0)  # views, made in one C++ call
        pieces.extend(split)
        if m < n:
            pieces.append(flat[m:])
        owner.extend([i] * (len(split) + (m < n)))
    sq = torch.stack(torch._foreach_norm(pieces, 2)).double().pow(2)
    out = torch.zeros(len(ts), dtype=torch.float64, device=sq.device)
    out.index_add_(0, torch.as_tensor(owner, device=sq.device), sq)
    return out.float()


def layer_grad_norms_torch(tensors: Sequence[torch.Tensor], layer_ids, num_layers: int) -> LayerGradNorms:
    """Fast torch path: ``torch._foreach_norm`` accumulating in fp32, then one masked per-layer sum."""
    check_inputs(tensors, layer_ids, num_layers)
    if not len(tensors):
        return _finish(torch.zeros(0, dtype=torch.float32), [], num_layers)
    return _finish(_per_tensor_sq(tensors), layer_ids, num_layers)
