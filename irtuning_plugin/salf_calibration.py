"""SALF-style calibration: a deviation per latent space, a gain per layer, and the freezing cut.

Pure numerics, usable without a Trainer:

    curve = deviation_curve(model, layers, batches, metric="logit_lens")   # L+1 values
    gains, fit = layer_gains(curve, "power_law")                             # L values
    cut = choose_cut(gains, min_trainable=1, max_trainable=None)            # layers 0..cut freeze

Latent space ``k`` is the input of layer ``k`` (``k = 0``: the embedding output) and, for ``k = L``, the
output of the last layer; layer ``l`` maps latent space ``l`` to ``l + 1``. Hidden states are taken with
hooks on the decoder blocks the engine selects, so they are the blocks' own outputs (HF's
``output_hidden_states`` puts the final-normed state in the last slot instead) and the forward stops
after the last block: neither the final norm nor the LM head runs on the full sequence.

Every latent space is read through the model's final norm (the LM head, and so its pseudoinverse, acts
on the normed space) at the positions that are trained (``labels[:, t + 1] != -100`` predicts token
``t + 1`` from position ``t``); the deviation is the mean cross-entropy of those targets under

* ``logit_lens``: the model's own head, ``logits = norm(h) · Wᵀ (+ b)``; the last point is the model's loss;
* ``vocab_semantics``: cosine with per-token semantic bases ``s_v = e_v · (Wᵀ)⁺`` (rows of
  ``W (WᵀW)⁺``), ``logits = cos(norm(h), s_v) / τ`` with ``τ = 1/sqrt(d)`` by default, so that logits of
  unrelated directions have unit variance whatever the hidden size ``d``.

Logits are fp32 and built for at most ``LOGIT_ELEMENTS / V`` token rows at a time.

A sequence-classification model (class-index labels, one per example; a ``score``/``classifier`` head
instead of an LM head) is read the same way through its own head: ``logit_lens`` puts the hidden state of
each example's last non-padding token through the final norm and the classification head, and the
deviation is the cross-entropy of the gold class (the last point is the model's loss).
``vocab_semantics`` needs a vocabulary and is refused there.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LOG = logging.getLogger(__name__)

METRICS = ("logit_lens", "vocab_semantics")
ESTIMATORS = ("power_law", "raw")
EMBEDDING_SPACE = ("auto", "include", "exclude")
IGNORE_INDEX = -100
LOGIT_ELEMENTS = 1 << 25  # fp32 logits of one chunk: 128 MiB (≈680 rows at a 49k vocabulary)
_FINAL_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "final_norm", "norm_f")


class CalibrationError(RuntimeError):
    """The calibration pass cannot give a usable deviation curve."""


class _StopForward(Exception):
    """Raised after the last decoder block: the rest of the forward is not needed."""


# ---- the model's pieces ------------------------------------------------------------------------
def _base_model(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)  # PEFT
    return get_base() if callable(get_base) else model


def find_final_norm(model: nn.Module) -> nn.Module:
    """The norm between the last decoder block and the LM head (identity, with a warning, if none)."""
    base = _base_model(model)
    owners = []
    get_decoder = getattr(base, "get_decoder", None)
    if callable(get_decoder):
        try:
            owners.append(get_decoder())
        except Exception:  # noqa: BLE001 - some models have no separate decoder
            pass
    prefix = getattr(base, "base_model_prefix", "")
    owners += [getattr(base, prefix, None) if prefix else None, base]
    for owner in owners:
        if owner is None:
            continue
        for name in _FINAL_NORM_NAMES:
            module = getattr(owner, name, None)
            if isinstance(module, nn.Module) and not isinstance(module, (nn.ModuleList, nn.Sequential)):
                return module
    LOG.warning("irtuning salf: no final norm found on %s; latent spaces are read without one",
                type(base).__name__)
    return nn.Identity()


def head_is_tied(model: nn.Module) -> bool:
    """True when the LM head reuses the input embedding matrix (``tie_word_embeddings``)."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    hw, ew = getattr(head, "weight", None), getattr(emb, "weight", None)
    return hw is not None and ew is not None and (hw is ew or (hw.shape == ew.shape and hw.data_ptr() == ew.data_ptr()))


