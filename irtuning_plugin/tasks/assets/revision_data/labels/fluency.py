"""fluency: the revision fixes a spelling or grammar slip that the original has.

* ``codespell-misspelling``: a correct word swapped for one of its misspellings from ``codespell``'s
  dictionary (real words of the corpus are never used as "misspellings");
* ``subject-verb-agreement``: a pronoun's verb put in the wrong number ("he are").
"""

from __future__ import annotations

import re
from typing import Callable

from irtuning_plugin.tasks.assets.revision_data.edits import WHOLE_WORD, Edit, match_case
from irtuning_plugin.tasks.assets.revision_data.lexicons import Lexicons
from irtuning_plugin.tasks.assets.revision_data.sources import Sentence

LABEL = "fluency"
# rule -> relative weight: rules are used in proportion to their weights where they apply
RULES = {"codespell-misspelling": 3.0, "subject-verb-agreement": 1.0}


class _Misspeller:
    def __init__(self, table: dict[str, list[str]]):
        self.table = {k: tuple(v) for k, v in table.items()}

    def edits(self, sentence: str) -> list[Edit]:
        out = []
        for m in WHOLE_WORD.finditer(sentence):
            word = m.group(0)
            wrongs = self.table.get(word)
            if wrongs is None and m.start() == 0 and word[1:].islower():
                wrongs = self.table.get(word.lower())
                wrongs = tuple(match_case(word, w) for w in wrongs) if wrongs else None
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
                (match_case(verb, wrong),),
            )
        )
    return out



def editor(sentences: list[Sentence], lex: Lexicons, common: set[str]) -> Callable[[Sentence], list[Edit]]:
    misspeller = _Misspeller(lex.misspellings)
    return lambda s: misspeller.edits(s.text) + _agreement_edits(s.text)
