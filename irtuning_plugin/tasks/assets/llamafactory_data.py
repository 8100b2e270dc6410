"""The built-in revision-intention data in LLaMA-Factory's layout: a folder with ``dataset_info.json``.

A recipe says ``dataset_dir: irtuning://revision-intention`` and ``dataset: revision_intention_train``;
each record becomes ``{"instruction": prompt, "output": label}`` (alpaca columns), so with
``template: empty`` the model sees exactly the text that ``irtuning eval`` scores.
"""

from __future__ import annotations

import json
from pathlib import Path

from irtuning_plugin.references import LLAMAFACTORY_SOURCE_STAMP, LLAMAFACTORY_SUBDIR, SPLITS
from irtuning_plugin.tasks.assets.references import revision_data_dir

SUBDIR = LLAMAFACTORY_SUBDIR
DATASET_PREFIX = "revision_intention_"
_STAMP = LLAMAFACTORY_SOURCE_STAMP


def dataset_names() -> list[str]:
    return [DATASET_PREFIX + s for s in SPLITS]


def _convert(record: dict) -> dict:
    segments = record["segments"]
    return {"instruction": "".join(s["text"] for s in segments if not s["label"]),
            "output": "".join(s["text"] for s in segments if s["label"])}


def llamafactory_dataset_dir() -> Path:
    """Folder with ``dataset_info.json`` and one JSONL file per split (rebuilt when the source changes)."""
    src = revision_data_dir()
    dest = src / SUBDIR
    source_id = (src / "manifest.json").read_text(encoding="utf-8")
    stamp = dest / _STAMP
    if stamp.exists() and stamp.read_text(encoding="utf-8") == source_id:
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    info = {}
    for split in SPLITS:
        rows = [json.loads(x) for x in (src / f"{split}.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
        name = f"{split}.jsonl"
        with open(dest / name, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(_convert(row)) + "\n")
        info[DATASET_PREFIX + split] = {"file_name": name, "columns": {"prompt": "instruction", "response": "output"}}
    (dest / "dataset_info.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    stamp.write_text(source_id, encoding="utf-8")
    return dest
