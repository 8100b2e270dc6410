"""coherence: the connective that links a sentence to the one before it in its document.

* ``connective-restored``: the author's connective left out; the revision puts it back;
* ``connective-swapped``: a connective of another relation in its place; the revision restores it;
* ``connective-dropped``: a spurious connective added; the revision drops it.

Both sentences go into the pair (so that the link can be judged); the builder reserves the earlier
one too, so no other pair uses it.
"""

from __future__ import annotations

import re
from typing import Callable

from irtuning_plugin.tasks.assets.revision_data.edits import Edit
from irtuning_plugin.tasks.assets.revision_data.lexicons import Lexicons
from irtuning_plugin.tasks.assets.revision_data.sources import WORD, Sentence

LABEL = "coherence"
RULES = {"connective-restored": 1.0, "connective-swapped": 1.0, "connective-dropped": 1.0}
USES_PREVIOUS_SENTENCE = True

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
    first = WORD.match(text)
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
    head = WORD.match(second)
    return [Edit("connective-dropped", head.group(0).lower() if head else "", text, at, len(text), options)]


_NO_SPURIOUS = re.compile(
    r"^(?:[A-Z][a-z]*ly|Now|Then|Today|Tonight|When|If|While|Because|Although|Though|After|Before|Since|Unless|"
    r"Yes|No|Well|Oh|Or|Nor|For|Plus|Even|Only|Just|Not|Like|Unlike|As|Otherwise|Hence|Whereas|Until|Once)\b"
)



def editor(sentences: list[Sentence], lex: Lexicons, common: set[str]) -> Callable[[Sentence], list[Edit]]:
    def edits(s: Sentence) -> list[Edit]:
        return _coherence_edits(sentences[s.prev].text, s.text, common) if s.prev is not None else []

    return edits
