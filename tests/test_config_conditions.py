import dataclasses
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gears_dist.config import ConfigError, from_dict, load_config, require, to_dict
from gears_dist.data.conditions import ConditionError, canonicalize, condition_name, parse_condition


@dataclasses.dataclass
class Inner:
    lr: float = 1e-3
    stage: int = 0
    kind: Literal["adam", "adamw"] = "adam"

    def validate(self):
        require(0 <= self.stage <= 3, "stage", f"ZeRO stage must be 0-3, received {self.stage}")


@dataclasses.dataclass
class Outer:
    name: str = "x"
    optim: Inner = dataclasses.field(default_factory=Inner)
    layers: list[int] = dataclasses.field(default_factory=lambda: [64])
    path: str | None = None


def test_round_trip_and_defaults():
    cfg = from_dict(Outer, {"optim": {"lr": "1e-4", "kind": "adamw"}, "layers": [1, 2]})
    assert cfg.optim.lr == 1e-4 and cfg.optim.kind == "adamw" and cfg.layers == [1, 2]
    assert from_dict(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "data, match",
    [
        ({"optm": {}}, r"unknown config key\(s\) \['optm'\]"),
        ({"optim": {"lrr": 1}}, r"\['optim.lrr'\]"),
        ({"optim": {"stage": "two"}}, r"optim.stage: expected an integer, received 'two'"),
        ({"optim": {"stage": 5}}, r"optim.stage: ZeRO stage must be 0-3, received 5"),
        ({"optim": {"kind": "sgd"}}, r"optim.kind: expected one of \['adam', 'adamw'\]"),
        ({"layers": [1, "a"]}, r"layers\[1\]: expected an integer"),
        ({"optim": {"stage": True}}, r"optim.stage: expected an integer, received True"),
        ({"optim": 3}, r"optim: expected a mapping"),
    ],
)
def test_bad_values_name_the_field(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(Outer, data)


def test_load_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at top level"):
        load_config(Outer, bad)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("ctrl", ()), ("control", ()), ("A+ctrl", ("A",)), ("ctrl+A", ("A",)), ("A", ("A",)),
        ("B+A", ("A", "B")), ("A+B+C", ("A", "B", "C")), (" A+B ", ("A", "B")),
    ],
)
def test_parse_conventions(raw, expected):
    assert parse_condition(raw) == expected


def test_underscore_separator_and_names():
    assert parse_condition("B_A", separators=("+", "_")) == ("A", "B")
    assert condition_name(()) == "ctrl" and condition_name(("B", "A")) == "A+B"
    assert canonicalize("KLF1+ctrl") == "KLF1"


@pytest.mark.parametrize("raw, match", [("A+A", "more than once"), ("A+", "empty gene name"), ("", "empty name"),
                                        (3, "expected a string")])
def test_parse_errors(raw, match):
    with pytest.raises(ConditionError, match=match):
        parse_condition(raw)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=30), st.integers(), st.none(), st.floats()))
def test_parser_fuzz_only_documented_errors(raw):
    try:
        genes = parse_condition(raw, separators=("+", "_"))
    except ConditionError:
        return
    assert genes == tuple(sorted(genes)) and len(set(genes)) == len(genes)
    assert canonicalize(condition_name(genes)) == condition_name(genes)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["name", "optim", "layers", "path", "bogus"]),
                       st.one_of(st.none(), st.integers(), st.text(max_size=5), st.floats(allow_nan=True),
                                 st.lists(st.integers(), max_size=3),
                                 st.dictionaries(st.sampled_from(["lr", "stage", "kind", "x"]),
                                                 st.one_of(st.integers(), st.text(max_size=4), st.floats())))))
def test_config_fuzz_only_config_errors(data):
    try:
        from_dict(Outer, data)
    except ConfigError:
        pass
