"""The Axolotl plugin: config validation through Axolotl's own code, and real `axolotl train` runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from irtuning_plugin.callback import RUN_SUMMARY, SELECTION_LOG, STATE_FILE, read_selection_log

from helpers_axolotl import AXOLOTL_ENV, RECIPES, REPO, VENV_BIN, base_cfg, run_axolotl, slice_of_train, validate
from helpers_reference import reference_select
from helpers_selection import without_timing


def test_valid_config_keeps_our_keys(tiny_model_dir):
    cfg = validate(base_cfg(tiny_model_dir, irtuning_ir_boundary="strict"))
    assert cfg.irtuning_strategy == "ir" and cfg.irtuning_ir_boundary == "strict"


@pytest.mark.parametrize("over,fragment", [
    ({"irtuning_strategy": "lasso"}, "irtuning_strategy='lasso' is not a strategy; allowed: "),
    ({"irtuning_ir_window_low": 0.8}, "irtuning_ir_window_low=0.8 / irtuning_ir_window_high=0.65"),
    ({"irtuning_ir_interval": 0}, "irtuning_ir_interval=0; must be >= 1"),
    ({"irtuning_layers_path": "model.blocks"}, "irtuning_layers_path='model.blocks' does not resolve"),
    ({"lisa_n_layers": 2}, "lisa_n_layers (Axolotl's built-in LISA) cannot be combined"),
    ({"adapter": None}, "irtuning_scope='adapter' (the default) selects adapter layers but no `adapter` is set"),
    ({"irtuning_scope": "full"}, "irtuning_scope='full' selects whole layers but adapter='lora'"),
    ({"irtuning_strategy": "all", "irtuning_ir_split_num": 2}, "irtuning_ir_split_num is an option of strategy 'ir'"),
    ({"irtuning_windw": 0.3}, "irtuning_windw is not an irtuning key"),
    ({"peft_layers_to_transform": [1, 2]}, "peft_layers_to_transform restricts LoRA to fixed layers"),
])
def test_bad_input_is_refused_before_training(tiny_model_dir, over, fragment):
    with pytest.raises(Exception) as err:
        validate(base_cfg(tiny_model_dir, **over))
    assert fragment in str(err.value), str(err.value)


def test_paper_recipe_validates():
    cfg = yaml.safe_load((RECIPES / "iterater" / "llama-3.1-8b-instruct" / "ir-lora.yaml").read_text())
    cfg["datasets"][0]["path"] = "/nonexistent/train.jsonl"  # validation does not read data
    out = validate(cfg)
    assert out.lora_r == 32 and out.lora_alpha == 64 and out.learning_rate == 2e-4 and out.seed == 171
    assert out.irtuning_strategy == "ir"


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["python", "accelerate"])
def test_axolotl_train_runs_the_plugin(tmp_path, tiny_model_dir, launcher):
    data = slice_of_train(tmp_path, 96)
    steps = 16 if launcher == "python" else 6
    cfg = base_cfg(
        tiny_model_dir, datasets=[{"path": str(data), "ds_type": "json", "type": "input_output"}],
        output_dir=str(tmp_path / "out"), dataset_prepared_path=str(tmp_path / "prepared"), max_steps=steps,
        micro_batch_size=4, learning_rate=5e-3, lr_scheduler="constant", logging_steps=1, save_strategy="no",
        val_set_size=0, train_on_inputs=False, seed=3,
    )
    log = run_axolotl(tmp_path, cfg, launcher)
    # the lines a user must see reach Axolotl's console (it drops other packages' INFO records)
    assert "[INFO] [axolotl.integrations.irtuning] irtuning: 8 layers at " in log, log[-3000:]
    assert "[INFO] [axolotl.integrations.irtuning] irtuning: strategy ir enabled" in log
    assert ("[INFO] [axolotl.integrations.irtuning] irtuning: strategy ir on 8 layers at" in log
            and "; backprop cut (the input-grad hook is removed; it stops at the lowest trained layer); "
                "step 1 trains layers [" in log)
    out = tmp_path / "out"
    rows = [json.loads(x) for x in (out / "irtuning_selection.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))  # one row per optimizer step
    assert len({r["n_active"] for r in rows}) > 1  # the number of trained layers varies
    assert all(r["n_active"] < 8 for r in rows[2:])
    assert (out / "irtuning_selection.png").stat().st_size > 1000
    run = json.loads((out / "irtuning_run.json").read_text())
    assert run["num_layers"] == 8 and run["backward_cut"] is True
    losses = [loss for _, loss in run["losses"]]
    assert len(losses) == steps
    if launcher == "python":
        assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4  # the loss went down


@pytest.mark.slow
def test_demo_recipe_runs_on_smollm2(tmp_path, smollm2_dir):
    cfg = yaml.safe_load((RECIPES / "demo-smollm2-ir.yaml").read_text())
    cfg.update(max_steps=3, output_dir=str(tmp_path / "out"), dataset_prepared_path=str(tmp_path / "prepared"),
               logging_steps=1)
    run_axolotl(tmp_path, cfg)
    rows = [json.loads(x) for x in (tmp_path / "out" / "irtuning_selection.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["scores"]) == 30 for r in rows)
    assert 10 <= rows[0]["n_active"] <= 20  # 30 layers: cut window 10..19
    cut = json.loads((tmp_path / "out" / "irtuning_run.json").read_text())["label_logits"]
    assert cut["training_forwards"] == 3 and 0 < cut["positions_kept"] < cut["positions"] / 4  # 4 rows, labels of a few tokens


def _bad_cfg_file(tmp_path, tiny_model_dir, **over):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(base_cfg(tiny_model_dir, output_dir=str(tmp_path / "out"), **over)))
    return path


def test_our_error_is_printed_as_one_line(tmp_path, tiny_model_dir, monkeypatch):
    """Axolotl's config loader (that of every `axolotl` command) ends with our message alone and exit status 1;
    other errors keep their traceback; sys.excepthook is never replaced."""
    from axolotl.cli.config import load_cfg

    from irtuning_plugin.axolotl_integration import errors

    monkeypatch.delenv(errors.TRACEBACK_ENV, raising=False)
    hook = sys.excepthook
    with pytest.raises(SystemExit) as ended:
        load_cfg(str(_bad_cfg_file(tmp_path, tiny_model_dir, irtuning_ir_interval=2.5)))
    assert isinstance(ended.value.code, str)  # Python prints it alone and exits with status 1
    assert ended.value.code.splitlines() == ["irtuning config error: irtuning_ir_interval=2.5; must be a whole number, not a fraction",
                                             "(set IRTUNING_FULL_TRACEBACK=1 for the full traceback)"]
    assert sys.excepthook is hook
    with pytest.raises(Exception) as err:  # not ours: Axolotl's own refusal keeps pydantic's error and traceback
        load_cfg(str(_bad_cfg_file(tmp_path, tiny_model_dir, micro_batch_size="two")))
    assert type(err.value).__name__ == "ValidationError" and "micro_batch_size" in str(err.value)
    monkeypatch.setenv(errors.TRACEBACK_ENV, "1")
    with pytest.raises(Exception, match="irtuning_ir_interval=2.5; must be a whole number") as err:
        load_cfg(str(_bad_cfg_file(tmp_path, tiny_model_dir, irtuning_ir_interval=2.5)))
    assert type(err.value).__name__ == "ValidationError"
    assert sys.excepthook is hook


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["python", "accelerate"])
def test_axolotl_cli_shows_our_message_not_a_traceback(tmp_path, tiny_model_dir, launcher):
    path = _bad_cfg_file(tmp_path, tiny_model_dir, irtuning_ir_window_low="abc")
    cmd = [str(Path(VENV_BIN) / "axolotl"), "train", str(path), "--launcher", launcher]
    proc = subprocess.run(cmd, cwd=tmp_path, env=AXOLOTL_ENV, capture_output=True, text=True, timeout=600)
    ours = ["irtuning config error: irtuning_ir_window_low='abc'; must be a number",
            "(set IRTUNING_FULL_TRACEBACK=1 for the full traceback)"]
    assert proc.returncode == 1
    assert "ValidationError" not in proc.stdout + proc.stderr  # no pydantic traceback
    if launcher == "python":
        assert proc.stderr.strip().splitlines()[-2:] == ours, proc.stderr[-3000:]
        assert "Traceback" not in proc.stdout + proc.stderr
    else:  # accelerate's own launcher process then adds its short CalledProcessError traceback
        lines = proc.stderr.splitlines()
        assert lines[lines.index(ours[0]) + 1] == ours[1], proc.stderr[-3000:]


def test_irtuning_check_catches_a_missing_plugin(tmp_path, tiny_model_dir, capsys):
    """Axolotl 0.19 drops irtuning_* keys when the plugin is not listed (plain LoRA, no error): the
    `irtuning check` command reports it; with the plugin listed it runs Axolotl's validation."""
    from irtuning_plugin.cli import main

    cfg = base_cfg(tiny_model_dir, plugins=None, output_dir=str(tmp_path / "out"))
    (tmp_path / "noplugin.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["check", str(tmp_path / "noplugin.yaml")]) == 1
    assert capsys.readouterr().err.strip() == (
        "irtuning check: irtuning_strategy is set but irtuning_plugin.IRTuningPlugin is not under plugins: Axolotl "
        "0.19 never loads the plugin, drops every irtuning_* key and trains plain LoRA; add plugins: "
        "[irtuning_plugin.IRTuningPlugin]")
    assert main(["check", str(_bad_cfg_file(tmp_path, tiny_model_dir, irtuning_ir_interval="2"))]) == 1
    assert capsys.readouterr().err.strip().endswith(
        "irtuning check: irtuning_ir_interval='2'; must be a whole number (write 2 without quotes)")
    assert main(["check", str(_bad_cfg_file(tmp_path, tiny_model_dir))]) == 0
    assert "irtuning check: ok (irtuning_strategy ir, scope adapter)" in capsys.readouterr().out


def test_readme_first_axolotl_example_lists_the_plugin_and_warns():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Use it in your own Axolotl recipe", 1)[1]
    example = yaml.safe_load(section.split("```yaml", 1)[1].split("```", 1)[0])
    assert example["plugins"] == ["irtuning_plugin.IRTuningPlugin"] and example["irtuning_strategy"] == "ir"
    warning = section.split("```", 2)[2].split("\n\n", 2)[1]
    assert "not optional on Axolotl 0.19" in warning and "plain LoRA" in warning and "irtuning check" in warning


def test_option_above_the_floor_names_the_floor(tiny_model_dir):
    """The tiny model has 8 layers; with a floor of 7 only layer 7 is left, so 2 LISA layers cannot fit: the message
    names the floor and the layers above it, not only the model's layer count."""
    cfg = base_cfg(tiny_model_dir, irtuning_strategy="lisa", irtuning_depth_floor=7, irtuning_lisa_n_layers=2)
    with pytest.raises(Exception, match=r"irtuning_lisa_n_layers=2 exceeds .*with irtuning_depth_floor=7 the strategy "
                                        r"works over the 1 layers 7\.\.7\); the model has 8"):
        validate(cfg)
    assert validate(base_cfg(tiny_model_dir, irtuning_strategy="lisa", irtuning_depth_floor=6,
                             irtuning_lisa_n_layers=2)).irtuning_lisa_n_layers == 2


# ---- the baseline strategies' options through Axolotl's validation -------------------------------------
# ---- Axolotl's config path ---------------------------------------------------------------------------
@pytest.mark.parametrize("over,fragment", [
    ({"irtuning_strategy": "lisa", "irtuning_lisa_n_layers": 99}, "irtuning_lisa_n_layers=99 exceeds the model's 8"),
    ({"irtuning_strategy": "random", "irtuning_random_n_layers": 9}, "irtuning_random_n_layers=9 exceeds the model's"),
    ({"irtuning_strategy": "fixed", "irtuning_fixed_layers": [0, 8]}, "layer 8 is outside 0..7"),
    ({"irtuning_strategy": "fixed"}, "irtuning_fixed_layers is required"),
    ({"irtuning_strategy": "ist", "irtuning_ist_train_fraction": 0.1}, "irtuning_ist_train_fraction=0.1 selects"),
    ({"irtuning_strategy": "ist", "irtuning_scope": "full", "adapter": None},
     "irtuning_strategy='ist' works only with irtuning_scope: adapter"),
    ({"irtuning_frozen_optimizer_state": "gpu"}, "irtuning_frozen_optimizer_state='gpu'"),
])
def test_axolotl_validation_refuses_bad_baseline_options(tiny_model_dir, over, fragment):
    with pytest.raises(Exception) as err:
        validate(base_cfg(tiny_model_dir, **over))
    assert fragment in str(err.value), str(err.value)


def test_axolotl_validation_accepts_baseline_options(tiny_model_dir):
    cfg = validate(base_cfg(tiny_model_dir, irtuning_strategy="lisa", irtuning_lisa_n_layers=8,
                            irtuning_frozen_optimizer_state="drop"))
    assert cfg.irtuning_lisa_n_layers == 8 and cfg.irtuning_frozen_optimizer_state == "drop"



@pytest.mark.slow
def test_axolotl_console_warns_once_about_nonfinite_gradients(tmp_path, tiny_model_dir):
    """The issue's repro: learning_rate 1e30 on the tiny-model recipe through `axolotl train`."""
    data = slice_of_train(tmp_path, 32)
    out = tmp_path / "out"
    cfg = base_cfg(tiny_model_dir, datasets=[{"path": str(data), "ds_type": "json", "type": "input_output"}],
                   output_dir=str(out), dataset_prepared_path=str(tmp_path / "prepared"), max_steps=4,
                   learning_rate=1.0e30, lr_scheduler="constant", warmup_steps=0, save_strategy="no",
                   val_set_size=0, seed=3)
    log = run_axolotl(tmp_path, cfg)
    rows = read_selection_log(out / "irtuning_selection.jsonl")
    bad = [r for r in rows if r["nonfinite_layers"]]
    assert bad, [r["scores"] for r in rows]
    first = bad[0]
    assert log.count("NON-FINITE") == 1
    assert f"optimizer step {first['step']} in layer(s) {first['nonfinite_layers']}" in log


@pytest.mark.slow
def test_axolotl_train_resume_continues_the_selection(tmp_path, tiny_model_dir):
    """Real `axolotl train` on the tiny-model recipe: 6 steps with a checkpoint every 2, then the same run
    restarted from checkpoint-2 in the same folder must rewrite steps 3..6 exactly as they were."""
    data = slice_of_train(tmp_path, 64)
    out = tmp_path / "out"
    cfg = base_cfg(
        tiny_model_dir, datasets=[{"path": str(data), "ds_type": "json", "type": "input_output"}],
        output_dir=str(out), dataset_prepared_path=str(tmp_path / "prepared"), max_steps=6, micro_batch_size=2,
        learning_rate=5e-3, lr_scheduler="constant", warmup_steps=0, logging_steps=1, save_strategy="steps",
        save_steps=2, val_set_size=0, train_on_inputs=False, seed=3,
    )
    run_axolotl(tmp_path, cfg)
    first = without_timing(read_selection_log(out / SELECTION_LOG))
    assert [r["step"] for r in first] == [1, 2, 3, 4, 5, 6]
    assert (out / "checkpoint-2" / STATE_FILE).is_file()
    log = run_axolotl(tmp_path, {**cfg, "resume_from_checkpoint": str(out / "checkpoint-2")})
    assert "resumed the selection at step 2" in log  # a WARNING: visible on Axolotl's console
    again = without_timing(read_selection_log(out / SELECTION_LOG))
    assert again == first
    assert len({tuple(r["active"]) for r in first}) > 1
    run = json.loads((out / RUN_SUMMARY).read_text())
    assert run["steps"] == 6 and len(run["losses"]) == 6 and [s for s, _ in run["losses"]] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in run["resumes"]] == [2]


@pytest.mark.slow
@pytest.mark.parametrize("score", ["cosine", "weight"])
def test_new_metrics_train_through_axolotl(tmp_path, tiny_model_dir, score):
    data = slice_of_train(tmp_path, 32)
    cfg = base_cfg(tiny_model_dir, datasets=[{"path": str(data), "ds_type": "json", "type": "input_output"}],
                   output_dir=str(tmp_path / "out"), dataset_prepared_path=str(tmp_path / "prepared"),
                   max_steps=4, micro_batch_size=4, logging_steps=1, save_strategy="no", val_set_size=0,
                   irtuning_ir_score=score, seed=5)
    run_axolotl(tmp_path, cfg)
    rows = [json.loads(x) for x in (tmp_path / "out" / "irtuning_selection.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r["fresh"] == list(range(8))  # neither metric needs gradients: every layer is measured
        want = reference_select(r["scores"], 1, score)
        assert r["next_active"] == want and 1 <= len(want) < 8
    if score == "weight":  # frozen o_proj under LoRA: the same scores and layers every step
        assert len({tuple(r["next_active"]) for r in rows}) == 1
    else:
        assert len({tuple(r["scores"]) for r in rows}) == 4
