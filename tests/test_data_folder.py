"""The data-folder writer never deletes a file it did not write (issue 35, item 1).

User folders (``irtuning convert``'s OUT) get our four files replaced one by one; a folder that holds
anything else is refused, or with ``force`` those entries are moved aside, whole. Our cache folders
(built-in data, models) are still swapped in as a whole, and refused if something foreign is inside.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from irtuning_plugin.tasks.assets import data_folder as df

OURS = ["manifest.json", "test.jsonl", "train.jsonl", "val.jsonl"]


def _records(tag: str) -> dict[str, list[dict]]:
    return {split: [{"id": f"{tag}-{split}-{i}", "text": f"{tag} {i}"} for i in range(3)] for split in df.SPLITS}


def _manifest(tag: str) -> dict:
    return {"format_version": 1, "task": "t", "labels": ["a"], "counts": {}, "tag": tag}


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (or the file ``root``): relative path -> sha256 of a file, or 'dir'."""
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


def _user_files(out: Path) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "notes.txt").write_text("my notes\n")
    (out / "sub").mkdir()
    (out / "sub" / "keep.bin").write_bytes(bytes(range(256)))
    return snapshot(out)


def test_new_folder_and_rewrite_of_our_own_output(tmp_path):
    out = tmp_path / "a" / "out"
    res = df.write_data_folder(out, _records("one"), _manifest("one"), hash_outputs=True)
    assert res.path == out.resolve() and res.moved_aside == {}
    assert sorted(p.name for p in out.iterdir()) == OURS
    assert json.loads((out / "manifest.json").read_text())["tag"] == "one"
    res = df.write_data_folder(out, _records("two"), _manifest("two"), hash_outputs=True)
    assert sorted(p.name for p in out.iterdir()) == OURS  # no staging folder left behind
    assert json.loads((out / "train.jsonl").read_text().splitlines()[0])["id"] == "two-train-0"
    assert json.loads((out / "manifest.json").read_text())["outputs"]["val.jsonl"] == \
        hashlib.sha256((out / "val.jsonl").read_bytes()).hexdigest()
    assert sorted(p.name for p in tmp_path.joinpath("a").iterdir()) == ["out"]


def test_foreign_files_are_refused_and_kept(tmp_path):
    out = tmp_path / "out"
    before = _user_files(out)
    with pytest.raises(df.DataFolderError, match=r"holds files irtuning did not write \(notes\.txt, sub\); .*--force"):
        df.write_data_folder(out, _records("x"), _manifest("x"))
    assert snapshot(out) == before  # nothing deleted, nothing written


def test_force_moves_foreign_files_aside_intact(tmp_path):
    out = tmp_path / "out"
    before = _user_files(out)
    res = df.write_data_folder(out, _records("x"), _manifest("x"), force=True)
    assert set(res.moved_aside) == {str(out.resolve() / "notes.txt"), str(out.resolve() / "sub")}
    aside = Path(res.moved_aside[str(out.resolve() / "notes.txt")]).parent
    assert aside.parent == out.resolve() and aside.name.startswith(df.MOVED_ASIDE_PREFIX)
    assert snapshot(aside) == before
    assert sorted(p.name for p in out.iterdir()) == sorted([*OURS, aside.name])
    # a later run without force writes again: the moved-aside folder is the user's and is left alone
    res = df.write_data_folder(out, _records("y"), _manifest("y"))
    assert res.moved_aside == {} and snapshot(aside) == before


def test_existing_file_at_out_is_refused(tmp_path):
    out = tmp_path / "out"
    out.write_text("a file, not a folder\n")
    with pytest.raises(df.DataFolderError, match=r"out is a file, not a folder"):
        df.write_data_folder(out, _records("x"), _manifest("x"), force=True)
    assert out.read_text() == "a file, not a folder\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_files_named_like_ours_but_not_ours_are_foreign(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.jsonl").write_text('{"mine": 1}\n')  # no manifest of ours beside it
    with pytest.raises(df.DataFolderError, match=r"\(train\.jsonl\)"):
        df.write_data_folder(out, _records("x"), _manifest("x"))
    assert (out / "train.jsonl").read_text() == '{"mine": 1}\n'
    # our output, then edited by hand: the manifest's sha256 no longer matches, so it is the user's now
    out2 = tmp_path / "out2"
    df.write_data_folder(out2, _records("x"), _manifest("x"), hash_outputs=True)
    (out2 / "val.jsonl").write_text('{"edited": 1}\n')
    with pytest.raises(df.DataFolderError, match=r"\(val\.jsonl\)"):
        df.write_data_folder(out2, _records("y"), _manifest("y"), hash_outputs=True)
    assert (out2 / "val.jsonl").read_text() == '{"edited": 1}\n'
    res = df.write_data_folder(out2, _records("y"), _manifest("y"), hash_outputs=True, force=True)
    assert Path(res.moved_aside[str(out2.resolve() / "val.jsonl")]).read_text() == '{"edited": 1}\n'


