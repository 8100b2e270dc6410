"""Label scoring and the classification metrics."""

import pytest
import torch

from irtuning_plugin.tasks.evaluation import classification_metrics, label_logprobs, label_logprobs_naive
from irtuning_plugin.tasks.revision_task import LABELS, format_prompt


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


def test_report_table_json_and_png(tmp_path):
    import json

    from irtuning_plugin.tasks.evaluation import format_report, write_report

    gold = ["clarity", "clarity", "fluency", "style", "coherence", "meaning-changed"]
    pred = ["clarity", "fluency", "fluency", "clarity", "coherence", "style"]
    res = classification_metrics(gold, pred)
    text = format_report(res, title="t")
    lines = text.splitlines()
    assert lines[0] == "t" and lines[1].startswith("n=6 accuracy=0.500 ")
    row = next(x for x in lines if x.startswith("fluency "))
    assert row.split()[1:] == ["0.500", "1.000", "0.667", "1"]
    conf_head = lines.index("confusion matrix (rows: gold, columns: predicted)")
    assert lines[conf_head + 2].split() == ["clarity", "1", "1", "0", "0", "0"]
    paths = write_report(res, tmp_path / "r", {"setup": "x"}, ids=list("abcdef"), gold=gold)
    data = json.loads(paths["json"].read_text())
    assert data["setup"] == "x" and data["confusion"] == res.confusion and data["macro_f1"] == res.macro_f1
    assert data["predictions"][1] == {"id": "b", "gold": "clarity", "predicted": "fluency"}
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


@pytest.mark.slow
def test_eval_cli_on_converted_data_with_both_setups(tmp_path, tiny_model_dir, capsys):
    """`irtuning eval` on converted ITERATER (completion setup, base model) and on converted ArgRevision with a
    classifier trained by `irtuning train-seqcls`: six labels, report files, predictions = the head's argmax."""
    import json
    from pathlib import Path

    from irtuning_plugin.cli import main
    from irtuning_plugin.tasks.seq_classification import class_logits, load_records, load_seq_cls_for_eval, prompt_of

    fixtures = Path(__file__).resolve().parent / "fixtures"
    assert main(["convert", "iterater", str(fixtures / "iterater_human_sent"), str(tmp_path / "it")]) == 0
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(tmp_path / "it"),
                 "--report-dir", str(tmp_path / "rep-it")]) == 0
    out = capsys.readouterr().out
    assert "completion (label scoring) on revision-intention test" in out and "confusion matrix" in out
    it = json.loads((tmp_path / "rep-it" / "eval.json").read_text())
    assert it["n"] == 4 and it["labels"] == list(LABELS) and (tmp_path / "rep-it" / "confusion.png").exists()

    assert main(["convert", "argrevision", str(fixtures / "argrevision" / "revision_purpose.csv"),
                 str(tmp_path / "arg")]) == 0
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(tmp_path / "arg"), "--report-dir",
                 str(tmp_path / "rep-arg")]) == 0  # completion setup on a six-label task
    assert "completion (label scoring) on argument-revision-purpose test" in capsys.readouterr().out
    arg = json.loads((tmp_path / "rep-arg" / "eval.json").read_text())
    assert len(arg["labels"]) == 6 and {p["predicted"] for p in arg["predictions"]} <= set(arg["labels"])
    assert main(["train-seqcls", "--model", str(tiny_model_dir), "--data", str(tmp_path / "arg"), "--output",
                 str(tmp_path / "cls"), "--strategy", "ir", "--max-steps", "2", "--batch-size", "4",
                 "--warmup-steps", "0", "--set", "irtuning_heatmap=false"]) == 0
    assert main(["eval", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "cls"), "--data",
                 str(tmp_path / "arg"), "--split", "train"]) == 0
    out = capsys.readouterr().out
    assert "seq_cls (classification head, argmax) on argument-revision-purpose train" in out
    rep = json.loads((tmp_path / "cls" / "eval-train" / "eval.json").read_text())
    records, task = load_records(tmp_path / "arg", "train")
    assert rep["labels"] == list(task.labels) and len(rep["labels"]) == 6 and rep["n"] == len(records)
    model, tok, labels = load_seq_cls_for_eval(str(tiny_model_dir), str(tmp_path / "cls"))
    want = [labels[i] for i in class_logits(model, tok, [prompt_of(r, task) for r in records]).argmax(1).tolist()]
    assert [p["predicted"] for p in rep["predictions"]] == want
    assert main(["train-seqcls", "--model", str(tiny_model_dir), "--output", str(tmp_path / "x"),
                 "--set", "irtuning_ir_windw=0.3"]) == 2
    assert "irtuning_ir_windw is not an irtuning key" in capsys.readouterr().err
