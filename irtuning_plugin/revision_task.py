"""The revision-intention classification task: labels and the exact prompt text.

One module owns the prompt so that the data builder, the Axolotl recipe (``type: input_output``
segments) and the label-scoring evaluation all tokenize the very same strings.
"""

from __future__ import annotations

# ITERATER-human's sentence-level intentions ("others" dropped), in the paper's order.
LABELS: tuple[str, ...] = ("clarity", "fluency", "coherence", "style", "meaning-changed")

_PROMPT = (
    "Classify the intention of this sentence revision as one of: "
    + ", ".join(LABELS)
    + ".\nOriginal: {original}\nRevised: {revised}\nIntention:"
)


def format_prompt(original: str, revised: str) -> str:
    """Prompt text that precedes the label; the label follows after one space."""
    return _PROMPT.format(original=original.strip(), revised=revised.strip())


def label_completion(label: str) -> str:
    """Completion text the model is trained to produce (the end-of-sequence token is added by the
    tokenizer side: Axolotl appends EOS to the last segment when asked, evaluation scores without it)."""
    if label not in LABELS:
        raise ValueError(f"unknown revision label {label!r}; allowed: {', '.join(LABELS)}")
    return " " + label


def to_segments(original: str, revised: str, label: str) -> list[dict]:
    """Axolotl ``type: input_output`` record: the prompt is masked, only the label trains."""
    return [
        {"text": format_prompt(original, revised), "label": False},
        {"text": label_completion(label), "label": True},
    ]
