"""irtuning_plugin.keys and irtuning_plugin.config: the key types, a config validated once per run (and again
when it changes), and what a strategy accepts read from its class attributes."""

import dataclasses
from dataclasses import dataclass
from typing import Literal

import pytest

import irtuning_plugin.config as config_module
import irtuning_plugin.depth_floor as depth_floor
import irtuning_plugin.strategies.base as strategies_base
from irtuning_plugin import SelectionConfig, attach_layer_selection
from irtuning_plugin.config import check_floor_value, config_from_flat, selection_fingerprint
from irtuning_plugin.keys import KeyType, StrategyConfigError, key_types, make_options, option, option_fields
from irtuning_plugin.layer_map import SCOPES
from irtuning_plugin.strategies import get_strategy_class, register_strategy, registered_strategies
from irtuning_plugin.strategies.base import SelectionStrategy


# ---- keys.py ----------------------------------------------------------------------------------------
def test_key_types_live_in_keys_and_stay_importable_from_the_strategies_package():
    import irtuning_plugin.strategies as strategies

    assert strategies_base.KeyType is KeyType and strategies_base.option is option
    assert strategies_base.StrategyConfigError is StrategyConfigError is strategies.StrategyConfigError
    assert strategies_base.make_options is make_options and strategies_base.key_types is key_types
    assert strategies_base.option_fields is option_fields
    assert issubclass(StrategyConfigError, ValueError)


@dataclass
class _Opts:
    count: int = option(2, "a count", minimum=1, maximum=5)
    rate: float = option(0.5, "a rate")
    flag: bool = option(True, "a flag")
    mode: str = option("a", "a choice", choices=("a", "b"))
    name: str | None = option(None, "a name")
    layers: list[int] | None = option(None, "layer indices")
    either: int | Literal["auto"] | None = option(None, "a count or auto")

    def check(self, prefix: str, num_layers: int | None = None) -> None:
        # cross-field rule only: it may assume the types are right (compares without isinstance)
        if self.count > 3 and self.rate > 0.9:
            raise StrategyConfigError(f"{prefix}count={self.count} with {prefix}rate={self.rate}: too much")


class _OptsStrategy(SelectionStrategy):
    name = "opts_test"
    Options = _Opts


def test_key_types_read_from_annotations():
    kinds = key_types(_Opts)
    assert set(kinds) == {"count", "rate", "flag", "mode", "name", "layers", "either"}
    assert kinds["count"] == KeyType(ints=True, minimum=1, maximum=5)
    assert kinds["rate"] == KeyType(floats=True)
    assert kinds["flag"] == KeyType(bools=True)
    assert kinds["mode"] == KeyType(choices=("a", "b"))
    assert kinds["name"] == KeyType(strings=True)
    assert kinds["layers"] == KeyType(int_lists=True)
    assert kinds["either"] == KeyType(ints=True, choices=("auto",))
    assert kinds["count"].describe() == "a whole number in 1..5"
    assert kinds["either"].describe() == "a whole number or auto"


@pytest.mark.parametrize("key,value,message", [
    ("count", 6, "p_count=6; must be a whole number in 1..5"),
    ("count", 0, "p_count=0; must be a whole number in 1..5"),
    ("count", 2.0, "p_count=2.0; must be a whole number in 1..5, not a fraction"),
    ("rate", "0.3", "p_rate='0.3'; must be a number (write 0.3 without quotes)"),
    ("rate", float("nan"), "p_rate=nan; must be a finite number"),
    ("flag", 1, "p_flag=1; must be true or false"),
    ("mode", "c", "p_mode='c'; allowed: a, b"),
    ("name", " ", "p_name=' '; must be a non-empty string"),
    ("layers", [1, True], "p_layers=[1, True]; must be a list of whole numbers (True is not a whole number)"),
    ("either", "manual", "p_either='manual'; must be a whole number or auto"),
])
def test_make_options_refuses_wrong_types_before_the_options_check(key, value, message):
    with pytest.raises(StrategyConfigError) as err:
        make_options(_OptsStrategy, {key: value}, "p_")
    assert str(err.value) == message


def test_make_options_builds_checks_and_keeps_defaults():
    opts = make_options(_OptsStrategy, {"count": 3, "rate": 1, "layers": [0, 2], "either": "auto", "name": None}, "p_")
    assert (opts.count, opts.rate, opts.layers, opts.either, opts.name, opts.mode) == (3, 1, [0, 2], "auto", None, "a")
    with pytest.raises(StrategyConfigError, match=r"^p_count=4 with p_rate=0.95: too much$"):
        make_options(_OptsStrategy, {"count": 4, "rate": 0.95}, "p_")
    with pytest.raises(StrategyConfigError, match=r"^p_size is not an option of strategy 'opts_test'; its options: "
                                                  r"p_count, p_either, p_flag, p_layers, p_mode, p_name, p_rate$"):
        make_options(_OptsStrategy, {"size": 1}, "p_")
    assert [f.name for f in option_fields(_OptsStrategy)] == [f.name for f in dataclasses.fields(_Opts)]


