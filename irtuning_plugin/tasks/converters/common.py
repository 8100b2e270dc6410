"""What every converter shares: the error type, the record shape and the folder it writes.

A converted folder looks like the built-in data set: ``train.jsonl``, ``val.jsonl``, ``test.jsonl``
(one record a line: ``id``, ``source_id``, ``label``, ``original``, ``revised``, ``segments``) and
``manifest.json`` (task, labels, counts per label and split, what was dropped, sha256 of every source
and output file). Only those four files are written; see ``assets.data_folder`` for what is refused.

Duplicates (:data:`DUPLICATE_RULE`): a row equal to an earlier one of its split (same original, revised
and label) is dropped as ``duplicate``; a val or test row whose input (original, revised) is already in
train, or a test row whose input is in val, is dropped as ``duplicate_of_train`` / ``duplicate_of_val``,
so no evaluated input was seen in training. Splits are filled in the order train, val, test. ``segments`` is Axolotl's ``input_output`` form, so a recipe trains on the folder
as it is, and the evaluation reads the task and labels from the manifest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from irtuning_plugin.tasks.assets.data_folder import (  # noqa: F401 (SPLITS, sha256_of re-exported)
    SPLITS,
    DataFolderError,
    check_output_folder,
    sha256_of,
    write_data_folder,
)
from irtuning_plugin.tasks.revision_task import RevisionTask
from irtuning_plugin.user_input import decode_utf8

LOG = logging.getLogger(__name__)

FORMAT_VERSION = 1
DUPLICATE_RULE = ("within a split, a row with the same original, revised and label as an earlier one is dropped "
                  "(duplicate); a val/test row whose (original, revised) is in train, or a test row whose "
                  "(original, revised) is in val, is dropped (duplicate_of_train / duplicate_of_val)")


class ConversionError(ValueError):
    """A source file is not what the converter expects; the message names the file and the row."""


@dataclass
class ConvertedSplit:
    records: list[dict] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)  # source label -> rows left out

    inputs: set[tuple[str, str]] = field(default_factory=set, repr=False)  # (original, revised) kept
    examples: set[tuple[str, str, str]] = field(default_factory=set, repr=False)  # + label

    def drop(self, label: str) -> None:
        self.dropped[label] = self.dropped.get(label, 0) + 1

    def add(self, task: RevisionTask, split: str, prefix: str, source_id: str, label: str, original: str,
            revised: str, earlier: dict[str, ConvertedSplit]) -> None:
        """Append a record numbered ``{prefix}-{split}-NNNNN``, or drop it as a duplicate (module docstring);
        ``earlier``: the splits filled before this one, by name."""
        for name, other in earlier.items():
            if (original, revised) in other.inputs:
                self.drop(f"duplicate_of_{name}")
                return
        if (original, revised, label) in self.examples:
            self.drop("duplicate")
            return
        self.inputs.add((original, revised))
        self.examples.add((original, revised, label))
        self.records.append(make_record(task, f"{prefix}-{split}-{len(self.records):05d}", source_id, label,
                                        original, revised))


def make_record(task: RevisionTask, rid: str, source_id: str, label: str, original: str, revised: str) -> dict:
    return {
        "id": rid,
        "source_id": source_id,
        "label": label,
        "original": original,
        "revised": revised,
        "segments": task.to_segments(original, revised, label),
    }


def read_utf8(path: Path) -> str:
    """The text of ``path`` (a UTF-8 byte-order mark is allowed); not UTF-8: one line naming the line and byte."""
    data = path.read_bytes()
    return decode_utf8(data, lambda line, at: ConversionError(
        f"{path.name} line {line}: not UTF-8 (byte 0x{data[at]:02x} at offset {at}); save the file as UTF-8 and "
        f"convert again"), allow_bom=True)


def check_output(out_dir: str | Path, src: str | Path, force: bool) -> None:
    """Refuse an unsafe output folder before reading anything (``assets.data_folder``), as ConversionError."""
    try:
        check_output_folder(out_dir, sources=[src], force=force)
    except DataFolderError as err:
        raise ConversionError(str(err)) from None


def write_converted(out_dir: str | Path, task: RevisionTask, splits: dict[str, ConvertedSplit], *,
                    source: str, source_files: list[Path], src: str | Path, force: bool = False,
                    extra: dict | None = None) -> dict:
    """Write the three splits and the manifest into ``out_dir`` (our four files only); return the manifest.

    ``src``: what the user gave as the source (file or folder): the output may not be, lie in or hold it.
    ``force``: entries of ``out_dir`` that we did not write are moved aside; the returned manifest (not
    the one written) then has ``moved_aside`` = {original path: new path}.
    """
    out = Path(out_dir).expanduser().resolve()
    manifest = {
        "format_version": FORMAT_VERSION,
        "task": task.name,
        "source": source,
        "labels": list(task.labels),
        "counts": {
            split: {**{lab: sum(r["label"] == lab for r in splits[split].records) for lab in task.labels},
                    "total": len(splits[split].records)}
            for split in SPLITS
        },
        "dropped": {split: dict(sorted(splits[split].dropped.items())) for split in SPLITS},
        "duplicates": DUPLICATE_RULE,
        "source_files": {p.name: {"sha256": sha256_of(p), "bytes": p.stat().st_size} for p in source_files},
        **(extra or {}),
    }
    for split in SPLITS:
        dups = {k: v for k, v in splits[split].dropped.items() if k.startswith("duplicate")}
        if dups:
            LOG.warning("irtuning convert: %s: dropped %s", split, ", ".join(f"{n} {k}" for k, n in dups.items()))
    try:
        written = write_data_folder(out, {split: splits[split].records for split in SPLITS}, manifest,
                                    hash_outputs=True, force=force, sources=[src])
    except DataFolderError as err:
        raise ConversionError(str(err)) from None
    if written.moved_aside:
        return {**manifest, "moved_aside": written.moved_aside}
    return manifest
