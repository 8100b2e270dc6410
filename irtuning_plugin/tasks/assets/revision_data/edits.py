"""What an edit is, and the helpers that more than one label's rules share.

A label's rules (``labels/<label>.py``) turn a real sentence into candidate :class:`Edit` objects;
:class:`PhraseLexicon` is the phrase matcher behind clarity's and style's lexicon rules.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterator

# what may follow a phrase-final expansion ("plan." -> "plan ahead.")
PHRASE_END = re.compile(r"^\s*(?:[,.!?;:]|$)")


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


def match_case(source: str, repl: str) -> str:
    if len(source) > 1 and source.isupper() and not repl.isupper():
        return repl.upper() if len(repl) <= 4 else repl
    if source[:1].isupper():
        return repl[:1].upper() + repl[1:]
    return repl


_HEAD = re.compile(r"[a-z]+")
_WORD_START = re.compile(r"(?<![\w'-])[a-z]+")
_WORD_CHAR = re.compile(r"[\w'-]")
WHOLE_WORD = re.compile(r"(?<![\w'-])[A-Za-z]+(?![\w'-])")
_DOUBLED = re.compile(r"\b(\w+) \1\b", re.I)


def bounded(phrase: str) -> str:
    return r"(?<![\w'-])" + re.escape(phrase) + r"(?![\w'-])"


SUBJECTS = frozenset("i you he she it we they who".split())
# words after which a noun-or-verb word ("plans", "share", "end") is most likely the verb
BEFORE_VERB = SUBJECTS | frozenset(
    "to will would can could should must may might do does did not never also just "
    "i'll we'll you'll they'll he'll she'll i'd we'd you'd they'd he'd she'd".split()
)


def prev_word(sentence: str, start: int) -> str:
    before = sentence[:start].split()
    return before[-1].lower().strip(",;:\"'") if before else ""


class PhraseLexicon:
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
        if not re.search(bounded(c), w):  # a paraphrase of the same part of speech: "did not remember"
            return True
        if w.endswith(" " + c):  # a modifier in front ("past history", "each and every"), not before a verb
            return prev_word(sentence, start) not in BEFORE_VERB
        if w.startswith(c + " "):
            tail = w[len(c) + 1 :].split()
            nxt = sentence[end:].split()[:1]
            if len(tail) == 1 and re.search(r"(?:ly|self|selves)$", tail[0]):  # "could possibly", "I myself"
                return True
            if tail[-1] in ("of", "that") and not (nxt and nxt[0].lower().strip(",.") in ("of", "that", "to")):
                return True  # "during the course of", "because of the fact that"
        return bool(PHRASE_END.match(sentence[end:]))  # other shapes only where a phrase ends

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
                spot = re.search(bounded(found.lower()), wordy.lower())
                if spot:  # keep the sentence's own spelling of the shared words ("I", "ATM")
                    new = wordy[: spot.start()] + found + wordy[spot.end() :]
                    new = match_case(found, new) if spot.start() > 0 else new
                else:
                    new = match_case(found, wordy)
                new = re.sub(r"(?<![\w'-])i(?![\w'-])", "I", new)
                altered = sentence[:start] + new + sentence[end:]
                if doubled is None:
                    doubled = len(_DOUBLED.findall(sentence))
                if new != found and len(_DOUBLED.findall(altered)) <= doubled:
                    options.append(new)
            if options:
                out.append(Edit(self.rule, found.lower(), sentence, start, end, tuple(options)))
        return out



DETERMINERS = frozenset(
    "a an the this that these those my your his her its our their some any every what which no each another one".split()
)

