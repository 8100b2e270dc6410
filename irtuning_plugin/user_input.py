"""Reading what a user hands the command line: files, recipes, numbers; every problem as one line.

``UserInputError`` is what the CLI prints as ``irtuning <command>: error: <message>`` (exit 2) instead of a
traceback; :func:`user_error_message` also recognises the project's own error types and the usual user
errors (a missing path, bad YAML, bad encoding) raised anywhere below a command.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from types import TracebackType
from typing import Any, Callable

TRACEBACK_ENV = "IRTUNING_FULL_TRACEBACK"
SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed's range
NUMPY_SEED_MAX = 2**32 - 1  # numpy's RandomState (transformers.set_seed seeds numpy too)
_PACKAGE_DIR = str(Path(__file__).resolve().parent) + os.sep
# A Hugging Face hub id: "name" or "namespace/name" (letters, digits, - _ .), never a path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class UserInputError(ValueError):
    """A user's file, folder or value that cannot be used (one line, naming it)."""


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """A UTF-8 text file, or one line naming the file and what is wrong."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserInputError(f"{what} {str(path)!r} not found")
    if p.is_dir():
        raise UserInputError(f"{what} {str(path)!r} is a folder, not a file")
    return decode_utf8(p.read_bytes(), lambda line, at: UserInputError(
        f"{what} {str(path)!r} is not UTF-8 text (byte {at}, line {line}): save it as UTF-8"))


def decode_utf8(data: bytes, error: Callable[[int, int], Exception], *, allow_bom: bool = False) -> str:
    """``data`` as UTF-8 text; a byte that is not UTF-8 raises ``error(line, offset)`` (line counted from 1)."""
    try:
        return data.decode("utf-8-sig" if allow_bom else "utf-8")
    except UnicodeDecodeError as err:
        raise error(data[:err.start].count(b"\n") + 1, err.start) from None


def read_yaml_mapping(path: str | os.PathLike, what: str = "recipe") -> dict[str, Any]:
    """A YAML file whose top level is a mapping (a recipe), or one line naming the file and the line."""
    import yaml

    text = read_text(path, what)
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserInputError(f"{what} {str(path)!r} is not valid YAML{where}: {problem}") from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise UserInputError(f"{what} {str(path)!r} must be a YAML mapping of keys to values, not a "
                             f"{type(cfg).__name__}")
    return cfg


def read_jsonl(path: str | os.PathLike, what: str = "file") -> list[dict]:
    """One JSON object per line; a bad line is named by its number."""
    rows = []
    for number, line in enumerate(read_text(path, what).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise UserInputError(f"{what} {str(path)!r}, line {number}: not JSON ({err.msg}); the file is truncated "
                                 f"or corrupt") from None
        if not isinstance(row, dict):
            raise UserInputError(f"{what} {str(path)!r}, line {number}: a JSON object per line expected")
        rows.append(row)
    return rows


def existing_dir(path: str | os.PathLike, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise UserInputError(f"{what} {str(path)!r} not found")
    if not p.is_dir():
        raise UserInputError(f"{what} {str(path)!r} is a file, not a folder")
    return p


def looks_like_hub_id(value: str) -> bool:
    return bool(_HUB_ID.fullmatch(value)) and not value.startswith(".")


def model_location(value: str, what: str = "--model", resolve: Callable[[str], str] | None = None) -> str:
    """A local model folder, an ``irtuning://`` reference, or a hub id (left to transformers); a path that
    does not exist is named here instead of reaching the hub client as a malformed repo id. A reference goes
    through ``resolve`` (the task commands pass one that builds the asset on first use); by default it must
    be built already."""
    from irtuning_plugin.references import SCHEME, built_path

    resolve_reference = resolve or built_path
    if value.startswith(SCHEME):
        try:
            return resolve_reference(value)
        except ValueError as err:
            raise UserInputError(f"{what}: {err}") from None
    if Path(value).expanduser().exists():
        return str(existing_dir(value, what))
    if looks_like_hub_id(value):
        return value
    raise UserInputError(f"{what} {value!r}: no such folder (and not a hub id such as org/name or an irtuning:// "
                         f"reference)")


def int_at_least(low: int, high: int | None = None, meaning: str = "") -> Any:
    """An argparse type: a whole number in [low, high]; the message says what is allowed."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            allowed = f">= {low}" if high is None else f"{low}..{high}"
            raise argparse.ArgumentTypeError(f"{value} is out of range; allowed: {allowed}{meaning}")
        return value

    parse.__name__ = "int"
    return parse


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is out of range; allowed: a finite number > 0")
    return value


positive_float.__name__ = "float"


def _raised_in_package(tb: TracebackType | None) -> bool:
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    return last is not None and os.path.abspath(last.tb_frame.f_code.co_filename).startswith(_PACKAGE_DIR)


def user_error_message(exc: BaseException) -> str | None:
    """One line for an error a user can fix, or None for a bug (which keeps its traceback).

    A user error is: an error type of this project; a ValueError/RuntimeError raised by this package's own
    code (its deliberate refusals); a missing/unreadable path (OSError); bad YAML; bad text encoding.
    """
    try:
        import yaml

        yaml_error: tuple[type, ...] = (yaml.YAMLError,)
    except ImportError:  # pragma: no cover
        yaml_error = ()
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        module = type(exc).__module__ or ""
        if module.startswith(("irtuning_plugin", "irtuning_kernels")) and isinstance(exc, (ValueError, RuntimeError)):
            return _one_line(exc)
        if isinstance(exc, (ValueError, RuntimeError)) and type(exc) in (ValueError, RuntimeError) \
                and _raised_in_package(exc.__traceback__):
            return _one_line(exc)
        if isinstance(exc, OSError) and not isinstance(exc, (ConnectionError, TimeoutError)):
            return _one_line(exc)
        if isinstance(exc, yaml_error + (UnicodeDecodeError,)):
            return _one_line(exc)
        exc = exc.__cause__ or exc.__context__
    return None


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return " ".join(lines) if lines else type(exc).__name__


def full_traceback_wanted() -> bool:
    return os.environ.get(TRACEBACK_ENV) == "1"
