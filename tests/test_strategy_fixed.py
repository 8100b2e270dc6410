"""The fixed strategy (irtuning_plugin/strategies/fixed.py): the listed layers train every step."""

from helpers_selection import assert_only_selected_layers_trained, run_tiny


def test_fixed_trains_its_list(tmp_path):
    cb, rec, _ = run_tiny(tmp_path, strategy="fixed", max_steps=3, strategy_options={"layers": [4, 1]})
    assert all(r["active"] == [1, 4] for r in cb.rows)
    assert_only_selected_layers_trained(cb.rows, rec)
