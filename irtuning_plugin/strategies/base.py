"""The strategy interface and the registry that maps a name to a strategy class.

A strategy is one module: an options dataclass (every field documented, checked in ``check``) and a
class with ``select``. The engine owns the parameters, the scores and the optimizer side; a strategy
only answers "which layers train in the next optimizer step".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch

if TYPE_CHECKING:  # pragma: no cover
    from irtuning_plugin.engine import LayerSelectionEngine

SENTINEL_SCORE = 1000.0  # the reference's "never measured" score, also used for NaN/inf norms

_REGISTRY: dict[str, type["SelectionStrategy"]] = {}


class StrategyConfigError(ValueError):
    """A strategy option has a value the strategy cannot use."""


@dataclass
class NoOptions:
    def check(self, prefix: str, num_layers: int | None = None) -> None:  # noqa: D401 - nothing to check
        return None


def option(default: Any, help: str, **kwargs) -> Any:  # noqa: A002 - mirrors argparse
    """A documented strategy option (the help text reaches the Axolotl args model and the README)."""
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


@dataclass
class SelectionContext:
    """What a strategy sees when it chooses the layers of the next optimizer step."""

    step: int  # optimizer steps completed so far (0 before the first)
    num_layers: int
    scores: torch.Tensor  # fp64 [L]; SENTINEL_SCORE where never measured
    ever_measured: torch.Tensor  # bool [L]
    fresh: torch.Tensor  # bool [L]: measured from the step that just ended
    active: list[int]  # layers that trained in the step that just ended
    generator: torch.Generator  # seeded identically on every rank
    engine: "LayerSelectionEngine | None" = None
    train_dataloader: Any = None


class SelectionStrategy:
    """Base class. Subclasses set ``name``, ``Options`` and implement :meth:`select`."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    summary: ClassVar[str] = ""

    def __init__(self, num_layers: int, options: Any = None):
        self.num_layers = num_layers
        self.options = options if options is not None else self.Options()

    def setup(self, engine: "LayerSelectionEngine") -> None:
        """Called once when training starts, before the first selection."""

    def layer_scores(self, per_tensor_sq: torch.Tensor, layer_ids: torch.Tensor) -> torch.Tensor:
        """Per-layer score from per-tensor squared gradient norms; default: the layer's L2 norm."""
        per_layer = torch.zeros(self.num_layers, dtype=torch.float64)
        per_layer.index_add_(0, layer_ids.cpu(), per_tensor_sq.detach().double().cpu())
        score = per_layer.sqrt()
        return torch.where(torch.isfinite(score), score, torch.full_like(score, SENTINEL_SCORE))

    def step_scores(self, per_tensor_sq: torch.Tensor, layer_ids: torch.Tensor,
                    grad_measured: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's scores and which layers they measured; default: :meth:`layer_scores` of the layers
        that have gradients. A metric that is not a gradient (e.g. ``ir``'s cosine) overrides this."""
        return self.layer_scores(per_tensor_sq, layer_ids), grad_measured

    def select(self, ctx: SelectionContext) -> Sequence[int]:
        raise NotImplementedError

    def log_fields(self) -> dict[str, Any]:
        """Extra JSON-serialisable fields for this step's row of the selection log (e.g. a calibration
        result); merged into the row of the step that just ended."""
        return {}

    def on_train_end(self, output_dir: Any) -> None:
        """Write strategy-specific artefacts (plots) into ``output_dir`` (main process only)."""


def register_strategy(cls: type[SelectionStrategy]) -> type[SelectionStrategy]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"strategy {cls.name!r} is already registered by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def registered_strategies() -> dict[str, type[SelectionStrategy]]:
    return dict(sorted(_REGISTRY.items()))


def get_strategy_class(name: str) -> type[SelectionStrategy]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise StrategyConfigError(
            f"irtuning_strategy={name!r} is not a strategy; allowed: {', '.join(sorted(_REGISTRY))}"
        ) from None


def option_fields(cls: type[SelectionStrategy]) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls.Options))


def make_options(cls: type[SelectionStrategy], values: dict[str, Any], prefix: str) -> Any:
    """Build and check ``cls.Options`` from ``values`` (unset/None keys keep their defaults)."""
    known = {f.name for f in option_fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        allowed = ", ".join(prefix + k for k in sorted(known)) or "none"
        raise StrategyConfigError(f"{prefix}{unknown[0]} is not an option of strategy {cls.name!r}; its options: {allowed}")
    opts = cls.Options(**{k: v for k, v in values.items() if v is not None})
    opts.check(prefix)
    return opts


def sample_without_replacement(n: int, k: int, generator: torch.Generator, weights: torch.Tensor | None = None) -> list[int]:
    """``k`` distinct indices of ``range(n)``, uniform or by ``weights``, from our own generator."""
    if not 0 <= k <= n:
        raise ValueError(f"cannot sample {k} of {n} layers")
    if weights is None:
        return sorted(torch.randperm(n, generator=generator)[:k].tolist())
    return sorted(torch.multinomial(weights.double(), k, replacement=False, generator=generator).tolist())
