"""The tweet-sentiment builder: labels from the human ratings, balance, disjoint splits, determinism."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from irtuning_plugin.tasks.assets import tweet_sentiment_data as td

FILES = ("manifest.json", "test.jsonl", "train.jsonl", "val.jsonl")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from irtuning_plugin.tasks.assets.models import cache_root

    return td.fetch_source(cache_root() / "sources")  # pip-downloaded once, SHA-256 checked


@pytest.fixture(scope="module")
def built(source, tmp_path_factory):
    root = tmp_path_factory.mktemp("tweets")
    out_a, out_b, out_c = root / "a", root / "b", root / "c"
    return (td.build_tweet_dataset(out_a, source=source), out_a, td.build_tweet_dataset(out_b, source=source), out_b,
            td.build_tweet_dataset(out_c, source=source, seed=5), out_c)


def _records(out, split):
    return [json.loads(x) for x in (out / f"{split}.jsonl").read_text().splitlines()]


def test_same_seed_gives_byte_identical_files_and_another_seed_another_split(built):
    _, a, _, b, _, c = built
    assert sorted(p.name for p in a.iterdir()) == list(FILES)
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "test.jsonl").read_bytes() != (c / "test.jsonl").read_bytes()


def test_labels_follow_the_human_ratings_of_the_source_file(built, source):
    manifest, out, *_ = built
    ratings = {f"vader-tweets:{tid}": (rating, text) for tid, rating, text in td.read_ratings(source)}
    assert len(ratings) == manifest["source_rows"] == 4200
    for split in td.SPLITS:
        for rec in _records(out, split):
            rating, text = ratings[rec["source_id"]]
            assert rec["rating"] == rating and rec["text"] == text  # the people's text and rating, unchanged
            assert rec["label"] == td.label_of(rating)
            if rec["label"] == "negative":
                assert rating <= -1.0
            elif rec["label"] == "positive":
                assert rating >= 1.0
            else:
                assert abs(rating) < 0.5
            prompt, completion = rec["segments"]
            assert prompt == {"text": td.format_prompt(text), "label": False}
            assert completion == {"text": " " + rec["label"], "label": True}
    assert td.label_of(0.7) is None and td.label_of(-0.5) is None  # mildly polar tweets are left out


def test_splits_are_balanced_disjoint_and_match_the_manifest(built):
    manifest, out, *_ = built
    seen = {}
    for split in td.SPLITS:
        recs = _records(out, split)
        counts = Counter(r["label"] for r in recs)
        assert dict(counts) == {lab: manifest["counts"][split][lab] for lab in td.LABELS}
        assert len(set(counts.values())) == 1  # balanced
        for r in recs:
            key = " ".join(r["text"].lower().split())
            assert key not in seen, f"{r['id']} repeats {seen.get(key)}"
            seen[key] = r["id"]
    per = manifest["per_label"]
    assert manifest["counts"]["train"]["total"] == 3 * (per - 2 * round(per * 0.1))
    assert manifest["source"]["sha256"] == td.SOURCE_SHA256


def test_a_tampered_source_is_refused(tmp_path):
    (tmp_path / td.SOURCE_SDIST).write_bytes(b"not the sdist")
    with pytest.raises(td.TweetDataError, match="SHA-256"):
        td.fetch_source(tmp_path)


def test_reference_resolves_to_the_built_split(monkeypatch, tmp_path, source):
    from irtuning_plugin.tasks.assets import references

    (tmp_path / "sources").mkdir()
    (tmp_path / "sources" / td.SOURCE_SDIST).write_bytes(source.read_bytes())
    monkeypatch.setattr(references, "cache_root", lambda: tmp_path)
    path = references.resolve_reference("irtuning://tweet-sentiment/val.jsonl")
    assert path == str(tmp_path / "data" / "tweet-sentiment-seed171" / "val.jsonl")
    assert references.data_dir_for("tweet-sentiment") == tmp_path / "data" / "tweet-sentiment-seed171"
    with pytest.raises(ValueError, match="allowed: revision-intention, tweet-sentiment"):
        references.data_dir_for("nope")


def test_evaluation_knows_the_task_of_a_built_folder(built):
    from irtuning_plugin.tasks import seq_classification as sc
    from irtuning_plugin.tasks.revision_task import TWEET_SENTIMENT

    _, out, *_ = built
    records, task = sc.load_records(out, "val")
    assert task is TWEET_SENTIMENT and task.labels == td.LABELS
    assert all(sc.prompt_of(r, task) == td.format_prompt(r["text"]) for r in records)
    assert all(task.format_prompt(" ".join(r["text"].split()), "") == td.format_prompt(r["text"]) for r in records[:50])
