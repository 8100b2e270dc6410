"""Axolotl >= 0.21 registers plugins through the `axolotl.plugins` entry point on every run: ours must be
found there, stay off without irtuning_strategy, and really train with it (no `plugins:` list)."""

import json

import pytest

from helpers_axolotl import base_cfg, run_axolotl, slice_of_train, validate

ENTRY = "irtuning_plugin.axolotl_integration.plugin.IRTuningPlugin"


def test_plugin_is_an_installed_entry_point():
    import axolotl
    from axolotl.integrations.base import PluginManager, get_builtin_plugins

    assert tuple(int(x) for x in axolotl.__version__.split(".")[:2]) >= (0, 21)
    assert ENTRY in get_builtin_plugins()
    assert type(PluginManager.get_instance().plugins[ENTRY]).__name__ == "IRTuningPlugin"


def test_module_colon_class_path_in_plugins_validates(tiny_model_dir):
    cfg = validate(base_cfg(tiny_model_dir, plugins=["irtuning_plugin.axolotl_integration.plugin:IRTuningPlugin"]))
    assert cfg.irtuning_strategy == "ir"


def test_entry_point_plugin_refuses_bad_keys_without_plugins_list(tiny_model_dir):
    with pytest.raises(Exception, match="irtuning_ir_interval=0; must be >= 1"):
        validate(base_cfg(tiny_model_dir, plugins=None, irtuning_ir_interval=0))


def test_listed_and_entry_point_instances_act_once(tiny_model_dir):
    """Listed under `plugins:` by its short name, the plugin is registered twice (that name and the entry
    point's): one instance merges the args model and adds the callback, the other does nothing."""
    from axolotl.integrations.base import PluginManager

    cfg = validate(base_cfg(tiny_model_dir))  # plugins: [irtuning_plugin.IRTuningPlugin]
    ours = [p for p in PluginManager.get_instance().plugins.values() if type(p).__name__ == "IRTuningPlugin"]
    assert len(ours) == 2
    assert [p.get_input_args() for p in ours].count(None) == 1
    assert sum(len(p.add_callbacks_post_trainer(cfg, None)) for p in ours) == 1


def _tiny_run(tmp_path, tiny_model_dir, plugins=None, **over):
    data = slice_of_train(tmp_path, 48)
    cfg = base_cfg(
        tiny_model_dir, plugins=plugins, datasets=[{"path": str(data), "ds_type": "json", "type": "input_output"}],
        output_dir=str(tmp_path / "out"), dataset_prepared_path=str(tmp_path / "prepared"), max_steps=8,
        micro_batch_size=4, learning_rate=5e-3, lr_scheduler="constant", logging_steps=1, save_strategy="no",
        val_set_size=0, train_on_inputs=False, seed=3, **over,
    )
    return run_axolotl(tmp_path, {k: v for k, v in cfg.items() if v is not None})


@pytest.mark.slow
def test_entry_point_plugin_stays_off_without_irtuning_strategy(tmp_path, tiny_model_dir):
    log = _tiny_run(tmp_path, tiny_model_dir, irtuning_strategy=None)
    assert f"Plugin loaded successfully: {ENTRY}" in log  # Axolotl loaded it from the entry point ...
    out = tmp_path / "out"  # ... and it did nothing
    assert "8/8 [" in log  # the 8 training steps ran
    assert not (out / "irtuning_selection.jsonl").exists() and not (out / "irtuning_run.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("plugins", [None, ["irtuning_plugin.IRTuningPlugin"]], ids=["entry-point", "also-listed"])
def test_entry_point_plugin_trains_with_irtuning_strategy(tmp_path, tiny_model_dir, plugins):
    """Also listed under `plugins:` (another name than the entry point's), it must still run once."""
    _tiny_run(tmp_path, tiny_model_dir, plugins=plugins)
    out = tmp_path / "out"
    rows = [json.loads(x) for x in (out / "irtuning_selection.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(r["fresh"] == r["active"] for r in rows) and len({r["n_active"] for r in rows}) > 1
    run = json.loads((out / "irtuning_run.json").read_text())
    assert run["backward_cut"] is True
    losses = [loss for _, loss in run["losses"]]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
