"""The counted training loop of the benchmark studies, and the recipe pieces they share.

``train_counted`` trains a model with the engine attached on a plain transformers ``Trainer`` (as a user
of the callback would) and records, per optimizer step: the wall time (from the step's start to its end,
before any evaluation a study runs at that step), the engine's ``memory_account()`` (before or after
``optimizer.step()``, as the study asks) and, with ``count_flops``, the FLOPs of every forward+backward
(``torch.utils.flop_counter.FlopCounterMode``: matmuls and attention, the optimizer not included).
FLOP counting costs time, so a study that reports step times leaves it off.

The cost study (``benchmarks.cost_count``) counts per selected set instead, on the meta device, with
``count_sets``' forward/backward counter (FLOPs and bytes saved for backward) around its own loop.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field

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


def build_model(model_dir: str, scope: str, seed: int):
    """The model every study trains, seeded: fp32 weights; with ``scope: adapter`` the LoRA adapter on
    ``TARGETS``, initialised from the seed alone, and ``enable_input_require_grads()`` (what Axolotl
    does for every adapter run: the engine's backward cut must undo it). ``full``: the base model."""
    from transformers import AutoModelForCausalLM, set_seed

    set_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if scope == "adapter":
        from peft import LoraConfig, get_peft_model

        set_seed(seed)  # the adapter's initialisation depends only on the seed
        model = get_peft_model(model, LoraConfig(target_modules=TARGETS, task_type="CAUSAL_LM", **LORA))
        model.enable_input_require_grads()
    return model


def meta_model(model_dir: str, scope: str):
    """The same architecture on the meta device (shapes only: counting is exact and costs no compute)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if scope == "adapter":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(target_modules=TARGETS, task_type="CAUSAL_LM", **LORA))
    model.train()
    return model


def account_totals(account: dict[str, int]) -> dict[str, int]:
    """The engine's memory account with accelerator and host bytes added up."""
    kinds = ("trainable_param_bytes", "grad_bytes", "optimizer_state_bytes")
    return {k: account[f"{k}_accelerator"] + account[f"{k}_host"] for k in kinds}


def resident_bytes(account: dict) -> dict:
    """Gradient and optimizer bytes on the training device vs kept off it by the `cpu` offload."""
    grads = account["grad_bytes_accelerator"] + account["grad_bytes_host"]
    state = account["optimizer_state_bytes_accelerator"] + account["optimizer_state_bytes_host"]
    off = account.get("optimizer_state_bytes_offloaded", 0)
    return {"grad_bytes": grads, "optimizer_state_bytes": state, "offloaded_bytes": off,
            "device_resident_bytes": grads + state - off}


@dataclass
class Counted:
    """What ``train_counted`` recorded; ``flops`` and ``train_s`` grow while training runs (a study's
    callback reads them at its evaluation points)."""

    trainer: object = None
    selection: object = None  # the engine's callback (``.engine``, ``.rows``)
    flops: int = 0
    train_s: float = 0.0
    step_s: list[float] = field(default_factory=list)
    accounts: list[dict] = field(default_factory=list)


ACCOUNT_AT = ("pre_optimizer", "optimizer")


def train_counted(model, train, collator, config, *, seed: int, steps: int, micro_batch: int, lr: float,
                  warmup: int, count_flops: bool, account_at: str, callbacks=(), output_dir: str | None = None,
                  prefix: str = "bench-") -> Counted:
    """Train ``steps`` optimizer steps of ``model`` on ``train`` with the engine of ``config`` attached
    (AdamW, linear schedule after ``warmup`` steps, gradient clipping at 1.0, the Trainer's seeded data
    order); ``account_at``: take the engine's memory account at ``pre_optimizer`` (gradients held, the
    step's Adam state not yet allocated) or at ``optimizer`` (after ``optimizer.step()``, before
    ``zero_grad``: both held). ``callbacks``: a study's own (called after the counter's, e.g. to
    evaluate), each given the ``Counted`` being filled as ``counted``."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from irtuning_plugin.callback import attach_layer_selection

    if account_at not in ACCOUNT_AT:
        raise ValueError(f"account_at: {account_at!r}; allowed: {', '.join(ACCOUNT_AT)}")
    counted = Counted()

    class CountingTrainer(Trainer):
        def training_step(self, *args, **kwargs):
            with FlopCounterMode(display=False) as fc:
                loss = super().training_step(*args, **kwargs)
            counted.flops += fc.get_total_flops()
            return loss

    args = TrainingArguments(
        output_dir=output_dir or tempfile.mkdtemp(prefix=prefix), max_steps=steps,
        per_device_train_batch_size=micro_batch, learning_rate=lr, lr_scheduler_type="linear",
        warmup_steps=warmup, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, seed=seed, data_seed=seed, dataloader_num_workers=0,
        remove_unused_columns=False, disable_tqdm=True,
    )
    trainer = (CountingTrainer if count_flops else Trainer)(model=model, args=args, train_dataset=train,
                                                            data_collator=collator)
    counted.trainer = trainer
    counted.selection = attach_layer_selection(trainer, config)

    class Counter(TrainerCallback):
        def on_step_begin(self, a, s, c, **kw):
            self.t0 = time.perf_counter()

        def on_pre_optimizer_step(self, a, s, c, **kw):
            if account_at == "pre_optimizer":
                counted.accounts.append(counted.selection.engine.memory_account())

        def on_optimizer_step(self, a, s, c, **kw):
            if account_at == "optimizer":
                counted.accounts.append(counted.selection.engine.memory_account())

        def on_step_end(self, a, s, c, **kw):
            counted.step_s.append(time.perf_counter() - self.t0)
            counted.train_s += counted.step_s[-1]

    trainer.add_callback(Counter())
    for cb in callbacks:
        cb.counted = counted
        trainer.add_callback(cb)
    trainer.train()
    return counted
