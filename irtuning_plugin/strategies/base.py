"""The strategy interface and the registry that maps a name to a strategy class.

A strategy is one module: an options dataclass (every field documented, checked in ``check``) and a
class with ``select``. The engine owns the parameters, the scores and the optimizer side; a strategy
only answers "which layers train in the next optimizer step".
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Sequence

import torch

if TYPE_CHECKING:  # pragma: no cover
    from irtuning_plugin.strategies.runtime import StrategyRuntime

SENTINEL_SCORE = 1000.0  # the reference's "never measured" score, also used for NaN/inf norms

_REGISTRY: dict[str, type["SelectionStrategy"]] = {}


class StrategyConfigError(ValueError):
    """A strategy option has a value the strategy cannot use."""


@dataclass
class NoOptions:
    def check(self, prefix: str, num_layers: int | None = None) -> None:  # noqa: D401 - nothing to check
        return None


def option(default: Any, help: str, **kwargs) -> Any:  # noqa: A002 - mirrors argparse
    """A documented strategy option (the help text reaches the Axolotl args model and the key table in docs/keys.md).

    Its type is the field's annotation (see :class:`KeyType`); ``choices=(...)`` on a ``str`` field
    makes it a choice of those strings.
    """
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


# ---- key types ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KeyType:
    """The values one key accepts, read from its dataclass annotation.

    Supported: ``int``, ``float`` (an int is accepted too), ``bool``, ``str`` (non-empty), ``list[int]``,
    ``Literal["a", "b"]`` (or ``str`` with ``choices=``), and unions of them, e.g. ``int | Literal["salf"]``
    for "a layer count or the word salf". ``None`` only means "unset". Checking is strict, as YAML gives
    real types: ``'2'`` is not a number, ``2.5`` is not a whole number, ``1`` is not ``true``.
    """

    ints: bool = False
    floats: bool = False
    bools: bool = False
    strings: bool = False
    int_lists: bool = False
    choices: tuple[str, ...] = ()
    # inclusive bounds of a number (field metadata ``minimum=`` / ``maximum=``), for values that reach an
    # API with a range of its own (a seed reaches torch.Generator.manual_seed)
    minimum: int | float | None = None
    maximum: int | float | None = None

    @classmethod
    def from_field(cls, f: dataclasses.Field, annotation: Any) -> "KeyType":
        kw: dict[str, Any] = {}
        choices: list[str] = []
        for t in _union_members(annotation):
            if t is type(None):
                continue
            origin = typing.get_origin(t)
            if t is bool:
                kw["bools"] = True
            elif t is int:
                kw["ints"] = True
            elif t is float:
                kw["floats"] = True
            elif t is str:
                if f.metadata.get("choices"):
                    choices.extend(f.metadata["choices"])
                else:
                    kw["strings"] = True
            elif origin is Literal:
                choices.extend(typing.get_args(t))
            elif origin is list and typing.get_args(t) == (int,):
                kw["int_lists"] = True
            else:
                raise TypeError(f"key {f.name!r}: annotation {annotation!r} is not a supported key type")
        if not all(isinstance(c, str) for c in choices):
            raise TypeError(f"key {f.name!r}: choices must be strings, got {choices!r}")
        return cls(**kw, choices=tuple(dict.fromkeys(choices)), minimum=f.metadata.get("minimum"),
                   maximum=f.metadata.get("maximum"))

    def describe(self) -> str:
        parts = []
        if self.ints and not self.floats:
            parts.append("a whole number" + self._range())
        if self.floats:
            parts.append("a number" + self._range())
        if self.bools:
            parts.append("true or false")
        if self.int_lists:
            parts.append("a list of whole numbers")
        if self.strings:
            parts.append("a non-empty string")
        if self.choices:
            parts.append(self.choices[0] if len(self.choices) == 1 else "one of " + ", ".join(self.choices))
        return " or ".join(parts)

    def _range(self) -> str:
        if self.minimum is None and self.maximum is None:
            return ""
        if self.maximum is None:
            return f" >= {self.minimum}"
        if self.minimum is None:
            return f" <= {self.maximum}"
        return f" in {self.minimum}..{self.maximum}"

    def _in_range(self, value: int | float) -> bool:
        return ((self.minimum is None or value >= self.minimum)
                and (self.maximum is None or value <= self.maximum))

    def accepts(self, value: Any) -> bool:
        if value is None:
            return True
        if isinstance(value, bool):
            return self.bools
        if isinstance(value, int):
            return (self.ints or self.floats) and self._in_range(value)
        if isinstance(value, float):
            return self.floats and math.isfinite(value) and self._in_range(value)
        if isinstance(value, str):
            return value in self.choices or (self.strings and bool(value.strip()))
        if isinstance(value, (list, tuple)):
            return self.int_lists and all(isinstance(i, int) and not isinstance(i, bool) for i in value)
        return False

    def check(self, key: str, value: Any) -> None:
        """Raise a one-line :class:`StrategyConfigError` naming ``key`` unless ``value`` has this type."""
        if self.accepts(value):
            return
        only_choices = self.choices and not (self.ints or self.floats or self.bools or self.strings or self.int_lists)
        if only_choices:
            raise StrategyConfigError(f"{key}={value!r}; allowed: {', '.join(self.choices)}")
        if isinstance(value, float) and self.floats and not math.isfinite(value):
            raise StrategyConfigError(f"{key}={value!r}; must be a finite number")
        raise StrategyConfigError(f"{key}={value!r}; must be {self.describe()}{self._hint(value)}")

    def _hint(self, value: Any) -> str:
        if isinstance(value, str):
            text = value.strip()
            if self.bools and text.lower() in ("true", "false"):
                return f" (write {text.lower()} without quotes)"
            for wanted, parse in ((self.ints, int), (self.floats, float)):
                try:
                    if wanted and math.isfinite(parse(text)):
                        return f" (write {text} without quotes)"
                except ValueError:
                    pass
        if isinstance(value, float) and self.ints and not self.floats:
            return ", not a fraction"
        if isinstance(value, (list, tuple)) and self.int_lists:
            bad = next(i for i in value if isinstance(i, bool) or not isinstance(i, int))
            return f" ({bad!r} is not a whole number)"
        return ""

    def pydantic_annotation(self) -> Any:
        """The same type for a pydantic model (strict: no '2' -> 2 coercion)."""
        from pydantic import AllowInfNan, Strict, StrictBool, StrictInt, StringConstraints

        members: list[Any] = []
        if self.ints or self.floats:
            members.append(StrictInt)
        if self.floats:
            members.append(typing.Annotated[float, Strict(), AllowInfNan(False)])
        if self.bools:
            members.append(StrictBool)
        if self.int_lists:
            members.append(list[StrictInt])
        if self.strings:
            members.append(typing.Annotated[str, StringConstraints(strict=True, min_length=1)])
        if self.choices:
            members.append(Literal[self.choices])
        return typing.Optional[typing.Union[tuple(members)]]


def _union_members(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(m for a in typing.get_args(annotation) for m in _union_members(a))
    return (annotation,)


@functools.lru_cache(maxsize=None)
def key_types(options_cls: type) -> dict[str, KeyType]:
    """Field name -> :class:`KeyType` of a dataclass of keys (a strategy's options, SelectionConfig); fields
    without a help text are not user keys and are left out."""
    hints = typing.get_type_hints(options_cls)
    return {f.name: KeyType.from_field(f, hints[f.name]) for f in dataclasses.fields(options_cls)
            if "help" in f.metadata}


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


def option_fields(cls: type[SelectionStrategy]) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls.Options))


def make_options(cls: type[SelectionStrategy], values: dict[str, Any], prefix: str) -> Any:
    """Build and check ``cls.Options`` from ``values`` (unset/None keys keep their defaults)."""
    known = {f.name for f in option_fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        allowed = ", ".join(prefix + k for k in sorted(known)) or "none"
        raise StrategyConfigError(f"{prefix}{unknown[0]} is not an option of strategy {cls.name!r}; its options: {allowed}")
    types_ = key_types(cls.Options)
    for name, value in values.items():
        types_[name].check(prefix + name, value)
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