def _lm_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise CalibrationError(f"{type(_base_model(model)).__name__} has no LM head (get_output_embeddings)")
    bias = getattr(head, "bias", None)
    return head.weight.detach(), None if bias is None else bias.detach()


def semantic_bases(weight: torch.Tensor) -> torch.Tensor:
    """Unit-norm rows ``s_v = e_v · (Wᵀ)⁺`` for an LM head ``logits = h · Wᵀ`` (``W``: [V, d]).

    ``(Wᵀ)⁺ = W (WᵀW)⁺`` for any ``W``; the d×d Gram matrix is accumulated and inverted in fp64 (chunks
    over the vocabulary), so neither a V×V matrix nor a V×d SVD is formed.
    """
    V, d = weight.shape
    rows = max(1, LOGIT_ELEMENTS // max(d, 1))
    gram = torch.zeros(d, d, dtype=torch.float64, device=weight.device)
    for start in range(0, V, rows):
        w = weight[start:start + rows].double()
        gram += w.T @ w
    gram_pinv = torch.linalg.pinv(gram, hermitian=True)
    bases = torch.empty(V, d, dtype=torch.float32, device=weight.device)
    for start in range(0, V, rows):
        bases[start:start + rows] = (weight[start:start + rows].double() @ gram_pinv).float()
    return F.normalize(bases, dim=-1)


class _Reader:
    """Turns the hidden states at the trained positions into summed cross-entropies, chunk by chunk."""

    def __init__(self, model: nn.Module, metric: str, temperature: float | None):
        if metric not in METRICS:
            raise ValueError(f"metric {metric!r}; allowed: {', '.join(METRICS)}")
        self.metric = metric
        self.norm = find_final_norm(model)
        weight, bias = _lm_head(model)
        self.device = weight.device
        self.vocab, hidden = weight.shape
        if metric == "logit_lens":
            self.matrix = weight.float()
            self.bias = None if bias is None else bias.float()
            self.scale = 1.0
        else:
            self.matrix = semantic_bases(weight)
            self.bias = None
            self.scale = 1.0 / temperature if temperature else math.sqrt(hidden)
        norm_params = list(self.norm.parameters())
        self.norm_dtype = norm_params[0].dtype if norm_params else None

    def ce_sum(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Sum over rows of the targets' cross-entropy; ``hidden`` [N, d] in the model's dtype."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        rows = max(1, LOGIT_ELEMENTS // self.vocab)
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start:start + rows]
            if self.norm_dtype is not None:
                h = h.to(self.norm_dtype)  # the model's own norm arithmetic (exact for the last point)
            h = self.norm(h).to(self.device, torch.float32)
            if self.metric == "vocab_semantics":
                h = F.normalize(h, dim=-1)
            logits = h @ self.matrix.T
            if self.bias is not None:
                logits += self.bias
            if self.scale != 1.0:
                logits *= self.scale
            total += F.cross_entropy(logits, targets[start:start + rows].to(self.device), reduction="sum").double()
        return total


_CLASSIFIER_HEADS = ("score", "classifier")


def classifier_head(model: nn.Module) -> nn.Module | None:
    """The classification head of a sequence-classification model (PEFT's wrapper of it included)."""
    base = _base_model(model)
    for name in _CLASSIFIER_HEADS:
        head = getattr(base, name, None)
        if isinstance(head, nn.Module):
            return head
    return None


class _ClassReader:
    """Cross-entropy of the gold class through the final norm and the classification head."""

    def __init__(self, model: nn.Module, metric: str):
        if metric != "logit_lens":
            raise CalibrationError(f"irtuning_salf_metric={metric!r} reads through a vocabulary, which a "
                                   f"sequence-classification model does not have; use irtuning_salf_metric: logit_lens")
        self.norm = find_final_norm(model)
        self.head = classifier_head(model)
        params = list(self.head.parameters())
        self.device = params[0].device
        norm_params = list(self.norm.parameters())
        self.norm_dtype = norm_params[0].dtype if norm_params else None

    def ce_sum(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        h = hidden.to(self.norm_dtype) if self.norm_dtype is not None else hidden
        logits = self.head(self.norm(h)).float()
        return F.cross_entropy(logits, targets.to(logits.device), reduction="sum").double().to(self.device)


def _last_token_positions(model: nn.Module, batch: dict) -> torch.Tensor:
    """Index of each row's last non-padding token, found as transformers' classifiers find it."""
    ids = batch["input_ids"]
    pad = getattr(getattr(_base_model(model), "config", None), "pad_token_id", None)
    if pad is None:
        return torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long, device=ids.device)
    idx = torch.arange(ids.shape[1], device=ids.device)
    return (idx * (ids != pad)).argmax(-1)


# ---- the calibration pass ------------------------------------------------------------------------
@dataclass
class DeviationCurve:
    deviation: list[float]  # L+1 mean cross-entropies, latent space 0 (embeddings) .. L
    tokens: int  # target tokens read (summed over ranks)
    batches: int  # batches read on this rank
    metric: str


def _targets(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions [B, T-1] bool, targets [N]) of next-token prediction at the trained tokens."""
    labels = batch.get("labels")
    if labels is None:  # no labels: every attended token is a target
        labels = batch["input_ids"].clone()
        mask = batch.get("attention_mask")
        if mask is not None:
            labels[mask == 0] = IGNORE_INDEX
    shifted = labels[:, 1:]
    positions = shifted != IGNORE_INDEX
    return positions, shifted[positions]


def _reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    backend = torch.distributed.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    out = values.to(device)
    torch.distributed.all_reduce(out)
    return out.to(values.device)


@torch.no_grad()
def deviation_curve(model: nn.Module, layers: Sequence[nn.Module], batches: Iterable[dict], *,
                    metric: str = "logit_lens", temperature: float | None = None) -> DeviationCurve:
    """Mean target cross-entropy in each of the ``len(layers) + 1`` latent spaces over ``batches``.

    ``model`` is the (PEFT-wrapped) causal LM, ``layers`` its decoder blocks in order. Runs in eval mode
    without gradients; every module's train/eval flag is restored afterwards.
    """
    batches = iter(batches)
    first = next(batches, None)
    labels = first.get("labels") if isinstance(first, Mapping) else None
    classify = isinstance(labels, torch.Tensor) and labels.dim() == 1 and classifier_head(model) is not None
    reader = _ClassReader(model, metric) if classify else _Reader(model, metric, temperature)
    batches = [] if first is None else itertools.chain([first], batches)
    L = len(layers)
    sums = torch.zeros(L + 1, dtype=torch.float64, device=reader.device)
    state: dict[str, Any] = {}

    def read(space: int, hidden: torch.Tensor) -> None:
        if classify:
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            sums[space] += reader.ce_sum(hidden[rows, state["positions"].to(hidden.device)], state["targets"])
            return
        selected = hidden[:, :-1][state["positions"].to(hidden.device)]
        sums[space] += reader.ce_sum(selected, state["targets"])

    def pre_hook(module, args, kwargs):
        read(0, args[0] if args else kwargs["hidden_states"])

    def make_post_hook(index: int):
        def post_hook(module, args, output):
            read(index + 1, output[0] if isinstance(output, (tuple, list)) else output)
            if index == L - 1:
                raise _StopForward

        return post_hook

    handles = [layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)]
    handles += [layer.register_forward_hook(make_post_hook(i)) for i, layer in enumerate(layers)]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    input_device = model.get_input_embeddings().weight.device
    tokens, count = 0, 0
    try:
        for batch in batches:
            batch = {k: v.to(input_device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            if classify:
                positions, targets = _last_token_positions(model, batch), batch["labels"]
            else:
                positions, targets = _targets(batch)
            count += 1
            if targets.numel() == 0:
                continue
            state["positions"], state["targets"] = positions, targets
            tokens += int(targets.numel())
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            try:
                model(**inputs, use_cache=False)
            except _StopForward:
                pass
            else:
                raise CalibrationError("the forward pass never reached the last decoder block")
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    totals = _reduce_sum(torch.cat([sums, torch.tensor([float(tokens)], dtype=torch.float64, device=sums.device)]))
    n = int(totals[-1].item())
    if n == 0:
        raise CalibrationError(f"no trained (label != {IGNORE_INDEX}) tokens in {count} calibration batches")
    curve = (totals[:-1] / n).cpu().tolist()
    if not all(math.isfinite(v) for v in curve):
        raise CalibrationError(f"non-finite deviation curve {curve}")
    return DeviationCurve(deviation=curve, tokens=n, batches=count, metric=metric)


# ---- from the curve to a cut ---------------------------------------------------------------------
@dataclass
class PowerLawFit:
    """``d(k) ≈ a·(k+1)^(−b) + c`` over latent spaces ``k = 0..L``."""

    a: float
    b: float
    c: float
    sse: float

    def __call__(self, k: np.ndarray) -> np.ndarray:
        return self.a * np.power(np.asarray(k, dtype=np.float64) + 1.0, -self.b) + self.c


def fit_power_law(curve: Sequence[float], grid: int = 400) -> PowerLawFit:
    """Least-squares power law in depth: for each offset ``c`` on a geometric grid below ``min(d)``,
    ``a`` and ``b`` come from a linear fit of ``log(d − c)`` on ``log(k+1)``; the ``c`` with the least
    squared error on ``d`` itself wins. A flat curve gives ``a = b = 0``, ``c = d``."""
    d = np.asarray(curve, dtype=np.float64)
    k = np.arange(len(d), dtype=np.float64)
    span = float(d.max() - d.min())
    if len(d) < 3 or span <= 1e-12 * max(1.0, abs(float(d.max()))):
        return PowerLawFit(0.0, 0.0, float(d.mean()), float(((d - d.mean()) ** 2).sum()))
    x = np.log(k + 1.0)
    design = np.stack([np.ones_like(x), -x], axis=1)

    def fit_at(log_gap: float) -> PowerLawFit:
        c = float(d.min() - span * 10.0 ** log_gap)
        (log_a, b), *_ = np.linalg.lstsq(design, np.log(d - c), rcond=None)
        fit = PowerLawFit(float(np.exp(log_a)), float(b), c, 0.0)
        fit.sse = float(((fit(k) - d) ** 2).sum())
        return fit

    coarse = np.linspace(-4.0, 3.0, grid)
    sse = [fit_at(g).sse for g in coarse]
    i = int(np.argmin(sse))
    step = coarse[1] - coarse[0]
    fine = np.linspace(coarse[i] - step, coarse[i] + step, 101)  # refine around the best grid point
    return min((fit_at(g) for g in fine), key=lambda f: f.sse)


def layer_gains(curve: Sequence[float], estimator: str = "power_law") -> tuple[list[float], PowerLawFit | None]:
    """Gain of each layer ``l = 0..L-1`` from the ``L+1``-point deviation curve.

    ``raw``: the drop across the layer, ``d[l] − d[l+1]``. ``power_law``: the drop in excess of the fitted
    scaling law's own drop, ``(d[l] − d[l+1]) − (f(l) − f(l+1))`` = the fall of the residual ``d − f``
    across the layer: the layer that does most beyond the smooth trend in depth.
    """
    d = np.asarray(curve, dtype=np.float64)
    drop = d[:-1] - d[1:]
    if estimator == "raw":
        return drop.tolist(), None
    if estimator != "power_law":
        raise ValueError(f"estimator {estimator!r}; allowed: {', '.join(ESTIMATORS)}")
    fit = fit_power_law(d)
    f = fit(np.arange(len(d)))
    return (drop - (f[:-1] - f[1:])).tolist(), fit


def cut_range(num_layers: int, min_trainable: int = 1, max_trainable: int | None = None) -> tuple[int, int]:
    """Cuts allowed by the bounds on the number of trained layers ``L − 1 − cut`` (−1 = freeze none)."""
    hi = num_layers - 1 - int(min_trainable)
    lo = max(-1, num_layers - 1 - int(num_layers if max_trainable is None else max_trainable))
    if lo > hi:
        raise ValueError(f"no cut trains between {min_trainable} and {max_trainable} of {num_layers} layers")
    return lo, hi


def choose_cut(gains: Sequence[float], min_trainable: int = 1, max_trainable: int | None = None,
               lowest: int = 0) -> int:
    """The layer of maximum gain among the cuts the bounds allow (ties: the lower layer, so more train).

    Layers ``0..cut`` freeze. ``−1`` (nothing frozen) only when ``min_trainable`` equals the layer count.
    ``lowest``: layers below it are no candidates (their gain is not measured); the bounds win over it.
    """
    lo, hi = cut_range(len(gains), min_trainable, max_trainable)
    if hi < 0:
        return -1
    lo = min(max(lo, 0, int(lowest)), hi)
    window = np.asarray(gains[lo:hi + 1], dtype=np.float64)
    return lo + int(np.argmax(window))


# ---- the figure ------------------------------------------------------------------------------------
def plot_calibration(deviation: Sequence[float], gains: Sequence[float], cut: int, path: str | Path, *,
                     fit: PowerLawFit | None = None, title: str = "", fit_from: int = 0) -> Path:
    """Deviation against latent space and gain against layer, frozen part shaded, cut marked.

    ``fit_from``: the first latent space the fit was made on (its ``k = 0``); a NaN gain is not drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = len(gains)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6.0, 2.0 + 0.25 * L), 6.5))
    ax1.plot(range(L + 1), deviation, marker="o", label="deviation (calibration)")
    if fit is not None:
        ks = np.linspace(fit_from, L, 200)
        sign = "+" if fit.c >= 0 else "−"
        ax1.plot(ks, fit(ks - fit_from), linestyle="--", label=f"fit {fit.a:.3g}·(k+1)^({-fit.b:.3g}) {sign} {abs(fit.c):.3g}")
    ax1.set_ylabel("deviation (mean CE)")
    ax1.set_xlabel("latent space k (0 = embeddings, k = output of layer k-1)")
    ax1.set_title(title or "SALF calibration")
    colours = ["tab:red" if layer == cut else ("tab:gray" if layer < cut else "tab:blue") for layer in range(L)]
    ax2.bar(range(L), np.nan_to_num(np.asarray(gains, dtype=np.float64), nan=0.0), color=colours)
    ax2.axhline(0.0, color="black", linewidth=0.5)
    ax2.set_ylabel("gain")
    ax2.set_xlabel("layer l (maps latent space l to l+1)")
    if cut >= 0:
        # the frozen layers 0..cut read latent spaces 0..cut and write 1..cut+1
        ax1.axvspan(0, cut + 1, color="tab:gray", alpha=0.15, label=f"frozen: layers 0..{cut}")
        ax1.axvline(cut + 1, color="tab:red", linestyle=":", label=f"cut: layer {cut + 1} is the first trained")
        ax2.axvspan(-0.5, cut + 0.5, color="tab:gray", alpha=0.15, label=f"frozen: layers 0..{cut}")
        ax2.axvline(cut + 0.5, color="tab:red", linestyle=":", label=f"cut at layer {cut} (maximum gain)")
    for ax in (ax1, ax2):
        ax.legend(loc="best", fontsize=8)
    out = Path(path)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
