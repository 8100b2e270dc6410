"""The benchmark's cost counter: meta-device counts equal CPU counts, and what they measure is real."""

import re

import pytest
import torch

from helpers_tiny import RandomTokens, tiny_peft_llama


@pytest.mark.parametrize("scope", ["adapter", "full"])
def test_meta_counts_equal_cpu_counts(tiny_model_dir, scope):
    from benchmarks.cost_count import build_model, count_sets, meta_model

    sets = [[5, 6], list(range(8))]
    on_meta = count_sets(meta_model(str(tiny_model_dir), scope), scope, sets, 2, 32)
    cpu = build_model(str(tiny_model_dir), scope, 1)
    if scope == "adapter":
        cpu.disable_input_require_grads()  # what the engine's backward cut does
    on_cpu = count_sets(cpu, scope, sets, 2, 32)
    assert on_meta == on_cpu
    top, every = on_cpu[(5, 6)], on_cpu[tuple(range(8))]
    assert top["forward_flops"] == every["forward_flops"]
    assert top["backward_flops"] < every["backward_flops"] and top["saved_bytes"] < every["saved_bytes"]


def test_saved_bytes_count_activations_once_and_no_parameters():
    from benchmarks.cost_count import SavedBytes

    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    with SavedBytes(lin) as saved:
        y = lin(x)
        z = (y * y).sum()  # y saved twice (both operands): one storage
    assert saved.param_refs >= 1  # the weight is saved for x's gradient but is not counted
    assert saved.bytes == x.numel() * 4 + y.numel() * 4
    z.backward()
    lin.requires_grad_(False)
    with SavedBytes(lin) as nothing:
        lin(torch.randn(4, 8)).sum()
    assert nothing.bytes == 0 and nothing.param_refs == 0  # nothing requires grad: no graph


def test_cpu_offload_account_names_the_state_kept_off_the_device():
    from irtuning_plugin.config import SelectionConfig
    from irtuning_plugin.engine import LayerSelectionEngine

    data = torch.utils.data.DataLoader(RandomTokens(n=24), batch_size=4)
    for mode in ("keep", "cpu"):
        model = tiny_peft_llama()
        engine = LayerSelectionEngine(model, SelectionConfig(strategy="random", frozen_optimizer_state=mode,
                                                             strategy_options={"n_layers": 2}), seed=3)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        engine.begin(opt)
        for step, batch in enumerate(data, start=1):
            model(**batch).loss.backward()
            engine.collect_scores()
            opt.step()
            acc = engine.memory_account()
            frozen_state = sum(v.numel() * v.element_size() for i, ps in enumerate(engine.layer_map.params)
                               if i not in engine.active for p in ps if p in opt.state
                               for v in opt.state[p].values() if torch.is_tensor(v))
            assert acc["optimizer_state_bytes_offloaded"] == (frozen_state if mode == "cpu" else 0)
            opt.zero_grad(set_to_none=True)
            engine.end_step(step)
        if mode == "cpu":
            assert frozen_state > 0  # some layer trained earlier and is frozen now


def test_cost_table_offload_moves_only_for_the_cpu_mode_and_unknown_variants_are_refused(tmp_path):
    from benchmarks import cost_table

    rows = [{"active": a} for a in ([0, 1], [1, 2], [0, 2])]
    sizes = [10, 100, 1000]
    cpu = {"engine_options": {"frozen_optimizer_state": "cpu"}, "rows": rows}
    keep = {"engine_options": {}, "rows": rows}
    assert cost_table.moved_per_step(cpu, sizes) == [10, 110]  # 0 leaves; then 1 leaves and 0 returns
    assert cost_table.moved_per_step(keep, sizes) == [0, 0]
    with pytest.raises(SystemExit, match=re.escape("--only: no variant 'full:ir + floor 99 cpu'; known: adapter:all")):
        cost_table.main(["--out", str(tmp_path), "--only", "full:ir + floor 99 cpu"])
    assert all(item.split(":", 1)[1] in (cost_table.LORA if item.startswith("adapter:") else cost_table.FULL)
               for item in cost_table.ISSUE40)
