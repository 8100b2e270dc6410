"""Converters of the paper's released files: ITERATER-human (sentence level) and ArgRevision."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from irtuning_plugin.converters import ConversionError, convert_argrevision, convert_iterater
from irtuning_plugin.converters.argrevision import reference_split
from irtuning_plugin.converters.xlsx import read_first_sheet, write_simple_xlsx
from irtuning_plugin.revision_task import ARGUMENT_PURPOSE, INTENTION, task_of_manifest

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ITERATER = FIXTURES / "iterater_human_sent"
ARG_CSV = FIXTURES / "argrevision" / "revision_purpose.csv"


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_iterater_records_counts_and_hashes(tmp_path):
    out = tmp_path / "iterater"
    manifest = convert_iterater(ITERATER, out)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "test.jsonl", "train.jsonl", "val.jsonl"]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert task_of_manifest(manifest) is INTENTION
    src = {name: _lines(ITERATER / name) for name in ("train.json", "dev.json", "test.json")}
    for split, name in (("train", "train.json"), ("val", "dev.json"), ("test", "test.json")):
        recs = _lines(out / f"{split}.jsonl")
        kept = [r for r in src[name] if r["labels"] != "others"]
        assert [(r["original"], r["revised"], r["label"]) for r in recs] == \
            [(r["before_sent"], r["after_sent"], r["labels"]) for r in kept]  # order and text as released
        assert manifest["counts"][split]["total"] == len(kept)
        for lab in INTENTION.labels:
            assert manifest["counts"][split][lab] == sum(r["labels"] == lab for r in kept)
        assert manifest["dropped"][split] == ({"others": 1} if split != "test" else {})
        assert manifest["outputs"][f"{split}.jsonl"] == hashlib.sha256((out / f"{split}.jsonl").read_bytes()).hexdigest()
        for rec in recs:
            assert rec["segments"] == INTENTION.to_segments(rec["original"], rec["revised"], rec["label"])
            assert rec["segments"][0]["text"].startswith("Classify the intention of this sentence revision")
    assert manifest["source_files"]["dev.json"]["sha256"] == hashlib.sha256((ITERATER / "dev.json").read_bytes()).hexdigest()
    # converting twice gives the same bytes
    again = convert_iterater(ITERATER, tmp_path / "again")
    assert again["outputs"] == manifest["outputs"]


def _copy_iterater(tmp_path: Path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(ITERATER, dst)
    return dst


def _rewrite_line(path: Path, index: int, fn) -> None:
    lines = path.read_text().splitlines()
    lines[index] = fn(lines[index])
    path.write_text("\n".join(lines) + "\n")


def test_iterater_errors_name_the_file_and_row(tmp_path):
    src = _copy_iterater(tmp_path)
    out = tmp_path / "out"

    def drop(col):
        return lambda line: json.dumps({k: v for k, v in json.loads(line).items() if k != col})

    _rewrite_line(src / "dev.json", 2, drop("after_sent"))
    with pytest.raises(ConversionError, match=r"^dev\.json line 3: missing column 'after_sent'"):
        convert_iterater(src, out)
    shutil.copy(ITERATER / "dev.json", src / "dev.json")
    _rewrite_line(src / "test.json", 1, lambda line: line.replace('"labels": "meaning-changed"', '"labels": "grammar"'))
    with pytest.raises(ConversionError, match=r"^test\.json line 2: unknown label 'grammar'; allowed: clarity, "):
        convert_iterater(src, out)
    shutil.copy(ITERATER / "test.json", src / "test.json")
    _rewrite_line(src / "train.json", 4, lambda line: line[:-3])
    with pytest.raises(ConversionError, match=r"^train\.json line 5: not valid JSON"):
        convert_iterater(src, out)
    (src / "train.json").write_text(json.dumps({"doc_id": "1", "revision_depth": 1, "before_revision": "a",
                                                "after_revision": "b", "edit_actions": []}) + "\n")
    with pytest.raises(ConversionError, match=r"^train\.json line 1: this is ITERATER's document-level release"):
        convert_iterater(src, out)
    (src / "dev.json").unlink()
    with pytest.raises(ConversionError, match=r"dev\.json not found; the sentence-level release has train\.json"):
        convert_iterater(src, out)
    with pytest.raises(ConversionError, match="is not a folder"):
        convert_iterater(ITERATER / "train.json", out)
    assert not out.exists()  # nothing half-written


def _arg_rows() -> list[list[str]]:
    with open(ARG_CSV, newline="") as fh:
        return list(csv.reader(fh))


def test_argrevision_csv_and_xlsx_give_the_same_records(tmp_path):
    rows = _arg_rows()
    xlsx = tmp_path / "revision_purpose.xlsx"
    write_simple_xlsx(xlsx, rows)
    assert read_first_sheet(xlsx) == rows
    m_csv = convert_argrevision(ARG_CSV, tmp_path / "a")
    m_xlsx = convert_argrevision(xlsx, tmp_path / "b")
    assert task_of_manifest(m_csv) is ARGUMENT_PURPOSE and m_xlsx["counts"] == m_csv["counts"]
    for split in ("train", "val", "test"):
        a = _lines(tmp_path / "a" / f"{split}.jsonl")
        b = _lines(tmp_path / "b" / f"{split}.jsonl")
        assert [(r["original"], r["revised"], r["label"]) for r in a] == \
            [(r["original"], r["revised"], r["label"]) for r in b]
    data = rows[1:]
    n_claim = sum(r[2] == "claim" for r in data)
    assert sum(m_csv["counts"][s]["total"] for s in ("train", "val", "test")) == len(data) - n_claim
    assert sum(m_csv["dropped"][s].get("claim", 0) for s in ("train", "val", "test")) == n_claim
    everything = [r for s in ("train", "val", "test") for r in _lines(tmp_path / "a" / f"{s}.jsonl")]
    assert {r["label"] for r in everything} == set(ARGUMENT_PURPOSE.labels)
    assert any(r["original"] == "" for r in everything) and any(r["revised"] == "" for r in everything)
    lce = [r for r in everything if r["label"] == "linked claim-evidence"]
    assert len(lce) == sum(r[2] == "LCE" for r in data)


@pytest.mark.parametrize("n", [20, 23, 101, 3254])
def test_argrevision_split_matches_pandas_and_sklearn(n):
    pd = pytest.importorskip("pandas")
    model_selection = pytest.importorskip("sklearn.model_selection")
    df = pd.DataFrame({"row": range(n)}).sample(frac=1, random_state=171).reset_index(drop=True)
    train, temp = model_selection.train_test_split(df, test_size=0.2, random_state=171)
    val, test = model_selection.train_test_split(temp, test_size=0.5, random_state=171)
    ours = reference_split(n, 171)
    assert ours == {"train": train["row"].tolist(), "val": val["row"].tolist(), "test": test["row"].tolist()}


def test_argrevision_errors_name_the_row(tmp_path):
    rows = _arg_rows()
    bad = [list(r) for r in rows]
    bad[5][2] = "evidence"
    path = tmp_path / "bad.csv"
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(bad)
    with pytest.raises(ConversionError, match=r"^bad\.csv row 6: unknown purpose_labels 'evidence'; allowed: relevant"):
        convert_argrevision(path, tmp_path / "out")
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([["old_sentences", "new_sentence", "purpose_labels"], *rows[1:]])
    with pytest.raises(ConversionError, match=r"row 1 \(header\): missing column 'new_sentences'"):
        convert_argrevision(path, tmp_path / "out")
    not_xlsx = tmp_path / "revision_purpose.xlsx"
    not_xlsx.write_text("old_sentences,new_sentences\n")
    with pytest.raises(ConversionError, match="is not an .xlsx workbook"):
        convert_argrevision(not_xlsx, tmp_path / "out")
    with pytest.raises(ConversionError, match=r"expected the ArgRevision sheet as \.xlsx"):
        convert_argrevision(ITERATER / "train.json", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_convert(tmp_path, capsys):
    from irtuning_plugin.cli import main

    assert main(["convert", "iterater", str(ITERATER), str(tmp_path / "it")]) == 0
    printed = capsys.readouterr().out
    assert "train" in printed and "others" in printed and (tmp_path / "it" / "manifest.json").exists()
    src = _copy_iterater(tmp_path)
    _rewrite_line(src / "train.json", 0, lambda line: "[1, 2]")
    assert main(["convert", "iterater", str(src), str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["irtuning convert: train.json line 1: expected a JSON object, got list"]
