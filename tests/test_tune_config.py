"""Search config: bad spaces are rejected at load with the field named; presets load; the CLI parses."""

import pathlib

import pytest

from gears_dist.cli import build_parser
from gears_dist.config import ConfigError
from gears_dist.tune.config import (
    ParamSpec,
    apply_params,
    decode_params,
    encode_value,
    load_tune_config,
    tune_config_from_dict,
)
from gears_dist.tune.search import WORST, objective, param_space, trial_run_config

REPO = pathlib.Path(__file__).resolve().parents[1]
BASE = {"name": "b", "model": {"hidden_size": 16}, "train": {"epochs": 2}}


def _tc(space, **kw):
    return tune_config_from_dict({"base": BASE, "space": space, **kw})


@pytest.mark.parametrize("space, field, message", [
    ({"optim.learning_rate": {"type": "uniform", "low": 0.1, "high": 0.2}}, "space.optim.learning_rate",
     "unknown parameter 'optim.learning_rate'"),
    ({"optimizer.lr": {"type": "uniform", "low": 0.1, "high": 0.2}}, "space.optimizer.lr", "unknown parameter"),
    ({"optim.lr.x": {"type": "uniform", "low": 0.1, "high": 0.2}}, "space.optim.lr.x", "is a value, not a section"),
    ({"optim": {"type": "uniform", "low": 0.1, "high": 0.2}}, "space.optim", "is a config section"),
    ({"model.hidden_size": {"type": "choice", "values": []}}, "space.model.hidden_size.values", "non-empty"),
    ({"model.hidden_size": {"type": "choice"}}, "space.model.hidden_size.values", "needs 'values"),
    ({"optim.lr": {"type": "uniform", "low": 0.2, "high": 0.1}}, "space.optim.lr.low", "low (0.2) > high (0.1)"),
    ({"optim.lr": {"type": "loguniform", "low": 0.0, "high": 0.1}}, "space.optim.lr.low", "low > 0"),
    ({"optim.lr": {"type": "loguniform", "low": -1.0, "high": 0.1}}, "space.optim.lr.low", "low > 0"),
    ({"optim.lr": {"type": "uniform", "high": 0.1}}, "space.optim.lr.low", "needs 'low'"),
    ({"optim.lr": {"type": "normal", "low": 0.1, "high": 0.2}}, "space.optim.lr.type", "expected one of"),
    ({"optim.lr": {"type": "uniform", "low": 0.1, "high": 0.2, "step": 1}}, "space.optim.lr.step", "unknown"),
    ({"model.num_go_layers": {"type": "randint", "low": 1.5, "high": 3}}, "space.model.num_go_layers.low",
     "integers"),
    # values the training config itself refuses, named by the space entry they come from
    ({"model.hidden_size": {"type": "choice", "values": [16, 0]}}, "space.model.hidden_size.values[1]",
     "hidden_size"),
    ({"optim.step_gamma": {"type": "uniform", "low": 0.5, "high": 1.5}}, "space.optim.step_gamma.high",
     "step_gamma"),
    ({"model.hidden_size": {"type": "loguniform", "low": 8, "high": 64}}, "space.model.hidden_size.low",
     "expected an integer"),
    ({"loss.direction": {"type": "choice", "values": ["sign", "cosine"]}}, "space.loss.direction.values[1]",
     "direction"),
    # fields that belong to the search, not to the trial
    ({"scaling.num_workers": {"type": "choice", "values": [1, 2]}}, "space.scaling.num_workers", "resources"),
    ({"train.epochs": {"type": "randint", "low": 1, "high": 3}}, "space.train.epochs", "max_epochs"),
    ({"tracking.experiment": {"type": "choice", "values": ["a"]}}, "space.tracking.experiment", "cannot be searched"),
])
def test_bad_space_rejected_naming_field(space, field, message):
    with pytest.raises(ConfigError) as err:
        _tc(space)
    assert field in str(err.value), str(err.value)
    assert message in str(err.value), str(err.value)


