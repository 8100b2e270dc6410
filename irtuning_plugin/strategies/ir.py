"""``ir``: IR-Tuning (Liu & Litman, Findings of EMNLP 2025).

Each optimizer step the layers are ranked by an importance score and split where the within-group
variances add up to the least; one group trains. Defaults reproduce the reference implementation
(ZhexiongLiu/IR-Tuning, ``ir.py``; see docs/strategies.md, "What happens in a step") to the layer, quirks included:

* the cut is the FIRST position in the whole variance list that holds the window's minimum
  (``V.index(min(V[window]))``), so with tied scores it can land below the window: all-equal scores
  train every layer, and with ``split_num: 2`` a high group made only of never-measured layers (all
  at the sentinel, every variance 0) trains whole;
* the boundary layer of the cut trains too (an off-by-one of the reference);
* each importance metric keeps the reference's own window and side (see :data:`METRIC_RULES`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from irtuning_plugin.distributed import frobenius_norms
from irtuning_plugin.strategies.base import (
    SENTINEL_SCORE,
    SelectionContext,
    SelectionStrategy,
    StrategyConfigError,
    option,
    register_strategy,
)

SCORES = ("reference", "l2", "cosine", "weight")
BOUNDARIES = ("inclusive", "strict")
CUTS = ("reference", "in_window")


@dataclass(frozen=True)
class MetricRule:
    """How the reference splits for one importance metric (its three callbacks differ)."""

    train_high: bool  # True: the high-score side trains; False: the low side (cosine)
    low_offset: int  # added to int(n * window_low) (the weight callback starts one position later)
    high_inclusive: bool  # whether V[int(n * window_high)] is inside the window


METRIC_RULES = {
    "reference": MetricRule(train_high=True, low_offset=0, high_inclusive=True),
    "l2": MetricRule(train_high=True, low_offset=0, high_inclusive=True),
    "weight": MetricRule(train_high=True, low_offset=1, high_inclusive=True),
    "cosine": MetricRule(train_high=False, low_offset=0, high_inclusive=False),
}


def cut_variances(ranked_scores: Sequence[float]) -> list[float]:
    """``V[j] = var(ranked[0..j]) + var(ranked[j+1..])`` for every cut ``j = 0..n-2`` (population
    variances, not weighted by group size)."""
    s = np.asarray(ranked_scores, dtype=np.float64)
    return [float(np.var(s[: j + 1]) + np.var(s[j + 1:])) for j in range(len(s) - 1)]


def split_position(ranked_scores: Sequence[float], *, window: tuple[float, float] = (0.35, 0.65),
                   rule: MetricRule = METRIC_RULES["reference"], cut: str = "reference") -> int:
    """The split position ``s`` of the reference: the window is ``V[int(a n) + offset : int(b n) (+1)]``;
    ``cut='reference'`` returns the first ``j`` of the WHOLE list ``V`` equal to the window's minimum,
    ``cut='in_window'`` the first minimal ``j`` inside the window. A window that is empty for a very small
    ``n`` (where the reference's ``min([])`` would fail) becomes the whole list."""
    n = len(ranked_scores)
    V = cut_variances(ranked_scores)
    lo = int(n * window[0]) + rule.low_offset
    hi = int(n * window[1]) + (1 if rule.high_inclusive else 0)
    if not V[lo:hi]:
        lo, hi = 0, len(V)
    best = min(V[lo:hi])
    if cut == "in_window":
        return lo + V[lo:hi].index(best)
    return V.index(best)


def split_high_group(
    scores: Sequence[float],
    layers: Sequence[int] | None = None,
    *,
    window: tuple[float, float] = (0.35, 0.65),
    include_boundary: bool = True,
    rule: MetricRule = METRIC_RULES["reference"],
    cut: str = "reference",
) -> tuple[list[int], list[float]]:
    """One application of IR-Tuning's split rule: the layers (and their scores) that train.

    Layers are sorted ascending by (score, layer). With ``s`` from :func:`split_position`, the
    gradient and weight metrics train ``sorted[s..]`` (``include_boundary``, the reference) or the
    cut's exact high group ``sorted[s+1..]``; the cosine metric trains ``sorted[..s-1]`` (the
    reference) or the cut's exact low group ``sorted[..s]``. An empty group (cosine, ``s = 0`` with
    ties) falls back to the cut's exact group, so a step never trains nothing.
    """
    n = len(scores)
    if layers is None:
        layers = list(range(n))
    if len(layers) != n:
        raise ValueError(f"{n} scores for {len(layers)} layers")
    if n < 2:
        return list(layers), [float(s) for s in scores]
    ranked = sorted(zip((float(s) for s in scores), layers))
    ranked_scores = [s for s, _ in ranked]
    ranked_layers = [ly for _, ly in ranked]
    s = split_position(ranked_scores, window=window, rule=rule, cut=cut)
    if rule.train_high:
        start = s if include_boundary else s + 1
        return ranked_layers[start:], ranked_scores[start:]
    stop = s if include_boundary and s > 0 else s + 1
    return ranked_layers[:stop], ranked_scores[:stop]


def reference_layer_scores(per_tensor_sq: torch.Tensor, layer_ids: torch.Tensor, num_layers: int) -> torch.Tensor:
    """The reference score: ``sqrt(sum_t sqrt(||g_t||))``; a NaN/inf tensor norm counts as 1000."""
    norms = per_tensor_sq.detach().double().cpu().sqrt()
    norms = torch.where(torch.isfinite(norms), norms, torch.full_like(norms, SENTINEL_SCORE))
    acc = torch.zeros(num_layers, dtype=torch.float64)
    acc.index_add_(0, layer_ids.cpu(), norms.sqrt())
    return acc.sqrt()


def hidden_state_cosine(before: torch.Tensor, after: torch.Tensor) -> float:
    """The reference's layer similarity: average the hidden states over the batch (``[B,T,H] -> [T,H]``,
    padding included), then the mean over positions ``t`` of ``cos(before_t, after_t)``."""
    b = before.detach().float()
    a = after.detach().float()
    if b.dim() == 3:
        b, a = b.mean(dim=0), a.mean(dim=0)
    return float(torch.nn.functional.cosine_similarity(b, a, dim=-1).mean())


def attention_output_weight(layer: nn.Module) -> torch.Tensor:
    """The frozen weight of a decoder block's attention output projection (``self_attn.o_proj`` in
    Llama/Qwen/Mistral; also ``out_proj``/``o_proj`` elsewhere), through a PEFT wrapper."""
    found = None
    for name, mod in layer.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("o_proj", "out_proj") and (found is None or name.endswith("self_attn.o_proj")):
            found = mod
    if found is None:
        raise StrategyConfigError(
            "irtuning_ir_score='weight' needs an attention output projection (o_proj or out_proj) in every "
            f"decoder layer; none in {type(layer).__name__}: use irtuning_ir_score: reference"
        )
    base = getattr(found, "base_layer", found)
    return base.weight


@dataclass
class IROptions:
    score: str = option(
        "reference",
        "importance metric (the reference's --importance-metric-name): 'reference' = gradient, "
        "sqrt(sum over tensors of sqrt(‖g‖)) as the paper's code; 'l2' = the layer's plain L2 gradient norm; "
        "'cosine' = mean over positions of cos(layer input, layer output), hidden states averaged over the "
        "batch, first training forward of the step; the LOW-similarity side trains; 'weight' = ‖W‖_F of "
        "the frozen attention output projection (o_proj); static under LoRA", choices=SCORES)
    window_low: float = option(0.35, "lower edge of the cut window, as a fraction of the layer count")
    window_high: float = option(0.65, "upper edge of the cut window, as a fraction of the layer count")
    boundary: str = option("inclusive", "'inclusive' trains the boundary layer of the cut too (the reference's "
                           "behaviour; for 'cosine' the reference instead leaves it out); 'strict' trains "
                           "exactly the group the cut defines", choices=BOUNDARIES)
    cut: str = option("reference", "'reference' = the first position in the whole variance list holding the "
                      "window's minimum (the reference: with ties the cut can fall below the window, e.g. "
                      "all-equal scores train every layer); 'in_window' = the first minimum inside the window, "
                      "so the trained count always stays within the window (a bounded cost per step)",
                      choices=CUTS)
    split_num: int = option(1, "how many times the split is applied (2 = split the trained group again: fewer layers)")
    interval: int = option(1, "re-select every this many optimizer steps (the paper: every step)")

    def check(self, prefix: str, num_layers: int | None = None) -> None:
        """Ranges and the window; the types (and the choices of score, boundary, cut) are checked by the key types."""
        lo, hi = float(self.window_low), float(self.window_high)
        if not 0.0 < lo < hi < 1.0:
            raise StrategyConfigError(
                f"{prefix}window_low={lo} / {prefix}window_high={hi}: the window must satisfy 0 < low < high < 1"
            )
        if int(self.split_num) not in (1, 2):
            raise StrategyConfigError(f"{prefix}split_num={self.split_num!r}; allowed: 1, 2")
        if int(self.interval) < 1:
            raise StrategyConfigError(f"{prefix}interval={self.interval!r}; must be >= 1")


@register_strategy
class IRStrategy(SelectionStrategy):
    name = "ir"
    Options = IROptions
    summary = "IR-Tuning: train the high-gradient group of a variance-minimising split, re-chosen every step"

    @classmethod
    def scores_from_own_batch(cls, options) -> bool:
        return options.score == "cosine"  # hidden states of the rank's batch; l2 / reference / weight do not differ

    def __init__(self, num_layers: int, options=None):
        super().__init__(num_layers, options)
        self._o_proj: list[torch.Tensor] = []
        self._cosine = torch.full((num_layers,), math.nan, dtype=torch.float64)

    # ---- the metrics that are not gradients --------------------------------------------------------
    def setup(self, runtime) -> None:
        super().setup(runtime)
        if self.options.score == "weight":
            self._o_proj = [attention_output_weight(layer) for layer in runtime.layers]
        elif self.options.score == "cosine":
            runtime.add_layer_forward_hook(self._record_cosine)

    def _record_cosine(self, index: int, module: nn.Module, args, kwargs, output) -> None:
        # The reference keeps the first forward of each step; eval-mode forwards are not training steps.
        if not module.training or not math.isnan(self._cosine[index]):
            return
        before = args[0] if args else kwargs.get("hidden_states")
        after = output[0] if isinstance(output, (tuple, list)) else output
        if torch.is_tensor(before) and torch.is_tensor(after) and before.shape == after.shape:
            with torch.no_grad():
                self._cosine[index] = hidden_state_cosine(before, after)

    def _weight_norms(self) -> torch.Tensor:
        return frobenius_norms(self._o_proj)  # under FSDP2 from each rank's shards, one all_reduce

    def step_scores(self, per_tensor_sq, layer_ids, grad_measured):
        if self.options.score == "weight":
            return self._weight_norms(), torch.ones(self.num_layers, dtype=torch.bool)
        if self.options.score == "cosine":
            seen = ~torch.isnan(self._cosine)
            scores = torch.where(seen, self._cosine, torch.full_like(self._cosine, SENTINEL_SCORE))
            self._cosine.fill_(math.nan)
            return scores, seen
        return super().step_scores(per_tensor_sq, layer_ids, grad_measured)

    def layer_scores(self, per_tensor_sq: torch.Tensor, layer_ids: torch.Tensor) -> torch.Tensor:
        if self.options.score == "reference":
            return reference_layer_scores(per_tensor_sq, layer_ids, self.num_layers)
        return super().layer_scores(per_tensor_sq, layer_ids)

    # ---- selection ---------------------------------------------------------------------------------
    def select(self, ctx: SelectionContext) -> list[int]:
        opts = self.options
        if ctx.step > 0 and ctx.step % int(opts.interval) != 0:
            return list(ctx.active)
        if opts.score == "weight":
            scores = self._weight_norms().tolist()  # the reference recomputes them before every step
        elif not bool(ctx.ever_measured.any()):
            # Nothing measured yet: the reference draws uniform random scores, so step 1 trains a random subset.
            # This holds for 'cosine' too: the reference's CosineCallback also starts every score at 1000.
            scores = torch.rand(ctx.num_layers, generator=ctx.generator, dtype=torch.float64).tolist()
        else:
            scores = ctx.scores.tolist()
        kw = dict(window=(float(opts.window_low), float(opts.window_high)),
                  include_boundary=opts.boundary == "inclusive", rule=METRIC_RULES[opts.score], cut=opts.cut)
        layers, kept = split_high_group(scores, **kw)
        if int(opts.split_num) >= 2:
            layers, kept = split_high_group(kept, layers, **kw)
        return sorted(layers)
