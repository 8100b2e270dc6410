"""A tiny PEFT-wrapped Llama and a plain transformers Trainer around it (no Axolotl)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def tiny_peft_llama(num_layers: int = 6, hidden: int = 32, vocab: int = 128, seed: int = 0, init_lora_weights=False):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    lcfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS,
                      init_lora_weights=init_lora_weights, task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


class RandomTokens(Dataset):
    def __init__(self, n=64, length=16, vocab=128, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        ids = self.data[i]
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def make_trainer(model, out_dir, max_steps=6, max_grad_norm=0.0, optimizers=(None, None), **kw):
    from transformers import Trainer, TrainingArguments

    kw = {"save_strategy": "no", **kw}
    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=1, report_to=[], use_cpu=True, max_grad_norm=max_grad_norm,
        seed=7, weight_decay=0.1, lr_scheduler_type="constant", dataloader_num_workers=0, **kw,
    )
    return Trainer(model=model, args=args, train_dataset=RandomTokens(), optimizers=optimizers)
