"""style: the revision uses the preferred, formal or US form of a word.

* ``needless-variant``: ``proselint``'s needless variants ("epical" -> "epic");
* ``informal-register``: ``codespell``'s informal spellings ("gonna" -> "going to"), where the
  informal form reads naturally;
* ``british-spelling``: ``codespell``'s British spellings ("colour" -> "color").
"""

from __future__ import annotations

from typing import Callable

from irtuning_plugin.tasks.assets.revision_data.edits import DETERMINERS, Edit, PhraseLexicon
from irtuning_plugin.tasks.assets.revision_data.lexicons import Lexicons
from irtuning_plugin.tasks.assets.revision_data.sources import Sentence

LABEL = "style"
RULES = {"needless-variant": 2.0, "informal-register": 2.0, "british-spelling": 1.0}

_INFORMAL_SKIP = frozenset({"natch", "tho", "innit", "biggie", "ain't"})  # odd or ambiguous informal forms
# US words whose British spelling holds for one sense only ("storey" is a floor, "practise" the verb)
_BRITISH_SKIP = frozenset(
    "story stories practice practices license licenses meter meters tire tires check checks curb curbs "
    "draft drafts ton tons jail jails program programs".split()
)
# needless variants of another part of speech than the common word's usual one ("channel" the noun)
_VARIANT_SKIP = frozenset(
    {"channel", "accused", "review", "revolt", "oversize", "discriminating", "acquaintance", "disquiet"}
)


def _register_fits(key: str, sentence: str, start: int, end: int) -> bool:
    """Whether codespell's informal spelling of ``key`` reads naturally at this spot."""
    before = sentence[:start].split()[-1:]
    after = sentence[end:].split()[:1]
    prev = before[0].lower() if before else ""
    nxt = after[0].lower().strip(",.!?") if after else ""
    if key in ("going to", "want to"):  # "going to the store" cannot become "gonna the store"
        return bool(after) and after[0].islower() and nxt not in DETERMINERS
    if key == "got to":  # "I got to know him" is not "I gotta know him"
        return prev.endswith(("'ve", "'s")) or prev in ("have", "has")
    if key in ("kind of", "sort of"):  # the noun use ("a kind of place") has no informal spelling
        return bool(prev) and prev not in DETERMINERS and prev not in ("of", "all")
    return True



def editor(sentences: list[Sentence], lex: Lexicons, common: set[str]) -> Callable[[Sentence], list[Edit]]:
    informal = {}
    for standard, spellings in lex.informal.items():
        kept = [w for w in spellings if w not in _INFORMAL_SKIP]
        if kept:
            informal[standard] = kept
    british = {k: v for k, v in lex.british.items() if k not in _BRITISH_SKIP}
    variants = PhraseLexicon("needless-variant", lex.needless_variant, check_fit=False, skip=_VARIANT_SKIP)
    register = PhraseLexicon("informal-register", informal, check_fit=False, guard=_register_fits)
    british_lex = PhraseLexicon("british-spelling", british, check_fit=False)
    return lambda s: variants.edits(s.text) + register.edits(s.text) + british_lex.edits(s.text)
