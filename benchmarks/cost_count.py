"""Exact per-step costs of a layer-selection strategy: FLOPs, bytes saved for backward, gradient and
optimizer bytes. Counted, not timed, so the figures do not depend on the machine or its load.

Per optimizer step (one micro-batch per step):

* forward and backward FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` around the forward and,
  separately, the backward pass (matmuls and attention; elementwise ops count 0, as in torch's
  counter). torch has no formula for the CPU flash-attention kernels; ``irtuning_plugin.planner.counters`` adds
  the same formula torch uses for the CUDA ones.
* bytes saved for backward: ``torch.autograd.graph.saved_tensors_hooks`` around the forward; each
  storage counts once (a view saved twice holds one storage), storages of parameters and buffers are
  left out (they exist anyway): what remains is the activation memory that backward keeps alive.
* gradient + optimizer-state bytes: the engine's ``memory_account()`` right after ``optimizer.step()``
  (before ``zero_grad``), when both are held; split into what lives on the training device and what
  ``frozen_optimizer_state: cpu`` keeps off it (``optimizer_state_bytes_offloaded``: on a CPU-only
  machine the offload moves nothing, the account still names those bytes).
* wall time of the counted step and the engine's scoring + selection time, peak RSS of the process.

It trains for real (the engine on a plain loop with AdamW), so ``ir``'s selections come from real
gradients. One run per process; ``cost_table.py`` runs the variants and writes the tables::

    python -m benchmarks.cost_count --strategy ir --steps 12 --out ir.json \
        [--scope full] [--engine-options '{"depth_floor": "salf"}'] [--options '{...}']
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

from benchmarks.harness.grid import write_cell
from benchmarks.harness.training import build_model as _build_model
from benchmarks.harness.training import meta_model, resident_bytes, tokenize_records
from irtuning_plugin.planner.counters import SavedBytes, count_forward_backward  # noqa: F401  (shared with irtuning plan)

__all__ = ["FixedBatches", "SavedBytes", "build_model", "count_sets", "meta_model", "resident_bytes", "run"]


class FixedBatches:
    """Batches of exactly ``batch x seq`` tokens: each example's last ``seq`` tokens, shorter ones padded
    (labels -100 on padding)."""

    def __init__(self, records: list[dict], batch: int, seq: int, pad_id: int):
        self.items = []
        for i in range(0, len(records) - batch + 1, batch):
            ids = torch.full((batch, seq), pad_id, dtype=torch.long)
            labels = torch.full((batch, seq), -100, dtype=torch.long)
            mask = torch.zeros((batch, seq), dtype=torch.long)
            for r, rec in enumerate(records[i:i + batch]):  # the last seq tokens: the trained label stays in
                n = min(len(rec["input_ids"]), seq)
                ids[r, :n] = torch.tensor(rec["input_ids"][-n:])
                labels[r, :n] = torch.tensor(rec["labels"][-n:])
                mask[r, :n] = 1
            self.items.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
        self.batch_size = batch
        self.dataset = None

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)


def build_model(model_dir: str, scope: str, seed: int):
    """The benchmarks' seeded model (``benchmarks.harness.training.build_model``), in training mode."""
    model = _build_model(model_dir, scope, seed)
    model.train()
    return model


