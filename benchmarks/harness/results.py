"""The generated sections of ``benchmarks/RESULTS.md`` (and of a study's own tables file).

A section sits between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``; regenerating it replaces it
in place (never a second copy); a new one goes at the end of the file, under ``## HEADING`` if the file
has no such heading yet. A section whose tables come out the same as the text already there is left
untouched, so regenerating unchanged cells on a later day does not move its "Generated <date>" line.

Inside ``collecting()`` nothing is written: the files' new texts are kept in memory (for a check that
the committed text is what the committed cells give), and figures are not drawn to disk.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent
RESULTS_MD = BENCHMARKS / "RESULTS.md"
REPO = BENCHMARKS.parent
_DATE = re.compile(r"\bGenerated \d{4}-\d{2}-\d{2}\b")
_collected: dict[Path, str] | None = None


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def _undated(text: str) -> str:
    return _DATE.sub("Generated <date>", text)


@contextlib.contextmanager
def collecting():
    """Keep every file's new text in the dict yielded (resolved path -> text) instead of writing it."""
    global _collected
    before, _collected = _collected, {}
    try:
        yield _collected
    finally:
        _collected = before


def _read(path: Path) -> str | None:
    path = Path(path).resolve()
    if _collected is not None and path in _collected:
        return _collected[path]
    return path.read_text() if path.exists() else None


def read_section(path: Path, name: str) -> str | None:
    """The text between a section's markers (None: the file or the section does not exist)."""
    start, end = markers(name)
    text = _read(path) or ""
    if start not in text:
        return None
    return text.split(start, 1)[1].split(end, 1)[0].removeprefix("\n").removesuffix("\n")


def replace_section(path: Path, name: str, section: str, heading: str | None = None,
                    title: str = "# Benchmark results") -> bool:
    """Write ``section`` between the markers of ``name`` in ``path``; return whether the file changed.

    ``heading``: the ``## HEADING`` a new section goes under; ``title``: the first line of a new file."""
    start, end = markers(name)
    text = _read(path) or title + "\n"
    old = read_section(path, name)
    if old is not None and _undated(old) == _undated(section):
        return False
    block = f"{start}\n{section}\n{end}"
    if old is not None:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        if heading and f"## {heading}" not in text:
            text += f"\n## {heading}\n"
        text += "\n" + block + "\n"
    if _collected is not None:
        _collected[Path(path).resolve()] = text
    else:
        Path(path).write_text(text)
    return True


def save_figure(fig, path: Path, dpi: int) -> None:
    """Save a study's figure and close it (inside ``collecting()``: close it only)."""
    import matplotlib.pyplot as plt

    if _collected is None:
        fig.savefig(path, dpi=dpi)
    plt.close(fig)


def host() -> dict:
    """The machine a report is generated on (what a report says where its cells did not record it)."""
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}


def code_span(text: str) -> str:
    """Markdown inline code that survives backticks inside ``text`` (e.g. a quoted --remaining)."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"
