"""The paper's classifier setup: a last-token classification head over the prompt, with LoRA.

The IR-Tuning reference trains ``AutoModelForSequenceClassification`` (a linear ``score`` head on the
hidden state of the last non-padding token) on the instruction prompt. This module offers the same on
a plain transformers ``Trainer`` with our callback, beside the completion setup of the Axolotl recipes
(the label trained as the prompt's continuation, scored at evaluation):

    from irtuning_plugin.tasks.seq_classification import SeqClsSettings, train_seq_cls
    train_seq_cls("meta-llama/Llama-3.1-8B-Instruct", "data/iterater", "outputs/seqcls-ir",
                  selection=SelectionConfig(strategy="ir"), settings=SeqClsSettings())

LoRA uses peft's ``task_type=SEQ_CLS`` with the head as a module to save, so the head trains in full
and is saved with the adapter. The head lives outside the decoder layers: the layer map reports it as
"trainable outside the layers" and no strategy ever freezes it (LISA's ``train_outside: false`` would;
it is refused here). ``full_finetune=True`` trains every parameter instead (``irtuning_scope: full``).

Deliberate differences from the reference: its ``LoraConfig`` says ``task_type="CAUSAL_LM"`` on the
classification model, so with the public peft its fresh head would stay frozen; ours trains. Prompts are
our task's prompt (``revision_task``), the same strings the completion setup trains on, so the two
setups compare on equal inputs. Padding is on the right (the reference pads left to max_length):
with causal attention no real token sees a pad, positions stay exact, and a prediction does not depend
on the batch it is in; the head reads the last non-pad token either way.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from irtuning_plugin.tasks.revision_task import RevisionTask, task_of_manifest

LOG = logging.getLogger(__name__)

SETUP_FILE = "irtuning_seq_cls.json"
HEAD_NAMES = ("score", "classifier")
TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


@dataclass
class SeqClsSettings:
    """The reference's settings (ZhexiongLiu/IR-Tuning's classifier set-up) as defaults."""

    lora_r: int = 32
    lora_alpha: int = 64
    lora_dropout: float = 0.05
    target_modules: Sequence[str] = field(default_factory=lambda: list(TARGETS))
    max_length: int = 256
    full_finetune: bool = False


def load_records(data_dir: str | Path, split: str) -> tuple[list[dict], RevisionTask]:
    """The records of one split of a data folder (built-in or converted) and the task its manifest names."""
    root = Path(data_dir).expanduser()
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    path = root / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (a data folder holds train/val/test.jsonl and manifest.json)")
    with open(path, encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    return records, task_of_manifest(manifest)


def prompt_of(record: dict, task: RevisionTask) -> str:
    """The exact prompt the record was written with (its first segment), else the task's prompt."""
    segments = record.get("segments")
    if segments:
        return segments[0]["text"]
    return task.format_prompt(record["original"], record["revised"])


def head_name(model: torch.nn.Module) -> str:
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), torch.nn.Module):
            return name
    raise ValueError(f"{type(model).__name__} has no classification head named {' or '.join(HEAD_NAMES)}")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def build_seq_cls_model(model_path: str, task: RevisionTask, settings: SeqClsSettings | None = None, *,
                        dtype: torch.dtype = torch.float32, seed: int = 171):
    """``(model, tokenizer)``: the classifier over ``model_path`` with LoRA (or all parameters trainable)."""
    from transformers import AutoModelForSequenceClassification, set_seed

    settings = settings or SeqClsSettings()
    tokenizer = load_tokenizer(model_path)
    set_seed(seed)  # the head and the LoRA matrices start from the same weights for every strategy
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=len(task.labels), id2label=dict(enumerate(task.labels)),
        label2id={lab: i for i, lab in enumerate(task.labels)}, dtype=dtype)
    model.config.pad_token_id = tokenizer.pad_token_id
    if settings.full_finetune:
        return model, tokenizer
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(task_type="SEQ_CLS", r=settings.lora_r, lora_alpha=settings.lora_alpha,
                      lora_dropout=settings.lora_dropout, target_modules=list(settings.target_modules),
                      modules_to_save=[head_name(model)], bias="none")
    return get_peft_model(model, lcfg), tokenizer


