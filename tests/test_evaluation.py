"""Label scoring and the classification metrics."""

import pytest
import torch

from irtuning_plugin.evaluation import classification_metrics, label_logprobs, label_logprobs_naive
from irtuning_plugin.revision_task import LABELS, format_prompt


def test_cached_label_scoring_equals_full_forward_scoring(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompts = [format_prompt("He go home.", "He goes home."),
               format_prompt("It was a very unique and truly remarkable day in the city.", "It was a unique day."),
               format_prompt("a", "b")]
    fast = label_logprobs(model, tok, prompts, batch_size=2)  # mixed prompt lengths in a batch: padding matters
    slow = label_logprobs_naive(model, tok, prompts)
    assert fast.shape == (3, len(LABELS))
    assert torch.allclose(fast, slow, atol=2e-4, rtol=1e-5), (fast - slow).abs().max()


def test_metrics_hand_computed():
    gold = ["clarity", "clarity", "fluency", "style"]
    pred = ["clarity", "fluency", "fluency", "clarity"]
    m = classification_metrics(gold, pred)
    assert m.accuracy == pytest.approx(0.5)
    assert m.per_class["clarity"]["precision"] == pytest.approx(0.5)
    assert m.per_class["clarity"]["recall"] == pytest.approx(0.5)
    assert m.per_class["fluency"]["f1"] == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert m.macro_f1 == pytest.approx((0.5 + 2 / 3 + 0 + 0 + 0) / 5)
    assert m.confusion[0] == [1, 1, 0, 0, 0]
