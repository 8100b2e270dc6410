"""Building what an ``irtuning://`` reference names (on first use), for the commands that may build.

The references, their folders and formats are :mod:`irtuning_plugin.references`; the plugin's integrations
resolve them there without building. Here each reference is built when missing or out of date:

    base_model: irtuning://smollm2-135m-instruct      # SmolLM2-135M-Instruct, converted from GGUF
    base_model: irtuning://tiny-llama                  # tiny random-init Llama (tests)
    datasets:
      - path: irtuning://revision-intention/train.jsonl
      - path: irtuning://tweet-sentiment/train.jsonl   # human-rated tweets (vaderSentiment's sdist)

Assets live in ``$IRTUNING_CACHE`` (default ``~/.cache/irtuning``), never in the repository.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from irtuning_plugin.references import (
    DEFAULT_DATA_SEED,
    REVISION_DATA,
    SCHEME,
    SMOLLM2,
    SPLITS,
    TINY_LLAMA,
    TWEET_DATA,
    cache_root,
    data_dir,
    data_format_problem,
    is_reference,
    parse_reference,
    resolve_axolotl_references,
)
from irtuning_plugin.tasks.assets.models import prepare_smollm2, prepare_tiny_llama

LOG = logging.getLogger(__name__)

DATA_NAME = REVISION_DATA
TWEET_DATA_NAME = TWEET_DATA
__all__ = ["DATA_BUILDERS", "DATA_NAME", "DEFAULT_DATA_SEED", "SCHEME", "SPLITS", "TWEET_DATA_NAME", "build_references",
           "data_dir_for", "resolve_asset_references", "resolve_reference", "revision_data_dir", "tweet_data_dir"]


def revision_data_dir(cache: Path | None = None, seed: int = DEFAULT_DATA_SEED) -> Path:
    """The built-in revision-intention data set (built once per seed)."""
    from irtuning_plugin.tasks.assets.revision_data import build_revision_dataset

    dest = data_dir(REVISION_DATA, seed, cache)
    if data_format_problem(dest, REVISION_DATA):
        LOG.info("irtuning: building the revision-intention data set in %s", dest)
        build_revision_dataset(dest, seed=seed)
    return dest


def tweet_data_dir(cache: Path | None = None, seed: int = DEFAULT_DATA_SEED) -> Path:
    """The tweet-sentiment data set (human-rated tweets; built once per seed)."""
    from irtuning_plugin.tasks.assets.tweet_sentiment_data import build_tweet_dataset

    root = cache or cache_root()
    dest = data_dir(TWEET_DATA, seed, root)
    if data_format_problem(dest, TWEET_DATA):
        LOG.info("irtuning: building the tweet-sentiment data set in %s", dest)
        build_tweet_dataset(dest, seed=seed, cache=root / "sources")
    return dest


DATA_BUILDERS = {REVISION_DATA: revision_data_dir, TWEET_DATA: tweet_data_dir}
MODEL_BUILDERS = {SMOLLM2: prepare_smollm2, TINY_LLAMA: prepare_tiny_llama}


def data_dir_for(task: str) -> Path:
    """The built-in data folder of a task by name (built on first use)."""
    if task not in DATA_BUILDERS:
        raise ValueError(f"unknown task {task!r}; allowed: {', '.join(DATA_BUILDERS)}")
    return DATA_BUILDERS[task]()


def resolve_reference(value: str) -> str:
    """A reference's path, building the asset first when it is missing; anything else unchanged."""
    if not is_reference(value):
        return value
    name, split = parse_reference(value)
    if name in MODEL_BUILDERS:
        return str(MODEL_BUILDERS[name]())
    folder = DATA_BUILDERS[name]()
    return str(folder / f"{split}.jsonl") if split else str(folder)


def resolve_asset_references(cfg: Any) -> Any:
    """Replace ``irtuning://`` values in an Axolotl config (a dict) in place, building what is missing."""
    return resolve_axolotl_references(cfg, resolve_reference)


def build_references(values) -> list[str]:
    """Build every asset the given references name (``irtuning prepare REF...``); their paths, in order."""
    return [resolve_reference(value) for value in values]