def test_other_bad_fields_rejected():
    lr = {"optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}
    with pytest.raises(ConfigError, match="space: expected at least one"):
        _tc({})
    with pytest.raises(ConfigError, match="metric: expected one of the per-epoch metrics"):
        _tc(lr, metric="val_msede")
    with pytest.raises(ConfigError, match="num_trials"):
        _tc(lr, num_trials=0)
    with pytest.raises(ConfigError, match="scheduler.reduction_factor"):
        _tc(lr, scheduler={"reduction_factor": 1})
    with pytest.raises(ConfigError, match="scheduler.max_epochs"):
        _tc(lr, scheduler={"grace_period": 3, "max_epochs": 2})
    with pytest.raises(ConfigError, match="resources.cpus_per_worker"):
        _tc(lr, resources={"cpus_per_worker": 0})
    with pytest.raises(ConfigError, match="searcher"):
        _tc(lr, searcher="hyperopt")
    with pytest.raises(ConfigError, match=r"points_to_evaluate\[0\].*not in 'space'"):
        _tc(lr, points_to_evaluate=[{"optim.weight_decay": 0.1}])
    with pytest.raises(ConfigError, match=r"points_to_evaluate\[0\].optim.lr: expected a loguniform value"):
        _tc(lr, points_to_evaluate=[{"optim.lr": 0.5}])
    with pytest.raises(ConfigError, match=r"base: .*optim.learning_rate"):
        tune_config_from_dict({"base": {"optim": {"learning_rate": 1}}, "space": lr})
    with pytest.raises(ConfigError, match="base: training config 'nowhere.yaml' not found"):
        tune_config_from_dict({"base": "nowhere.yaml", "space": lr})
    with pytest.warns(UserWarning, match="correlations are maximized"):
        _tc(lr, metric="val_pearson_delta", mode="min")


def test_base_path_relative_to_file_and_overrides(tmp_path):
    (tmp_path / "train.yaml").write_text("name: x\nmodel: {hidden_size: 8}\ntrain: {epochs: 7}\n")
    (tmp_path / "search.yaml").write_text(
        "base: train.yaml\noverrides: {optim: {weight_decay: 0.0}}\n"
        "space: {optim.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}}\nscheduler: {max_epochs: 3}\n")
    tc = load_tune_config(tmp_path / "search.yaml")
    base = tc.base_run_dict()
    assert base["model"]["hidden_size"] == 8
    assert base["optim"]["weight_decay"] == 0.0
    assert base["train"]["epochs"] == 3 == tc.max_epochs  # the scheduler's max_epochs wins
    (tmp_path / "bad.yaml").write_text("base: train.yaml\nsource_dir: /\nspace: {}\n")
    with pytest.raises(ConfigError, match="source_dir"):
        load_tune_config(tmp_path / "bad.yaml")


def test_list_choices_travel_encoded_and_trial_config_built():
    tc = _tc({"model.recovery_hidden_sizes": {"type": "choice", "values": [None, [32], [32, 32]]},
              "model.num_go_layers": {"type": "randint", "low": 1, "high": 2}})
    spec = tc.space["model.recovery_hidden_sizes"]
    sampled = {"model.recovery_hidden_sizes": encode_value(spec, [32, 32]), "model.num_go_layers": 2}
    assert isinstance(sampled["model.recovery_hidden_sizes"], str)  # Optuna categoricals take scalars only
    params = decode_params(tc.space, sampled)
    assert params == {"model.recovery_hidden_sizes": [32, 32], "model.num_go_layers": 2}
    data = trial_run_config(tc.base_run_dict(), params, "abc", {"num_workers": 2, "cpus_per_worker": 1.5,
                                                                "gpus_per_worker": 0.0})
    assert data["model"]["recovery_hidden_sizes"] == [32, 32] and data["model"]["hidden_size"] == 16
    assert data["scaling"]["num_workers"] == 2 and data["scaling"]["use_gpu"] is False
    assert data["tracking"]["enabled"] is False and data["name"] == "trial_abc"
    space = param_space(tc)
    assert set(space) == set(tc.space)
    # randint bounds are inclusive in the YAML; Tune's upper bound is exclusive
    assert space["model.num_go_layers"].upper == 3
    assert apply_params({"a": {"b": 1, "c": 2}}, {"a.b": 5}) == {"a": {"b": 5, "c": 2}}


def test_objective_makes_divergence_the_worst():
    assert objective(0.5, "min") == 0.5
    assert objective(float("nan"), "min") == WORST
    assert objective(float("inf"), "max") == -WORST
    assert objective(None, "min") == WORST


@pytest.mark.parametrize("preset", ["tune_demo", "tune_genome"])
def test_presets_load(preset):
    tc = load_tune_config(REPO / "configs" / f"{preset}.yaml")
    assert tc.space and tc.num_trials >= tc.max_concurrent
    assert tc.max_epochs == tc.scheduler.max_epochs


def test_cli_parses_tune():
    args = build_parser().parse_args(["tune", "--config", "configs/tune_demo.yaml", "s.zarr", "--out", "o",
                                      "--resume", "--address", "auto"])
    assert (args.config, args.store, args.out, args.resume, args.address) == \
        ("configs/tune_demo.yaml", "s.zarr", "o", True, "auto")


def test_param_spec_enumerate():
    assert ParamSpec("randint", 1, 3).enumerate(10) == [1, 2, 3]
    assert ParamSpec("uniform", 0.0, 1.0).enumerate(10) is None
    assert ParamSpec("choice", values=["a"]).enumerate(10) == ["a"]
