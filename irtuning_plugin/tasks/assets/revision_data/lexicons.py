"""Edit lexicons read from installed packages: codespell's dictionaries and proselint's lists.

``codespell``'s dictionaries are GPL: they are read from the installed package at build time and
only the handful of words used in the pairs ends up in the output; nothing of them lives in this repo.
Which entries a label leaves out is that label's business (``labels/<label>.py``).
"""

from __future__ import annotations

import ast
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from irtuning_plugin.tasks.assets.revision_data.sources import PINNED, RevisionDataError, need_file, package_dir

_PLAIN = re.compile(r"^[A-Za-z][A-Za-z' -]*[A-Za-z]$")


def _codespell_pairs(path: Path) -> list[tuple[str, str]]:
    """(wrong, right) from a codespell dictionary file, keeping only entries with a single fix.

    Lines read ``wrong->right``, ``wrong->right1, right2,`` (several candidates) or
    ``wrong->right, reason`` (an entry codespell will not fix on its own); only the first form is used.
    """
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if "->" not in line:
            continue
        wrong, right = (part.strip() for part in line.split("->", 1))
        if "," in right or not _PLAIN.match(wrong) or not _PLAIN.match(right) or wrong == right:
            continue
        out.append((wrong, right))
    return out


def codespell_dictionary_path() -> Path:
    """The installed codespell main dictionary (``misspelling->correction`` lines)."""
    return need_file(package_dir("codespell_lib", "codespell") / "data" / "dictionary.txt", "codespell")


def _proselint_file_pairs(path: Path) -> list[tuple[str, str]]:
    """(flagged, preferred) pairs from one proselint source: a ``flagged,preferred`` data file or a
    python module whose literals hold them (``{"flagged": "preferred"}`` dicts in proselint >= 0.16,
    ``[["preferred", ["flagged", ...]], ...]`` lists in older releases). Nothing is imported."""
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".py":
        return [tuple(p.strip() for p in line.split(",", 1)) for line in text.splitlines() if "," in line]
    out = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and isinstance(value, ast.Constant):
                    if isinstance(key.value, str) and isinstance(value.value, str):
                        out.append((key.value, value.value))
        elif isinstance(node, (ast.List, ast.Tuple)) and len(node.elts) == 2:
            head, tail = node.elts
            if (
                isinstance(head, ast.Constant)
                and isinstance(head.value, str)
                and isinstance(tail, (ast.List, ast.Tuple))
            ):
                for item in tail.elts:
                    if isinstance(item, ast.Constant) and isinstance(item.value, str):
                        out.append((item.value, head.value))
    return out


def _proselint_pairs(root: Path, candidates: Iterable[str]) -> tuple[list[tuple[str, str]], list[str]]:
    pairs, used = [], []
    for rel in candidates:
        path = root / rel
        if path.is_file():
            found = [
                (a, b)
                for a, b in _proselint_file_pairs(path)
                if _PLAIN.match(a) and _PLAIN.match(b) and a.lower() != b.lower()
            ]
            if found:
                pairs += found
                used.append(f"proselint/{rel}")
    return pairs, used


@dataclass
class Lexicons:
    misspellings: dict[str, list[str]]  # correct word -> misspellings of it
    redundancy: dict[str, list[str]]  # concise phrase (lower case) -> wordy forms
    positive_form: dict[str, list[str]]
    needless_variant: dict[str, list[str]]  # preferred (lower case) -> variants
    informal: dict[str, list[str]]  # standard phrase -> informal spelling
    british: dict[str, list[str]]  # US spelling -> British spelling
    files: list[str]


def _invert(pairs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for flagged, preferred in pairs:
        key = preferred.lower()
        if flagged not in out[key]:
            out[key].append(flagged)
    return {k: sorted(v) for k, v in sorted(out.items())}


def load_lexicons(vocabulary: set[str]) -> Lexicons:
    """Read every edit lexicon from the installed packages. ``vocabulary`` (lower-case words seen in
    the corpus) keeps out codespell "misspellings" that are in fact real words."""
    files = []
    cs_data = codespell_dictionary_path().parent
    misspell = [
        (w, r)
        for w, r in _codespell_pairs(cs_data / "dictionary.txt")
        if w.isalpha() and r.isalpha() and w.islower() and r.islower() and w not in vocabulary
    ]
    files.append("codespell_lib/data/dictionary.txt")
    informal = _codespell_pairs(need_file(cs_data / "dictionary_informal.txt", "codespell"))
    files.append("codespell_lib/data/dictionary_informal.txt")
    british = [
        (w, r)
        for w, r in _codespell_pairs(need_file(cs_data / "dictionary_en-GB_to_en-US.txt", "codespell"))
        if w.isalpha() and r.isalpha() and w.islower()
    ]
    files.append("codespell_lib/data/dictionary_en-GB_to_en-US.txt")

    pl = package_dir("proselint", "proselint") / "checks"
    redundancy, f1 = _proselint_pairs(
        pl, ("redundancy/garner", "redundancy/after-the-deadline", "redundancy/misc.py", "redundancy/ras_syndrome.py")
    )
    positive, f2 = _proselint_pairs(pl, ("misc/composition.py",))
    variants, f3 = _proselint_pairs(pl, ("needless-variants", "needless_variants.py"))
    files += f1 + f2 + f3
    lex = Lexicons(
        misspellings=_invert((w, r) for w, r in misspell if len(r) >= 3),
        redundancy=_invert(redundancy),
        positive_form=_invert(positive),
        needless_variant=_invert(variants),
        informal=_invert(informal),
        british=_invert(british),
        files=files,
    )
    for name in ("redundancy", "needless_variant"):
        if not getattr(lex, name):
            raise RevisionDataError(
                f"no {name.replace('_', ' ')} list found in the installed proselint ({pl}); install a "
                f"release that ships them: {sys.executable} -m pip install --no-deps proselint=={PINNED['proselint']}"
            )
    if not lex.misspellings:
        raise RevisionDataError(f"codespell's dictionary under {cs_data} held no usable entries")
    return lex

