"""The random strategy (irtuning_plugin/strategies/random_layers.py): n fresh layers each step."""

from helpers_selection import assert_only_selected_layers_trained, run_tiny, selections


def test_random_trains_n_fresh_layers_each_step(tmp_path):
    cb, rec, _ = run_tiny(tmp_path, strategy="random", max_steps=5, strategy_options={"n_layers": 2})
    assert all(r["n_active"] == 2 for r in cb.rows) and len({tuple(r["active"]) for r in cb.rows}) > 1
    assert_only_selected_layers_trained(cb.rows, rec)


def test_random_count_is_exact():
    seq, _ = selections("random", steps=10, n_layers=5)
    assert all(len(x) == 5 for x in seq) and len({tuple(x) for x in seq}) > 1
