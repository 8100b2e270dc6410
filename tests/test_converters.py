"""Converters of the paper's released files: ITERATER-human (sentence level) and ArgRevision."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from irtuning_plugin.tasks.converters import ConversionError, convert_argrevision, convert_iterater
from irtuning_plugin.tasks.converters.argrevision import reference_split
from irtuning_plugin.tasks.converters.xlsx import read_first_sheet, write_simple_xlsx
from irtuning_plugin.tasks.revision_task import ARGUMENT_PURPOSE, INTENTION, task_of_manifest

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
    lines = err.strip().splitlines()  # one line; the CLI's prefix and hint are the CLI's business
    assert len(lines) == 1 and lines[0].startswith("irtuning convert:")
    assert "train.json line 1: expected a JSON object, got list" in lines[0]


# --- issue 35: never destroy a user's file; one-line input errors; duplicate rows ---------------------

def _snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (or the file ``root`` itself): relative path -> sha256, or 'dir'."""
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


def test_every_converter_takes_force_as_a_keyword():
    import inspect

    from irtuning_plugin.tasks.converters import CONVERTERS

    for name, fn in CONVERTERS.items():
        param = inspect.signature(fn).parameters["force"]
        assert param.kind is inspect.Parameter.KEYWORD_ONLY and param.default is False, name


def test_convert_refuses_to_write_into_its_source(tmp_path):
    src = _copy_iterater(tmp_path)
    before = _snapshot(src)
    with pytest.raises(ConversionError, match=r"src is the source; write the output to another folder"):
        convert_iterater(src, src)
    with pytest.raises(ConversionError, match=r"src/converted is inside the source folder .*src; write the output "
                       r"outside it"):
        convert_iterater(src, src / "converted", force=True)
    with pytest.raises(ConversionError, match=r"holds the source .*src"):
        convert_iterater(src, tmp_path, force=True)
    assert _snapshot(src) == before  # byte for byte, and nothing added
    sheet = tmp_path / "sheet" / "revision_purpose.csv"
    sheet.parent.mkdir()
    shutil.copy(ARG_CSV, sheet)
    before = _snapshot(sheet.parent)
    with pytest.raises(ConversionError, match=r"revision_purpose\.csv is the source"):
        convert_argrevision(sheet, sheet)
    with pytest.raises(ConversionError, match=r"sheet holds the source .*revision_purpose\.csv"):
        convert_argrevision(sheet, sheet.parent, force=True)
    assert _snapshot(sheet.parent) == before


def test_convert_keeps_unrelated_files_or_moves_them_aside_with_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.txt").write_text("my own notes\n")
    (out / "old").mkdir()
    (out / "old" / "run.log").write_text("log\n")
    before = _snapshot(out)
    with pytest.raises(ConversionError, match=r"^.*out holds files irtuning did not write \(README\.txt, old\); give "
                       r"an empty or new folder, or use --force"):
        convert_iterater(ITERATER, out)
    assert _snapshot(out) == before
    src_before = _snapshot(ITERATER)
    manifest = convert_iterater(ITERATER, out, force=True)
    moved = manifest["moved_aside"]
    assert set(moved) == {str(out / "README.txt"), str(out / "old")}
    aside = Path(moved[str(out / "README.txt")]).parent
    assert _snapshot(aside) == before  # contents intact
    assert "moved_aside" not in json.loads((out / "manifest.json").read_text())
    assert _snapshot(ITERATER) == src_before
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", "test.jsonl", "train.jsonl",
                                                             "val.jsonl", aside.name])


def test_convert_refuses_a_file_at_out_and_overwrites_its_own_output(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    with pytest.raises(ConversionError, match=r"out\.jsonl is a file, not a folder"):
        convert_argrevision(ARG_CSV, out, force=True)
    assert out.read_text() == "precious\n"
    folder = tmp_path / "folder"
    first = convert_argrevision(ARG_CSV, folder)
    second = convert_argrevision(ARG_CSV, folder, seed=5)  # our own earlier output: replaced
    assert "moved_aside" not in second and second["outputs"] != first["outputs"]
    assert json.loads((folder / "manifest.json").read_text()) == second
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "test.jsonl", "train.jsonl", "val.jsonl"]


