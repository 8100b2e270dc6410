"""Every key has a real type: wrong-typed values are refused in one line naming the key.

The wrong values are generated from the key registry (``flat_key_types``), so a key added later is
covered without editing this file.
"""

import math
from dataclasses import dataclass
from typing import Literal

import pytest

from irtuning_plugin.config import SelectionConfig, all_flat_keys, config_from_flat, flat_key_types
from irtuning_plugin.strategies.base import KeyType, StrategyConfigError, key_types, option


def wrong_values(kind: KeyType) -> list:
    """Values of the wrong type for ``kind``: quoted numbers, fractions for whole numbers, words for numbers."""
    out: list = [{"a": 1}]
    if kind.ints and not kind.floats:
        out += [2.5, "2", True]
    if kind.floats:
        out += ["abc", "0.2", True, math.nan]
    if not (kind.ints or kind.floats):
        out += [3]
    if kind.bools:
        out += ["true", 1]
    if kind.int_lists:
        out += ["1,2", [1.5], [True]]
    if not kind.strings:
        out += ["no-such-choice" if kind.choices else "abc"]
    else:
        out += [""]
    return [v for v in out if not kind.accepts(v)]


def flat_for(key: str, value) -> dict:
    owner = all_flat_keys()[key][0]
    flat = {key: value}
    if owner is not None:
        flat["irtuning_strategy"] = owner
    return flat


CASES = [(key, value) for key, kind in flat_key_types().items() for value in wrong_values(kind)]


def test_every_key_has_a_type_and_wrong_values():
    kinds = flat_key_types()
    assert set(kinds) == set(all_flat_keys())
    for key, kind in kinds.items():
        assert kind.describe(), key
        assert len(wrong_values(kind)) >= 2, key


def test_every_default_has_its_keys_type():
    for key, (_, f) in all_flat_keys().items():
        assert flat_key_types()[key].accepts(f.default), (key, f.default)


@pytest.mark.parametrize("key,value", CASES, ids=[f"{k}={v!r}" for k, v in CASES])
def test_wrong_type_is_refused_naming_the_key(key, value):
    with pytest.raises(StrategyConfigError) as err:
        config_from_flat(flat_for(key, value))
    message = str(err.value)
    assert message.startswith(f"{key}={value!r}"), message
    assert "\n" not in message
    assert "must be" in message or "allowed:" in message or "is not a strategy" in message


@pytest.mark.parametrize("flat,message", [
    ({"irtuning_ir_window_low": "abc"}, "irtuning_ir_window_low='abc'; must be a number"),
    ({"irtuning_ir_interval": 2.5}, "irtuning_ir_interval=2.5; must be a whole number, not a fraction"),
    ({"irtuning_ir_interval": "2"}, "irtuning_ir_interval='2'; must be a whole number (write 2 without quotes)"),
    ({"irtuning_ir_window_low": "0.2"}, "irtuning_ir_window_low='0.2'; must be a number (write 0.2 without quotes)"),
    ({"irtuning_strategy": "lisa", "irtuning_lisa_n_layers": 2.5},
     "irtuning_lisa_n_layers=2.5; must be a whole number, not a fraction"),
    ({"irtuning_log_scores": "true"}, "irtuning_log_scores='true'; must be true or false (write true without quotes)"),
    ({"irtuning_seed": True}, "irtuning_seed=True; must be a whole number"),
    ({"irtuning_strategy": "fixed", "irtuning_fixed_layers": [1, 2.0]},
     "irtuning_fixed_layers=[1, 2.0]; must be a list of whole numbers (2.0 is not a whole number)"),
    ({"irtuning_ir_window_low": math.inf}, "irtuning_ir_window_low=inf; must be a finite number"),
    ({"irtuning_layers_path": 3}, "irtuning_layers_path=3; must be a non-empty string"),
    ({"irtuning_strategy": 3}, "irtuning_strategy=3 is not a strategy; allowed: "),
])
def test_the_issues_examples(flat, message):
    with pytest.raises(StrategyConfigError) as err:
        config_from_flat(flat)
    assert str(err.value).startswith(message), str(err.value)


def test_right_types_pass_and_ints_are_numbers():
    config = config_from_flat({"irtuning_strategy": "ist", "irtuning_ist_lr": 10, "irtuning_seed": 3})
    assert config.strategy_options == {"lr": 10} and config.seed == 3
    with pytest.raises(StrategyConfigError, match="0 < low < high < 1"):  # the type passes, the range does not
        config_from_flat({"irtuning_ir_window_low": 0})


def test_plain_trainer_config_is_typed_too():
    with pytest.raises(StrategyConfigError, match=r"^irtuning_cut_backward='no'; must be true or false$"):
        SelectionConfig(cut_backward="no").check()
    with pytest.raises(StrategyConfigError, match=r"^irtuning_ir_interval='3'; must be a whole number"):
        SelectionConfig(strategy="ir", strategy_options={"interval": "3"}).check()


@dataclass
class _UnionOptions:
    floor: int | Literal["salf"] | None = option(None, "a layer count, or 'salf' for SALF's choice")
    mode: str = option("a", "a choice", choices=("a", "b"))


def test_int_or_fixed_word():
    kinds = key_types(_UnionOptions)
    floor = kinds["floor"]
    for ok in (None, 0, 7, "salf"):
        floor.check("irtuning_x_floor", ok)
    for bad, text in ((2.5, "must be a whole number or salf, not a fraction"), ("abc", "must be a whole number or salf"),
                      ("3", "must be a whole number or salf (write 3 without quotes)"), (True, "must be a whole")):
        with pytest.raises(StrategyConfigError) as err:
            floor.check("irtuning_x_floor", bad)
        assert str(err.value) == f"irtuning_x_floor={bad!r}; {text}" or str(err.value).startswith(
            f"irtuning_x_floor={bad!r}; {text}"), str(err.value)
    with pytest.raises(StrategyConfigError, match=r"^irtuning_x_mode='c'; allowed: a, b$"):
        kinds["mode"].check("irtuning_x_mode", "c")


def test_an_unsupported_annotation_fails_at_definition():
    @dataclass
    class Bad:
        table: dict = option(None, "no dict keys")

    with pytest.raises(TypeError, match="not a supported key type"):
        key_types(Bad)


def test_args_model_fields_carry_the_types():
    from pydantic import TypeAdapter, ValidationError

    from irtuning_plugin.axolotl_integration.args import IRTuningArgs

    fields = IRTuningArgs.model_fields
    assert set(fields) == set(all_flat_keys())
    for key, kind in flat_key_types().items():
        adapter = TypeAdapter(fields[key].annotation)
        for value in wrong_values(kind):
            with pytest.raises(ValidationError):
                adapter.validate_python(value)
    assert TypeAdapter(fields["irtuning_ir_window_low"].annotation).validate_python(0) == 0
    assert TypeAdapter(fields["irtuning_fixed_layers"].annotation).validate_python([1, 2]) == [1, 2]


def test_wrong_types_are_refused_by_axolotl_validation(tiny_model_dir):
    """One wrong value per key through Axolotl's own validate_config (the message names the key)."""
    from helpers_axolotl import base_cfg, validate

    for key, kind in flat_key_types().items():
        value = wrong_values(kind)[1]
        flat = flat_for(key, value)
        flat.setdefault("irtuning_strategy", "ir")
        with pytest.raises(Exception) as err:
            validate(base_cfg(tiny_model_dir, **flat))
        assert f"{key}={value!r}" in str(err.value), str(err.value)
