"""Config errors on Axolotl's command line: our one-line message instead of a pydantic traceback.

Axolotl validates the config with pydantic, so a refusal of ours arrives as a ``ValidationError`` whose
traceback (about 50 lines through click, Axolotl and pydantic) ends with our message. Axolotl's config
loader (``axolotl.cli.config.load_cfg``, used by every ``axolotl`` command) calls the listed plugins'
``on_config_validation_error`` while it handles a rejected config; there the plugin calls
:func:`exit_on_our_config_error`, which ends the process with our message alone (``SystemExit``: exit
status 1, no traceback). Every other error keeps Python's traceback, ``IRTUNING_FULL_TRACEBACK=1``
restores it for ours too, and ``sys.excepthook`` is never touched.
"""

from __future__ import annotations

import sys

from irtuning_plugin.engine import SelectionError
from irtuning_plugin.layer_map import LayerMapError
from irtuning_plugin.strategies.base import StrategyConfigError
from irtuning_plugin.user_input import TRACEBACK_ENV, full_traceback_wanted

__all__ = ["OURS", "TRACEBACK_ENV", "exit_on_our_config_error", "irtuning_message"]

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


def exit_on_our_config_error() -> None:
    """While an error is being handled: when it is (or wraps) one of ours, end the process with its message
    in one line, unless IRTUNING_FULL_TRACEBACK=1 asks for the traceback."""
    if full_traceback_wanted():
        return
    message = irtuning_message(sys.exc_info()[1])
    if message is not None:
        raise SystemExit(f"irtuning config error: {message}\n(set {TRACEBACK_ENV}=1 for the full traceback)")
