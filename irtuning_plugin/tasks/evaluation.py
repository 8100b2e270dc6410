"""Evaluation of either setup on any data folder, and the report a researcher reads.

* Completion setup (the Axolotl recipes): label scoring, each label's log-likelihood as the continuation
  of the prompt; the best one wins. Prompt and label strings are tokenized exactly as Axolotl's
  ``input_output`` format tokenizes the training segments (each segment on its own, no special tokens
  added), so evaluation sees the same token boundaries as training.
* Classifier setup (:mod:`irtuning_plugin.tasks.seq_classification`): the head's argmax.

:func:`evaluate_data` picks the setup from the trained folder (``irtuning_seq_cls.json`` marks a
classifier) and the labels and prompts from the data folder (its manifest and each record's first
segment), so it runs on the built-in data and on every converted data set. :func:`format_report` and
:func:`write_report` give the per-class table, the confusion matrix, a JSON file and a PNG.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from irtuning_plugin.tasks.revision_task import INTENTION, LABELS, RevisionTask, completion_text

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


def format_report(res: EvalResult, title: str | None = None) -> str:
    """Plain-text report: the headline figures, the per-class table and the confusion matrix."""
    labels = list(res.labels)
    width = max(len(x) for x in [*labels, "macro avg"])
    lines = [title] if title else []
    lines.append(f"n={res.n} accuracy={res.accuracy:.3f} macro_P={res.macro_precision:.3f} "
                 f"macro_R={res.macro_recall:.3f} macro_F1={res.macro_f1:.3f}")
    lines += ["", f"{'class':<{width}}  precision  recall     f1  support"]
    for lab in labels:
        c = res.per_class[lab]
        lines.append(f"{lab:<{width}}  {c['precision']:9.3f}  {c['recall']:6.3f}  {c['f1']:5.3f}  {c['support']:7d}")
    lines.append(f"{'macro avg':<{width}}  {res.macro_precision:9.3f}  {res.macro_recall:6.3f}  {res.macro_f1:5.3f}"
                 f"  {res.n:7d}")
    cell = max(4, *(len(str(v)) for row in res.confusion for v in row))
    short = [lab[:cell] for lab in labels]
    lines += ["", "confusion matrix (rows: gold, columns: predicted)",
              " " * width + "  " + " ".join(f"{s:>{cell}}" for s in short)]
    for lab, row in zip(labels, res.confusion, strict=True):
        lines.append(f"{lab:<{width}}  " + " ".join(f"{v:>{cell}}" for v in row))
    return "\n".join(lines)


def plot_confusion(res: EvalResult, path: str | Path, title: str | None = None) -> Path:
    """The confusion matrix as a PNG (counts in the cells, row-normalised colour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(res.labels)
    counts = torch.tensor(res.confusion, dtype=torch.float64)
    rates = counts / counts.sum(1, keepdim=True).clamp(min=1)
    size = 1.2 + 0.9 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(rates.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, str(int(counts[i, j])), ha="center", va="center",
                    color="white" if rates[i, j] > 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the gold class")
    ax.set_title(title or f"accuracy {res.accuracy:.3f}, macro-F1 {res.macro_f1:.3f} (n={res.n})")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(res: EvalResult, out_dir: str | Path, meta: dict | None = None, ids: Sequence[str] | None = None,
                 gold: Sequence[str] | None = None) -> dict[str, Path]:
    """``eval.json`` (metrics, per-class table, confusion matrix, run facts, per-example predictions) and
    ``confusion.png`` in ``out_dir``; returns their paths (no PNG without matplotlib, with a warning)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {**(meta or {}), **res.as_dict()}
    if ids is not None and gold is not None:
        data["predictions"] = [{"id": i, "gold": g, "predicted": p} for i, g, p in zip(ids, gold, res.predictions,
                                                                                        strict=True)]
    paths = {"json": out / "eval.json"}
    paths["json"].write_text(json.dumps(data, indent=1) + "\n")
    try:
        paths["png"] = plot_confusion(res, out / "confusion.png")
    except ImportError as err:
        LOG.warning("irtuning eval: no confusion-matrix PNG (%s); pip install matplotlib", err)
    return paths


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
    label_ids = [tokenizer(completion_text(lab), add_special_tokens=False)["input_ids"] for lab in labels]
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
                   batch_size: int = 16) -> torch.Tensor:
    """``[len(prompts), len(labels)]`` summed log-probabilities of each label's tokens after its prompt.

    Each prompt runs once (left-padded, explicit position ids, logits only at its last position); the
    labels then continue from the prompt's KV cache, repeated once per label. On SmolLM2 this is about
    5x cheaper than scoring every (prompt, label) sequence in full, and never builds [tokens x vocab]
    logits for the prompt.
    """
    device = next(model.parameters()).device
    label_ids = [tokenizer(completion_text(lab), add_special_tokens=False)["input_ids"] for lab in labels]
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


def evaluate_records(model, tokenizer, records: Sequence[dict], batch_size: int = 8,
                     task: RevisionTask = INTENTION) -> EvalResult:
    """Label scoring of ``records`` with the completion model (prompts: each record's first segment)."""
    from irtuning_plugin.tasks.seq_classification import prompt_of

    prompts = [prompt_of(r, task) for r in records]
    scores = label_logprobs(model, tokenizer, prompts, task.labels, batch_size=batch_size)
    pred = [task.labels[i] for i in scores.argmax(dim=1).tolist()]
    return classification_metrics([r["label"] for r in records], pred, task.labels)


def evaluate_data(model_path: str, adapter_path: str | None, data_dir: str | Path, split: str = "test",
                  limit: int | None = None, batch_size: int = 8) -> tuple[EvalResult, dict, list[dict]]:
    """Evaluate a trained model of either setup on one split of a data folder.

    Returns the result, the facts of the run (setup, task, model, data) and the records scored.
    """
    from irtuning_plugin.tasks import seq_classification as sc

    records, task = sc.load_records(data_dir, split)
    records = records[:limit] if limit else records
    trained = adapter_path or model_path
    meta = {"model": str(model_path), "adapter": adapter_path, "data": str(data_dir), "split": split, "task": task.name}
    if sc.is_seq_cls_output(trained):
        model, tokenizer, labels = sc.load_seq_cls_for_eval(model_path, adapter_path)
        if tuple(labels) != task.labels:
            raise ValueError(f"the classifier in {trained} was trained on labels {list(labels)}, but {data_dir} holds "
                             f"task {task.name!r} with labels {list(task.labels)}")
        logits = sc.class_logits(model, tokenizer, [sc.prompt_of(r, task) for r in records], batch_size=batch_size)
        pred = [task.labels[i] for i in logits.argmax(dim=1).tolist()]
        res = classification_metrics([r["label"] for r in records], pred, task.labels)
        meta["setup"] = "seq_cls (classification head, argmax)"
    else:
        model, tokenizer = load_model_for_eval(model_path, adapter_path)
        res = evaluate_records(model, tokenizer, records, batch_size=batch_size, task=task)
        meta["setup"] = "completion (label scoring)"
    return res, meta, records


def load_model_for_eval(model_path: str, adapter_path: str | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if adapter_path:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_path)
    model.eval()
    return model, tokenizer
