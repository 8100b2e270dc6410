"""Chooses the implementation of :func:`layer_grad_norms` (Triton on CUDA, torch elsewhere)."""

from __future__ import annotations

from typing import Sequence

import torch

from irtuning_kernels.reference import (
    LayerGradNorms,
    check_inputs,
    layer_grad_norms_fp64,
    layer_grad_norms_torch,
)

BACKENDS = ("auto", "triton", "torch", "reference")

_triton_mod = None


def _triton():
    """The kernel module, imported on first use (None when triton is not installed)."""
    global _triton_mod
    if _triton_mod is None:
        try:
            from irtuning_kernels import grad_norm_triton
        except ImportError:
            _triton_mod = False
        else:
            _triton_mod = grad_norm_triton
    return _triton_mod or None


def _interpreted(mod) -> bool:
    # triton.jit reads TRITON_INTERPRET once, when the kernel module is imported.
    return type(mod._layer_grad_norms_kernel).__name__ == "InterpretedFunction"


def layer_grad_norms(
    tensors: Sequence[torch.Tensor],
    layer_ids: Sequence[int],
    num_layers: int,
    *,
    deterministic: bool = True,
    backend: str = "auto",
) -> LayerGradNorms:
    """Per-tensor and per-layer squared L2 norms (fp32) of ``tensors``; ``layer_ids[i]`` is the layer
    of ``tensors[i]``. Layers with no tensor come back unmeasured (``measured`` False, NaN norm).

    backend: "auto" (Triton for CUDA tensors of fp32/bf16/fp16 when triton is installed, torch
    otherwise), "triton" (forced; CPU tensors only under TRITON_INTERPRET=1), "torch"
    (``torch._foreach_norm``), "reference" (fp64, slow). Every backend is deterministic, so
    ``deterministic=False`` currently changes nothing.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend == "reference":
        return layer_grad_norms_fp64(tensors, layer_ids, num_layers)
    if backend == "torch" or not len(tensors):
        return layer_grad_norms_torch(tensors, layer_ids, num_layers)
    if isinstance(layer_ids, torch.Tensor):
        layer_ids = layer_ids.tolist()
    if len(tensors) != len(layer_ids) or isinstance(num_layers, bool) or not isinstance(num_layers, int):
        check_inputs(tensors, layer_ids, num_layers)
    if backend == "auto":
        mod = _triton() if tensors[0].is_cuda else None
        res = mod.layer_grad_norms_triton(tensors, layer_ids, num_layers, strict=False) if mod else None
        return res if res is not None else layer_grad_norms_torch(tensors, layer_ids, num_layers)
    mod = _triton()
    if mod is None:
        raise ValueError("backend='triton' but triton is not installed")
    if not tensors[0].is_cuda and not _interpreted(mod):
        raise ValueError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                         "irtuning_kernels is first used, for CPU tensors")
    return mod.layer_grad_norms_triton(tensors, layer_ids, num_layers)
