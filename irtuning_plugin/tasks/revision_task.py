"""The revision classification tasks: their labels and the exact prompt text.

One module owns the prompts so that the data builder, the converters, the Axolotl recipes
(``type: input_output`` segments), the sequence-classification setup and the evaluation all use the
very same strings. A data folder says which task it holds in its ``manifest.json`` (``task``,
``labels``); :func:`task_of_manifest` maps that back to a :class:`RevisionTask`.
"""

from __future__ import annotations

from dataclasses import dataclass


def completion_text(label: str) -> str:
    """A label as the continuation of its prompt: after one space (every task)."""
    return " " + label


@dataclass(frozen=True)
class RevisionTask:
    name: str
    labels: tuple[str, ...]
    template: str  # with {labels}, {original}, {revised}

    def format_prompt(self, original: str, revised: str) -> str:
        """Prompt text that precedes the label; the label follows after one space."""
        return self.template.format(labels=", ".join(self.labels), original=original.strip(),
                                    revised=revised.strip())

    def label_completion(self, label: str) -> str:
        """Completion text the model is trained to produce (the end-of-sequence token is added by the
        tokenizer side: Axolotl appends EOS to the last segment when asked, evaluation scores without it)."""
        if label not in self.labels:
            raise ValueError(f"unknown {self.name} label {label!r}; allowed: {', '.join(self.labels)}")
        return completion_text(label)

    def to_segments(self, original: str, revised: str, label: str) -> list[dict]:
        """Axolotl ``type: input_output`` record: the prompt is masked, only the label trains."""
        return [
            {"text": self.format_prompt(original, revised), "label": False},
            {"text": self.label_completion(label), "label": True},
        ]


# ITERATER-human's sentence-level intentions ("others" dropped), in the paper's order. The built-in data
# set and converted ITERATER files share this task, so a model trained on one is evaluated on the other.
INTENTION = RevisionTask(
    name="revision-intention",
    labels=("clarity", "fluency", "coherence", "style", "meaning-changed"),
    template="Classify the intention of this sentence revision as one of: {labels}.\n"
             "Original: {original}\nRevised: {revised}\nIntention:",
)

# ArgRevision's revision purposes ("claim" dropped, as in the reference), in the reference's order. The
# released sheet spells two of them "LCE" / "not LCE"; the converter writes them out. (The reference builds
# its ArgRevision val/test prompts with the ITERATER instruction, a slip; ours use this task's prompt in every
# split.)
ARGUMENT_PURPOSE = RevisionTask(
    name="argument-revision-purpose",
    labels=("relevant", "irrelevant", "already exists", "linked claim-evidence", "not linked claim-evidence",
            "commentary"),
    template="Classify the purpose of this revision of an argumentative essay as one of: {labels}.\n"
             "Original: {original}\nRevised: {revised}\nPurpose:",
)

# The second benchmark task (tasks/assets/tweet_sentiment_data.py, human-rated tweets): one text, not a revision
# pair. Its records always carry their prompt segment, which evaluation reads; where a prompt has to be
# rebuilt, ``original`` stands for the tweet.
TWEET_SENTIMENT = RevisionTask(
    name="tweet-sentiment",
    labels=("negative", "neutral", "positive"),
    template="Classify the sentiment of this tweet as one of: {labels}.\nTweet: {original}\nSentiment:",
)

TASKS: dict[str, RevisionTask] = {t.name: t for t in (INTENTION, ARGUMENT_PURPOSE, TWEET_SENTIMENT)}

LABELS: tuple[str, ...] = INTENTION.labels


def format_prompt(original: str, revised: str) -> str:
    return INTENTION.format_prompt(original, revised)


def label_completion(label: str) -> str:
    return INTENTION.label_completion(label)


def to_segments(original: str, revised: str, label: str) -> list[dict]:
    return INTENTION.to_segments(original, revised, label)


def task_of_manifest(manifest: dict) -> RevisionTask:
    """The task a data folder's manifest names (``task`` key); its labels must match the manifest's."""
    name = manifest.get("task", INTENTION.name)
    if name not in TASKS:
        raise ValueError(f"manifest task {name!r} is not a known task; allowed: {', '.join(TASKS)}")
    task = TASKS[name]
    if "labels" in manifest and tuple(manifest["labels"]) != task.labels:
        raise ValueError(f"manifest labels {manifest['labels']} differ from task {name!r}'s {list(task.labels)}")
    return task