@pytest.mark.parametrize("where", ["same", "out_inside_src", "src_inside_out"])
def test_source_overlap_is_refused_even_with_force(tmp_path, where):
    src = tmp_path / "src"
    src.mkdir()
    (src / "train.json").write_text('{"a": 1}\n')
    out = {"same": src, "out_inside_src": src / "converted", "src_inside_out": tmp_path}[where]
    before, before_all = snapshot(src), snapshot(tmp_path)
    expect = {"same": r"is the source", "out_inside_src": r"is inside the source folder",
              "src_inside_out": r"holds the source"}[where]
    with pytest.raises(df.DataFolderError, match=expect):
        df.write_data_folder(out, _records("x"), _manifest("x"), sources=[src], force=True)
    assert snapshot(src) == before and snapshot(tmp_path) == before_all


def test_cache_folder_is_swapped_whole_and_foreign_files_refused(tmp_path):
    out = tmp_path / "cache" / "data"
    df.write_data_folder(out, _records("one"), _manifest("one"), cache=True)
    inode = out.stat().st_ino
    df.write_data_folder(out, _records("two"), _manifest("two"), cache=True)
    assert out.stat().st_ino != inode  # a new folder renamed in, not files replaced in the old one
    assert sorted(p.name for p in out.iterdir()) == OURS
    assert sorted(p.name for p in out.parent.iterdir()) == ["data"]  # old folder and staging gone
    (out / "mine.txt").write_text("keep\n")
    with pytest.raises(df.DataFolderError, match=r"holds files irtuning did not write \(mine\.txt\); .*cache"):
        df.write_data_folder(out, _records("three"), _manifest("three"), cache=True)
    assert (out / "mine.txt").read_text() == "keep\n" and json.loads((out / "manifest.json").read_text())["tag"] == "two"
    assert sorted(p.name for p in out.parent.iterdir()) == ["data"]


def test_publish_folder_keeps_what_it_did_not_write(tmp_path):
    dest = tmp_path / "models" / "m"
    dest.mkdir(parents=True)
    (dest / "config.json").write_text("{}")
    (dest / "mine.txt").write_text("keep\n")
    tmp = tmp_path / "models" / ".m-new"
    tmp.mkdir()
    (tmp / "config.json").write_text('{"new": 1}')
    with pytest.raises(df.DataFolderError, match=r"m holds files irtuning did not write \(mine\.txt\)"):
        df.publish_folder(tmp, dest, own={"config.json"})
    assert (dest / "mine.txt").read_text() == "keep\n" and not tmp.exists()
    (dest / "mine.txt").unlink()
    tmp.mkdir()
    (tmp / "config.json").write_text('{"new": 1}')
    df.publish_folder(tmp, dest, own={"config.json"})
    assert (dest / "config.json").read_text() == '{"new": 1}'
    assert sorted(p.name for p in dest.parent.iterdir()) == ["m"]


def test_builtin_data_builders_refuse_a_cache_folder_with_foreign_files(tmp_path):
    from irtuning_plugin.tasks.assets import revision_data as rd
    from irtuning_plugin.tasks.assets import tweet_sentiment_data as td

    for build in (lambda out: rd.build_revision_dataset(out, pairs_per_label=2),
                  lambda out: td.build_tweet_dataset(out, source=tmp_path / "no-such-source.tar.gz")):
        out = tmp_path / "data"
        before = _user_files(out)
        with pytest.raises(df.DataFolderError, match=r"data holds files irtuning did not write \(notes\.txt, sub\); "
                           r"it is irtuning's cache folder"):
            build(out)  # refused before any work (the tweet source does not even exist)
        assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["data"]
        (tmp_path / "data" / "sub" / "keep.bin").unlink()
        (tmp_path / "data" / "sub").rmdir()
        (tmp_path / "data" / "notes.txt").unlink()
        (tmp_path / "data").rmdir()


def test_model_cache_rebuild_deletes_only_the_files_it_wrote(tmp_path):
    from irtuning_plugin.tasks.assets import models

    dest = tmp_path / "models" / "m"
    for content in ("one", "two"):
        tmp = tmp_path / "models" / f".m-{content}"
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text(content)
        (tmp / "model.safetensors").write_bytes(content.encode())
        models._publish(tmp, dest)
    assert (dest / "config.json").read_text() == "two"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["m"]
    (dest / "my-notes.md").write_text("keep\n")
    tmp = tmp_path / "models" / ".m-three"
    tmp.mkdir()
    (tmp / "config.json").write_text("three")
    with pytest.raises(df.DataFolderError, match=r"m holds files irtuning did not write \(my-notes\.md\)"):
        models._publish(tmp, dest)
    assert (dest / "my-notes.md").read_text() == "keep\n" and (dest / "config.json").read_text() == "two"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["m"]
    # a file the earlier build wrote and this one does not is still ours (listed in the marker)
    (dest / "my-notes.md").unlink()
    tmp.mkdir()
    (tmp / "config.json").write_text("three")
    models._publish(tmp, dest)
    assert sorted(p.name for p in dest.iterdir()) == sorted(["config.json", models._DONE])
