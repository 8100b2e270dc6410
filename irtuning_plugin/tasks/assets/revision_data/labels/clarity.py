"""clarity: the revision is the concise form of a wordy original.

* ``redundancy``: a concise phrase blown up into the wordy form that ``proselint``'s redundancy
  lists flag ("past history", "each and every");
* ``positive-form``: Strunk's "put statements in positive form" undone ("did not remember" for
  "forgot"), only where the grammar allows it.
"""

from __future__ import annotations

import re
from typing import Callable

from irtuning_plugin.tasks.assets.revision_data.edits import (
    DETERMINERS,
    PHRASE_END,
    SUBJECTS,
    Edit,
    PhraseLexicon,
    prev_word,
)
from irtuning_plugin.tasks.assets.revision_data.lexicons import Lexicons
from irtuning_plugin.tasks.assets.revision_data.sources import Sentence

LABEL = "clarity"
RULES = {"redundancy": 3.0, "positive-form": 1.0}

# Strunk-style rewrites that only work in the sentence they were written for ("he" -> "he is a man who")
_POSITIVE_SKIP = frozenset({"he", "because", "whether", "fail", "no doubt", "this subject", "strange."})


def _positive_fits(key: str, sentence: str, start: int, end: int) -> bool:
    """Where Strunk's "put statements in positive form" pairs can be undone without breaking the grammar."""
    prev = prev_word(sentence, start)
    nxt = sentence[end:].split()[:1]
    if key == "failed":  # "we failed." -> "we did not succeed.", but not "failed the test" / "failed to"
        return prev in SUBJECTS and bool(PHRASE_END.match(sentence[end:]))
    if key in ("forgot", "ignored", "distrusted"):  # only the past-tense verb right after its subject
        return prev in SUBJECTS
    if key in ("dishonest", "unimportant"):  # only the predicate adjective: "is dishonest" -> "is not honest"
        return prev in ("is", "are", "was", "were", "be", "been", "seem", "seems", "seemed")
    if key == "hastily":  # modifying a verb, not a participle ("a hastily mounted production")
        return prev not in DETERMINERS and prev != "and" and not (nxt and re.search(r"(?:ed|en)\W*$", nxt[0]))
    return False



def editor(sentences: list[Sentence], lex: Lexicons, common: set[str]) -> Callable[[Sentence], list[Edit]]:
    # concise words that are mostly function words make ungrammatical wordy forms ("as" -> "equally as")
    clarity_skip = frozenset("as but and or so if of to the a an these those done".split())
    redundancy = PhraseLexicon("redundancy", lex.redundancy, check_fit=True, skip=clarity_skip)
    positive = PhraseLexicon(
        "positive-form", lex.positive_form, check_fit=True, skip=_POSITIVE_SKIP, guard=_positive_fits
    )
    return lambda s: redundancy.edits(s.text) + positive.edits(s.text)
