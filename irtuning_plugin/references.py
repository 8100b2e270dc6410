"""``irtuning://`` references in a recipe, resolved to built-in assets that are already built.

    base_model: irtuning://smollm2-135m-instruct      # SmolLM2-135M-Instruct, converted from GGUF
    base_model: irtuning://tiny-llama                  # tiny random-init Llama (tests)
    datasets:
      - path: irtuning://revision-intention/train.jsonl
      - path: irtuning://tweet-sentiment/train.jsonl   # human-rated tweets (vaderSentiment's sdist)
    dataset_dir: irtuning://revision-intention         # LLaMA-Factory: the same data in its layout

This module only knows where each asset lives in ``$IRTUNING_CACHE`` (default ``~/.cache/irtuning``) and
whether it is there, complete and of the format this version reads. Building is the tasks' job
(:mod:`irtuning_plugin.tasks.assets`): ``irtuning prepare REFERENCE...`` builds any of them, and the
``demo``, ``eval``, ``train-seqcls`` and ``llamafactory`` commands build the ones they are given. An
integration (Axolotl's ``register``, the LLaMA-Factory launcher) resolves with :func:`built_path`, which
never builds: a missing asset is one line saying which command builds it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

SCHEME = "irtuning://"
SPLITS = ("train", "val", "test")
DEFAULT_DATA_SEED = 171
SMOLLM2 = "smollm2-135m-instruct"
TINY_LLAMA = "tiny-llama"
REVISION_DATA = "revision-intention"
TWEET_DATA = "tweet-sentiment"
# The folder each model reference names, under cache_root() / "models" (tiny-llama: its default shape).
MODEL_FOLDERS = {SMOLLM2: "smollm2-135m-instruct", TINY_LLAMA: "tiny-llama-8x64"}
# The manifest format each data set's builder writes (tests/test_references.py checks the builders agree).
DATA_FORMATS = {REVISION_DATA: 1, TWEET_DATA: 1}
MODEL_DONE = ".irtuning-complete"  # written last into a model folder by its builder
LLAMAFACTORY_SUBDIR = "llamafactory"  # the revision data in LLaMA-Factory's layout, inside the data folder
LLAMAFACTORY_SOURCE_STAMP = ".irtuning-source"  # that folder's copy of the manifest it was converted from
# Axolotl config keys that may hold a reference (datasets: each entry's ``path``).
AXOLOTL_MODEL_KEYS = ("base_model", "base_model_config", "tokenizer_config")
AXOLOTL_DATASET_KEYS = ("datasets", "test_datasets")


class AssetNotBuiltError(ValueError):
    """An ``irtuning://`` reference to an asset that is not built (or was built in another format)."""


def cache_root() -> Path:
    """Where built assets live: ``$IRTUNING_CACHE`` or ``~/.cache/irtuning`` (never inside the repo)."""
    return Path(os.environ.get("IRTUNING_CACHE") or Path.home() / ".cache" / "irtuning").expanduser()


def data_dir(name: str, seed: int = DEFAULT_DATA_SEED, cache: Path | None = None) -> Path:
    """The cache folder of a built-in data set (built or not)."""
    return (cache or cache_root()) / "data" / f"{name}-seed{seed}"


def is_reference(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(SCHEME)


def parse_reference(value: str) -> tuple[str, str | None]:
    """``(asset name, split or None)`` of a reference; an unknown one is refused with the allowed values."""
    rest = value[len(SCHEME):].strip("/")
    if rest in MODEL_FOLDERS:
        return rest, None
    parts = rest.split("/")
    if parts[0] in DATA_FORMATS:
        if len(parts) == 1:
            return parts[0], None
        split = parts[1].removesuffix(".jsonl")
        if len(parts) == 2 and split in SPLITS:
            return parts[0], split
    raise ValueError(
        f"unknown asset reference {value!r}; allowed: {SCHEME}{SMOLLM2}, {SCHEME}{TINY_LLAMA}, "
        + ", ".join(f"{SCHEME}{name}/{s}.jsonl" for name in DATA_FORMATS for s in SPLITS)
    )


def _not_built(value: str, why: str, how: str | None = None) -> AssetNotBuiltError:
    how = how or f"`irtuning prepare {value}`"
    return AssetNotBuiltError(f"{value}: {why}; build it with {how} (needs pip install 'irtuning[tasks]'; "
                              f"`irtuning demo` builds the demo's own)")


def data_format_problem(folder: Path, name: str) -> str | None:
    """Why ``folder`` is not a usable build of data set ``name`` (None when it is)."""
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return f"not built yet (no {manifest})"
    try:
        found = json.loads(manifest.read_text(encoding="utf-8")).get("format_version")
    except (ValueError, AttributeError):
        return f"{manifest} is not a JSON object"
    if found != DATA_FORMATS[name]:
        return f"built in format {found!r}, this version of irtuning reads format {DATA_FORMATS[name]}"
    return None


def built_path(value: Any) -> Any:
    """A reference's path in the cache when the asset is built; anything else unchanged. Never builds."""
    if not is_reference(value):
        return value
    name, split = parse_reference(value)
    if name in MODEL_FOLDERS:
        folder = cache_root() / "models" / MODEL_FOLDERS[name]
        if not (folder / MODEL_DONE).is_file():
            raise _not_built(value, f"not built yet (no complete model folder at {folder})")
        return str(folder)
    folder = data_dir(name)
    problem = data_format_problem(folder, name)
    if problem:
        raise _not_built(value, problem)
    return str(folder / f"{split}.jsonl") if split else str(folder)


def llamafactory_built_dir(value: str) -> str:
    """``dataset_dir: irtuning://revision-intention``: the LLaMA-Factory copy of the built data. Never builds."""
    how = "`irtuning llamafactory check RECIPE.yaml` (or `train`), which builds what the recipe names"
    folder = data_dir(REVISION_DATA)
    problem = data_format_problem(folder, REVISION_DATA)
    dest = folder / LLAMAFACTORY_SUBDIR
    stamp = dest / LLAMAFACTORY_SOURCE_STAMP
    if not problem and not (stamp.is_file() and stamp.read_text(encoding="utf-8")
                            == (folder / "manifest.json").read_text(encoding="utf-8")):
        problem = f"not converted to LLaMA-Factory's layout yet (no current {dest})"
    if problem:
        raise _not_built(value, problem, how)
    return str(dest)


def axolotl_reference_slots(cfg: Any) -> list[tuple[Any, str]]:
    """``(container, key)`` of every reference in an Axolotl config: model keys and each dataset's path."""
    slots = [(cfg, key) for key in AXOLOTL_MODEL_KEYS if is_reference(cfg.get(key))]
    for key in AXOLOTL_DATASET_KEYS:
        for ds in cfg.get(key) or []:
            if isinstance(ds, dict) and is_reference(ds.get("path")):
                slots.append((ds, "path"))
    return slots


def resolve_axolotl_references(cfg: Any, resolve=built_path) -> Any:
    """Replace the references of an Axolotl config (a dict) in place with ``resolve(value)``."""
    for container, key in axolotl_reference_slots(cfg):
        container[key] = resolve(container[key])
    return cfg
