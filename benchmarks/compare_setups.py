"""Completion (label scoring) vs the paper's classifier head, on the built-in data, same everything else.

Both setups train on a plain transformers Trainer with our callback, the same strategy, LoRA settings,
examples (in the same order), steps, batch, learning rate and seed; only the output differs:

* completion: prompt tokens masked, the label's tokens and EOS trained as the continuation (what the
  Axolotl recipes do with ``type: input_output``); evaluated by label scoring;
* seq_cls: ``AutoModelForSequenceClassification`` + LoRA ``SEQ_CLS`` with the head as a module to save;
  evaluated by the head's argmax.

    python -P benchmarks/compare_setups.py --model irtuning://smollm2-135m-instruct --steps 40
    python -P benchmarks/compare_setups.py --model irtuning://tiny-llama --steps 4 --eval-n 20   # mechanics

Writes ``benchmarks/results/setups-<model>-<steps>steps.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

RESULTS = Path(__file__).resolve().parent / "results"


class CompletionDataset(Dataset):
    """input_output-style examples: prompt segment masked, label segment (+ EOS) trained."""

    def __init__(self, records, task, tokenizer, max_length=256):
        from irtuning_plugin.tasks.seq_classification import prompt_of

        self.items = []
        for rec in records:
            p = tokenizer(prompt_of(rec, task), add_special_tokens=False)["input_ids"]
            lab = tokenizer(task.label_completion(rec["label"]), add_special_tokens=False)["input_ids"]
            lab = lab + [tokenizer.eos_token_id]
            ids = (p + lab)[:max_length]
            labels = ([-100] * len(p) + lab)[:max_length]
            self.items.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _collate_completion(pad_id):
    def collate(batch):
        width = max(len(b["input_ids"]) for b in batch)
        out = {k: torch.full((len(batch), width), v, dtype=torch.long)
               for k, v in (("input_ids", pad_id), ("attention_mask", 0), ("labels", -100))}
        for r, b in enumerate(batch):
            n = len(b["input_ids"])
            for k in out:
                out[k][r, :n] = torch.tensor(b[k])
        return out

    return collate


def _training_args(a, out_dir):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(out_dir), max_steps=a.steps, per_device_train_batch_size=a.batch,
                             learning_rate=a.lr, lr_scheduler_type="linear", warmup_steps=a.warmup, seed=a.seed,
                             weight_decay=0.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             max_grad_norm=1.0, dataloader_num_workers=0)


def run_completion(a, model_path, records, test, task, out_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, set_seed

    from irtuning_plugin.callback import attach_layer_selection
    from irtuning_plugin.config import SelectionConfig
    from irtuning_plugin.tasks.evaluation import evaluate_records

    tok = AutoTokenizer.from_pretrained(model_path)
    set_seed(a.seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=32, lora_alpha=64, lora_dropout=0.05,
                                             target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]))
    before = evaluate_records(model, tok, test, task=task)
    trainer = Trainer(model=model, args=_training_args(a, out_dir), train_dataset=CompletionDataset(records, task, tok),
                      data_collator=_collate_completion(tok.pad_token_id if tok.pad_token_id is not None else 0))
    cb = attach_layer_selection(trainer, SelectionConfig(strategy=a.strategy, heatmap=False))
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    after = evaluate_records(model, tok, test, task=task)
    return _summary(trainer, cb, model, before, after, seconds)


def run_seq_cls(a, model_path, records, test, task, out_dir):
    from transformers import DataCollatorWithPadding, Trainer

    from irtuning_plugin.callback import attach_layer_selection
    from irtuning_plugin.config import SelectionConfig
    from irtuning_plugin.tasks.evaluation import classification_metrics
    from irtuning_plugin.tasks.seq_classification import PromptDataset, build_seq_cls_model, class_logits, prompt_of

    model, tok = build_seq_cls_model(model_path, task, seed=a.seed)

    def evaluate():
        logits = class_logits(model, tok, [prompt_of(r, task) for r in test])
        return classification_metrics([r["label"] for r in test], [task.labels[i] for i in logits.argmax(1).tolist()],
                                      task.labels)

    before = evaluate()
    trainer = Trainer(model=model, args=_training_args(a, out_dir), train_dataset=PromptDataset(records, task, tok),
                      data_collator=DataCollatorWithPadding(tok))
    cb = attach_layer_selection(trainer, SelectionConfig(strategy=a.strategy, heatmap=False))
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    return _summary(trainer, cb, model, before, evaluate(), seconds)


def _summary(trainer, cb, model, before, after, seconds):
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    counts = [r["n_active"] for r in cb.rows]
    return {
        "steps": trainer.state.global_step, "train_seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(1, trainer.state.global_step), 2),
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "loss_mean_last5": sum(losses[-5:]) / len(losses[-5:]) if losses else None,
        "layers_per_step": counts,
        "trainable_params": sum(p.numel() for n, p in model.named_parameters() if "lora_" in n or "modules_to_save" in n),
        "head_params": sum(p.numel() for n, p in model.named_parameters() if "modules_to_save" in n),
        "before": {"accuracy": before.accuracy, "macro_f1": before.macro_f1, "n": before.n},
        "after": {"accuracy": after.accuracy, "macro_f1": after.macro_f1, "n": after.n,
                  "per_class_f1": {k: v["f1"] for k, v in after.per_class.items()}, "confusion": after.confusion},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="irtuning://smollm2-135m-instruct")
    p.add_argument("--data", default=None, help="data folder (default: the built-in data set)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--strategy", default="ir")
    p.add_argument("--eval-n", type=int, default=100, help="test examples scored (the first N)")
    p.add_argument("--seed", type=int, default=171)
    p.add_argument("--setups", default="completion,seq_cls")
    p.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/setups-MODEL-Nsteps.json)")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from irtuning_plugin.tasks.assets.references import resolve_reference, revision_data_dir
    from irtuning_plugin.tasks.seq_classification import load_records

    model_path = resolve_reference(a.model)
    data = a.data or str(revision_data_dir())
    records, task = load_records(data, "train")
    records = records[: a.steps * a.batch]  # each example seen once, in file order (the Trainer shuffles by seed)
    test, _ = load_records(data, "test")
    test = test[: a.eval_n]
    out = {"model": a.model, "data": data, "task": task.name, "strategy": a.strategy, "steps": a.steps,
           "batch": a.batch, "lr": a.lr, "warmup": a.warmup, "seed": a.seed, "train_examples": len(records),
           "host": platform.node(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
           "torch_threads": torch.get_num_threads(), "setups": {}}
    runs = {"completion": run_completion, "seq_cls": run_seq_cls}
    for name in a.setups.split(","):
        with tempfile.TemporaryDirectory(prefix=f"irtuning-setups-{name}-") as tmp:
            out["setups"][name] = runs[name](a, model_path, records, test, task, tmp)
        print(name, json.dumps({k: v for k, v in out["setups"][name].items() if k != "layers_per_step"}), flush=True)
    path = Path(a.out) if a.out else RESULTS / f"setups-{a.model.split('/')[-1]}-{a.steps}steps.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print("\n| setup | loss first → last | acc before → after | macro-F1 before → after | s/step | trainable |")
    print("|---|---|---|---|---|---|")
    for name, s in out["setups"].items():
        print(f"| {name} | {s['loss_first']:.3f} → {s['loss_last']:.3f} | {s['before']['accuracy']:.3f} → "
              f"{s['after']['accuracy']:.3f} | {s['before']['macro_f1']:.3f} → {s['after']['macro_f1']:.3f} | "
              f"{s['seconds_per_step']} | {s['trainable_params']:,} |")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
