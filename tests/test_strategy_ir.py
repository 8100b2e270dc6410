"""The IR-Tuning split rule and strategy (pure logic, no model)."""

import numpy as np
import pytest
import torch

from irtuning_plugin.config import config_from_flat
from irtuning_plugin.strategies import SENTINEL_SCORE, SelectionContext, StrategyConfigError
from irtuning_plugin.strategies.ir import IROptions, IRStrategy, reference_layer_scores, split_high_group


def ctx_for(scores, measured, step=1, active=None, seed=0):
    L = len(scores)
    return SelectionContext(
        step=step, num_layers=L, scores=torch.tensor(scores, dtype=torch.float64),
        ever_measured=torch.tensor(measured, dtype=torch.bool), fresh=torch.tensor(measured, dtype=torch.bool),
        active=list(range(L)) if active is None else active, generator=torch.Generator().manual_seed(seed),
    )


def test_hand_computed_split_inclusive_and_strict():
    # n=6: window j in int(2.1)=2 .. int(3.9)=3. V[2] = 2/3 + 2/3; V[3] = 12.5 + 0.25 -> cut at j=2.
    scores = [1, 2, 3, 10, 11, 12]
    assert split_high_group(scores)[0] == [2, 3, 4, 5]  # boundary layer 2 included (reference)
    assert split_high_group(scores, include_boundary=False)[0] == [3, 4, 5]


def test_split_ranks_layers_by_score_not_position():
    scores = [12, 1, 11, 2, 10, 3]  # sorted: L1, L3, L5 | L4, L2, L0
    high, kept = split_high_group(scores)
    assert high == [5, 4, 2, 0]
    assert kept == [3.0, 10.0, 11.0, 12.0]
    assert sorted(split_high_group(scores, include_boundary=False)[0]) == [0, 2, 4]


def test_window_forbids_the_global_minimum():
    # Unrestricted, V is minimal (0) at j=8 (2 layers). The window 3..6 gives V[3]=1388.9 < V[4..6]: j=3.
    scores = [0.0] * 9 + [100.0]
    high, _ = split_high_group(scores)
    assert len(high) == 7 and 9 in high
    assert len(split_high_group(scores, window=(0.05, 0.95))[0]) == 2


def test_ties_broken_by_layer_index():
    # window 1..2, every V is 0: the reference's V.index(0) is j = 0, below the window -> all 4 train
    assert split_high_group([5.0, 5.0, 5.0, 5.0])[0] == [0, 1, 2, 3]
    assert split_high_group([2.0, 1.0, 1.0, 1.0])[0] == [3, 0]  # tied layers 1..3 ranked by index: 3 is the boundary


def test_variance_is_population_variance():
    # check one V value against numpy's ddof=0 variance through the choice it implies
    rng = np.random.default_rng(3)
    s = rng.random(20)
    order = np.argsort(s, kind="stable")
    srt = s[order]
    V = [np.var(srt[: j + 1]) + np.var(srt[j + 1:]) for j in range(19)]
    lo, hi = int(20 * 0.35), int(20 * 0.65)
    j = lo + int(np.argmin(V[lo:hi + 1]))
    assert split_high_group(s.tolist())[0] == order[j:].tolist()


@pytest.mark.parametrize("L,lo,hi", [(32, 12, 21), (36, 13, 24), (40, 14, 26)])
def test_counts_for_random_scores(L, lo, hi):
    rng = np.random.default_rng(L)
    counts = {len(split_high_group(rng.random(L).tolist())[0]) for _ in range(400)}
    assert min(counts) >= lo and max(counts) <= hi
    assert len(counts) > 3  # the count really varies


def test_first_step_is_random_and_seeded():
    strat = IRStrategy(32, IROptions())
    unmeasured = [SENTINEL_SCORE] * 32
    a = strat.select(ctx_for(unmeasured, [False] * 32, step=0, seed=1))
    b = strat.select(ctx_for(unmeasured, [False] * 32, step=0, seed=1))
    c = strat.select(ctx_for(unmeasured, [False] * 32, step=0, seed=2))
    assert a == b and a != c
    assert 12 <= len(a) <= 21 and 12 <= len(c) <= 21


