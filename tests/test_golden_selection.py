"""Seeded runs select the same layers, step for step, as the frozen golden logs.

The golden files (tests/golden/selection/<case>.json) were written by tests/golden/make_golden.py from the
commit named in each file; the cases are in tests/golden_selection_cases.py. A difference here means a
change of behaviour: which layers train, what is chosen next, or what a strategy logs. If the change is
intended, regenerate the files (see make_golden.py) and say why in the commit.
"""

import json
from pathlib import Path

import pytest
from golden_selection_cases import CASES, STOP_AT, case_settings, run_case

GOLDEN = Path(__file__).parent / "golden" / "selection"


def _golden(name: str) -> dict:
    path = GOLDEN / f"{name}.json"
    assert path.is_file(), f"no golden file {path}; write it with tests/golden/make_golden.py"
    return json.loads(path.read_text(encoding="utf-8"))


def _first_difference(expected: list[dict], got: list[dict]) -> str:
    for want, have in zip(expected, got):
        if want != have:
            keys = sorted(k for k in set(want) | set(have) if want.get(k, "<absent>") != have.get(k, "<absent>"))
            return "; ".join(f"step {want['step']} {k}: golden {want.get(k, '<absent>')!r} now {have.get(k, '<absent>')!r}"
                             for k in keys)
    return f"golden has {len(expected)} rows, this run {len(got)}"


@pytest.mark.parametrize("name", list(CASES))
def test_selection_matches_golden(tmp_path, name):
    golden = _golden(name)
    assert golden["settings"] == json.loads(json.dumps(case_settings(name))), "case changed since the golden file"
    rows = run_case(name, tmp_path)
    assert [r["step"] for r in rows] == list(range(1, len(golden["rows"]) + 1))
    assert rows == golden["rows"], f"{name}: {_first_difference(golden['rows'], rows)}"


@pytest.mark.parametrize("name", [n for n in CASES if "base" in CASES[n]])
def test_resumed_golden_equals_uninterrupted_golden(name):
    """The promise the resume cases freeze: after resuming from checkpoint-4, steps 5..8 are the
    uninterrupted run's (steps 1..4 come from the checkpoint's log)."""
    resumed, base = _golden(name)["rows"], _golden(CASES[name]["base"])["rows"]
    assert resumed[STOP_AT:] == base[STOP_AT:] and len(resumed[STOP_AT:]) == 4
    assert resumed == base


def test_golden_cases_cover_every_registered_strategy():
    from irtuning_plugin.strategies import registered_strategies

    default_cases = {n for n, c in CASES.items() if set(c.get("flat", {})) <= {"irtuning_strategy", "irtuning_fixed_layers"}}
    assert set(registered_strategies()) <= default_cases
    assert any(case_settings(n)["max_grad_norm"] > 0 for n in CASES)
