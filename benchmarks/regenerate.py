"""Regenerate every generated section of ``benchmarks/RESULTS.md`` (and the cost study's issue-40 tables
file) and their figures from the committed cells, or (``--check``) only say whether that reproduces the
committed text::

    python -m benchmarks.regenerate            # rewrite the sections whose tables changed, redraw the figures
    python -m benchmarks.regenerate --check    # write nothing; exit 1 and show each section that differs
    python -m benchmarks.regenerate --no-figures   # rewrite the sections only

The commands are the studies' own ``--report`` runs. A convergence section's command is the one its
"Regenerate:" line prints, so a grid section added later is covered without an edit here. A section
whose tables come out unchanged keeps its "Generated <date>" line (``benchmarks.harness.results``).
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shlex
import sys
from pathlib import Path

from benchmarks.harness import results

STRATEGIES_TITLE = "CPU (2 threads, AMD EPYC 2 cores), SmolLM2-135M-Instruct, LoRA r=32 on q,k,v,up,down"
ISSUE40_TABLES = "benchmarks/results/costs-smollm2-issue40/tables.md"
FIXED = [
    "python -m benchmarks.run_comparison --out benchmarks/results/cpu-smollm2 --report --title "
    + shlex.quote(STRATEGIES_TITLE),
    "python -m benchmarks.cost_table --out benchmarks/results/costs-smollm2 --report",
    f"python -m benchmarks.cost_table --out benchmarks/results/costs-smollm2-issue40 --results-md {ISSUE40_TABLES} "
    "--report",
    "python -m benchmarks.salf_analysis --out benchmarks/results/salf-smollm2.json --report",
    "python -m benchmarks.decision_table --report",
]
_REGENERATE = re.compile(r"^Regenerate: (?:`` (.+) ``|`([^`]+)`)$", re.M)


def commands(results_md: Path = results.RESULTS_MD) -> list[str]:
    """Every section's command: the fixed ones, then each convergence section's "Regenerate:" line."""
    text = Path(results_md).read_text()
    found = []
    for name in re.findall(r"<!-- (convergence:[^ ]+):start -->", text):
        m = _REGENERATE.search(results.read_section(results_md, name) or "")
        if not m:
            raise SystemExit(f"{results_md}: section {name} has no 'Regenerate: `...`' line")
        found.append(m.group(1) or m.group(2))
    return FIXED + found


def run(command: str) -> None:
    """Run one ``python -m benchmarks.<study> ...`` command in this process."""
    import importlib

    argv = shlex.split(command)
    if argv[:2] != ["python", "-m"] or not argv[2].startswith("benchmarks."):
        raise SystemExit(f"not a study command: {command}")
    module = importlib.import_module(argv[2])
    if module.main(argv[3:]):
        raise SystemExit(f"failed: {command}")


def regenerated() -> dict[Path, str]:
    """The new text of every file whose sections change (nothing written, no figure drawn)."""
    with results.collecting() as files:
        for command in commands():
            run(command)
    return files


def check() -> list[str]:
    """The differences (unified diffs) between the committed files and what the commands give."""
    files = regenerated()
    return ["".join(difflib.unified_diff(path.read_text().splitlines(True), text.splitlines(True),
                                         str(path), "regenerated"))
            for path, text in files.items() if path.read_text() != text]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a section would change")
    p.add_argument("--no-figures", action="store_true", help="rewrite the sections, leave the figures as they are")
    a = p.parse_args(argv)
    os.chdir(results.REPO)  # the commands name their folders from the repository root
    if a.check:
        diffs = check()
        sys.stdout.write("".join(diffs))
        print("regenerated sections differ from the committed text" if diffs else
              "every generated section is what the committed cells give")
        return 1 if diffs else 0
    if a.no_figures:
        for path, text in regenerated().items():
            print(f"rewrote {path}")
            path.write_text(text)
        return 0
    for command in commands():
        print(command, flush=True)
        run(command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
