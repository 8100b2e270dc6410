"""A grid of cells, each trained in its own Python process, one after another.

A cell is one ``python -m benchmarks.<study> ...`` command that writes one result file. The runner:

* with ``resume``, skips a cell whose result file exists (``check`` may refuse it first, e.g. a cell of
  another recipe) and deletes the cell's ``.partial.jsonl`` (an interrupted cell's curve so far) before
  it trains that cell again from its first step; without ``resume`` every cell runs again and its new
  file replaces the old one;
* runs the cell's command with the repository root on ``PYTHONPATH`` (so ``benchmarks`` imports from
  any working directory) and the offline, untracked environment of every run;
* hands each finished cell's result to ``done`` (e.g. to append it to a ``runs.jsonl``).

A cell writes its result with ``write_cell``: to ``<name>.tmp`` first, renamed once complete, so a result
file exists only for a finished cell.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from benchmarks.harness.results import REPO


@dataclass
class Cell:
    """One cell: what it is called in the log, the result file it writes and its command-line arguments
    (after ``python -m``)."""

    label: str
    path: Path
    argv: list[str]
    partial: Path | None = field(default=None)


def cell_env(threads: int | None = None) -> dict:
    """The environment of a cell process: offline, untracked, this venv's tools first on PATH; with
    ``threads``, torch's OpenMP/MKL thread count."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1", "WANDB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false",
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
           "PYTHONPATH": os.pathsep.join(x for x in (str(REPO), os.environ.get("PYTHONPATH", "")) if x)}
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def write_cell(path: Path, result: dict) -> None:
    """Write a cell's result atomically: the file exists only once complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)


def run_cells(cells: list[Cell], *, resume: bool, threads: int | None = None,
              check: Callable[[Cell], None] | None = None,
              done: Callable[[Cell, dict], None] | None = None) -> list[Path]:
    """Run the cells in order (see the module docstring); return the result files (re)computed."""
    computed = []
    for cell in cells:
        if resume and cell.path.exists():
            if check:
                check(cell)
            print(f"skip {cell.path} (finished)", flush=True)
            continue
        cell.path.parent.mkdir(parents=True, exist_ok=True)
        if cell.partial is not None:
            cell.partial.unlink(missing_ok=True)  # an interrupted cell starts again from its first step
        print(f"cell {cell.label} -> {cell.path}", flush=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", *cell.argv], check=True, env=cell_env(threads))
        print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
        computed.append(cell.path)
        if done:
            done(cell, json.loads(cell.path.read_text()))
    return computed
