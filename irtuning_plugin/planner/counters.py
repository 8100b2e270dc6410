"""Exact counters of one training step, shared by ``irtuning plan`` and ``benchmarks/cost_count.py``.

* FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and attention; elementwise ops count 0, as in
  torch's counter). torch has no formula for the CPU flash-attention kernels; importing this module adds the
  one torch uses for the CUDA kernels.
* bytes saved for backward: ``torch.autograd.graph.saved_tensors_hooks``; each storage counts once (a view
  saved twice holds one storage); storages of parameters and buffers are left out (they exist anyway).
"""

from __future__ import annotations

import torch
from torch.utils import flop_counter

_aten = torch.ops.aten


def register_cpu_sdpa() -> None:
    """FLOP formulas for the CPU flash-attention ops (torch registers only the CUDA ones)."""
    fwd = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    reg = flop_counter.flop_registry
    if fwd is not None and fwd.default not in reg and fwd not in reg:
        @flop_counter.register_flop_formula(fwd)
        def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)
    if bwd is not None and bwd.default not in reg and bwd not in reg:
        @flop_counter.register_flop_formula(bwd)
        def _cpu_sdpa_bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                          **kwargs) -> int:
            return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


register_cpu_sdpa()


def storage_key(t: torch.Tensor):
    return t.untyped_storage()._cdata


class SavedBytes:
    """Context manager: bytes of the distinct non-parameter storages saved for backward inside it.

    ``owner``: a callable taking the saved tensor and returning a label (e.g. the decoder layer running now); each storage is booked to
    the label current when it was first saved (``by_owner``)."""

    def __init__(self, model: torch.nn.Module, owner=None):
        self.exclude = {storage_key(p) for p in model.parameters()} | {storage_key(b) for b in model.buffers()}
        self.seen: dict[int, int] = {}
        self.by_owner: dict = {}
        self.param_refs = 0
        self.owner = owner

    def _pack(self, t):
        if isinstance(t, torch.Tensor):
            key = storage_key(t)
            if key in self.exclude:
                self.param_refs += 1
            elif key not in self.seen:
                n = t.untyped_storage().nbytes()
                self.seen[key] = n
                label = self.owner(t) if self.owner is not None else None
                self.by_owner[label] = self.by_owner.get(label, 0) + n
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self.seen.values())


def count_forward_backward(model: torch.nn.Module, batch: dict) -> dict:
    """One forward + backward of ``model`` on ``batch``, counted; leaves the gradients in place."""
    saved = SavedBytes(model)
    with flop_counter.FlopCounterMode(display=False) as fwd, saved:
        loss = model(**batch).loss
    with flop_counter.FlopCounterMode(display=False) as bwd:
        loss.backward()
    return {"loss": None if loss.is_meta else loss.item(), "forward_flops": int(fwd.get_total_flops()),
            "backward_flops": int(bwd.get_total_flops()), "saved_bytes": saved.bytes,
            "saved_param_refs": saved.param_refs}
