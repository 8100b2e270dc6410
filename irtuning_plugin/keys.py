"""Configuration keys and their types: what each ``irtuning_*`` key accepts, checked in one place.

A key is a dataclass field made with :func:`option` (its help text reaches the Axolotl args model and the
key table in docs/keys.md). Its accepted values come from the field's annotation (:class:`KeyType`), so
``SelectionConfig`` and every strategy's options dataclass are typed the same way, once. Strategy options
are built and checked by :func:`make_options`: types here, then the options' own ``check`` for the rules
that span fields or depend on the layer count.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal


class StrategyConfigError(ValueError):
    """A configuration key (an engine key or a strategy option) has a value that cannot be used."""


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


def option_fields(cls: type) -> list[dataclasses.Field]:
    """The option fields of a strategy class (``cls.Options``)."""
    return list(dataclasses.fields(cls.Options))


def make_options(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Build and check ``cls.Options`` of a strategy class from ``values`` (unset/None keys keep their
    defaults): unknown keys and wrong types are refused here, then ``Options.check`` applies the rules that
    span fields (no layer count is known yet)."""
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
