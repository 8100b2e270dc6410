"""Layer selection on an FSDP2-sharded model with a plain transformers Trainer, under ``accelerate launch``.

    accelerate launch --config_file yaml_recipes/fsdp2/accelerate_fsdp2_cpu.yaml \\
        yaml_recipes/fsdp2/train_fsdp2.py --model PATH --data train.jsonl --output_dir out \\
        --irtuning irtuning_strategy=ir --irtuning irtuning_frozen_optimizer_state=drop

``--data``: a JSON-lines file with a ``text`` field per line (causal-LM loss on every token). ``--lora R``
trains LoRA adapters of rank R on the attention and MLP projections (irtuning_scope: adapter); ``--lora 0``
fine-tunes whole layers (give ``--irtuning irtuning_scope=full``). Each ``--irtuning KEY=VALUE`` is an
``irtuning_*`` key of the key table in docs/keys.md (VALUE read as YAML: 2, true, [3, 5]). accelerate's config
chooses FSDP2 (``fsdp_version: 2``); the Trainer builds the optimizer over every parameter before any is
frozen, as irtuning needs.
"""

from __future__ import annotations

import argparse
import json

import torch
import yaml


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory or hub name (a causal LM)")
    p.add_argument("--data", required=True, help="JSON lines with a 'text' field")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--lora", type=int, default=8, help="LoRA rank; 0 = full fine-tuning")
    p.add_argument("--max_steps", type=int, default=100)
    p.add_argument("--batch_size", type=int, default=2, help="per process")
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--learning_rate", type=float, default=2e-4)
    p.add_argument("--save_steps", type=int, default=0, help="0 = no checkpoints")
    p.add_argument("--resume", default=None, help="checkpoint folder to resume from")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--irtuning", action="append", default=[], metavar="KEY=VALUE", help="an irtuning_* key")
    return p.parse_args(argv)


def irtuning_keys(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.startswith("irtuning_"):
            raise SystemExit(f"--irtuning {pair!r}: write irtuning_KEY=VALUE")
        out[key] = yaml.safe_load(value)
    return out


class TextLines(torch.utils.data.Dataset):
    def __init__(self, path: str, tokenizer, max_length: int):
        with open(path, encoding="utf-8") as fh:
            texts = [json.loads(line)["text"] for line in fh if line.strip()]
        if not texts:
            raise SystemExit(f"--data {path}: no lines")
        self.rows = [tokenizer(t, truncation=True, max_length=max_length, padding="max_length",
                               return_tensors="pt") for t in texts]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        ids, mask = self.rows[i]["input_ids"][0], self.rows[i]["attention_mask"][0]
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def build_trainer(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from irtuning_plugin import attach_layer_selection
    from irtuning_plugin.config import config_from_flat

    config = config_from_flat(irtuning_keys(args.irtuning))  # bad keys fail here, before loading anything
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    if args.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=args.lora, lora_alpha=2 * args.lora, lora_dropout=0.0, task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]))
    targs = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, lr_scheduler_type="constant", logging_steps=1, report_to=[],
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        seed=args.seed, dataloader_num_workers=0, max_grad_norm=1.0,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=TextLines(args.data, tokenizer, args.max_length))
    attach_layer_selection(trainer, config)
    return trainer


def main(argv=None):
    args = parse_args(argv)
    trainer = build_trainer(args)
    trainer.train(resume_from_checkpoint=args.resume)


if __name__ == "__main__":
    main()
