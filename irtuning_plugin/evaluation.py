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
def label_logprobs_naive(model, tokenizer, prompts: Sequence[str], labels: Sequence[str] = LABELS) -> torch.Tensor:
    """Reference: one full forward per (prompt, label) pair. Slow; for tests."""
    label_ids = [tokenizer(label_completion(lab), add_special_tokens=False)["input_ids"] for lab in labels]
    device = next(model.parameters()).device
    out = torch.empty(len(prompts), len(labels), dtype=torch.float64)
    for i, prompt in enumerate(prompts):
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for j, l_ids in enumerate(label_ids):
            ids = torch.tensor([p_ids + l_ids], device=device)
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            out[i, j] = sum(logp[len(p_ids) - 1 + t, tok].item() for t, tok in enumerate(l_ids))
    return out


@torch.no_grad()
def label_logprobs(model, tokenizer, prompts: Sequence[str], labels: Sequence[str] = LABELS,
                   batch_size: int = 16, completion=label_completion) -> torch.Tensor:
    """``[len(prompts), len(labels)]`` summed log-probabilities of each label's tokens after its prompt.

    Each prompt runs once (left-padded, explicit position ids, logits only at its last position); the
    labels then continue from the prompt's KV cache, repeated once per label. On SmolLM2 this is about
    5x cheaper than scoring every (prompt, label) sequence in full, and never builds [tokens x vocab]
    logits for the prompt. ``completion`` maps a label to its trained text (another task's labels).
    """
    device = next(model.parameters()).device
    label_ids = [tokenizer(completion(lab), add_special_tokens=False)["input_ids"] for lab in labels]
    n_lab, l_max = len(label_ids), max(len(x) for x in label_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    lab = torch.full((n_lab, l_max), pad, dtype=torch.long)
    lab_mask = torch.zeros((n_lab, l_max), dtype=torch.long)
    for j, ids in enumerate(label_ids):
        lab[j, :len(ids)] = torch.tensor(ids)
        lab_mask[j, :len(ids)] = 1
    first = torch.tensor([ids[0] for ids in label_ids])
    out = torch.empty(len(prompts), n_lab, dtype=torch.float64)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # similar lengths batch together
    was_training = model.training
    model.eval()
    for start in range(0, len(prompts), batch_size):
        rows = order[start:start + batch_size]
        chunk = [encoded[i] for i in rows]
        b, width = len(chunk), max(len(c) for c in chunk)
        ids = torch.full((b, width), pad, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for r, c in enumerate(chunk):
            ids[r, width - len(c):] = torch.tensor(c)
            mask[r, width - len(c):] = 1
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        res = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                    use_cache=True, logits_to_keep=1)
        first_logp = torch.log_softmax(res.logits[:, -1].double(), dim=-1).cpu()  # [b, V]
        scores = first_logp[:, first]  # [b, n_lab]
        if l_max > 1:
            cache = res.past_key_values
            cache.batch_repeat_interleave(n_lab)
            cont = lab[:, :-1].repeat(b, 1)  # label tokens 0..l-2 predict tokens 1..l-1
            cont_mask = lab_mask[:, 1:].repeat(b, 1)
            full_mask = torch.cat([mask.repeat_interleave(n_lab, 0), torch.ones_like(cont)], dim=1)
            cpos = pos[:, -1:].repeat_interleave(n_lab, 0) + 1 + torch.arange(l_max - 1)
            res2 = model(input_ids=cont.to(device), attention_mask=full_mask.to(device),
                         position_ids=cpos.to(device), past_key_values=cache, use_cache=True)
            logp = torch.log_softmax(res2.logits.double(), dim=-1).cpu()  # [b*n_lab, l_max-1, V]
            targets = lab[:, 1:].repeat(b, 1)
            tok = logp.gather(2, targets[..., None])[..., 0] * cont_mask
            scores = scores + tok.sum(1).view(b, n_lab)
        out[rows] = scores
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
