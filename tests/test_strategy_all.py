"""The all strategy (irtuning_plugin/strategies/all_layers.py): every layer trains every step."""

from helpers_selection import run_tiny


def test_all_strategy_trains_every_layer(tmp_path):
    cb, rec, _ = run_tiny(tmp_path, strategy="all", max_steps=2)
    assert all(r["n_active"] == 6 for r in cb.rows)
    assert all(all(all(c) for c in step) for step in rec.changed)
