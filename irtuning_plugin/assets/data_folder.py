"""Writing a data folder (``train/val/test.jsonl`` + ``manifest.json``) so that readers never see half of one.

The built-in revision data, the tweet-sentiment data and the ITERATER/ArgRevision converters all publish
their folders through :func:`write_data_folder`: everything is written into a temporary sibling folder,
which is then renamed in for the old one (renames only; the old folder is removed afterwards).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

SPLITS = ("train", "val", "test")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def publish_folder(tmp: Path, dest: Path) -> Path:
    """Swap the finished temp folder in for ``dest`` (renames only, so a reader sees the old folder or the
    new one, never half of one); the old folder is removed afterwards. Returns ``dest``."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def write_data_folder(out_dir: str | Path, records: dict[str, list[dict]], manifest: dict, *,
                      hash_outputs: bool = False) -> Path:
    """Write one JSON line per record for each split, then ``manifest.json``, and publish the folder.

    ``hash_outputs`` adds ``manifest["outputs"]`` = {file name: sha256} of the split files (the manifest
    dict passed in is updated too). Returns the folder's resolved path.
    """
    out = Path(out_dir).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for split in SPLITS:
            with open(tmp / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as fh:
                for rec in records[split]:
                    fh.write(json.dumps(rec, ensure_ascii=True) + "\n")
        if hash_outputs:
            manifest["outputs"] = {f"{split}.jsonl": sha256_of(tmp / f"{split}.jsonl") for split in SPLITS}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        publish_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
