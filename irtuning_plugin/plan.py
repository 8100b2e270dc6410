"""``irtuning plan``: what a recipe will cost on a GPU (the planner lives in ``irtuning_plugin/planner/``)."""

from __future__ import annotations

from irtuning_plugin.planner.command import add_arguments, main

__all__ = ["add_arguments", "main"]
