"""Chooses the implementation of :func:`layer_grad_norms` (Triton on CUDA, torch elsewhere), and
:class:`CheckedLayerGradNorms`, the per-run caller that checks the Triton kernel against the torch path
the first time it meets each gradient structure and falls back to torch for good if they disagree."""

from __future__ import annotations

import logging
import operator
from typing import Any, Sequence

import torch

from irtuning_kernels.reference import (
    LayerGradNorms,
    check_inputs,
    layer_grad_norms_fp64,
    layer_grad_norms_torch,
)

LOG = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "torch", "reference")

# Self-check tolerance, the same for fp32, bf16 and fp16 inputs: both paths upcast every element exactly
# to fp32 and accumulate squares in fp32, only in different orders, so they differ by a few fp32 roundings
# of a sum of positive terms (both within 1e-5 of fp64 in tests/test_kernels.py). 1024 eps(fp32) = 1.2e-4
# relative leaves a wide margin for that and none for a lost or doubled chunk (at least 1/num_chunks).
SELF_CHECK_RTOL = 1024 * torch.finfo(torch.float32).eps
SELF_CHECK_ATOL = torch.finfo(torch.float32).tiny  # two all-zero or denormal results agree
# Structures checked per run before the checks stop (ir's changing sets make a new list most steps;
# after this many agreeing launches the kernel has proven itself on this device).
MAX_SELF_CHECKS = 64

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
    return mod.INTERPRETED


def _kernel_for(tensors: Sequence[torch.Tensor], backend: str):
    """The Triton module when ``backend`` sends these (non-empty) tensors to the kernel, else None."""
    if backend == "auto":
        return _triton() if tensors[0].is_cuda else None
    mod = _triton()
    if mod is None:
        raise ValueError("backend='triton' but triton is not installed")
    if not tensors[0].is_cuda and not _interpreted(mod):
        raise ValueError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                         "irtuning_kernels is first used, for CPU tensors")
    return mod


def _launch(mod, tensors, layer_ids, num_layers, backend) -> LayerGradNorms:
    res = mod.layer_grad_norms_triton(tensors, layer_ids, num_layers, strict=backend == "triton")
    return res if res is not None else layer_grad_norms_torch(tensors, layer_ids, num_layers)


def _plain_ids(tensors, layer_ids, num_layers):
    if isinstance(layer_ids, torch.Tensor):
        layer_ids = layer_ids.tolist()
    if len(tensors) != len(layer_ids) or isinstance(num_layers, bool) or not isinstance(num_layers, int):
        check_inputs(tensors, layer_ids, num_layers)
    return layer_ids


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
    ``deterministic=False`` currently changes nothing. No self-check here: see
    :class:`CheckedLayerGradNorms`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend == "reference":
        return layer_grad_norms_fp64(tensors, layer_ids, num_layers)
    if backend == "torch" or not len(tensors):
        return layer_grad_norms_torch(tensors, layer_ids, num_layers)
    layer_ids = _plain_ids(tensors, layer_ids, num_layers)
    mod = _kernel_for(tensors, backend)
    if mod is None:
        return layer_grad_norms_torch(tensors, layer_ids, num_layers)
    return _launch(mod, tensors, layer_ids, num_layers, backend)


_shape = operator.attrgetter("shape")
_dtype = operator.attrgetter("dtype")


def structure_key(tensors: Sequence[torch.Tensor], layer_ids: Sequence[int], num_layers: int) -> tuple:
    """What one kernel launch depends on besides the values: device, dtypes, shapes, strides, 16-byte
    alignment of each pointer (the kernel has an aligned and an unaligned variant) and the layer ids."""
    aligned = not any(t.data_ptr() & 15 for t in tensors)
    return (tensors[0].device, int(num_layers), aligned, tuple(map(_dtype, tensors)), tuple(map(_shape, tensors)),
            tuple(map(torch.Tensor.stride, tensors)), tuple(int(i) for i in layer_ids))


def _first_mismatch(kernel: torch.Tensor, torch_res: torch.Tensor) -> int | None:
    close = torch.isclose(kernel, torch_res, rtol=SELF_CHECK_RTOL, atol=SELF_CHECK_ATOL, equal_nan=True)
    bad = (~close).nonzero().flatten()
    return int(bad[0]) if len(bad) else None


