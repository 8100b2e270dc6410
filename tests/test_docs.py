"""The documentation: a short README that links to docs/, and no link that leads nowhere.

Checks every relative link (and image) in README.md and docs/*.md: the file it names exists, and an
``#anchor`` into a Markdown file matches one of that file's headings (GitHub's heading ids). Links inside
fenced code blocks and to other sites are not links to check.
"""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [REPO / "README.md", *DOCS]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
README_MAX_LINES = 210


def _prose(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def _anchors(page: Path) -> set[str]:
    """GitHub's ids of a Markdown file's headings: lower case, punctuation dropped, spaces to hyphens,
    a repeated id numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    ids = set()
    for line in _prose(page.read_text(encoding="utf-8")):
        m = re.match(r"#{1,6} +(.*?) *#* *$", line)
        if not m:
            continue
        base = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
        n = seen.get(base, 0)
        seen[base] = n + 1
        ids.add(base if n == 0 else f"{base}-{n}")
    return ids


def _relative_links(page: Path) -> list[str]:
    links = []
    for line in _prose(page.read_text(encoding="utf-8")):
        links += [t for t in LINK.findall(line) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]
    return links


def test_the_docs_folder_exists_and_readme_links_every_page():
    assert DOCS, "docs/*.md not found"
    readme_links = {(REPO / t.split("#", 1)[0]).resolve() for t in _relative_links(REPO / "README.md")}
    orphans = [p.name for p in DOCS if p.resolve() not in readme_links]
    assert not orphans, f"docs pages the README does not link to: {orphans}"


def test_readme_is_short():
    n = len((REPO / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; at most {README_MAX_LINES} (move detail to docs/)"


def _broken_links(page: Path, root: Path = REPO) -> list[str]:
    broken = []
    for target in _relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading with id {anchor!r} in {dest.relative_to(root.resolve())})")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_every_relative_link_resolves(page):
    broken = _broken_links(page)
    assert not broken, f"{page.relative_to(REPO)}: broken links: {broken}"


def test_the_checker_finds_a_broken_file_and_a_broken_anchor(tmp_path):
    (tmp_path / "a.md").write_text("# Title: one, `two`\n\n## Same\n\n## Same\n\n```\n# not a heading\n[x](gone.md)\n```\n")
    page = tmp_path / "b.md"
    page.write_text("[ok](a.md#title-one-two) [ok](a.md#same-1) [bad](a.md#not-a-heading) [gone](c.md) "
                    "[web](https://example.org/x.md) ![img](a.md)\n")
    assert _anchors(tmp_path / "a.md") == {"title-one-two", "same", "same-1"}
    assert _relative_links(tmp_path / "a.md") == []
    assert _broken_links(page, tmp_path) == ["a.md#not-a-heading (no heading with id 'not-a-heading' in a.md)",
                                             "c.md (no such file)"]
