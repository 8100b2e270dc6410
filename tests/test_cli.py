"""The command line: every command answers a user error with one line and a non-zero exit, never a traceback.

The walk below is generated from the parser itself, so a command added later is walked too: each command
gets a path that does not exist wherever it takes one, and each numeric option gets values out of range.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from irtuning_plugin import cli
from irtuning_plugin.user_input import TRACEBACK_ENV

MISSING = "/nonexistent/irtuning-test/missing"
# Positional arguments and options that name a file or folder the command reads.
PATH_ARGS = {"recipe", "src", "output_dir", "model", "adapter", "data", "write_readme"}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _required_argv(sub: argparse.ArgumentParser, path_value: str, out_dir: Path) -> list[str]:
    """The smallest command line the parser accepts, with ``path_value`` for every path it reads."""
    argv: list[str] = []
    for act in sub._actions:
        if isinstance(act, argparse._HelpAction) or act.dest == "overrides":
            continue
        if act.dest in PATH_ARGS:
            value = path_value
        elif act.dest in ("out", "output"):
            value = str(out_dir / act.dest)
        elif act.choices and not act.option_strings:
            value = str(list(act.choices)[0])
        elif act.required:
            value = "x"
        else:
            continue
        argv += [act.option_strings[0], value] if act.option_strings else [value]
    return argv


def _numeric_options(sub: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in sub._actions if a.option_strings and getattr(a.type, "__name__", "") in ("int", "float")]


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as stop:  # argparse's usage errors
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def _error_lines(err: str) -> list[str]:
    """The lines a user sees on stderr, without the logging records of the work done before the error."""
    return [line for line in err.splitlines() if line.strip() and not line.startswith(("INFO ", "WARNING "))]


def test_every_command_is_walked():
    # the walk covers the whole parser; a new command needs no entry here, only a path argument it declares
    assert set(_subparsers()) >= {"prepare", "demo", "eval", "convert", "train-seqcls", "summary", "keys", "check",
                                  "llamafactory", "plan"}


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_missing_path_gives_one_line_and_nonzero_exit(command, capsys, tmp_path):
    sub = _subparsers()[command]
    argv = _required_argv(sub, MISSING, tmp_path)
    if not any(MISSING in a for a in argv):
        pytest.skip(f"irtuning {command} reads no path")
    code, out, err = _run([command, *argv], capsys)
    lines = _error_lines(err)
    assert code != 0, (argv, out, err)
    assert len(lines) == 1, (argv, err)
    assert "Traceback" not in err
    assert "missing" in lines[0] or "not found" in lines[0], lines[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "output").exists()  # nothing written


def _bad_value_cases():
    for command, sub in sorted(_subparsers().items()):
        for act in _numeric_options(sub):
            for bad in ("0", "-5", "x"):
                yield command, act.option_strings[0], bad


@pytest.mark.parametrize("command,option,bad", list(_bad_value_cases()))
def test_bad_numeric_value_gives_one_line_naming_the_option(command, option, bad, capsys, tmp_path):
    sub = _subparsers()[command]
    act = next(a for a in sub._actions if option in a.option_strings)
    try:
        act.type(bad)
    except argparse.ArgumentTypeError:
        pass
    else:
        pytest.skip(f"{bad} is allowed for {option}")  # e.g. --warmup-steps 0
    argv = [command, *_required_argv(sub, MISSING, tmp_path), option, bad]
    code, out, err = _run(argv, capsys)
    lines = _error_lines(err)
    assert code == 2
    assert len(lines) == 1, err
    assert option in lines[0] and any(w in lines[0] for w in ("allowed", "not a", "invalid")), lines[0]


def test_there_are_numeric_options_to_walk():
    cases = list(_bad_value_cases())
    assert {c[:2] for c in cases} >= {("demo", "--max-steps"), ("eval", "--limit"), ("train-seqcls", "--seed")}


@pytest.mark.parametrize("steps", [0, -5])
def test_demo_refuses_max_steps_below_one(steps):
    # before: 0 trained the recipe's 300 steps (`if max_steps:`), -5 reached Axolotl as a step count
    from irtuning_plugin.tasks.commands import demo_train_command

    with pytest.raises(cli.UserInputError, match=r"--max-steps=.*>= 1"):
        demo_train_command("recipe.yaml", "python", steps)
    with pytest.raises(argparse.ArgumentTypeError, match="allowed: >= 1"):
        next(a for a in _subparsers()["demo"]._actions if a.dest == "max_steps").type(str(steps))


def test_demo_checks_the_recipe_before_any_work(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("base_model: m\n")  # no datasets
    code, _, err = _run(["demo", "--recipe", str(recipe)], capsys)
    assert code == 2 and "datasets[0].path" in _error_lines(err)[0]


def test_bad_yaml_names_the_file_and_line(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("base_model: m\nplugins: [a\nadapter: lora\n")
    code, _, err = _run(["check", str(recipe)], capsys)
    (line,) = _error_lines(err)
    assert code == 2 and str(recipe) in line and "not valid YAML at line" in line


def test_recipe_that_is_not_a_mapping_or_not_utf8(tmp_path, capsys):
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    code, _, err = _run(["check", str(listed)], capsys)
    assert code == 2 and "must be a YAML mapping" in _error_lines(err)[0]
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("base_model: caf\xe9\n".encode("latin-1"))
    code, _, err = _run(["check", str(latin)], capsys)
    assert code == 2 and "not UTF-8" in _error_lines(err)[0] and "line 1" in _error_lines(err)[0]


def test_eval_names_a_missing_local_model_instead_of_a_hub_error(capsys, tmp_path):
    for model in (str(tmp_path / "no-model"), "./no-model-here", "../x/y/z"):
        code, _, err = _run(["eval", "--model", model], capsys)
        (line,) = _error_lines(err)
        assert code == 2 and "no such folder" in line and "Repo id" not in line, line


def test_summary_names_a_corrupt_log_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    row = {"step": 1, "active": [0], "n_active": 1, "lowest_active": 0}
    (run / "irtuning_selection.jsonl").write_text(json.dumps(row) + "\n" + '{"step": 2, "act')
    code, _, err = _run(["summary", str(run)], capsys)
    (line,) = _error_lines(err)
    assert code == 2 and "line 2" in line and "irtuning_selection.jsonl" in line
    (run / "irtuning_selection.jsonl").write_text(json.dumps(row) + "\n")
    (run / "irtuning_run.json").write_text("{trunc")
    code, _, err = _run(["summary", str(run)], capsys)
    assert code == 2 and "irtuning_run.json" in _error_lines(err)[0]


def test_summary_of_a_folder_without_a_selection_log(tmp_path, capsys):
    code, _, err = _run(["summary", str(tmp_path)], capsys)
    assert code == 2 and "holds no irtuning_selection.jsonl" in _error_lines(err)[0]


def test_summary_skips_event_rows(tmp_path, capsys):
    rows = [{"step": 1, "active": [0, 1], "n_active": 2, "lowest_active": 0},
            {"step": 1, "event": "resume_config_changed"},
            {"step": 2, "active": [1], "n_active": 1, "lowest_active": 1}]
    (tmp_path / "irtuning_selection.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = cli.summarize_run(tmp_path)
    assert (s["steps"], s["layers_min"], s["layers_max"]) == (2, 1, 2)


def test_keys_write_readme_leaves_a_file_without_markers_untouched(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# mine\nno markers here\n")
    code, _, err = _run(["keys", "--write-readme", str(readme)], capsys)
    assert code == 2 and "markers" in _error_lines(err)[0]
    assert readme.read_text() == "# mine\nno markers here\n"
    readme.write_text(f"head\n{cli.KEYS_START}\nold\n{cli.KEYS_END}\ntail\n")
    assert _run(["keys", "--write-readme", str(readme)], capsys)[0] == 0
    text = readme.read_text()
    assert text.startswith("head\n") and text.endswith("tail\n") and "`irtuning_strategy`" in text
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]  # no temporary file left


def test_train_seqcls_refuses_a_bad_set_before_loading_anything(capsys, tmp_path):
    code, _, err = _run(["train-seqcls", "--model", MISSING, "--output", str(tmp_path / "o"), "--set", "nokey"], capsys)
    assert code == 2 and "expected irtuning_KEY=VALUE" in _error_lines(err)[0]
    code, _, err = _run(["train-seqcls", "--model", MISSING, "--output", str(tmp_path / "o"),
                         "--set", "irtuning_seed=-1"], capsys)
    assert code == 2 and "irtuning_seed" in _error_lines(err)[0]


def test_full_traceback_env_brings_the_traceback_back(monkeypatch):
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(Exception, match="not found"):
        cli.main(["summary", MISSING])


def test_a_bug_keeps_its_traceback(monkeypatch):
    def broken(args):
        raise KeyError("a bug, not a user error")

    monkeypatch.setattr(cli, "_cmd_summary", broken)
    with pytest.raises(KeyError):
        cli.main(["summary", MISSING])


def test_installed_command_prints_one_line_on_stderr(tmp_path):
    """End to end through the console script, logging set-up included."""
    exe = Path(sys.executable).with_name("irtuning")
    env = dict(os.environ)
    env.pop(TRACEBACK_ENV, None)
    proc = subprocess.run([str(exe), "check", str(tmp_path / "absent.yaml")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"irtuning check: error: recipe {str(tmp_path / 'absent.yaml')!r} not found (set {TRACEBACK_ENV}=1 for the "
        f"traceback)"]
