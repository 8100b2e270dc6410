"""``salf``: SALF-style semantic-aware layer freezing (after Gu, Aleti, Chen, Zhang, Findings of ACL 2025).

Once, before the first optimizer step, a no-gradient calibration pass over a few training batches
measures a deviation (a loss) in each of the L+1 latent spaces; each layer's gain is how much it lowers
the deviation; the layer of maximum gain ``k*`` (within bounds on how many layers train) is the cut:
layers ``0..k*`` freeze and ``k*+1..L-1`` train for the whole run, so backprop stops at ``k*+1``.
Under a tied LM head latent space 0 is left out of the gains by default (``embedding_space: auto``):
read through the input embedding matrix it scores the input token itself, so the drop across layer 0
measures the tying, not the layer (on SmolLM2 it is 103 nats against at most 7 for any other layer).
The numerics live in :mod:`irtuning_plugin.salf_calibration`; what follows the paper and what is ours
is in docs/salf.md.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from irtuning_plugin.distributed import unsharded_root
from irtuning_plugin.salf_calibration import (
    EMBEDDING_SPACE,
    ESTIMATORS,
    METRICS,
    CalibrationError,
    PowerLawFit,
    choose_cut,
    cut_range,
    deviation_curve,
    head_is_tied,
    layer_gains,
    plot_calibration,
)
from irtuning_plugin.strategies.base import (
    SelectionContext,
    SelectionStrategy,
    StrategyConfigError,
    option,
    register_strategy,
)
from irtuning_plugin.strategies.runtime import StrategyRuntime

LOG = logging.getLogger(__name__)

PLOT = "irtuning_salf.png"


@dataclass
class SALFOptions:
    metric: str = option("logit_lens", "deviation measured in each latent space: 'logit_lens' = cross-entropy of "
                         "the trained tokens through the final norm and LM head; 'vocab_semantics' = the same "
                         "with logits = cosine to the semantic bases e_v·W⁺ (W⁺: pseudoinverse of the LM head)",
                         choices=METRICS)
    estimator: str = option("power_law", "per-layer gain from the deviation curve: 'power_law' = the drop across "
                            "the layer beyond that of a fitted a·(k+1)^-b + c; 'raw' = the plain drop d[l] - d[l+1]",
                            choices=ESTIMATORS)
    calibration_batches: int = option(8, "training batches read by the calibration pass (no gradients, before "
                                      "step 1)", maximum=sys.maxsize)  # itertools.islice's range
    min_trainable: int = option(1, "fewest layers that train (1..L)")
    max_trainable: int | None = option(None, "most layers that train (1..L; default: L)")
    cut: int | None = option(None, "freeze layers 0..cut by hand (0..L-2) and skip the calibration")
    semantics_temperature: float | None = option(None, "temperature of the 'vocab_semantics' cosine logits "
                                                 "(default: 1/sqrt(hidden size))")
    embedding_space: str = option("auto", "latent space 0 (the embedding output) in the gains: 'include'; 'exclude' "
                                  "= gains from latent spaces 1..L only, so layer 0 is no candidate cut; 'auto' = "
                                  "exclude when the LM head is tied to the input embeddings (read through a tied "
                                  "head, latent space 0 scores the input token itself, not a prediction)",
                                  choices=EMBEDDING_SPACE)

    def check(self, prefix: str, num_layers: int | None = None) -> None:
        """Ranges and how the keys combine; the types and choices are checked by the key types."""
        if self.calibration_batches < 1:
            raise StrategyConfigError(f"{prefix}calibration_batches={self.calibration_batches!r}; must be an "
                                      f"integer >= 1")
        t = self.semantics_temperature
        if t is not None and not 0 < t < float("inf"):
            raise StrategyConfigError(f"{prefix}semantics_temperature={t!r}; must be a number > 0")
        L = num_layers
        span = "1..L" if L is None else f"1..{L} for a {L}-layer model"
        for name in ("min_trainable", "max_trainable"):
            value = getattr(self, name)
            if value is None:
                continue
            if value < 1 or (L is not None and value > L):
                raise StrategyConfigError(f"{prefix}{name}={value!r}; allowed {span}")
        if self.max_trainable is not None and self.min_trainable > self.max_trainable:
            raise StrategyConfigError(f"{prefix}min_trainable={self.min_trainable} > {prefix}max_trainable="
                                      f"{self.max_trainable}; the minimum must not exceed the maximum")
        if self.cut is None:
            return
        # A cut of L-1 would freeze every layer (nothing to train): refused, like the engine refuses an
        # empty selection. Use irtuning_strategy: all for no freezing.
        if self.cut < 0 or (L is not None and self.cut > L - 2):
            if L is None:
                allowed = "0..L-2 (L-1 would train nothing)"
            elif L >= 2:
                allowed = f"0..{L - 2} for a {L}-layer model"
            else:
                allowed = "none: a 1-layer model has no cut that leaves a layer to train"
            raise StrategyConfigError(f"{prefix}cut={self.cut!r}; allowed {allowed}")
        if L is not None:
            trained = L - 1 - self.cut
            hi = L if self.max_trainable is None else self.max_trainable
            if not self.min_trainable <= trained <= hi:
                raise StrategyConfigError(f"{prefix}cut={self.cut} trains {trained} of {L} layers, outside "
                                          f"{prefix}min_trainable={self.min_trainable}..{prefix}max_trainable={hi}")


@register_strategy
class SALFStrategy(SelectionStrategy):
    name = "salf"
    Options = SALFOptions
    summary = ("SALF-style semantic-aware freezing: one calibration pass before training picks a cut; "
               "layers up to it freeze, the ones above train for the whole run")
    fixed_after_first_step = True
    accepts_depth_floor = False  # its cut is a floor already

    def __init__(self, num_layers: int, options: Any = None):
        super().__init__(num_layers, options)
        self.cut: int | None = None
        self.deviation: list[float] | None = None
        self.gains: list[float] | None = None
        self.fit: PowerLawFit | None = None
        self.report: dict[str, Any] = {}
        self.fit_from = 0
        self._logged = False

    def calibrate(self, model: torch.nn.Module, layers, batches) -> int:
        """Deviation curve, gains and cut from ``batches``; stores them and returns the cut."""
        opts = self.options
        t0 = time.perf_counter()
        curve = deviation_curve(model, layers, batches, metric=opts.metric, temperature=opts.semantics_temperature)
        skip = opts.embedding_space == "exclude" or (opts.embedding_space == "auto" and head_is_tied(model))
        self.fit_from = 1 if skip else 0
        if skip:  # layer 0's gain is measured against latent space 0: not measured, not a candidate
            upper, fit = layer_gains(curve.deviation[1:], opts.estimator)
            gains = [math.nan] + upper
        else:
            gains, fit = layer_gains(curve.deviation, opts.estimator)
        cut = choose_cut(gains, opts.min_trainable, opts.max_trainable, lowest=self.fit_from)
        self.cut, self.deviation, self.gains, self.fit = cut, curve.deviation, gains, fit
        self.report = {
            "salf_cut": cut,
            "salf_source": "calibration",
            "salf_metric": opts.metric,
            "salf_estimator": opts.estimator,
            "salf_deviation": [round(v, 6) for v in curve.deviation],
            "salf_gains": [None if math.isnan(v) else round(v, 6) for v in gains],
            "salf_embedding_space": "excluded" if skip else "included",
            "salf_tokens": curve.tokens,
            "salf_batches": curve.batches,
            "salf_calibration_s": round(time.perf_counter() - t0, 3),
        }
        if fit is not None:
            self.report["salf_fit"] = {"a": fit.a, "b": fit.b, "c": fit.c}
        LOG.info("irtuning salf: %s deviation over %d tokens %s; %s gains %s; cut %d (layers 0..%d freeze, "
                 "%d train)", opts.metric, curve.tokens, self.report["salf_deviation"], opts.estimator,
                 self.report["salf_gains"], cut, cut, self.num_layers - 1 - cut)
        return cut

    def calibrate_on(self, runtime: StrategyRuntime) -> int:
        """:meth:`calibrate` over the runtime's model and layers, on the first ``calibration_batches``
        batches of its training dataloader, read without moving the Trainer's data order; returns the cut."""
        # under FSDP2 every rank runs these forwards together, with the LM head and final norm whole
        with runtime.peek_batches(int(self.options.calibration_batches)) as batches, unsharded_root(runtime.model):
            return self.calibrate(runtime.model, runtime.layers, batches)

    def select(self, ctx: SelectionContext) -> list[int]:
        if self.cut is None:
            if self.options.cut is not None:
                self.cut = int(self.options.cut)
                self.report = {"salf_cut": self.cut, "salf_source": "option"}
            else:
                if self.runtime is None or self.runtime.train_dataloader is None:
                    raise CalibrationError("salf calibrates on the training dataloader, which this run does not "
                                           "pass to the engine; give the cut by hand with irtuning_salf_cut")
                self.calibrate_on(self.runtime)
        return list(range(self.cut + 1, ctx.num_layers))

    def state_dict(self) -> dict[str, Any]:
        """The cut and the calibration behind it: a resumed run keeps the cut and does not calibrate again."""
        fit = None if self.fit is None else {k: float(v) for k, v in dataclasses.asdict(self.fit).items()}
        floats = (lambda xs: None if xs is None else [float(x) for x in xs])  # noqa: E731 - plain floats for torch.load
        return {"cut": self.cut, "deviation": floats(self.deviation), "gains": floats(self.gains), "fit": fit,
                "report": dict(self.report), "logged": self._logged}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cut = None if state.get("cut") is None else int(state["cut"])
        self.deviation, self.gains = state.get("deviation"), state.get("gains")
        self.fit = None if state.get("fit") is None else PowerLawFit(**state["fit"])
        self.report = dict(state.get("report") or {})
        self._logged = bool(state.get("logged", False))

    def log_fields(self) -> dict[str, Any]:
        if self._logged or not self.report:
            return {}
        self._logged = True
        return dict(self.report)

    def on_train_end(self, output_dir: Any) -> None:
        if self.deviation is None or output_dir is None:
            return
        try:
            plot_calibration(self.deviation, self.gains, self.cut, Path(output_dir) / PLOT, fit=self.fit,
                             fit_from=self.fit_from,
                             title=f"SALF calibration ({self.options.metric}, {self.options.estimator})")
        except ImportError as err:  # matplotlib is optional
            LOG.warning("irtuning salf: no plot (%s); pip install matplotlib", err)


__all__ = ["PLOT", "SALFOptions", "SALFStrategy", "cut_range"]