class PromptDataset(Dataset):
    """Tokenized prompts with their class index (no special tokens added, as the completion setup)."""

    def __init__(self, records: Sequence[dict], task: RevisionTask, tokenizer, max_length: int = 256):
        index = {lab: i for i, lab in enumerate(task.labels)}
        self.items = []
        for rec in records:
            if rec["label"] not in index:
                raise ValueError(f"record {rec.get('id')!r}: label {rec['label']!r} is not one of {task.name}'s "
                                 f"labels ({', '.join(task.labels)})")
            ids = tokenizer(prompt_of(rec, task), add_special_tokens=False, truncation=True,
                            max_length=max_length)["input_ids"]
            self.items.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": index[rec["label"]]})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def _check_selection(selection) -> None:
    if selection is None:
        return
    # Read from the options, not the strategy's name: any strategy that can freeze what lies outside the
    # layers (today lisa's train_outside) would freeze the new head too.
    if selection.strategy_options.get("train_outside") is False:
        raise ValueError(f"irtuning_{selection.strategy}_train_outside=false would freeze the classification head, "
                         f"which starts untrained: keep it true in the sequence-classification setup")


def train_seq_cls(model_path: str, data_dir: str | Path, output_dir: str | Path, *, selection=None,
                  settings: SeqClsSettings | None = None, training: dict[str, Any] | None = None,
                  dtype: torch.dtype = torch.float32) -> dict:
    """Train the classifier on ``data_dir/train.jsonl`` with a plain ``Trainer`` and (unless ``selection`` is
    None) our layer-selection callback; save it into ``output_dir``; return the run's figures.

    ``training`` overrides ``TrainingArguments`` (defaults: the paper's lr 2e-4 linear, 100 warm-up steps,
    4 epochs, batch 16, seed 171).
    """
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from irtuning_plugin.callback import attach_layer_selection

    settings = settings or SeqClsSettings()
    _check_selection(selection)
    if selection is not None:
        want = "full" if settings.full_finetune else "adapter"
        if selection.scope != want:
            raise ValueError(f"irtuning_scope={selection.scope!r} but the model is set up for "
                             f"{'full fine-tuning' if settings.full_finetune else 'LoRA'}: use irtuning_scope: {want}")
    records, task = load_records(data_dir, "train")
    args = {"output_dir": str(output_dir), "learning_rate": 2e-4, "lr_scheduler_type": "linear", "warmup_steps": 100,
            "num_train_epochs": 4, "per_device_train_batch_size": 16, "seed": 171, "weight_decay": 0.0,
            "logging_steps": 10, "save_strategy": "no", "report_to": [], "max_grad_norm": 1.0,
            "dataloader_num_workers": 0, **(training or {})}
    model, tokenizer = build_seq_cls_model(model_path, task, settings, dtype=dtype, seed=int(args["seed"]))
    dataset = PromptDataset(records, task, tokenizer, settings.max_length)
    trainer = Trainer(model=model, args=TrainingArguments(**args), train_dataset=dataset,
                      data_collator=DataCollatorWithPadding(tokenizer))
    callback = attach_layer_selection(trainer, selection) if selection is not None else None
    result = trainer.train()
    out = Path(output_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    setup = {"setup": "seq_cls", "task": task.name, "labels": list(task.labels), "base_model": str(model_path),
             "settings": asdict(settings) | {"target_modules": list(settings.target_modules)},
             "strategy": selection.strategy if selection is not None else None}
    (out / SETUP_FILE).write_text(json.dumps(setup, indent=1))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"train_loss": result.training_loss, "losses": losses, "steps": trainer.state.global_step,
            "selection_rows": callback.rows if callback is not None else [], "output_dir": str(out)}


def is_seq_cls_output(path: str | Path | None) -> bool:
    return path is not None and (Path(path) / SETUP_FILE).is_file()


def load_seq_cls_for_eval(model_path: str, adapter_path: str | None = None, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer, labels)`` of a trained classifier: ``model_path`` a full fine-tuning output, or the
    base model with ``adapter_path`` a LoRA output (adapter and head)."""
    from transformers import AutoModelForSequenceClassification

    trained = Path(adapter_path or model_path)
    setup = json.loads((trained / SETUP_FILE).read_text())
    labels = tuple(setup["labels"])
    tokenizer = load_tokenizer(str(trained))
    if adapter_path:
        from peft import PeftModel

        base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=len(labels), dtype=dtype)
        base.config.pad_token_id = tokenizer.pad_token_id
        model = PeftModel.from_pretrained(base, adapter_path)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(model_path, dtype=dtype)
    model.eval()
    return model, tokenizer, labels


@torch.no_grad()
def class_logits(model, tokenizer, prompts: Sequence[str], batch_size: int = 16, max_length: int = 256) -> torch.Tensor:
    """``[len(prompts), num_labels]`` fp64 logits of the head (right-padded batches)."""
    device = next(model.parameters()).device
    out = []
    was_training = model.training
    model.eval()
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(list(prompts[start:start + batch_size]), add_special_tokens=False, truncation=True,
                        max_length=max_length, padding=True, return_tensors="pt")
        out.append(model(**{k: v.to(device) for k, v in enc.items()}).logits.double().cpu())
    if was_training:
        model.train()
    return torch.cat(out) if out else torch.empty(0, 0, dtype=torch.float64)
