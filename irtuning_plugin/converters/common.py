"""What every converter shares: the error type, the record shape and the folder it writes.

A converted folder looks like the built-in data set: ``train.jsonl``, ``val.jsonl``, ``test.jsonl``
(one record a line: ``id``, ``source_id``, ``label``, ``original``, ``revised``, ``segments``) and
``manifest.json`` (task, labels, counts per label and split, what was dropped, sha256 of every source
and output file). ``segments`` is Axolotl's ``input_output`` form, so a recipe trains on the folder
as it is, and the evaluation reads the task and labels from the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from irtuning_plugin.assets.data_folder import SPLITS, sha256_of, write_data_folder  # noqa: F401 (re-exported)
from irtuning_plugin.revision_task import RevisionTask

FORMAT_VERSION = 1


class ConversionError(ValueError):
    """A source file is not what the converter expects; the message names the file and the row."""


@dataclass
class ConvertedSplit:
    records: list[dict] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)  # source label -> rows left out

    def drop(self, label: str) -> None:
        self.dropped[label] = self.dropped.get(label, 0) + 1


def make_record(task: RevisionTask, rid: str, source_id: str, label: str, original: str, revised: str) -> dict:
    return {
        "id": rid,
        "source_id": source_id,
        "label": label,
        "original": original,
        "revised": revised,
        "segments": task.to_segments(original, revised, label),
    }


def write_converted(out_dir: str | Path, task: RevisionTask, splits: dict[str, ConvertedSplit], *,
                    source: str, source_files: list[Path], extra: dict | None = None) -> dict:
    """Write the three splits and the manifest into ``out_dir`` (replaced as a whole); return the manifest."""
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
        "source_files": {p.name: {"sha256": sha256_of(p), "bytes": p.stat().st_size} for p in source_files},
        **(extra or {}),
    }
    write_data_folder(out, {split: splits[split].records for split in SPLITS}, manifest, hash_outputs=True)
    return manifest