# ---- validated once ---------------------------------------------------------------------------------
@pytest.fixture
def count_make_options(monkeypatch):
    calls = []
    real = config_module.make_options

    def counting(cls, values, prefix):
        calls.append(cls.name)
        return real(cls, values, prefix)

    monkeypatch.setattr(config_module, "make_options", counting)
    return calls


def test_check_runs_once_for_unchanged_values(count_make_options):
    cfg = SelectionConfig(strategy="lisa", strategy_options={"n_layers": 2, "interval": 3})
    assert cfg.check() is cfg and cfg.check() is cfg
    first, second = cfg.build_options(), cfg.build_options()
    assert count_make_options == ["lisa"]
    assert first == second and first is not second  # each call gets its own copy, as before
    first.n_layers = 5  # a caller changing its copy changes nothing for the next one
    assert cfg.build_options().n_layers == 2
    selection_fingerprint(cfg, seed=1, layers_path="model.layers")
    assert count_make_options == ["lisa"]


def test_an_unchecked_config_is_checked_by_build_options(count_make_options):
    cfg = SelectionConfig(strategy="ir", strategy_options={"interval": 2})
    assert cfg.build_options().interval == 2 and count_make_options == ["ir"]
    with pytest.raises(StrategyConfigError, match=r"^irtuning_ir_interval=0; must be >= 1$"):
        SelectionConfig(strategy="ir", strategy_options={"interval": 0}).build_options()


def test_the_check_is_not_a_config_field():
    cfg = SelectionConfig(strategy="random").check()
    assert cfg == SelectionConfig(strategy="random")  # equality, fields and asdict ignore the recorded check
    assert "_checked" not in {f.name for f in dataclasses.fields(cfg)} and "_checked" not in repr(cfg)
    assert dataclasses.asdict(cfg) == dataclasses.asdict(SelectionConfig(strategy="random"))


@pytest.mark.parametrize("change,message", [
    (lambda c: c.strategy_options.__setitem__("n_layers", 0), "irtuning_lisa_n_layers=0; must be >= 1"),
    (lambda c: c.strategy_options.__setitem__("interval", True), "irtuning_lisa_interval=True; must be a whole number"),
    (lambda c: c.strategy_options.__setitem__("steps", 3), "irtuning_lisa_steps is not an option of strategy 'lisa'"),
    (lambda c: setattr(c, "seed", True), "irtuning_seed=True; must be a whole number"),  # 1 -> True: equal, not same
    (lambda c: setattr(c, "seed", 1.0), "irtuning_seed=1.0; must be a whole number"),
    (lambda c: setattr(c, "depth_floor", -1), "irtuning_depth_floor=-1; allowed: a whole number of layers >= 0"),
    (lambda c: setattr(c, "strategy", "fixed"), "irtuning_fixed_interval is not an option of strategy 'fixed'"),
    (lambda c: setattr(c, "strategy_options", [("n_layers", 2)]), "strategy_options=[('n_layers', 2)]; must be a dict"),
])
def test_a_config_changed_after_its_check_is_checked_again(change, message):
    cfg = SelectionConfig(strategy="lisa", seed=1, strategy_options={"n_layers": 2, "interval": 3}).check()
    change(cfg)
    for call in (cfg.check, cfg.build_options, cfg.check):  # refused every time, not only the first
        with pytest.raises(StrategyConfigError) as err:
            call()
        assert str(err.value).startswith(message), str(err.value)


def test_a_config_changed_to_good_values_gets_the_new_options(count_make_options):
    cfg = SelectionConfig(strategy="lisa", strategy_options={"n_layers": 2}).check()
    cfg.strategy_options["n_layers"] = 3
    assert cfg.build_options().n_layers == 3
    cfg.strategy_options["n_layers"] = 2  # back to the first values: checked once more, then cheap again
    assert cfg.check().build_options().n_layers == 2 and cfg.check().build_options().n_layers == 2
    assert count_make_options == ["lisa"] * 3


def test_a_run_validates_its_config_once(tmp_path, count_make_options):
    """config_from_flat, the callback, the preflight, the engine (check, options, fingerprint): one validation."""
    from helpers_tiny import make_trainer, tiny_peft_llama

    cfg = config_from_flat({"irtuning_strategy": "ir", "irtuning_depth_floor": 2, "irtuning_ir_interval": 1,
                            "irtuning_selection_log": False, "irtuning_heatmap": False})
    trainer = make_trainer(tiny_peft_llama(num_layers=4), tmp_path, max_steps=2)
    cb = attach_layer_selection(trainer, cfg)
    trainer.train()
    assert len(cb.rows) == 2 and all(min(r["active"]) >= 2 for r in cb.rows)
    assert count_make_options == ["ir"]


# ---- capabilities as class attributes ---------------------------------------------------------------
def test_capability_defaults_and_the_strategies_that_differ():
    assert SelectionStrategy.scopes == SCOPES == ("adapter", "full")
    assert SelectionStrategy.accepts_depth_floor is True and SelectionStrategy.freezes_layers is True
    differ = {name: {attr: getattr(cls, attr) for attr in ("scopes", "accepts_depth_floor", "freezes_layers")
                     if getattr(cls, attr) != getattr(SelectionStrategy, attr)}
              for name, cls in registered_strategies().items()}
    assert {n: d for n, d in differ.items() if d} == {
        "all": {"freezes_layers": False},
        "fixed": {"accepts_depth_floor": False},
        "salf": {"accepts_depth_floor": False},
        "ist": {"scopes": ("adapter",)},
    }


