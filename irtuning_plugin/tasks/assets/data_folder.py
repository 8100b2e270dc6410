"""Writing a data folder (``train/val/test.jsonl`` + ``manifest.json``) without ever deleting a file we did not write.

Two kinds of destination:

* a folder the user named (``irtuning convert SRC OUT``): only our four files are written, each staged
  in a hidden folder inside OUT and renamed into place (a reader may see old and new files mixed for a
  moment). A new OUT is staged beside it and renamed in whole. Refused: OUT that is, lies inside or
  holds a source; OUT that is a file; OUT holding anything we did not write, unless ``force``, which
  moves those entries, whole, into ``OUT/irtuning-moved-aside-<UTC time>/`` and reports where.
* one of our cache folders (``cache=True``: built-in data; :func:`publish_folder` for models): the new
  folder is swapped in whole (renames only, so a reader sees the old folder or the new one), and only
  the old folder's files of ours are deleted. A cache folder holding anything else is refused.

"Ours" in a user folder: ``manifest.json`` is a JSON object with ``format_version``, ``task``, ``labels``
and ``counts``, and each split file is a plain file whose sha256 matches the manifest's ``outputs`` (where
it records them). A split file edited since, or one with no manifest of ours beside it, is the user's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from irtuning_plugin.references import SPLITS

LOG = logging.getLogger(__name__)

MANIFEST = "manifest.json"
OWN_FILES = (*(f"{split}.jsonl" for split in SPLITS), MANIFEST)
MOVED_ASIDE_PREFIX = "irtuning-moved-aside-"
_STAGING_PREFIX = ".irtuning-staging-"


class DataFolderError(ValueError):
    """An output folder we will not write into; the message names the path and what to do instead."""


@dataclass
class Written:
    path: Path  # the folder, resolved
    moved_aside: dict[str, str] = field(default_factory=dict)  # original path -> where it is now


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_plain_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _our_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not _is_plain_file(path):
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and {"format_version", "task", "labels", "counts"} <= set(data) else None


def _tolerated(path: Path) -> bool:
    """Entries we neither refuse nor touch: what an earlier ``force`` moved aside (the user's, kept)."""
    return path.name.startswith(MOVED_ASIDE_PREFIX) and path.is_dir() and not path.is_symlink()


def _stale_staging(path: Path) -> bool:
    """A staging folder of ours left by an interrupted run: only our file names, as plain files."""
    return (path.name.startswith(_STAGING_PREFIX) and path.is_dir() and not path.is_symlink()
            and all(p.name in OWN_FILES and _is_plain_file(p) for p in path.iterdir()))


def foreign_entries(folder: Path, *, own: Iterable[str] | None = None) -> list[str]:
    """Names in ``folder`` that we did not write (sorted). ``own`` given: any plain file of those names is
    ours (a cache folder); else the data-folder rule of the module docstring (a user's folder)."""
    entries = sorted(os.listdir(folder))
    if own is not None:
        own = set(own)
        return [n for n in entries if not (n in own and _is_plain_file(folder / n))]
    manifest = _our_manifest(folder)
    outputs = manifest.get("outputs", {}) if manifest is not None else {}
    foreign = []
    for name in entries:
        path = folder / name
        if _tolerated(path) or _stale_staging(path):
            continue
        if name == MANIFEST and manifest is not None:
            continue
        if name in OWN_FILES and name != MANIFEST and manifest is not None and _is_plain_file(path) and \
                (name not in outputs or outputs[name] == sha256_of(path)):
            continue
        foreign.append(name)
    return foreign


def _list(names: list[str], most: int = 5) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def check_output_folder(out_dir: str | Path, *, sources: Iterable[str | Path] = (), force: bool = False) -> list[str]:
    """Refuse a user's output folder we must not write; return the entries ``force`` would move aside."""
    out = Path(out_dir).expanduser().resolve()
    for src in sources:
        s = Path(src).expanduser().resolve()
        if out == s:
            raise DataFolderError(f"{out} is the source; write the output to another folder (nothing was written)")
        if s in out.parents:
            raise DataFolderError(f"{out} is inside the source folder {s}; write the output outside it "
                                  f"(nothing was written)")
        if out in s.parents:
            raise DataFolderError(f"{out} holds the source {s}; write the output to a folder that does not "
                                  f"contain it (nothing was written)")
    if out.exists() and not out.is_dir():
        raise DataFolderError(f"{out} is a file, not a folder; give a folder for the output (nothing was written)")
    if not out.is_dir():
        return []
    foreign = foreign_entries(out)
    if foreign and not force:
        raise DataFolderError(f"{out} holds files irtuning did not write ({_list(foreign)}); give an empty or new "
                              f"folder, or use --force to move them aside into "
                              f"{out}/{MOVED_ASIDE_PREFIX}<time>/ (nothing was written)")
    return foreign


def check_cache_folder(dest: str | Path, own: Iterable[str] = OWN_FILES) -> None:
    """Refuse to rebuild one of our cache folders that is a file or holds entries not named in ``own``."""
    dest = Path(dest).expanduser()
    if dest.exists() and not dest.is_dir():
        raise DataFolderError(f"{dest} is a file, not a folder; move it out of irtuning's cache and run again "
                              f"(nothing was deleted)")
    foreign = foreign_entries(dest, own=own) if dest.is_dir() else []
    if foreign:
        raise DataFolderError(f"{dest} holds files irtuning did not write ({_list(foreign)}); it is irtuning's "
                              f"cache folder: move those files out of it and run again (nothing was deleted)")


def _move_aside(out: Path, names: list[str]) -> dict[str, str]:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for n in range(1, 1000):
        aside = out / f"{MOVED_ASIDE_PREFIX}{stamp}{'' if n == 1 else f'-{n}'}"
        try:
            aside.mkdir()
            break
        except FileExistsError:
            continue
    else:
        raise DataFolderError(f"{out}: could not make a {MOVED_ASIDE_PREFIX}{stamp} folder; move its files yourself")
    moved = {}
    for name in names:
        os.replace(out / name, aside / name)
        moved[str(out / name)] = str(aside / name)
    LOG.warning("irtuning: moved %d entr%s of %s aside into %s: %s", len(moved), "y" if len(moved) == 1 else "ies",
                out, aside, _list(names, 20))
    return moved


def _umask_mode(mode: int = 0o777) -> int:
    current = os.umask(0)
    os.umask(current)
    return mode & ~current


def _swap_in(staged: Path, dest: Path, own: set[str]) -> None:
    """Rename ``staged`` to ``dest``; an existing ``dest`` is renamed aside first and only its files named
    in ``own`` are deleted (anything that appeared meanwhile is left there, with a warning)."""
    if not dest.exists():
        os.rename(staged, dest)
        return
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{time.monotonic_ns()}")
    os.replace(dest, old)
    os.replace(staged, dest)
    for name in own:
        if _is_plain_file(old / name):
            (old / name).unlink()
    try:
        old.rmdir()
    except OSError:
        LOG.warning("irtuning: %s kept: it holds files irtuning did not write (%s)", old,
                    _list(sorted(os.listdir(old))))


def publish_folder(tmp: Path, dest: Path, *, own: Iterable[str]) -> Path:
    """Swap the finished cache folder ``tmp`` in for ``dest`` (see the module docstring). ``own``: the file
    names of ours that ``dest`` may hold (what ``tmp`` holds is always included). ``tmp`` is removed if
    ``dest`` is refused. Returns ``dest``."""
    own = set(own) | set(os.listdir(tmp))
    try:
        check_cache_folder(dest, own)
        os.chmod(tmp, _umask_mode())  # mkdtemp makes it private
        _swap_in(tmp, dest, own)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _write_files(folder: Path, records: dict[str, list[dict]], manifest: dict, hash_outputs: bool) -> None:
    for split in SPLITS:
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as fh:
            for rec in records[split]:
                fh.write(json.dumps(rec, ensure_ascii=True) + "\n")
    if hash_outputs:
        manifest["outputs"] = {f"{split}.jsonl": sha256_of(folder / f"{split}.jsonl") for split in SPLITS}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def write_data_folder(out_dir: str | Path, records: dict[str, list[dict]], manifest: dict, *,
                      hash_outputs: bool = False, force: bool = False, sources: Iterable[str | Path] = (),
                      cache: bool = False) -> Written:
    """Write one JSON line per record for each split, then ``manifest.json`` (see the module docstring).

    ``hash_outputs`` adds ``manifest["outputs"]`` = {file name: sha256} of the split files (the manifest
    dict passed in is updated too). ``sources``: paths the output must neither be, lie inside nor hold.
    ``force``: move entries we did not write aside instead of refusing (a user's folder only).
    ``cache``: ``out_dir`` is one of our cache folders: swapped in whole; foreign entries always refused.
    Raises :class:`DataFolderError` (nothing written, nothing moved) for a refused destination.
    """
    out = Path(out_dir).expanduser().resolve()
    if cache:
        check_cache_folder(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            _write_files(tmp, records, manifest, hash_outputs)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        publish_folder(tmp, out, own=OWN_FILES)
        return Written(out)

    foreign = check_output_folder(out, sources=sources, force=force)
    exists = out.is_dir()
    if not exists:
        out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX if exists else f".{out.name}{_STAGING_PREFIX}",
                                    dir=out if exists else out.parent))
    try:
        _write_files(staging, records, manifest, hash_outputs)
        if not exists:
            os.chmod(staging, _umask_mode())
            os.rename(staging, out)  # fails (nothing lost) if a non-empty OUT appeared meanwhile
            return Written(out)
        moved = _move_aside(out, foreign) if foreign else {}
        for stale in os.listdir(out):
            if _stale_staging(out / stale) and out / stale != staging:
                shutil.rmtree(out / stale)
        for name in OWN_FILES:  # the manifest last: it vouches for the files before it
            os.replace(staging / name, out / name)
        staging.rmdir()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Written(out, moved)
