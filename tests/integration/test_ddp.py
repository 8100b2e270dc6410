"""DDP on CPU: two processes (gloo) through the real `axolotl train` CLI on the tiny model.

Both ranks must end with identical LoRA weights and identical selection logs, and the run must really
be one DDP run: each rank reports a world size of 2 and a DDP-wrapped model, and the ranks read
different batches (two separately training processes would read the same ones). Setting up CPU DDP
under Axolotl 0.19 needs the test plugin in ddp_cpu_plugin.py and ACCELERATE_USE_CPU=true.
"""

import json
import os
from pathlib import Path

import pytest
import torch

from helpers_axolotl import AXOLOTL_ENV, base_cfg, run_axolotl, slice_of_train

TESTS = str(Path(__file__).resolve().parent)


@pytest.mark.slow
@pytest.mark.parametrize("strategy,options", [
    ("ir", {}),
    ("ist", {"irtuning_ist_first_update": 1, "irtuning_ist_update_every": 2, "irtuning_ist_estimation_batch": 4}),
    ("salf", {"irtuning_salf_calibration_batches": 2}),  # each rank calibrates on its own shard: summed
], ids=["ir", "ist", "salf"])
def test_two_cpu_ranks_select_and_train_identically(tmp_path, tiny_model_dir, monkeypatch, strategy, options):
    data = slice_of_train(tmp_path, 48)
    out = tmp_path / "out"
    cfg = base_cfg(
        tiny_model_dir, datasets=[{"path": str(data), "ds_type": "json", "type": "input_output"}],
        plugins=["irtuning_plugin.IRTuningPlugin", "ddp_cpu_plugin.CPUDDPPlugin"], irtuning_strategy=strategy,
        output_dir=str(out), dataset_prepared_path=str(tmp_path / "prepared"), max_steps=4, micro_batch_size=2,
        learning_rate=5e-3, lr_scheduler="constant", logging_steps=1, save_strategy="no", val_set_size=0,
        train_on_inputs=False, seed=3, **options,
    )  # ddp_find_unused_parameters left unset: the plugin sets it to true
    env = {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (AXOLOTL_ENV.get("PYTHONPATH"), TESTS) if p)}
    for k, v in env.items():
        monkeypatch.setitem(AXOLOTL_ENV, k, v)
    run_axolotl(tmp_path, cfg, launcher="accelerate", extra=["--", "--multi_gpu", "--num_processes", "2"])

    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, info in enumerate(ranks):
        assert info["rank"] == r and info["world_size"] == 2 and info["backend"] == "gloo", info
        assert info["ddp"] and info["find_unused_parameters"], info
        assert info["global_step"] == 4 and len(info["rows"]) == 4
    assert ranks[0]["batches"] != ranks[1]["batches"]  # each rank read its own shard of the data
    assert ranks[0]["rows"] == ranks[1]["rows"]  # same layers, same scores, same strategy fields every step
    assert len({tuple(r["active"]) for r in ranks[0]["rows"]}) > 1 or strategy in ("ist", "salf")
    w0, w1 = (torch.load(out / f"rank{r}_lora.pt") for r in (0, 1))
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    # the rank-0 selection log on disk is the same history
    disk = [json.loads(x) for x in (out / "irtuning_selection.jsonl").read_text().splitlines()]
    assert [r["active"] for r in disk] == [r["active"] for r in ranks[0]["rows"]]
    if strategy == "salf":
        calib = ranks[0]["rows"][0]
        assert calib["salf_source"] == "calibration" and calib["salf_batches"] == 2
        assert calib["salf_tokens"] > 0  # tokens of both ranks' batches (the rows above are equal)
    if strategy == "ist":
        updates = [r["ist_update"] for r in ranks[0]["rows"] if "ist_update" in r]
        assert len(updates) == 2  # steps 1 and 3: importance from losses averaged over both ranks


def test_find_unused_parameters_is_set_or_a_false_value_refused(tiny_model_dir):
    from helpers_axolotl import validate

    assert validate(base_cfg(tiny_model_dir)).ddp_find_unused_parameters is True
    assert validate(base_cfg(tiny_model_dir, irtuning_strategy="all")).ddp_find_unused_parameters is None
    with pytest.raises(Exception, match="ddp_find_unused_parameters: false cannot work with irtuning_strategy='ir'"):
        validate(base_cfg(tiny_model_dir, ddp_find_unused_parameters=False))


def test_plain_trainer_ddp_without_find_unused_parameters_is_refused(tmp_path):
    """The callback's own check (a plain Trainer has no config validation): a world-1 gloo group suffices."""
    from types import SimpleNamespace

    from irtuning_plugin.callback import LayerSelectionCallback
    from irtuning_plugin.config import SelectionConfig
    from irtuning_plugin.strategies import StrategyConfigError

    from helpers_tiny import tiny_peft_llama

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = tiny_peft_llama()
        for find_unused in (False, True):
            ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused)
            cb = LayerSelectionCallback(SelectionConfig(strategy="ir"), model,
                                        trainer=SimpleNamespace(model_wrapped=ddp, train=lambda *a, **k: None))
            if find_unused:
                cb._check_setup(SimpleNamespace())
            else:
                with pytest.raises(StrategyConfigError, match="set ddp_find_unused_parameters: true"):
                    cb._check_setup(SimpleNamespace())
    finally:
        torch.distributed.destroy_process_group()