def test_no_name_lists_of_strategies_remain():
    assert not hasattr(depth_floor, "NO_FLOOR") and not hasattr(depth_floor, "check_floor_value")
    assert "depth_floor" not in vars(config_module)  # config no longer imports the depth floor (no cycle)


@pytest.mark.parametrize("name", ["salf", "fixed"])
def test_strategies_that_fix_their_layers_refuse_a_floor(name):
    with pytest.raises(StrategyConfigError) as err:
        check_floor_value(3, get_strategy_class(name))
    assert str(err.value) == (f"irtuning_depth_floor=3 cannot be combined with irtuning_strategy={name!r}, which "
                              f"chooses its layers itself: remove irtuning_depth_floor (salf's cut is a floor already)")
    check_floor_value(0, get_strategy_class(name))  # 0 and unset mean no floor
    check_floor_value(None, get_strategy_class(name))


def test_a_registered_strategy_declaring_no_floor_is_refused_one(monkeypatch):
    monkeypatch.setattr(strategies_base, "_REGISTRY", dict(strategies_base._REGISTRY))  # undone after the test

    @register_strategy
    class Pinned(SelectionStrategy):
        name = "pinned_test"
        accepts_depth_floor = False

        def select(self, ctx):
            return [ctx.num_layers - 1]

    @register_strategy
    class Floored(SelectionStrategy):
        name = "floored_test"

        def select(self, ctx):
            return [ctx.num_layers - 1]

    with pytest.raises(StrategyConfigError) as err:
        SelectionConfig(strategy="pinned_test", depth_floor=2).check()
    assert str(err.value) == ("irtuning_depth_floor=2 cannot be combined with irtuning_strategy='pinned_test', which "
                              "chooses its layers itself: remove irtuning_depth_floor (salf's cut is a floor already)")
    with pytest.raises(StrategyConfigError, match="cannot be combined with irtuning_strategy='pinned_test'"):
        SelectionConfig(strategy="pinned_test", depth_floor="salf").check()
    SelectionConfig(strategy="pinned_test", depth_floor=0).check()
    SelectionConfig(strategy="floored_test", depth_floor=2).check()
    SelectionConfig(strategy="floored_test", depth_floor="salf").check()


# ---- the baseline strategies' options, refused with the key (from the flat keys) ---------------------------
# ---- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("flat,fragment", [
    ({"irtuning_strategy": "lisa", "irtuning_lisa_n_layers": 0}, "irtuning_lisa_n_layers=0; must be >= 1"),
    ({"irtuning_strategy": "lisa", "irtuning_lisa_interval": 0}, "irtuning_lisa_interval=0; must be"),
    ({"irtuning_strategy": "lisa", "irtuning_lisa_train_outside": "no"}, "irtuning_lisa_train_outside='no'"),
    ({"irtuning_strategy": "random", "irtuning_random_n_layers": "4"}, "irtuning_random_n_layers='4'; must be"),
    ({"irtuning_strategy": "fixed"}, "irtuning_fixed_layers is required"),
    ({"irtuning_strategy": "fixed", "irtuning_fixed_layers": []}, "irtuning_fixed_layers=[]; must be a non-empty"),
    ({"irtuning_strategy": "fixed", "irtuning_fixed_layers": [1, 1]}, "irtuning_fixed_layers=[1, 1] lists a layer"),
    ({"irtuning_strategy": "fixed", "irtuning_fixed_layers": [-1]}, "layer -1 is outside"),
    ({"irtuning_strategy": "fixed", "irtuning_fixed_layers": ["a"]}, "irtuning_fixed_layers=['a']; must be a list of whole numbers ('a' is not"),
    ({"irtuning_strategy": "ist", "irtuning_ist_train_fraction": 0}, "irtuning_ist_train_fraction=0; must be a "),
    ({"irtuning_strategy": "ist", "irtuning_ist_candidates": 1}, "irtuning_ist_candidates=1; must be a whole"),
    ({"irtuning_strategy": "ist", "irtuning_ist_suppress_factor": 1.0}, "irtuning_ist_suppress_factor=1.0"),
    ({"irtuning_strategy": "ist", "irtuning_ist_lr": -1}, "irtuning_ist_lr=-1; must be > 0"),
    ({"irtuning_frozen_optimizer_state": "gpu"}, "irtuning_frozen_optimizer_state='gpu'; allowed: keep, cpu, drop"),
    ({"irtuning_strategy": "random", "irtuning_lisa_n_layers": 2}, "irtuning_lisa_n_layers is an option of"),
])
def test_bad_config_is_refused_with_the_key(flat, fragment):
    with pytest.raises(StrategyConfigError) as err:
        config_from_flat(flat)
    assert fragment in str(err.value) and "\n" not in str(err.value)
