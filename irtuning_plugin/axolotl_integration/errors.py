"""Config errors on Axolotl's command line: our one-line message instead of a pydantic traceback.

Axolotl validates the config with pydantic, so a refusal of ours arrives as a ``ValidationError`` whose
traceback (about 50 lines through click, Axolotl and pydantic) ends with our message. The hook installed
here prints only that message, for uncaught errors of ours; every other error keeps Python's traceback,
and ``IRTUNING_FULL_TRACEBACK=1`` restores it for ours too. The exit status stays 1.
"""

from __future__ import annotations

import os
import sys

from irtuning_plugin.engine import SelectionError
from irtuning_plugin.layer_map import LayerMapError
from irtuning_plugin.strategies.base import StrategyConfigError

TRACEBACK_ENV = "IRTUNING_FULL_TRACEBACK"
OURS = (StrategyConfigError, LayerMapError, SelectionError)


def irtuning_message(exc: BaseException | None) -> str | None:
    """The message of our error inside ``exc`` (ours, or a pydantic ValidationError raised from ours)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OURS):
            return str(exc)
        if type(exc).__name__ == "ValidationError" and callable(getattr(exc, "errors", None)):
            for item in exc.errors():
                inner = (item.get("ctx") or {}).get("error")
                if isinstance(inner, OURS):
                    return str(inner)
        exc = exc.__cause__ or exc.__context__
    return None


def install_concise_config_errors() -> None:
    """Wrap ``sys.excepthook`` once per process (no-op with IRTUNING_FULL_TRACEBACK=1)."""
    if os.environ.get(TRACEBACK_ENV) == "1" or getattr(sys.excepthook, "irtuning", False):
        return
    previous = sys.excepthook

    def excepthook(etype, value, tb):
        message = irtuning_message(value)
        if message is None:
            return previous(etype, value, tb)
        sys.stderr.write(f"irtuning config error: {message}\n(set {TRACEBACK_ENV}=1 for the full traceback)\n")
        sys.stderr.flush()
        return None

    excepthook.irtuning = True  # type: ignore[attr-defined]
    sys.excepthook = excepthook
