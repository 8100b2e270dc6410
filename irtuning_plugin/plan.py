"""``irtuning plan``: what a recipe will cost on a GPU (placeholder; being written)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", help="an Axolotl or LLaMA-Factory recipe")


def main(args: argparse.Namespace) -> int:
    raise NotImplementedError("irtuning plan is not written yet")
