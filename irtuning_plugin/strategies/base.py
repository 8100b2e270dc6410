"""The strategy interface and the registry that maps a name to a strategy class.

A strategy is one module: an options dataclass (every field documented, checked in ``check``) and a
class with ``select``. The engine owns the parameters, the scores and the optimizer side; a strategy
only answers "which layers train in the next optimizer step".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch

# The key types live in irtuning_plugin.keys; these names stay importable from here (and from
# irtuning_plugin.strategies) for strategy modules and user code.
from irtuning_plugin.keys import (  # noqa: F401 - re-exported
    KeyType,
    StrategyConfigError,
    key_types,
    make_options,
    option,
    option_fields,
)

if TYPE_CHECKING:  # pragma: no cover
    from irtuning_plugin.strategies.runtime import StrategyRuntime

SENTINEL_SCORE = 1000.0  # the reference's "never measured" score, also used for NaN/inf norms

_REGISTRY: dict[str, type["SelectionStrategy"]] = {}


@dataclass
class NoOptions:
    def check(self, prefix: str, num_layers: int | None = None) -> None:  # noqa: D401 - nothing to check
        return None


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


class SelectionStrategy:
    """Base class. Subclasses set ``name``, ``Options`` and implement :meth:`select`."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    summary: ClassVar[str] = ""
    # True when the trainable set chosen at step 0 never changes afterwards (torch_compile is then safe:
    # a changing set flips requires_grad, which torch.compile guards on, so every new set recompiles).
    fixed_after_first_step: ClassVar[bool] = False
    # What the strategy accepts and does, declared here rather than listed by name elsewhere:
    # the irtuning_scope values it works with;
    scopes: ClassVar[tuple[str, ...]] = ("adapter", "full")
    # whether irtuning_depth_floor may be combined with it (False: it fixes its layers itself);
    accepts_depth_floor: ClassVar[bool] = True
    # whether it ever leaves a layer frozen. False (``all``): DDP needs no find_unused_parameters, a PEFT
    # layer filter does not conflict with it, and a layer with nothing selectable is not an error.
    freezes_layers: ClassVar[bool] = True

    def __init__(self, num_layers: int, options: Any = None):
        self.num_layers = num_layers
        self.options = options if options is not None else self.Options()
        self.runtime: StrategyRuntime | None = None  # set by setup()

    def setup(self, runtime: "StrategyRuntime") -> None:
        """Called once when training starts, before the first selection, with what the strategy may use of
        the run (model, its layers, scope, seed, hooks, training batches). An override calls this first."""
        self.runtime = runtime

    def layer_scores(self, per_tensor_sq: torch.Tensor, layer_ids: torch.Tensor) -> torch.Tensor:
        """Per-layer score from per-tensor squared gradient norms; default: the layer's L2 norm."""
        per_layer = torch.zeros(self.num_layers, dtype=torch.float64)
        per_layer.index_add_(0, layer_ids.cpu(), per_tensor_sq.detach().double().cpu())
        score = per_layer.sqrt()
        return torch.where(torch.isfinite(score), score, torch.full_like(score, SENTINEL_SCORE))

    @classmethod
    def scores_from_own_batch(cls, options: Any) -> bool:
        """Whether, with these options, a step's scores come from each rank's own batch rather than from the
        gradients (which DDP and FSDP2 make equal on every rank). Several ranks then average the scores
        before choosing, so every rank trains the same layers. Default: False (gradient scores)."""
        return False

    def step_scores(self, per_tensor_sq: torch.Tensor, layer_ids: torch.Tensor,
                    grad_measured: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's scores and which layers they measured; default: :meth:`layer_scores` of the layers
        that have gradients. A metric that is not a gradient (e.g. ``ir``'s cosine) overrides this."""
        return self.layer_scores(per_tensor_sq, layer_ids), grad_measured

    def select(self, ctx: SelectionContext) -> Sequence[int]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The strategy's own state (beyond the engine's scores, active set and generator) that its next
        choices depend on; saved with every checkpoint. Tensors on CPU, otherwise plain Python."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (called after :meth:`setup` when a run resumes)."""
        if state:
            raise ValueError(f"strategy {self.name!r} keeps no state but was given {sorted(state)}")

    def log_fields(self) -> dict[str, Any]:
        """Extra JSON-serialisable fields for this step's row of the selection log (e.g. a calibration
        result); merged into the row of the step that just ended."""
        return {}

    def on_train_end(self, output_dir: Any) -> None:
        """Write strategy-specific artefacts (plots) into ``output_dir`` (main process only)."""


def register_strategy(cls: type[SelectionStrategy]) -> type[SelectionStrategy]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    key_types(cls.Options)  # an unsupported option type fails at import, not in a user's run
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"strategy {cls.name!r} is already registered by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def registered_strategies() -> dict[str, type[SelectionStrategy]]:
    return dict(sorted(_REGISTRY.items()))


def get_strategy_class(name: str) -> type[SelectionStrategy]:
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise StrategyConfigError(
            f"irtuning_strategy={name!r} is not a strategy; allowed: {', '.join(sorted(_REGISTRY))}"
        )
    return cls


def sample_without_replacement(n: int, k: int, generator: torch.Generator, weights: torch.Tensor | None = None) -> list[int]:
    """``k`` distinct indices of ``range(n)``, uniform or by ``weights``, from our own generator."""
    if not 0 <= k <= n:
        raise ValueError(f"cannot sample {k} of {n} layers")
    if weights is None:
        return sorted(torch.randperm(n, generator=generator)[:k].tolist())
    return sorted(torch.multinomial(weights.double(), k, replacement=False, generator=generator).tolist())
