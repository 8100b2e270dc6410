"""meaning-changed: the revision says something else than the original.

* ``negation``: a negation added or removed;
* ``number``: a number changed (number words or digits; years stay plausible years);
* ``antonym``: a word swapped for its antonym (a list written for this builder).

The real sentence is as often the revision as the original.
"""

from __future__ import annotations

import re
from typing import Callable

from irtuning_plugin.tasks.assets.revision_data.edits import DETERMINERS, WHOLE_WORD, Edit, bounded, match_case
from irtuning_plugin.tasks.assets.revision_data.lexicons import Lexicons
from irtuning_plugin.tasks.assets.revision_data.sources import WORD, Sentence

LABEL = "meaning-changed"
RULES = {"negation": 1.0, "number": 1.0, "antonym": 1.0}
EITHER_SIDE_REAL = True

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
        out.append(Edit("negation", "drop-n't", sentence, m.start(), m.end(), (match_case(m.group(1), base),), False))
    for m in _CANNOT.finditer(sentence):
        out.append(
            Edit("negation", "drop-cannot", sentence, m.start(), m.end(), (match_case(m.group(0), "can"),), False)
        )
    for m in _AUX_BARE.finditer(sentence):
        before = sentence[: m.start()].split()[-1:]
        if not before or (
            m.group(1) == "will" and before[0].lower() in DETERMINERS | {"political", "free", "good", "own"}
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
        present = {w.lower() for w in WORD.findall(sentence)}
        # not a number the sentence already has: "four or five" must not become "five or five"
        options = tuple(match_case(word, other) + plural for other in pool if other not in present)
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
    for m in WHOLE_WORD.finditer(sentence):
        word = m.group(0)
        target = _ANTONYM.get(word) or _ANTONYM.get(word.lower())
        if target is None or (word[0].isupper() and m.start() > 0 and word not in _ANTONYM):
            continue
        if word.lower() == "more" and re.match(r"\s+(?:and more|than ever)", sentence[m.end() :]):
            continue
        if re.search(bounded(target.lower()), sentence.lower()):
            continue  # "better or worse" would turn into "better or better"
        out.append(Edit("antonym", word.lower(), sentence, m.start(), m.end(), (match_case(word, target),), False))
    return out



def editor(sentences: list[Sentence], lex: Lexicons, common: set[str]) -> Callable[[Sentence], list[Edit]]:
    return lambda s: _negation_edits(s.text) + _number_edits(s.text) + _antonym_edits(s.text)
