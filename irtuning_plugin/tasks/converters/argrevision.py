"""ArgRevision (argumentative-essay revisions, revision purposes) -> our records, split as the reference.

Source: the spreadsheet the IR-Tuning reference reads (``data/revision_purpose.xlsx``; the corpus is
shared by its authors on request, see docs/paper-task.md), or the same sheet saved as CSV. The first row names
the columns; the converter needs

    old_sentences, new_sentences, purpose_labels

(other columns are ignored). An empty cell is an empty sentence (an added or a deleted sentence).
Purposes: relevant, irrelevant, already exists, LCE, not LCE, commentary, and claim; as in the
reference (``get_erevise_purpose_data``) ``claim`` rows are left out, and LCE / not LCE are written
out as "linked claim-evidence" / "not linked claim-evidence".

Split, as in the reference's ``main.py``: shuffle every row (claim rows included) with
``pandas.DataFrame.sample(frac=1, random_state=seed)``, then ``train_test_split(test_size=0.2,
random_state=seed)`` and ``train_test_split(test_size=0.5, random_state=seed)`` of the held-out part
into val and test (seed 171). Both are reproduced here with numpy's ``RandomState``; the test checks
the result against pandas and scikit-learn where they are installed. After the split, duplicate rows, and
val/test rows whose sentence pair is already in train (or, for test, in val), are dropped and counted
(``common.DUPLICATE_RULE``).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from irtuning_plugin.tasks.converters.common import (
    ConversionError,
    ConvertedSplit,
    check_output,
    read_utf8,
    write_converted,
)
from irtuning_plugin.tasks.converters.xlsx import XlsxError, read_first_sheet
from irtuning_plugin.tasks.revision_task import ARGUMENT_PURPOSE

COLUMNS = ("old_sentences", "new_sentences", "purpose_labels")
LABEL_MAP = {
    "relevant": "relevant",
    "irrelevant": "irrelevant",
    "already exists": "already exists",
    "LCE": "linked claim-evidence",
    "not LCE": "not linked claim-evidence",
    "commentary": "commentary",
}
DROPPED_LABELS = ("claim",)
SOURCE_LABELS = (*LABEL_MAP, *DROPPED_LABELS)
DEFAULT_SEED = 171
assert tuple(LABEL_MAP.values()) == ARGUMENT_PURPOSE.labels


def _read_table(path: Path) -> list[list[str]]:
    if path.suffix.lower() == ".xlsx":
        try:
            return read_first_sheet(path)
        except XlsxError as err:
            raise ConversionError(str(err)) from None
    if path.suffix.lower() == ".csv":
        try:
            return list(csv.reader(io.StringIO(read_utf8(path), newline="")))
        except csv.Error as err:
            raise ConversionError(f"{path.name}: not a readable CSV sheet ({err})") from None
    raise ConversionError(f"{path.name}: expected the ArgRevision sheet as .xlsx (revision_purpose.xlsx) or .csv")


def _cell(value: str) -> str:
    # pandas reads an empty cell as NaN and the reference turns str(NaN) == "nan" into ""
    return "" if value is None or value == "nan" else value


def read_rows(src: str | Path) -> list[tuple[int, str, str, str]]:
    """``(sheet row number, old, new, source label)`` for every data row, in sheet order."""
    path = Path(src).expanduser()
    if not path.is_file():
        raise ConversionError(f"{path} not found; give the ArgRevision sheet (revision_purpose.xlsx or a .csv of it)")
    table = _read_table(path)
    if not table:
        raise ConversionError(f"{path.name}: the sheet is empty")
    header = [h.strip() for h in table[0]]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise ConversionError(f"{path.name} row 1 (header): missing column {missing[0]!r}; the sheet needs "
                              f"{', '.join(COLUMNS)} (found: {', '.join(h for h in header if h) or 'none'})")
    idx = [header.index(c) for c in COLUMNS]
    out = []
    for no, row in enumerate(table[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        old, new, label = (_cell(row[i]) if i < len(row) else "" for i in idx)
        label = label.strip()
        if label not in SOURCE_LABELS:
            raise ConversionError(f"{path.name} row {no}: unknown purpose_labels {label!r}; allowed: "
                                  f"{', '.join(SOURCE_LABELS)}")
        out.append((no, old, new, label))
    if not out:
        raise ConversionError(f"{path.name}: no data rows under the header")
    return out


def _train_test_split(n: int, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (train, test) as scikit-learn's ``train_test_split(..., test_size, random_state=seed)``."""
    n_test = math.ceil(test_size * n)
    perm = np.random.RandomState(seed).permutation(n)
    return perm[n_test:], perm[:n_test]


def reference_split(n: int, seed: int = DEFAULT_SEED) -> dict[str, list[int]]:
    """Row positions of each split, as the reference's shuffle and two train_test_split calls give them."""
    shuffled = np.random.RandomState(seed).permutation(n)  # DataFrame.sample(frac=1, random_state=seed)
    train, temp = _train_test_split(n, 0.2, seed)
    val, test = _train_test_split(len(temp), 0.5, seed)
    return {"train": shuffled[train].tolist(), "val": shuffled[temp[val]].tolist(),
            "test": shuffled[temp[test]].tolist()}


def convert_argrevision(src: str | Path, out_dir: str | Path, seed: int = DEFAULT_SEED, *, force: bool = False) -> dict:
    """Convert the ArgRevision sheet ``src`` into ``out_dir`` with the reference's split; returns the manifest.

    ``force``: move entries of ``out_dir`` we did not write aside (``manifest["moved_aside"]``) instead
    of refusing. Raises :class:`ConversionError` (one line) for bad input or an unsafe ``out_dir``.
    """
    path = Path(src).expanduser()
    check_output(out_dir, path, force)
    rows = read_rows(path)
    positions = reference_split(len(rows), seed)
    splits: dict[str, ConvertedSplit] = {}
    for split, pos in positions.items():
        out = ConvertedSplit()
        for p in pos:
            no, old, new, label = rows[p]
            if label in DROPPED_LABELS:
                out.drop(label)
                continue
            out.add(ARGUMENT_PURPOSE, split, "argrevision", f"{path.name}:row{no}", LABEL_MAP[label], old, new,
                    earlier=dict(splits))
        splits[split] = out
    return write_converted(out_dir, ARGUMENT_PURPOSE, splits, source="ArgRevision revision purposes",
                           source_files=[path], src=path, force=force, extra={"split": {"method": "reference (shuffle, 80/10/10)",
                                                                 "seed": seed}})