def count_sets(model: torch.nn.Module, scope: str, sets: list[list[int]], batch: int, seq: int,
               frozen_outside: tuple[str, ...] = ()) -> dict[tuple, dict]:
    """Counted forward/backward of ``model`` with each set of trained layers (others frozen, no input-grad
    hook: as after the engine's backward cut). Attention runs the math kernel, the one the meta device
    has; ``frozen_outside``: names of parameters outside the layers that the run froze."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from irtuning_plugin.layer_map import build_layer_map, set_layers_trainable

    lm = build_layer_map(model, scope)
    for name, p in model.named_parameters():
        if name in frozen_outside:
            p.requires_grad_(False)
    device = next(model.parameters()).device
    ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
    out = {}
    for s in sets:
        key = tuple(sorted(s))
        if key in out:
            continue
        set_layers_trainable(lm, list(key))
        with sdpa_kernel(SDPBackend.MATH):
            c = count_forward_backward(model, {"input_ids": ids, "labels": ids})
        model.zero_grad(set_to_none=True)
        c.pop("loss")
        out[key] = c
    return out


def run(strategy: str, *, model_dir: str, data_dir: str, steps: int, scope: str = "adapter", batch: int = 4,
        seq: int = 128, count_batch: int = 4, count_seq: int = 128, lr: float = 2e-4, seed: int = 1,
        options: dict | None = None, engine_options: dict | None = None, label: str | None = None,
        replay: bool = False) -> dict:
    """Train ``steps`` real steps (batches of ``batch x seq``) recording selections, byte accounts, wall
    and engine time; then count every selected set's FLOPs and saved bytes at ``count_batch x count_seq``
    on the meta device.

    ``replay``: for strategies whose choice never reads a gradient (all, lisa, random, salf): no forward
    or backward, every trainable parameter gets a zero gradient instead, so the engine, the selections and
    AdamW's state (allocated on a parameter's first step) are those of a real run, byte for byte; wall
    times of such a run are not step times."""
    from transformers import AutoTokenizer

    from irtuning_plugin.config import SelectionConfig
    from irtuning_plugin.engine import LayerSelectionEngine

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = [json.loads(x) for x in open(Path(data_dir) / "train.jsonl") if x.strip()][: batch * (steps + 16)]
    loader = FixedBatches(tokenize_records(tokenizer, records, 10_000), batch, seq, tokenizer.pad_token_id)
    model = build_model(model_dir, scope, seed)
    config = SelectionConfig(strategy=strategy, scope=scope, strategy_options=dict(options or {}),
                             selection_log=False, heatmap=False, **(engine_options or {}))
    engine = LayerSelectionEngine(model, config, seed=seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0, foreach=False)
    t_begin = time.perf_counter()
    engine.begin(optimizer, loader)
    begin_s = time.perf_counter() - t_begin
    frozen_outside = tuple(n for n, p in model.named_parameters()
                           if n in set(engine.layer_map.outside_trainable) and not p.requires_grad)
    rows = []
    it = iter(loader)
    for step in range(steps):
        batch_t = next(it)
        active = list(engine.active)
        t0 = time.perf_counter()
        if replay:
            loss = torch.zeros(())
            for p in trainable:
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
        else:
            loss = model(**batch_t).loss
            loss.backward()
        t1 = time.perf_counter()
        engine.collect_scores()
        torch.nn.utils.clip_grad_norm_([p for p in trainable if p.grad is not None], 1.0)
        optimizer.step()
        account = engine.memory_account()
        optimizer.zero_grad(set_to_none=True)
        row_engine = engine.end_step(step + 1, loader)
        wall = time.perf_counter() - t0
        rows.append({"step": step + 1, "active": active, "lowest_active": min(active), "loss": loss.item(),
                     **resident_bytes(account), "account": account, "wall_s": wall, "fwd_bwd_s": t1 - t0,
                     "score_ms": row_engine["score_ms"], "select_ms": row_engine["select_ms"],
                     **{k: v for k, v in row_engine.items() if k in ("salf_cut", "depth_floor", "ist_update")}})
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    num_layers = engine.num_layers
    del engine, optimizer, model, trainable
    counted = count_sets(meta_model(model_dir, scope), scope, [r["active"] for r in rows], count_batch, count_seq,
                         frozen_outside)
    for r in rows:
        r.update(counted[tuple(r["active"])])
    return {"label": label or strategy, "strategy": strategy, "scope": scope, "model": Path(model_dir).name,
            "options": options or {},
            "engine_options": engine_options or {}, "steps": steps, "batch": batch, "seq": seq, "replay": replay,
            "count_batch": count_batch, "count_seq": count_seq, "num_layers": num_layers, "begin_s": begin_s,
            "rows": rows, "peak_rss_bytes": peak_rss, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "load_avg": os.getloadavg()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--strategy", required=True)
    p.add_argument("--scope", default="adapter", choices=("adapter", "full"))
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--count-batch", type=int, default=4)
    p.add_argument("--count-seq", type=int, default=128)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--model", default="irtuning://smollm2-135m-instruct")
    p.add_argument("--options", default="{}", help="strategy options as JSON")
    p.add_argument("--engine-options", default="{}", help="engine options (SelectionConfig fields) as JSON")
    p.add_argument("--label", default=None)
    p.add_argument("--replay", action="store_true", help="zero gradients instead of forward/backward (for "
                   "strategies that never read a gradient)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    from irtuning_plugin.tasks.assets.references import resolve_reference, revision_data_dir

    result = run(a.strategy, model_dir=resolve_reference(a.model), data_dir=str(revision_data_dir()), steps=a.steps,
                 scope=a.scope, batch=a.batch, seq=a.seq, count_batch=a.count_batch, count_seq=a.count_seq,
                 seed=a.seed, options=json.loads(a.options),
                 engine_options=json.loads(a.engine_options), label=a.label, replay=a.replay)
    write_cell(Path(a.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
