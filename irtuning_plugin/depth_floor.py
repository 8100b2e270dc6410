"""The depth floor: decoder layers below it stay frozen for the whole run; the strategy works above it.

With ``irtuning_depth_floor: F`` layers ``0..F-1`` never train, so (with the engine's backward cut)
the backward pass never runs below layer ``F``: that is where layer selection saves compute and
activation memory on a LoRA run. The strategy is built over the ``L - F`` layers above the floor and
sees them as its layers ``0..L-F-1`` (ir's cut window and split, lisa's and random's draws, ist's
sampling fractions all apply to those); :class:`FlooredStrategy` maps its indices back.

``irtuning_depth_floor: salf`` takes the floor from the ``salf`` calibration (default options) before
the first step: SALF decides where, the strategy decides which. SALF freezes layers ``0..cut``, so the
floor is ``cut + 1``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from irtuning_plugin.config import FLOOR_FROM_SALF
from irtuning_plugin.strategies.base import SENTINEL_SCORE, SelectionContext, SelectionStrategy, StrategyConfigError
from irtuning_plugin.strategies.runtime import StrategyRuntime
from irtuning_plugin.strategies.salf import SALFOptions, SALFStrategy

LOG = logging.getLogger(__name__)

KEY = "irtuning_depth_floor"
# The config-time check of the key (a count or 'salf', and only for a strategy that accepts a floor) is
# config.check_floor_value.


def check_floor_depth(floor: int, num_layers: int, source: str = "") -> int:
    if not 0 <= floor <= num_layers - 1:
        raise StrategyConfigError(f"{KEY}={floor}{source} leaves no layer to train in a {num_layers}-layer model; "
                                  f"allowed 0..{num_layers - 1}")
    return floor


def check_options_above_floor(options: Any, prefix: str, num_layers: int, floor: int) -> None:
    """Check a strategy's options against the ``num_layers - floor`` layers it works over; an error names the
    floor, the layers above it and the model's layer count (every integration calls this)."""
    upper = num_layers - floor
    try:
        options.check(prefix, upper)
    except StrategyConfigError as err:
        raise StrategyConfigError(f"{err} (with {KEY}={floor} the strategy works over the {upper} layers "
                                  f"{floor}..{num_layers - 1}); the model has {num_layers}: lower the option, or "
                                  f"lower {KEY}") from None


def saved_floor(strategy_state: dict) -> int:
    """The depth floor a checkpoint's strategy state was saved under (0: none)."""
    if isinstance(strategy_state, dict) and set(strategy_state) == {"depth_floor", "inner", "report"}:
        return int(strategy_state["depth_floor"])
    return 0


def floor_of(strategy: SelectionStrategy) -> int | None:
    """The engine's strategy's depth floor: 0 without one, None while a salf floor is not known yet."""
    return strategy.floor if isinstance(strategy, FlooredStrategy) else 0


def _calibrate_salf_floor(runtime: StrategyRuntime | None) -> tuple[int, dict]:
    """The floor (cut + 1) of a default salf calibration over every layer, and salf's report."""
    if runtime is None or runtime.train_dataloader is None:
        raise StrategyConfigError(f"{KEY}=salf calibrates on the training dataloader, which this run does not pass "
                                  f"to the engine; give the floor as a number of layers")
    salf = SALFStrategy(runtime.num_layers, SALFOptions())
    cut = salf.calibrate_on(runtime)
    return cut + 1, dict(salf.report)


