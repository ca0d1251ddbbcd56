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


def test_base_inheritance_merges_recursively_and_refuses_cycles(tmp_path):
    (tmp_path / "root.yaml").write_text("name: root\noptim: {lr: 0.5, stage: 1}\nlayers: [1, 2]\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mid.yaml").write_text("base: ../root.yaml\noptim: {stage: 2}\n")
    (tmp_path / "sub" / "leaf.yaml").write_text("base: mid.yaml\nname: leaf\n")
    cfg = load_config(Outer, tmp_path / "sub" / "leaf.yaml")
    assert (cfg.name, cfg.optim.lr, cfg.optim.stage, cfg.layers) == ("leaf", 0.5, 2, [1, 2])
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(Outer, tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="base 'nowhere.yaml' not found"):
        load_config(Outer, tmp_path / "c.yaml")


def test_train_set_overrides_reach_the_run_config(tmp_path, monkeypatch, capsys):
    """`gears-dist train --set` and `base:` give the config the API resolves (the launcher is replaced by a
    recorder, so no Ray run: this checks the CLI's parsing, not training)."""
    from gears_dist import cli
    from gears_dist.api import resolve_config
    from gears_dist.distributed import launcher

    (tmp_path / "mine.yaml").write_text("base: %s\nname: mine\n" % (
        __import__("pathlib").Path(__file__).parents[1] / "configs" / "demo.yaml"))
    seen = {}
    monkeypatch.setattr(launcher, "cli_train", lambda cfg, store, **kw: seen.update(cfg=cfg, store=store) or 0)
    rc = cli.main(["train", "st.zarr", "--config", str(tmp_path / "mine.yaml"), "--set", "train.epochs=7",
                   "--set", "optim.lr=3e-4", "--set", "model.prior=go"])
    assert rc == 0 and seen["store"] == "st.zarr"
    want = resolve_config("demo", {"train.epochs": 7, "optim.lr": 3e-4, "model.prior": "go", "name": "mine"})
    assert seen["cfg"] == want and seen["cfg"].optim.lr == 3e-4 and seen["cfg"].train.epochs == 7
    assert cli.main(["train", "st.zarr", "--config", "demo", "--set", "train.epoch=2"]) != 0
    assert "train.epochs" in capsys.readouterr().err
    assert cli.main(["train", "st.zarr", "--config", "demo", "--set", "train.epochs"]) != 0
    assert "FIELD=VALUE" in capsys.readouterr().err
