"""irtuning:// references: the plugin resolves only built assets and never builds one; the tasks build them;
importing the plugin imports no task code."""

import json
import subprocess
import sys

import pytest

from irtuning_plugin.references import (
    DATA_FORMATS,
    AssetNotBuiltError,
    built_path,
    llamafactory_built_dir,
    resolve_axolotl_references,
)

CORE_MODULES = ("irtuning_plugin", "irtuning_plugin.callback", "irtuning_plugin.engine", "irtuning_plugin.strategies",
                "irtuning_plugin.axolotl_integration.plugin", "irtuning_plugin.axolotl_integration.args",
                "irtuning_plugin.llamafactory_integration.launcher", "irtuning_plugin.cli",
                "irtuning_plugin.references", "irtuning_plugin.plan")


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("IRTUNING_CACHE", str(cache))
    return cache


def _task_modules_after(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(sorted(m for m in sys.modules "
                          "if m.startswith('irtuning_plugin.tasks')))"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return eval(out.stdout.strip().splitlines()[-1])


def test_importing_the_plugin_imports_no_task_code():
    assert _task_modules_after("import " + ", ".join(CORE_MODULES)) == []


def test_the_plugin_commands_import_no_task_code():
    code = ("import contextlib, io\nfrom irtuning_plugin.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    assert main(['keys']) == 0\n")
    assert _task_modules_after(code) == []


def test_anything_but_a_reference_passes_unchanged(empty_cache):
    for value in ("HuggingFaceTB/SmolLM2-135M", "/data/train.jsonl", None, 3):
        assert built_path(value) == value


def test_an_unbuilt_asset_is_refused_in_one_line_naming_the_command(empty_cache):
    for ref in ("irtuning://revision-intention/train.jsonl", "irtuning://tiny-llama", "irtuning://tweet-sentiment"):
        with pytest.raises(AssetNotBuiltError) as err:
            built_path(ref)
        message = str(err.value)
        assert "\n" not in message and "not built yet" in message and f"irtuning prepare {ref}" in message
    assert not empty_cache.exists()  # resolving never builds


def test_an_unknown_reference_lists_the_allowed_ones(empty_cache):
    with pytest.raises(ValueError, match=r"unknown asset reference 'irtuning://revision-intention/dev.jsonl'; "
                                         r"allowed: irtuning://smollm2-135m-instruct, irtuning://tiny-llama, "):
        built_path("irtuning://revision-intention/dev.jsonl")


def test_data_of_another_format_is_refused(empty_cache):
    folder = empty_cache / "data" / "revision-intention-seed171"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"format_version": 0}))
    with pytest.raises(AssetNotBuiltError, match="built in format 0, this version of irtuning reads format 1"):
        built_path("irtuning://revision-intention/train.jsonl")


def test_the_builders_write_the_formats_the_resolver_reads():
    from irtuning_plugin.tasks.assets import revision_data, tweet_sentiment_data

    assert DATA_FORMATS == {"revision-intention": revision_data.FORMAT_VERSION,
                            "tweet-sentiment": tweet_sentiment_data.FORMAT_VERSION}


def test_built_assets_resolve_to_what_the_builders_return(tiny_model_dir):
    from irtuning_plugin.tasks.assets.llamafactory_data import llamafactory_dataset_dir
    from irtuning_plugin.tasks.assets.references import resolve_reference, revision_data_dir

    data = revision_data_dir()
    assert built_path("irtuning://revision-intention/val.jsonl") == str(data / "val.jsonl") \
        == resolve_reference("irtuning://revision-intention/val.jsonl")
    assert built_path("irtuning://tiny-llama") == str(tiny_model_dir) == resolve_reference("irtuning://tiny-llama")
    assert llamafactory_built_dir("irtuning://revision-intention") == str(llamafactory_dataset_dir())


def test_the_axolotl_plugin_resolves_without_building(empty_cache, monkeypatch):
    from axolotl.integrations.base import PluginManager

    from irtuning_plugin.axolotl_integration.plugin import IRTuningPlugin

    # a fresh plugin manager: an earlier test's registered instance would make this one a duplicate, which
    # does nothing by design (Axolotl >= 0.21 registers the plugin twice)
    monkeypatch.setattr(PluginManager, "_instance", None, raising=False)

    cfg = {"plugins": ["irtuning_plugin.IRTuningPlugin"], "irtuning_strategy": "ir", "base_model": "/models/m",
           "datasets": [{"path": "irtuning://revision-intention/train.jsonl", "type": "input_output"}]}
    with pytest.raises(AssetNotBuiltError, match=r"irtuning prepare irtuning://revision-intention/train.jsonl"):
        IRTuningPlugin().register(cfg)
    assert not empty_cache.exists()


def test_prepare_builds_the_named_assets_and_the_plugin_then_finds_them(empty_cache, capsys):
    from irtuning_plugin.cli import main

    ref = "irtuning://revision-intention/train.jsonl"
    assert main(["prepare", ref]) == 0
    path = empty_cache / "data" / "revision-intention-seed171" / "train.jsonl"
    assert capsys.readouterr().out.split() == [ref, str(path)] and path.is_file()
    cfg = {"base_model": "/models/m", "datasets": [{"path": ref}], "test_datasets": [{"path": "/own/test.jsonl"}]}
    assert resolve_axolotl_references(cfg) == {"base_model": "/models/m", "datasets": [{"path": str(path)}],
                                               "test_datasets": [{"path": "/own/test.jsonl"}]}


def test_prepare_refuses_an_unknown_reference_in_one_line(empty_cache, capsys):
    from irtuning_plugin.cli import main

    assert main(["prepare", "irtuning://other-data"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown asset reference 'irtuning://other-data'" in err[0]


def test_the_llamafactory_launcher_resolves_without_building(empty_cache):
    from irtuning_plugin.llamafactory_integration.launcher import resolve_recipe

    cfg = {"model_name_or_path": "/models/m", "dataset_dir": "irtuning://revision-intention"}
    with pytest.raises(AssetNotBuiltError, match=r"irtuning://revision-intention: not built yet .*irtuning llamafactory check"):
        resolve_recipe(cfg)
    assert not empty_cache.exists()
