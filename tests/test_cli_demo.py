"""The demo's closing table: per-class recall and F1 before and after training, and the overall line."""

from irtuning_plugin.tasks.commands import demo_table, demo_train_command
from irtuning_plugin.tasks.evaluation import classification_metrics
from irtuning_plugin.tasks.revision_task import LABELS


def test_demo_table_reports_each_class_before_and_after():
    gold = [lab for lab in LABELS for _ in range(4)]  # 20 examples, 4 per class
    before = classification_metrics(gold, ["clarity"] * len(gold))  # one class predicted for everything
    after_pred = list(gold)
    after_pred[0] = "style"  # one clarity example wrong
    after = classification_metrics(gold, after_pred)
    lines = demo_table(before, after).splitlines()
    assert lines[0].startswith("held-out test examples (n=20")
    rows = {line.split()[0]: line.split() for line in lines[2:-1]}
    assert list(rows) == list(LABELS)
    # clarity: recall 1.00 -> 0.75; F1 before = 2*(0.2*1)/(1.2) = 0.33, after = 2*(1*0.75)/1.75 = 0.86
    assert rows["clarity"][1:] == ["4", "1.00", "->", "0.75", "0.33", "->", "0.86"]
    assert rows["fluency"][1:] == ["4", "0.00", "->", "1.00", "0.00", "->", "1.00"]
    # style: recall 0 -> 1, precision after 4/5: F1 = 2*0.8/1.8 = 0.89
    assert rows["style"][-1] == "0.89"
    assert lines[-1] == ("test accuracy 0.200 -> 0.950; macro-F1 "
                         f"{before.macro_f1:.3f} -> {after.macro_f1:.3f} (chance 1/5 = 0.200)")


def test_demo_max_steps_reaches_axolotl_as_a_config_option():
    """`irtuning demo --max-steps N` must override the recipe: Axolotl 0.19's click parser must read it as its
    max_steps option, not as an unknown extra argument (which `--launcher python` drops silently)."""
    from axolotl.cli.main import train

    cmd = demo_train_command("yaml_recipes/demo-smollm2-ir.yaml", "python", 12)
    args = cmd[cmd.index("train") + 1:]
    ctx = train.make_context("train", list(args))
    assert int(ctx.params["max_steps"]) == 12  # click hands it over as text; Axolotl's schema makes it an int
    assert ctx.args == []
    assert ctx.params["launcher"] == "python"
    # the trap this guards: the underscore spelling is not an option, it is left over as an extra argument
    ctx = train.make_context("train", list(args[:-1]) + ["--max_steps=12"])
    assert ctx.params.get("max_steps") is None and ctx.args == ["--max_steps=12"]