class CheckedLayerGradNorms:
    """``layer_grad_norms`` for one training run, with a first-use self-check of the Triton kernel.

    Each call takes the path ``backend`` takes in :func:`layer_grad_norms`. When that path is the Triton
    kernel (CUDA under ``auto``; also the CPU interpreter under a forced ``triton``, which is how the
    tests drive it) and ``self_check`` is on, the first call with a new :func:`structure_key` also runs
    the torch path and compares every tensor's and every layer's squared norm at
    :data:`SELF_CHECK_RTOL`. On a mismatch, or an exception from the launch, it logs one ERROR line with
    both values, records :attr:`fallback` and uses the torch path for the rest of the run (this object's
    life). After :data:`MAX_SELF_CHECKS` agreeing structures it stops checking.
    """

    def __init__(self, backend: str = "auto", *, self_check: bool = True):
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}; allowed: {', '.join(BACKENDS)}")
        self.backend = backend
        self.self_check = bool(self_check)
        self.fallback: dict[str, Any] | None = None
        self.checks_passed = 0
        self.kernel_calls = 0
        self._checked: set[tuple] = set()

    def facts(self) -> dict[str, Any]:
        """What the run summary reports about the kernel."""
        return {"kernel_backend": self.backend, "kernel_self_check": self.self_check,
                "kernel_calls": self.kernel_calls, "kernel_self_checks_passed": self.checks_passed,
                "kernel_fallback": self.fallback}

    def __call__(self, tensors: Sequence[torch.Tensor], layer_ids: Sequence[int], num_layers: int) -> LayerGradNorms:
        if self.fallback is not None:
            return layer_grad_norms(tensors, layer_ids, num_layers, backend="torch")
        if self.backend in ("torch", "reference") or not len(tensors):
            return layer_grad_norms(tensors, layer_ids, num_layers, backend=self.backend)
        layer_ids = _plain_ids(tensors, layer_ids, num_layers)
        mod = _kernel_for(tensors, self.backend)
        if mod is None:
            return layer_grad_norms_torch(tensors, layer_ids, num_layers)
        if not self.self_check or self.checks_passed >= MAX_SELF_CHECKS:
            self.kernel_calls += 1
            return _launch(mod, tensors, layer_ids, num_layers, self.backend)
        key = structure_key(tensors, layer_ids, num_layers)
        if key in self._checked:
            self.kernel_calls += 1
            return _launch(mod, tensors, layer_ids, num_layers, self.backend)
        check_inputs(tensors, layer_ids, num_layers)  # a user's bad input raises; it is no kernel fault
        reference = layer_grad_norms_torch(tensors, layer_ids, num_layers)
        self.kernel_calls += 1
        try:
            res = mod.layer_grad_norms_triton(tensors, layer_ids, num_layers, strict=False)
        except Exception as err:  # noqa: BLE001 - any failure of the kernel sends the run to torch
            return self._fall_back(reference, layer_ids, reason="exception", error=f"{type(err).__name__}: {err}")
        if res is None:  # a dtype the kernel does not take
            if self.backend == "triton":
                raise ValueError("backend='triton' takes fp32, bf16 and fp16 tensors on one device")
            return reference
        kernel = LayerGradNorms(*(x.detach().cpu() for x in res))
        ref = LayerGradNorms(*(x.detach().cpu() for x in reference))
        bad_tensor = _first_mismatch(kernel.per_tensor_sq, ref.per_tensor_sq)
        bad_layer = _first_mismatch(kernel.per_layer_sq, ref.per_layer_sq)
        if bad_tensor is not None or bad_layer is not None or not torch.equal(kernel.measured, ref.measured):
            return self._fall_back(reference, layer_ids, reason="mismatch", kernel=kernel, ref=ref,
                                   bad_tensor=bad_tensor, bad_layer=bad_layer)
        self._checked.add(key)
        self.checks_passed += 1
        return res

    def _fall_back(self, reference: LayerGradNorms, layer_ids, *, reason: str, error: str | None = None,
                   kernel: LayerGradNorms | None = None, ref: LayerGradNorms | None = None,
                   bad_tensor: int | None = None, bad_layer: int | None = None) -> LayerGradNorms:
        rec: dict[str, Any] = {"reason": reason, "backend": self.backend, "tensors": len(layer_ids),
                               "rtol": SELF_CHECK_RTOL, "checks_passed_before": self.checks_passed}
        if error is not None:
            rec["error"] = error
            detail = f"the Triton launch raised {error}"
        else:
            parts = []
            if bad_tensor is not None:
                rec["first_tensor"] = {"index": bad_tensor, "layer": int(layer_ids[bad_tensor]),
                                       "kernel": float(kernel.per_tensor_sq[bad_tensor]),
                                       "torch": float(ref.per_tensor_sq[bad_tensor])}
                parts.append("tensor {index} (layer {layer}): kernel {kernel!r} vs torch {torch!r}".format(
                    **rec["first_tensor"]))
            if bad_layer is not None:
                rec["first_layer"] = {"layer": bad_layer, "kernel": float(kernel.per_layer_sq[bad_layer]),
                                      "torch": float(ref.per_layer_sq[bad_layer])}
                parts.append("layer {layer}: kernel {kernel!r} vs torch {torch!r}".format(**rec["first_layer"]))
            if not torch.equal(kernel.measured, ref.measured):
                rec["measured_differs"] = True
                parts.append("measured-layer flags differ")
            detail = "squared norms disagree beyond rtol %.2g: %s" % (SELF_CHECK_RTOL, "; ".join(parts))
        self.fallback = rec
        LOG.error("irtuning: KERNEL SELF-CHECK FAILED on %s (%d tensors): %s; the torch path computes the "
                  "gradient norms for the rest of the run (kernel_fallback in irtuning_run.json); please report "
                  "this with your GPU and triton version", reference.per_tensor_sq.device, len(layer_ids), detail)
        return reference
