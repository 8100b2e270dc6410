"""One generated section of ``benchmarks/RESULTS.md``, between ``<!-- KIND:TAG:start/end -->`` markers.

Regenerating a section replaces it in place (never a second copy); a new one goes at the end of its
``## HEADING`` chapter's file, and the heading is added if the file has none yet.
"""

from __future__ import annotations

from pathlib import Path


def markers(kind: str, tag: str) -> tuple[str, str]:
    return f"<!-- {kind}:{tag}:start -->", f"<!-- {kind}:{tag}:end -->"


def replace_section(results_md: Path, kind: str, tag: str, section: str, heading: str) -> None:
    start, end = markers(kind, tag)
    results_md = Path(results_md)
    text = results_md.read_text() if results_md.exists() else "# Benchmark results\n"
    block = f"{start}\n{section}\n{end}"
    if start in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        if f"## {heading}" not in text:
            text += f"\n## {heading}\n"
        text += "\n" + block + "\n"
    results_md.write_text(text)