def test_non_utf8_input_names_the_file_and_line(tmp_path):
    src = _copy_iterater(tmp_path)
    lines = (src / "dev.json").read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b"collected", "collect\u00e8d".encode("latin-1"))
    assert b"\xe8" in lines[2]
    (src / "dev.json").write_bytes(b"".join(lines))
    with pytest.raises(ConversionError, match=r"^dev\.json line 3: not UTF-8 \(byte 0xe8 at offset \d+\); save "):
        convert_iterater(src, tmp_path / "out")
    csv_path = tmp_path / "latin1.csv"
    rows = _arg_rows()
    rows[4][0] = "caf\u00e9"
    with open(csv_path, "w", newline="", encoding="latin-1") as fh:
        csv.writer(fh).writerows(rows)
    with pytest.raises(ConversionError, match=r"^latin1\.csv line 5: not UTF-8"):
        convert_argrevision(csv_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _xlsx_with(tmp_path: Path, member: str, data: bytes | None) -> Path:
    """The fixture sheet as .xlsx with one zip member replaced (``None``: left out)."""
    import zipfile

    good = tmp_path / "good.xlsx"
    write_simple_xlsx(good, _arg_rows())
    bad = tmp_path / "revision_purpose.xlsx"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            if info.filename != member:
                zout.writestr(info, zin.read(info))
            elif data is not None:
                zout.writestr(info, data)
    return bad


def test_corrupt_xlsx_sheet_names_the_file_and_the_sheet(tmp_path):
    sheet = "xl/worksheets/sheet1.xml"
    bad = _xlsx_with(tmp_path, sheet, b'<?xml version="1.0"?><worksheet><sheetData><row r="1"><c')
    with pytest.raises(ConversionError, match=r"^revision_purpose\.xlsx: sheet 'Sheet1' \(xl/worksheets/sheet1\.xml\) "
                       r"is not valid XML \(line 1, column \d+\)"):
        convert_argrevision(bad, tmp_path / "out")
    bad = _xlsx_with(tmp_path, sheet, None)
    with pytest.raises(ConversionError, match=r"^revision_purpose\.xlsx: sheet 'Sheet1' \(xl/worksheets/sheet1\.xml\) "
                       r"is missing from the workbook"):
        convert_argrevision(bad, tmp_path / "out")
    bad = _xlsx_with(tmp_path, "xl/workbook.xml", b"<workbook><sheets>")
    with pytest.raises(ConversionError, match=r"^revision_purpose\.xlsx: the workbook part \(xl/workbook\.xml\) is not "
                       r"valid XML"):
        convert_argrevision(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_iterater_duplicates_dropped_and_counted(tmp_path):
    src = _copy_iterater(tmp_path)
    train = (src / "train.json").read_text().splitlines()
    first = json.loads(train[0])
    assert first["labels"] != "others"
    (src / "train.json").write_text("\n".join([*train, train[0]]) + "\n")  # the same row twice in train
    relabelled = {**first, "labels": "style" if first["labels"] != "style" else "clarity"}
    dev = (src / "dev.json").read_text().splitlines()
    (src / "dev.json").write_text("\n".join([*dev, json.dumps(relabelled)]) + "\n")  # train's input, other label
    test = (src / "test.json").read_text().splitlines()
    (src / "test.json").write_text("\n".join([train[0], *test]) + "\n")  # a train example in test
    manifest = convert_iterater(src, tmp_path / "out")
    assert manifest["dropped"]["train"] == {"duplicate": 1, "others": 1}
    assert manifest["dropped"]["val"] == {"duplicate_of_train": 1, "others": 1}
    assert manifest["dropped"]["test"] == {"duplicate_of_train": 1}
    inputs = {s: [(r["original"], r["revised"]) for r in _lines(tmp_path / "out" / f"{s}.jsonl")]
              for s in ("train", "val", "test")}
    assert inputs["train"].count((first["before_sent"], first["after_sent"])) == 1
    assert not set(inputs["train"]) & (set(inputs["val"]) | set(inputs["test"]))
    assert manifest["counts"]["test"]["total"] == len(test)
    ids = [r["id"] for r in _lines(tmp_path / "out" / "test.jsonl")]
    assert ids == [f"iterater-test-{i:05d}" for i in range(len(test))]  # numbered without gaps


def test_argrevision_duplicates_never_cross_splits(tmp_path):
    rows = _arg_rows()
    data = [r for r in rows[1:] if r[2] != "claim"]
    dup = tmp_path / "dup.csv"
    with open(dup, "w", newline="") as fh:
        csv.writer(fh).writerows([rows[0], *rows[1:], *data, *data])  # every kept row three times
    manifest = convert_argrevision(dup, tmp_path / "out")
    recs = {s: _lines(tmp_path / "out" / f"{s}.jsonl") for s in ("train", "val", "test")}
    seen: set = set()
    for split in ("train", "val", "test"):
        keys = [(r["original"], r["revised"]) for r in recs[split]]
        assert len(keys) == len(set(keys)) and not set(keys) & seen, split
        seen |= set(keys)
    assert len(seen) == len(data)  # each distinct example kept exactly once
    dropped = sum(n for s in ("train", "val", "test") for lab, n in manifest["dropped"][s].items()
                  if lab.startswith("duplicate"))
    assert dropped == 2 * len(data)
    assert "duplicate_of_train" in {lab for s in ("val", "test") for lab in manifest["dropped"][s]}


def test_cli_convert_force_moves_foreign_files_aside_and_says_where(tmp_path, capsys):
    from irtuning_plugin.cli import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["convert", "iterater", str(ITERATER), str(out)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "holds files irtuning did not write (notes.txt)" in line and "--force" in line
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert main(["convert", "iterater", str(ITERATER), str(out), "--force"]) == 0
    printed = capsys.readouterr().out
    moved = [line for line in printed.splitlines() if line.startswith("moved aside (--force): ")]
    assert len(moved) == 1 and moved[0].endswith("notes.txt")
    target = Path(moved[0].split(" -> ")[1])
    assert target.read_text() == "mine" and target.parent.parent == out.resolve()
