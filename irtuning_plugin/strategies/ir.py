"""``ir``: IR-Tuning (Liu & Litman, Findings of EMNLP 2025).

Each optimizer step the layers are ranked by the size of their adapter gradients and split where the
within-group variances add up to the least; only the high group trains. Defaults reproduce the
reference implementation (see ../shared/ALGORITHMS.md §1), including its boundary-layer off-by-one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from irtuning_plugin.strategies.base import (
    SENTINEL_SCORE,
    SelectionContext,
    SelectionStrategy,
    StrategyConfigError,
    option,
    register_strategy,
)

SCORES = ("reference", "l2")
BOUNDARIES = ("inclusive", "strict")


def split_high_group(
    scores: Sequence[float],
    layers: Sequence[int] | None = None,
    *,
    window: tuple[float, float] = (0.35, 0.65),
    include_boundary: bool = True,
) -> tuple[list[int], list[float]]:
    """One application of IR-Tuning's split rule.

    Layers are sorted ascending by (score, layer). For a cut ``j`` the low group is ``sorted[0..j]`` and
    the high group ``sorted[j+1..]``; ``V[j] = var(low) + var(high)`` (population variances, unweighted).
    ``j`` is restricted to ``floor(a*n)..floor(b*n)`` and the first minimal ``j`` wins. Returned: the
    high group ``sorted[j..]`` (boundary layer included, as the reference does) or ``sorted[j+1..]``.
    """
    n = len(scores)
    if layers is None:
        layers = list(range(n))
    if len(layers) != n:
        raise ValueError(f"{n} scores for {len(layers)} layers")
    if n < 2:
        return list(layers), list(scores)
    ranked = sorted(zip((float(s) for s in scores), layers))
    ranked_scores = np.array([s for s, _ in ranked], dtype=np.float64)
    ranked_layers = [ly for _, ly in ranked]
    lo = int(n * window[0])
    hi = min(int(n * window[1]), n - 2)
    lo = min(lo, hi)
    best_j, best_v = lo, None
    for j in range(lo, hi + 1):
        v = float(np.var(ranked_scores[: j + 1]) + np.var(ranked_scores[j + 1 :]))
        if best_v is None or v < best_v:
            best_j, best_v = j, v
    start = best_j if include_boundary else best_j + 1
    return ranked_layers[start:], ranked_scores[start:].tolist()


def reference_layer_scores(per_tensor_sq: torch.Tensor, layer_ids: torch.Tensor, num_layers: int) -> torch.Tensor:
    """The reference score: ``sqrt(sum_t sqrt(||g_t||))``; a NaN/inf tensor norm counts as 1000."""
    norms = per_tensor_sq.detach().double().cpu().sqrt()
    norms = torch.where(torch.isfinite(norms), norms, torch.full_like(norms, SENTINEL_SCORE))
    acc = torch.zeros(num_layers, dtype=torch.float64)
    acc.index_add_(0, layer_ids.cpu(), norms.sqrt())
    return acc.sqrt()


@dataclass
class IROptions:
    score: str = option("reference", "per-layer score: 'reference' = sqrt(sum over tensors of sqrt(‖g‖)) as the "
                        "paper's code; 'l2' = the layer's plain L2 gradient norm", choices=SCORES)
    window_low: float = option(0.35, "lower edge of the cut window, as a fraction of the layer count")
    window_high: float = option(0.65, "upper edge of the cut window, as a fraction of the layer count")
    boundary: str = option("inclusive", "'inclusive' trains the boundary layer of the cut too (the reference's "
                           "behaviour); 'strict' trains only the high group", choices=BOUNDARIES)
    split_num: int = option(1, "how many times the split is applied (2 = split the high group again: fewer layers)")
    interval: int = option(1, "re-select every this many optimizer steps (the paper: every step)")

    def check(self, prefix: str, num_layers: int | None = None) -> None:
        if self.score not in SCORES:
            raise StrategyConfigError(f"{prefix}score={self.score!r}; allowed: {', '.join(SCORES)}")
        if self.boundary not in BOUNDARIES:
            raise StrategyConfigError(f"{prefix}boundary={self.boundary!r}; allowed: {', '.join(BOUNDARIES)}")
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

    def layer_scores(self, per_tensor_sq: torch.Tensor, layer_ids: torch.Tensor) -> torch.Tensor:
        if self.options.score == "reference":
            return reference_layer_scores(per_tensor_sq, layer_ids, self.num_layers)
        return super().layer_scores(per_tensor_sq, layer_ids)

    def select(self, ctx: SelectionContext) -> list[int]:
        opts = self.options
        if ctx.step > 0 and ctx.step % int(opts.interval) != 0:
            return list(ctx.active)
        if not bool(ctx.ever_measured.any()):
            # Nothing measured yet: the reference draws uniform random scores, so step 1 trains a random subset.
            scores = torch.rand(ctx.num_layers, generator=ctx.generator, dtype=torch.float64).tolist()
        else:
            scores = ctx.scores.tolist()
        window = (float(opts.window_low), float(opts.window_high))
        inclusive = opts.boundary == "inclusive"
        layers, kept = split_high_group(scores, window=window, include_boundary=inclusive)
        if int(opts.split_num) >= 2:
            layers, kept = split_high_group(kept, layers, window=window, include_boundary=inclusive)
        return sorted(layers)
