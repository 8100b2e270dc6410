"""One training run of one strategy on equal terms, measured: the unit of the strategy comparison.

Every run: the same model, the same LoRA initialisation (seeded before the adapter is created), the
same data order (Trainer seed), the same batch and steps; the engine on a plain transformers Trainer
with ``enable_input_require_grads()`` called first, as Axolotl does for every adapter run. Measured:
per-step wall time, the engine's scoring/selection time, trained layers and backward depth per step,
an exact byte account of trainable parameters / gradients / optimizer state per step, peak RSS, loss,
and label-scoring accuracy / macro-F1 on the held-out split.

Run one in a fresh process (peak RSS is per process)::

    PYTHONSAFEPATH=1 python benchmarks/strategy_bench.py --strategy ir --seed 1 --steps 30 --out run.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
# The paper's adapter (r=32, alpha 64, dropout 0.05 on q,k,v,up,down).
LORA = dict(r=32, lora_alpha=64, lora_dropout=0.05)


def tokenize_records(tokenizer, records, seq_len: int) -> list[dict]:
    """Axolotl ``input_output`` tokenization: each segment alone, no special tokens, prompt masked."""
    out = []
    for rec in records:
        ids, labels = [], []
        for seg in rec["segments"]:
            t = tokenizer(seg["text"], add_special_tokens=False)["input_ids"]
            ids += t
            labels += t if seg["label"] else [-100] * len(t)
        if len(ids) <= seq_len:
            out.append({"input_ids": ids, "labels": labels})
    return out


class PadCollator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch):
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[r, :n] = torch.tensor(b["input_ids"])
            labels[r, :n] = torch.tensor(b["labels"])
            mask[r, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def totals(account: dict[str, int]) -> dict[str, int]:
    """The engine's memory account with accelerator and host bytes added up."""
    kinds = ("trainable_param_bytes", "grad_bytes", "optimizer_state_bytes")
    return {k: account[f"{k}_accelerator"] + account[f"{k}_host"] for k in kinds}


def _percentile(xs, q):
    xs = sorted(xs)
    if not xs:
        return None
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def run_strategy(strategy: str, *, seed: int, steps: int, model_dir: str, data_dir: str, micro_batch: int = 4,
                 lr: float = 5e-4, seq_len: int = 256, eval_n: int = 100, options: dict | None = None,
                 n_train: int = 1024, warmup_skip: int = 2, output_dir: str | None = None,
                 engine_options: dict | None = None, label: str | None = None) -> dict:
    import tempfile

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments, set_seed

    from irtuning_plugin.callback import attach_layer_selection
    from irtuning_plugin.config import SelectionConfig
    from irtuning_plugin.evaluation import evaluate_records

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    load = lambda split: [json.loads(x) for x in open(Path(data_dir) / f"{split}.jsonl") if x.strip()]  # noqa: E731
    train = tokenize_records(tokenizer, load("train")[:n_train], seq_len)
    test = load("test")[:eval_n]

    set_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    set_seed(seed)  # the adapter's initialisation depends only on the seed
    model = get_peft_model(base, LoraConfig(target_modules=TARGETS, task_type="CAUSAL_LM", **LORA))
    model.enable_input_require_grads()  # what Axolotl 0.19 does for every adapter run
    out = output_dir or tempfile.mkdtemp(prefix=f"bench-{strategy}-")
    args = TrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=micro_batch, learning_rate=lr,
        lr_scheduler_type="linear", warmup_steps=min(5, steps // 5), weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=seed, data_seed=seed,
        dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=PadCollator(tokenizer.pad_token_id))
    cb = attach_layer_selection(trainer, SelectionConfig(strategy=strategy, strategy_options=dict(options or {}),
                                                         **(engine_options or {})))

    times: list[float] = []
    mem: list[dict] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, s, c, **kw):
            self.t0 = time.perf_counter()

        def on_pre_optimizer_step(self, a, s, c, **kw):
            mem.append(totals(cb.engine.memory_account()))

        def on_step_end(self, a, s, c, **kw):
            times.append(time.perf_counter() - self.t0)

    trainer.add_callback(Timer())
    t_train = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - t_train
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rows = cb.rows
    steady = times[warmup_skip:] or times
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    res = evaluate_records(model, tokenizer, test)
    return {
        "strategy": label or strategy, "seed": seed, "engine_options": engine_options or {}, "steps": steps,
        "micro_batch": micro_batch, "options": options or {},
        "num_layers": cb.engine.num_layers,
        "step_s_median": statistics.median(steady), "step_s_p20": _percentile(steady, 0.2),
        "step_s_p80": _percentile(steady, 0.8), "step_times": times, "train_seconds": train_seconds,
        "score_select_ms_median": statistics.median(r["score_ms"] + r["select_ms"] for r in rows[warmup_skip:] or rows),
        "layers_per_step": [r["n_active"] for r in rows],
        "lowest_active": [r["lowest_active"] for r in rows],
        "memory_per_step": mem, "peak_rss_bytes": peak_rss,
        "losses": losses, "loss_last5": statistics.mean(losses[-5:]) if losses else None,
        "accuracy": res.accuracy, "macro_f1": res.macro_f1, "eval_n": res.n,
        "torch": torch.__version__, "device": "cpu", "threads": torch.get_num_threads(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--strategy", required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--model", default="irtuning://smollm2-135m-instruct")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--eval-n", type=int, default=100)
    p.add_argument("--options", default="{}", help="strategy options as JSON")
    p.add_argument("--engine-options", default="{}", help="engine options (SelectionConfig fields) as JSON")
    p.add_argument("--label", default=None, help="name of this variant in the tables")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    from irtuning_plugin.assets.references import resolve_reference, revision_data_dir

    result = run_strategy(a.strategy, seed=a.seed, steps=a.steps, model_dir=resolve_reference(a.model),
                          data_dir=str(revision_data_dir()), micro_batch=a.micro_batch, eval_n=a.eval_n,
                          options=json.loads(a.options), engine_options=json.loads(a.engine_options),
                          label=a.label)
    Path(a.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
