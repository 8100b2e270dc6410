"""Peak device memory, per-step traffic and a step-time model of one training set-up, from the counts.

What is counted (exact, meta device): parameter bytes of every tensor, which of them train, their gradients and
AdamW moments (the engine's ``memory_account()`` semantics: moments have the parameter's dtype, or fp32 with
``mixed`` precision; ``frozen_optimizer_state`` keep / cpu / drop), bytes saved for backward, FLOPs.

What is modelled (stated with every result):
* the loss transient: the fp32 logits' gradient (plus its copy in the weights' dtype) at micro-batch x seq x vocab,
  next to the saved fp32 log-softmax, at the start of backward;
* checkpointing: the layer inputs stay, one layer's saved tensors are rebuilt at a time;
* AdamW's foreach step: one temporary the size of the stepped moments (torch's ``_multi_tensor_adamw``);
* ``cpu`` offload: a leaving layer's device moments stay until the next optimizer step (the copies overlap the
  next forward/backward), so two consecutive sets' moments are resident together;
* the caching allocator: reserved = allocated x (1 + ``ALLOCATOR_OVERHEAD``); the CUDA context (not in
  ``max_memory_reserved``, part of what the card must hold): ``CUDA_CONTEXT_GIB``;
* the attention kernel's saved tensors with sdpa/flash (see ``count.py``).
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import asdict, dataclass, field

from irtuning_plugin.planner.count import CountSetup, LayerCosts, count_costs, step_count
from irtuning_plugin.planner.selection import Selection

GIB = 1024 ** 3
ALLOCATOR_OVERHEAD = 0.05  # caching-allocator rounding and fragmentation, a fraction of the allocated peak
CUDA_CONTEXT_GIB = 0.75  # CUDA context + cuBLAS/cuDNN handles: on the card, outside torch's allocator
CARDS_GIB = (24, 40, 80)
MFU = 0.40  # fraction of the peak dense bf16 FLOP rate a training step reaches (a stated assumption)

# name: (label, peak dense bf16 TFLOP/s, memory GiB, host<->device GB/s achieved per direction)
GPUS = {
    "h100": ("H100 SXM 80GB", 989.0, 80, 50.0),
    "h200": ("H200 SXM 141GB", 989.0, 141, 50.0),
    "a100": ("A100 SXM 80GB", 312.0, 80, 25.0),
    "4090": ("RTX 4090 24GB", 165.0, 24, 25.0),
    "3090": ("RTX 3090 24GB", 71.0, 24, 25.0),
}


@dataclass
class RowSpec:
    """One set-up to plan: what trains and how."""

    label: str
    count: CountSetup
    selection: Selection
    batch: int
    seq: int
    num_layers: int
    checkpointing: bool
    frozen_optimizer_state: str = "keep"  # keep | cpu | drop
    precision: str = "bf16"  # bf16 | fp16 | fp32 | mixed (fp32 weights of the trained model, bf16 compute)
    foreach: bool = True
    loss_chunks: int = 1  # the loss computed over this many sequence chunks (torchtune's CEWithChunkedOutputLoss: 8)
    notes: list[str] = field(default_factory=list)


@dataclass
class RowPlan:
    label: str
    strategy_source: str
    layers: dict
    trainable_params: int
    frozen_weight_bytes: int
    trainable_weight_bytes: int
    grad_bytes: int
    optimizer_device_bytes: int
    optimizer_host_bytes: int
    activation_bytes: int
    transient_bytes: int
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    peak_phase: str
    fwd_flops: int
    bwd_flops: int
    bwd_flops_ratio_to_all: float | None
    offload_bytes_per_step_median: int
    offload_bytes_per_step_mean: int
    offload_bytes_per_step_max: int
    fits: dict
    max_micro_batch: dict
    step_time: dict | None
    notes: list[str]

    def to_json(self) -> dict:
        return asdict(self)


def _moment_factor(spec: RowSpec) -> float:
    """Bytes of one AdamW moment per byte of the trained parameter as counted."""
    return 2.0 if spec.precision == "mixed" and spec.count.scope == "full" else 1.0


def _affine(one: LayerCosts, two: LayerCosts, batch: int) -> LayerCosts:
    """``one`` (batch 2) and ``two`` (batch 3) extended to ``batch``: a + b * batch, field by field."""
    def ext(a, b):
        if isinstance(a, dict):
            return {k: ext(a[k], b[k]) for k in a}
        if isinstance(a, int) and not isinstance(a, bool):
            return a + (b - a) * (batch - 2)
        return a
    out = dataclasses.replace(one)
    for f in dataclasses.fields(LayerCosts):
        if f.name not in ("num_layers", "batch", "vocab", "hidden") and not f.name.startswith(("layer_param",
                                                                                                "layer_trainable",
                                                                                                "outside_param",
                                                                                                "outside_trainable")):
            setattr(out, f.name, ext(getattr(one, f.name), getattr(two, f.name)))
    out.batch = batch
    return out


class Planner:
    """Plans rows; counts each (set-up, seq, batch <= 3) once, and extends the counts to larger batches."""

    def __init__(self):
        self._cache: dict = {}

    def _count(self, setup: CountSetup, seq: int, num_layers: int, batch: int) -> LayerCosts:
        key = (setup, seq, num_layers, batch)
        if key not in self._cache:
            self._cache[key] = count_costs(setup, batch, seq, num_layers)
        return self._cache[key]

    def costs(self, setup: CountSetup, seq: int, num_layers: int, batch: int) -> LayerCosts:
        """Counts at micro-batch ``batch``: counted directly up to 3; above, every count is affine in the batch
        (a tensor's shape has the batch dimension or not: rotary tables and scalars do not), so the counts at 2
        and 3 give it (at batch 1 a few bytes of views are shared that are not at 2, so 1 is not a base)."""
        if batch <= 3:
            return self._count(setup, seq, num_layers, batch)
        return _affine(self._count(setup, seq, num_layers, 2), self._count(setup, seq, num_layers, 3), batch)

    def memory(self, spec: RowSpec, batch: int) -> dict:
        c = self.costs(spec.count, spec.seq, spec.num_layers, batch)
        sel = spec.selection
        outside = spec.count.train_outside
        mixed = spec.precision == "mixed" and spec.count.scope == "full"
        wmul = 2 if mixed else 1  # fp32 copies of bf16-counted weights
        steps = [step_count(c, s, train_outside=outside, checkpointing=spec.checkpointing) for s in sel.sets]
        worst = max(range(len(steps)), key=lambda i: steps[i].saved_bytes + steps[i].recompute_bytes)
        w = 2 if spec.count.weight_dtype in ("bf16", "fp16") else 4
        loss_transient = batch * spec.seq * c.vocab * (4 + (w if w < 4 else 0)) // spec.loss_chunks
        saved = steps[worst].saved_bytes
        recompute = steps[worst].recompute_bytes
        max_active = max(len(s) for s in sel.sets)
        layer_train = c.layer_trainable_bytes * wmul
        out_train = c.outside_trainable_bytes * wmul
        grads = max_active * layer_train + out_train
        if spec.frozen_optimizer_state == "keep":
            candidates = len(sel.fixed_candidates)
        elif spec.frozen_optimizer_state == "cpu":
            # the engine's copies overlap the next forward/backward and hold a leaving layer's device moments until
            # the next optimizer step: the moments of two consecutive sets are on the device together
            candidates = max([max_active] + [len(set(a) | set(b)) for a, b in zip(sel.sets, sel.sets[1:],
                                                                                   strict=False)])
        else:
            candidates = max_active
        mf = _moment_factor(spec)
        moments_layer = 2 * c.layer_trainable_bytes * mf
        opt_device = int(candidates * moments_layer + 2 * c.outside_trainable_bytes * mf)
        opt_host = int((len(sel.fixed_candidates) - min(len(s) for s in sel.sets)) * moments_layer) \
            if spec.frozen_optimizer_state == "cpu" else 0
        weights = c.total_param_bytes * wmul if mixed else c.total_param_bytes
        trainable_w = len(sel.fixed_candidates) * layer_train + out_train
        frozen_w = weights - trainable_w
        early = saved + loss_transient + out_train  # start of backward: the loss's tensors, the head's gradient
        kept = saved - c.outside_saved if spec.checkpointing else 0  # layer inputs not yet released
        late = kept + recompute + grads  # later in backward: gradients complete, one layer rebuilt at a time
        fb = weights + opt_device + max(early, late)
        stepped = max_active * moments_layer / 2 + c.outside_trainable_bytes * mf
        step = weights + opt_device + grads + (stepped if spec.foreach else 0)
        peak = max(fb, step)
        return {"costs": c, "steps": steps, "worst": worst, "grads": int(grads), "opt_device": opt_device,
                "opt_host": opt_host, "weights": int(weights), "trainable_w": int(trainable_w),
                "frozen_w": int(frozen_w), "saved": int(saved), "transient": int(max(loss_transient, recompute)),
                "peak": int(peak), "phase": "optimizer step" if step >= fb else "forward/backward",
                "reserved": int(peak * (1 + ALLOCATOR_OVERHEAD))}

    def plan(self, spec: RowSpec, gpu: str | None = None, all_bwd_flops: int | None = None,
             mfu: float = MFU) -> RowPlan:
        m = self.memory(spec, spec.batch)
        c: LayerCosts = m["costs"]
        sel = spec.selection
        steps = m["steps"]
        fwd = statistics.median(s.fwd_flops for s in steps)
        bwd = statistics.median(s.bwd_flops for s in steps)
        # host<->device traffic of frozen_optimizer_state: cpu: moments of the layers leaving and entering the set
        moments_layer = 2 * c.layer_trainable_bytes * _moment_factor(spec)
        moves = [len(set(a) ^ set(b)) * moments_layer for a, b in zip(sel.sets, sel.sets[1:], strict=False)] or [0]
        if spec.frozen_optimizer_state != "cpu":
            moves = [0]
        fits, max_mb = {}, {}
        for card in CARDS_GIB:
            budget = (card - CUDA_CONTEXT_GIB) * GIB
            fits[f"{card}GB"] = m["reserved"] <= budget
            max_mb[f"{card}GB"] = self._max_batch(spec, budget)
        step_time = None
        if gpu:
            label, tflops, _, pcie = GPUS[gpu]
            compute_s = (fwd + bwd) / (tflops * 1e12 * mfu)
            # both directions at once (two side streams, full-duplex PCIe): half the bytes moved, each way
            offload_s = statistics.fmean(moves) / 2 / (pcie * 1e9)
            step_time = {"gpu": label, "mfu": mfu, "compute_s": compute_s, "offload_s_mean": offload_s,
                         "offload_s_max": max(moves) / (pcie * 1e9),
                         "step_s": max(compute_s, offload_s),
                         "side_stream_hides_offload": max(moves) / 2 / (pcie * 1e9) <= compute_s,
                         "model": f"modelled: FLOPs at {mfu:.0%} of {tflops:g} TFLOP/s dense bf16, offload at "
                                  f"{pcie:g} GB/s each way; the engine issues the copies on side streams after "
                                  f"the optimizer step (irtuning_plugin/offload.py), so they are hidden when "
                                  f"shorter than the next forward+backward (step = max of the two), else they "
                                  f"add the difference"}
        counts = sel.summary()
        trainable_params = len(sel.fixed_candidates) * c.layer_trainable_numel + c.outside_trainable_numel
        return RowPlan(
            label=spec.label, strategy_source=sel.source, layers=counts, trainable_params=trainable_params,
            frozen_weight_bytes=m["frozen_w"], trainable_weight_bytes=m["trainable_w"], grad_bytes=m["grads"],
            optimizer_device_bytes=m["opt_device"], optimizer_host_bytes=m["opt_host"],
            activation_bytes=m["saved"], transient_bytes=m["transient"], peak_allocated_bytes=m["peak"],
            peak_reserved_bytes=m["reserved"], peak_phase=m["phase"], fwd_flops=int(fwd), bwd_flops=int(bwd),
            bwd_flops_ratio_to_all=(bwd / all_bwd_flops) if all_bwd_flops else None,
            offload_bytes_per_step_median=int(statistics.median(moves)),
            offload_bytes_per_step_mean=int(statistics.fmean(moves)), offload_bytes_per_step_max=int(max(moves)),
            fits=fits, max_micro_batch=max_mb, step_time=step_time, notes=list(spec.notes))

    def _max_batch(self, spec: RowSpec, budget: float, limit: int = 4096) -> int:
        lo, hi = 0, 1
        while hi <= limit and self.memory(spec, hi)["reserved"] <= budget:
            lo, hi = hi, hi * 2
        hi = min(hi, limit + 1)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.memory(spec, mid)["reserved"] <= budget:
                lo = mid
            else:
                hi = mid
        return lo
