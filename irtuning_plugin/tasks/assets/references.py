"""``irtuning://`` references in a recipe, resolved to the built-in assets (built on first use).

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

from irtuning_plugin.tasks.assets.data_folder import SPLITS
from irtuning_plugin.tasks.assets.models import cache_root, prepare_smollm2, prepare_tiny_llama

LOG = logging.getLogger(__name__)

SCHEME = "irtuning://"
DATA_NAME = "revision-intention"
TWEET_DATA_NAME = "tweet-sentiment"
DEFAULT_DATA_SEED = 171


def revision_data_dir(cache: Path | None = None, seed: int = DEFAULT_DATA_SEED) -> Path:
    """The built-in revision-intention data set (built once per seed)."""
    import json

    from irtuning_plugin.tasks.assets.revision_data import FORMAT_VERSION, build_revision_dataset

    dest = (cache or cache_root()) / "data" / f"{DATA_NAME}-seed{seed}"
    manifest = dest / "manifest.json"
    current = manifest.exists() and json.loads(manifest.read_text()).get("format_version") == FORMAT_VERSION
    if not current:
        LOG.info("irtuning: building the revision-intention data set in %s", dest)
        build_revision_dataset(dest, seed=seed)
    return dest


def tweet_data_dir(cache: Path | None = None, seed: int = DEFAULT_DATA_SEED) -> Path:
    """The tweet-sentiment data set (human-rated tweets; built once per seed)."""
    import json

    from irtuning_plugin.tasks.assets.tweet_sentiment_data import FORMAT_VERSION, TASK, build_tweet_dataset

    root = cache or cache_root()
    dest = root / "data" / f"{TASK}-seed{seed}"
    manifest = dest / "manifest.json"
    current = manifest.exists() and json.loads(manifest.read_text()).get("format_version") == FORMAT_VERSION
    if not current:
        LOG.info("irtuning: building the tweet-sentiment data set in %s", dest)
        build_tweet_dataset(dest, seed=seed, cache=root / "sources")
    return dest


DATA_BUILDERS = {DATA_NAME: revision_data_dir, TWEET_DATA_NAME: tweet_data_dir}


def data_dir_for(task: str) -> Path:
    """The built-in data folder of a task by name (built on first use)."""
    if task not in DATA_BUILDERS:
        raise ValueError(f"unknown task {task!r}; allowed: {', '.join(DATA_BUILDERS)}")
    return DATA_BUILDERS[task]()


def resolve_reference(value: str) -> str:
    if not isinstance(value, str) or not value.startswith(SCHEME):
        return value
    rest = value[len(SCHEME):].strip("/")
    if rest == "smollm2-135m-instruct":
        return str(prepare_smollm2())
    if rest == "tiny-llama":
        return str(prepare_tiny_llama())
    parts = rest.split("/")
    if parts[0] in DATA_BUILDERS:
        data_dir = DATA_BUILDERS[parts[0]]()
        if len(parts) == 1:
            return str(data_dir)
        split = parts[1].removesuffix(".jsonl")
        if len(parts) == 2 and split in SPLITS:
            return str(data_dir / f"{split}.jsonl")
    raise ValueError(
        f"unknown asset reference {value!r}; allowed: {SCHEME}smollm2-135m-instruct, {SCHEME}tiny-llama, "
        + ", ".join(f"{SCHEME}{name}/{s}.jsonl" for name in DATA_BUILDERS for s in SPLITS)
    )


def resolve_asset_references(cfg: Any) -> Any:
    """Replace ``irtuning://`` values in an Axolotl config (a dict) in place."""
    for key in ("base_model", "base_model_config", "tokenizer_config"):
        if isinstance(cfg.get(key), str):
            cfg[key] = resolve_reference(cfg[key])
    for key in ("datasets", "test_datasets"):
        for ds in cfg.get(key) or []:
            if isinstance(ds, dict) and isinstance(ds.get("path"), str):
                ds["path"] = resolve_reference(ds["path"])
    return cfg
