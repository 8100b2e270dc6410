"""One module per label: its rules, their weights, the lexicon entries it leaves out, and an
``editor`` that lists the candidate edits of a real sentence.

A label module defines ``LABEL``, ``RULES`` ({rule: relative weight}) and
``editor(sentences, lexicons, common_words) -> (Sentence -> list[Edit])``; optionally
``USES_PREVIOUS_SENTENCE`` (the pair holds the sentence before it as well) and ``EITHER_SIDE_REAL``
(the real sentence is the original as often as the revision).
"""

from __future__ import annotations

from types import ModuleType

from irtuning_plugin.tasks.assets.revision_data.labels import clarity, coherence, fluency, meaning_changed, style
from irtuning_plugin.tasks.revision_task import LABELS

# Labels pick their sentences in this order, the one with the fewest usable sentences first
# (the order is part of what a seed means: changing it changes every pair).
SELECTION_ORDER: tuple[ModuleType, ...] = (style, clarity, coherence, meaning_changed, fluency)
LABEL_MODULES: dict[str, ModuleType] = {m.LABEL: m for m in SELECTION_ORDER}
RULES: dict[str, dict[str, float]] = {m.LABEL: dict(m.RULES) for m in SELECTION_ORDER}
assert set(RULES) == set(LABELS)

__all__ = ["LABEL_MODULES", "RULES", "SELECTION_ORDER"]