class FlooredStrategy(SelectionStrategy):
    """Runs ``inner`` over the layers ``floor..L-1`` and reports its choices in the engine's numbering.

    ``inner`` (the wrapped strategy, ``None`` until a salf floor is known) is set up with the runtime's
    sliced copy (:meth:`StrategyRuntime.above`); its own state (ist's importance, ...) is read there."""

    def __init__(self, cls: type[SelectionStrategy], options: Any, num_layers: int, floor: int | str, prefix: str):
        super().__init__(num_layers, options)
        self._cls, self._prefix = cls, prefix
        self.name = cls.name
        self.floor: int | None = None
        self.inner: SelectionStrategy | None = None
        self._report: dict[str, Any] = {}
        self._logged = False
        if floor != FLOOR_FROM_SALF:
            self._build(check_floor_depth(int(floor), num_layers))

    def _build(self, floor: int) -> None:
        upper = self.num_layers - floor
        check_options_above_floor(self.options, self._prefix, self.num_layers, floor)
        self.floor = floor
        self.inner = self._cls(upper, self.options)
        self._report.setdefault("depth_floor", floor)

    def setup(self, runtime: StrategyRuntime) -> None:
        super().setup(runtime)
        if self.inner is not None:
            self.inner.setup(runtime.above(self.floor))

    def _sub(self, ctx: SelectionContext) -> SelectionContext:
        f = self.floor
        return SelectionContext(
            step=ctx.step, num_layers=self.num_layers - f, scores=ctx.scores[f:].clone(),
            ever_measured=ctx.ever_measured[f:].clone(), fresh=ctx.fresh[f:].clone(),
            active=[a - f for a in ctx.active if a >= f], generator=ctx.generator,
        )

    def select(self, ctx: SelectionContext) -> list[int]:
        if self.inner is None:  # floor from the salf calibration, on the first selection (before step 1)
            floor, report = _calibrate_salf_floor(self.runtime)
            self._report.update(report)
            self._build(check_floor_depth(floor, self.num_layers, " (from the salf calibration)"))
            LOG.info("irtuning: depth floor %d from the salf calibration (cut %d); %s selects among layers %d..%d",
                     floor, floor - 1, self.name, floor, self.num_layers - 1)
            self.setup(self.runtime)
        chosen = [int(i) for i in self.inner.select(self._sub(ctx))]
        upper = self.num_layers - self.floor
        bad = [i for i in chosen if not 0 <= i < upper]
        if bad:
            raise StrategyConfigError(f"strategy {self.name!r} chose layers {bad} outside its {upper} layers")
        return sorted(i + self.floor for i in chosen)

    def layer_scores(self, per_tensor_sq: torch.Tensor, layer_ids: torch.Tensor) -> torch.Tensor:
        out = torch.full((self.num_layers,), SENTINEL_SCORE, dtype=torch.float64)
        keep = layer_ids.cpu() >= self.floor  # layers below the floor are frozen: they have no gradients
        if bool(keep.any()):
            sq = per_tensor_sq[keep.to(per_tensor_sq.device)]
            out[self.floor:] = self.inner.layer_scores(sq, layer_ids.cpu()[keep] - self.floor)
        return out

    def step_scores(self, per_tensor_sq: torch.Tensor, layer_ids: torch.Tensor,
                    grad_measured: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.floor
        keep = layer_ids.cpu() >= f
        sq = per_tensor_sq[keep.to(per_tensor_sq.device)] if per_tensor_sq.numel() else per_tensor_sq
        inner_scores, inner_fresh = self.inner.step_scores(sq, layer_ids.cpu()[keep] - f, grad_measured[f:])
        scores = torch.full((self.num_layers,), SENTINEL_SCORE, dtype=torch.float64)
        scores[f:] = inner_scores.detach().double().cpu()
        fresh = torch.zeros(self.num_layers, dtype=torch.bool)
        fresh[f:] = inner_fresh.cpu()
        return scores, fresh

    def state_dict(self) -> dict[str, Any]:
        inner = self.inner.state_dict() if self.inner is not None else {}
        return {"depth_floor": self.floor, "inner": inner, "report": dict(self._report)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        floor = int(state["depth_floor"])
        if self.inner is None:  # floor from salf: the checkpoint's, not a new calibration
            self._report.update(state.get("report") or {})
            self._build(check_floor_depth(floor, self.num_layers, " (from the checkpoint)"))
            self.setup(self.runtime)
        elif floor != self.floor:
            raise StrategyConfigError(f"the checkpoint was trained with {KEY}={floor}, this run has {self.floor}: "
                                      f"resume with the same {KEY}")
        self._logged = True
        self.inner.load_state_dict(state.get("inner") or {})

    def log_fields(self) -> dict[str, Any]:
        row = dict(self.inner.log_fields()) if self.inner is not None else {}
        if not self._logged and self._report:
            row.update(self._report)
            self._logged = True
        return row

    def on_train_end(self, output_dir: Any) -> None:
        if self.inner is not None:
            self.inner.on_train_end(output_dir)


def floored_strategy(cls: type[SelectionStrategy], options: Any, num_layers: int, floor: int | str | None,
                     prefix: str) -> SelectionStrategy:
    """The engine's strategy: ``cls`` over all layers, or wrapped above a depth floor."""
    if floor in (None, 0):
        options.check(prefix, num_layers)
        return cls(num_layers, options)
    options.check(prefix, num_layers)  # early, layer-count-free errors; rechecked over the upper layers
    return FlooredStrategy(cls, options, num_layers, floor, prefix)
