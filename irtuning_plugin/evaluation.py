"""Label scoring: each label's log-likelihood as the continuation of the prompt; the best one wins.

The prompt and label strings come from :mod:`irtuning_plugin.revision_task`, tokenized exactly as
Axolotl's ``input_output`` format tokenizes the training segments (each segment on its own, no
special tokens added), so evaluation sees the same token boundaries as training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch

from irtuning_plugin.revision_task import LABELS, format_prompt, label_completion

LOG = logging.getLogger(__name__)


@dataclass
class EvalResult:
    n: int
    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)
    confusion: list[list[int]] = field(default_factory=list)  # rows: gold, columns: predicted
    labels: tuple[str, ...] = LABELS
    predictions: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("n", "accuracy", "macro_precision", "macro_recall", "macro_f1",
                                               "per_class", "confusion", "labels")}


def classification_metrics(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str] = LABELS) -> EvalResult:
    index = {lab: i for i, lab in enumerate(labels)}
    conf = [[0] * len(labels) for _ in labels]
    for g, p in zip(gold, pred):
        conf[index[g]][index[p]] += 1
    per_class = {}
    for i, lab in enumerate(labels):
        tp = conf[i][i]
        fp = sum(conf[r][i] for r in range(len(labels))) - tp
        fn = sum(conf[i]) - tp
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        per_class[lab] = {"precision": prec, "recall": rec, "f1": f1, "support": sum(conf[i])}
    k = len(labels)
    n = len(gold)
    return EvalResult(
        n=n,
        accuracy=sum(conf[i][i] for i in range(k)) / n if n else 0.0,
        macro_precision=sum(c["precision"] for c in per_class.values()) / k,
        macro_recall=sum(c["recall"] for c in per_class.values()) / k,
        macro_f1=sum(c["f1"] for c in per_class.values()) / k,
        per_class=per_class,
        confusion=conf,
        labels=tuple(labels),
        predictions=list(pred),
    )


@torch.no_grad()
def label_logprobs(model, tokenizer, prompts: Sequence[str], labels: Sequence[str] = LABELS,
                   batch_size: int = 8) -> torch.Tensor:
    """``[len(prompts), len(labels)]`` summed log-probabilities of each label's tokens after its prompt."""
    device = next(model.parameters()).device
    label_ids = [tokenizer(label_completion(lab), add_special_tokens=False)["input_ids"] for lab in labels]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = torch.empty(len(prompts), len(labels), dtype=torch.float64)
    was_training = model.training
    model.eval()
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        seqs, spans = [], []
        for prompt in chunk:
            p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            for l_ids in label_ids:
                seqs.append(p_ids + l_ids)
                spans.append((len(p_ids), len(l_ids)))
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        scores = []
        for r, (p_len, l_len) in enumerate(spans):
            targets = ids[r, p_len:p_len + l_len].to(device)
            steps = logp[r, p_len - 1:p_len - 1 + l_len]
            scores.append(steps.gather(1, targets[:, None]).sum().item())
        out[start:start + len(chunk)] = torch.tensor(scores, dtype=torch.float64).view(len(chunk), len(labels))
    if was_training:
        model.train()
    return out


def evaluate_records(model, tokenizer, records: Sequence[dict], batch_size: int = 8) -> EvalResult:
    prompts = [format_prompt(r["original"], r["revised"]) for r in records]
    scores = label_logprobs(model, tokenizer, prompts, LABELS, batch_size=batch_size)
    pred = [LABELS[i] for i in scores.argmax(dim=1).tolist()]
    return classification_metrics([r["label"] for r in records], pred)


def load_model_for_eval(model_path: str, adapter_path: str | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if adapter_path:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_path)
    model.eval()
    return model, tokenizer