@pytest.mark.parametrize("seed", range(10))
def test_second_step_trains_every_never_measured_layer(seed):
    L = 32
    strat = IRStrategy(L, IROptions())
    first = strat.select(ctx_for([SENTINEL_SCORE] * L, [False] * L, step=0, seed=seed))
    g = torch.Generator().manual_seed(100 + seed)
    scores = [SENTINEL_SCORE] * L
    for i in first:
        scores[i] = float(torch.rand(1, generator=g)) * 5
    measured = [i in first for i in range(L)]
    second = strat.select(ctx_for(scores, measured, step=1, active=first))
    never = {i for i in range(L) if i not in first}
    assert never <= set(second)
    assert len(second) == len(never) + 1  # plus the boundary layer of the cut


def test_strict_boundary_and_split_twice_shrink_the_group():
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = rng.random(32).tolist()
        one = set(split_high_group(s)[0])
        strict = set(split_high_group(s, include_boundary=False)[0])
        assert strict < one and len(one) - len(strict) == 1
        strat = IRStrategy(32, IROptions(split_num=2))
        two = set(strat.select(ctx_for(s, [True] * 32)))
        assert two < one and 4 <= len(two) <= 14


def test_interval_keeps_selection_between_reselections():
    strat = IRStrategy(8, IROptions(interval=3))
    scores = list(range(8))
    assert strat.select(ctx_for(scores, [True] * 8, step=1, active=[0, 1])) == [0, 1]
    assert strat.select(ctx_for(scores, [True] * 8, step=3, active=[0, 1])) != [0, 1]


def test_reference_score_formula():
    sq = torch.tensor([4.0, 16.0, 9.0, float("nan")])
    ids = torch.tensor([0, 0, 1, 2])
    got = reference_layer_scores(sq, ids, 4)
    assert got[0].item() == pytest.approx((2.0 ** 0.5 + 4.0 ** 0.5) ** 0.5)
    assert got[1].item() == pytest.approx((3.0 ** 0.5) ** 0.5)
    assert got[2].item() == pytest.approx((1000.0 ** 0.5) ** 0.5)  # NaN norm counts as 1000
    l2 = IRStrategy(4, IROptions(score="l2")).layer_scores(sq, ids)
    assert l2[0].item() == pytest.approx(20.0 ** 0.5)


@pytest.mark.parametrize("flat,fragment", [
    ({"irtuning_strategy": "nope"}, "irtuning_strategy='nope' is not a strategy; allowed: all"),
    ({"irtuning_ir_window_low": 0.7, "irtuning_ir_window_high": 0.6}, "0 < low < high < 1"),
    ({"irtuning_ir_window_high": 1.0}, "0 < low < high < 1"),
    ({"irtuning_ir_interval": 0}, "irtuning_ir_interval=0; must be >= 1"),
    ({"irtuning_ir_score": "grad"}, "irtuning_ir_score='grad'; allowed: reference, l2, cosine, weight"),
    ({"irtuning_ir_cut": "window"}, "irtuning_ir_cut='window'; allowed: reference, in_window"),
    ({"irtuning_ir_split_num": 3}, "irtuning_ir_split_num=3"),
    ({"irtuning_strategy": "all", "irtuning_ir_interval": 2}, "option of strategy 'ir'"),
    ({"irtuning_typo": 1}, "irtuning_typo is not an irtuning key"),
    ({"irtuning_scope": "half"}, "irtuning_scope='half'; allowed: adapter, full"),
])
def test_bad_config_is_refused_with_the_key(flat, fragment):
    with pytest.raises(StrategyConfigError) as err:
        config_from_flat(flat)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_readme_key_table_is_current():
    from pathlib import Path

    from irtuning_plugin.cli import KEYS_END, KEYS_START, keys_table

    readme = (Path(__file__).resolve().parent.parent / "docs" / "keys.md").read_text()
    section = readme.split(KEYS_START, 1)[1].split(KEYS_END, 1)[0].strip()
    assert section == keys_table(), "run: irtuning keys --write-readme docs/keys.md"
