"""ITERATER-human, sentence level (Du et al., ACL 2022) -> our revision-intention records.

Source: the three files of the Hugging Face dataset ``wanyu/IteraTeR_human_sent`` (the same files as
``dataset/`` in github.com/vipulraheja/IteraTeR): ``train.json``, ``dev.json``, ``test.json``, one
JSON object a line with the keys

    before_sent, before_sent_with_intent, after_sent, labels, doc_id, revision_depth

(``IteraTeR_full_sent`` rows also carry ``confidence``; it is accepted and ignored). ``labels`` is one
of clarity, fluency, coherence, style, meaning-changed, others. As in the reference (IR-Tuning's
``get_iterater_data``), rows labelled ``others`` are left out and counted in the manifest; ``dev``
becomes our ``val``. Published sizes: 3254 / 400 / 364 rows before dropping ``others``. Duplicate rows,
and val/test rows whose sentence pair is already in train, are dropped too (``common.DUPLICATE_RULE``).
"""

from __future__ import annotations

import json
from pathlib import Path

from irtuning_plugin.tasks.converters.common import (
    ConversionError,
    ConvertedSplit,
    check_output,
    read_utf8,
    write_converted,
)
from irtuning_plugin.tasks.revision_task import INTENTION

FILES = {"train": "train.json", "val": "dev.json", "test": "test.json"}
COLUMNS = ("before_sent", "before_sent_with_intent", "after_sent", "labels", "doc_id", "revision_depth")
TEXT_COLUMNS = ("before_sent", "after_sent", "labels")
DROPPED_LABELS = ("others",)
SOURCE_LABELS = (*INTENTION.labels, *DROPPED_LABELS)
WHERE = "https://huggingface.co/datasets/wanyu/IteraTeR_human_sent"


def _rows(path: Path) -> list[tuple[int, object]]:
    """(line number, parsed value) of a JSON-lines file; a single JSON array is accepted too."""
    text = read_utf8(path)
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # not one array: read it line by line
        if isinstance(data, list):
            return [(i + 1, row) for i, row in enumerate(data)]
    rows = []
    for no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((no, json.loads(line)))
        except json.JSONDecodeError as err:
            raise ConversionError(f"{path.name} line {no}: not valid JSON ({err.msg}); expected one ITERATER "
                                  f"sentence-level object a line") from None
    return rows


def _check_row(name: str, no: int, row: object) -> None:
    where = f"{name} line {no}"
    if not isinstance(row, dict):
        raise ConversionError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "before_revision" in row or "edit_actions" in row:
        raise ConversionError(f"{where}: this is ITERATER's document-level release (before_revision, edit_actions); "
                              f"convert the sentence-level files ({WHERE})")
    missing = [c for c in COLUMNS if c not in row]
    if missing:
        raise ConversionError(f"{where}: missing column {missing[0]!r}; a sentence-level row has "
                              f"{', '.join(COLUMNS)}")
    for col in TEXT_COLUMNS:
        if not isinstance(row[col], str):
            raise ConversionError(f"{where}: column {col!r} must be a string, got {type(row[col]).__name__}")
    if row["labels"] not in SOURCE_LABELS:
        raise ConversionError(f"{where}: unknown label {row['labels']!r}; allowed: {', '.join(SOURCE_LABELS)}")


def read_iterater(src: str | Path) -> dict[str, ConvertedSplit]:
    root = Path(src).expanduser()
    if not root.is_dir():
        raise ConversionError(f"{root} is not a folder; give the folder holding {', '.join(FILES.values())} "
                              f"({WHERE})")
    for name in FILES.values():
        if not (root / name).is_file():
            raise ConversionError(f"{root / name} not found; the sentence-level release has "
                                  f"{', '.join(FILES.values())} ({WHERE})")
    splits: dict[str, ConvertedSplit] = {}
    for split, name in FILES.items():
        rows = _rows(root / name)
        if not rows:
            raise ConversionError(f"{name}: no rows")
        out = ConvertedSplit()
        for no, row in rows:
            _check_row(name, no, row)
            if row["labels"] in DROPPED_LABELS:
                out.drop(row["labels"])
                continue
            source_id = f"{row['doc_id']}:{row['revision_depth']}:{name}:{no}"
            out.add(INTENTION, split, "iterater", source_id, row["labels"], row["before_sent"], row["after_sent"],
                    earlier=dict(splits))
        splits[split] = out
    return splits


def convert_iterater(src: str | Path, out_dir: str | Path, *, force: bool = False) -> dict:
    """Convert the released sentence-level files in ``src`` into ``out_dir``; returns the manifest.

    ``force``: move entries of ``out_dir`` we did not write aside (``manifest["moved_aside"]``) instead
    of refusing. Raises :class:`ConversionError` (one line) for bad input or an unsafe ``out_dir``.
    """
    root = Path(src).expanduser()
    check_output(out_dir, root, force)
    splits = read_iterater(root)
    return write_converted(out_dir, INTENTION, splits, source="ITERATER-human sentence level (wanyu/IteraTeR_human_sent)",
                           source_files=[root / name for name in FILES.values()], src=root, force=force,
                           extra={"split_from": {s: n for s, n in FILES.items()}})
