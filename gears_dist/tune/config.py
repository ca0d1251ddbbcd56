"""Typed configuration of a hyperparameter search (the ``configs/tune_*.yaml`` presets).

A search YAML names a base training config (a path to a training preset, or the training config inline),
the search space over its fields, the objective and the budget::

    name: demo_search
    base: demo.yaml                 # a training preset (relative to this file, else to the working directory)
    overrides: {train: {log_every: 1000}}   # merged over the base for every trial (optional)
    space:                          # dotted path of a training-config field -> distribution
      optim.lr:          {type: loguniform, low: 1.0e-4, high: 1.0e-2}
      model.hidden_size: {type: choice, values: [16, 32, 64]}
      model.num_go_layers: {type: randint, low: 1, high: 2}     # integers, both ends included
    metric: val_mse_de              # a per-epoch validation metric of the training loop
    mode: min
    num_trials: 16
    max_concurrent: 2
    searcher: optuna                # optuna (TPE) | random; both seeded
    seed: 0
    scheduler: {kind: asha, grace_period: 1, reduction_factor: 2, max_epochs: 4}
    resources: {num_workers: 1, cpus_per_worker: 1, gpus_per_worker: 0}
    tracking:  {uri: null, experiment: null}

Everything is checked at load: an unknown path, a path to a config section instead of a value, an empty
choice, ``low > high``, a log-uniform range reaching 0 or below, or any endpoint / choice value that the
training config itself rejects (e.g. ``model.hidden_size: 0``) raises ConfigError naming the field.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import pathlib
import typing
import warnings
from typing import Any, Literal

from gears_dist.config import ConfigError, deep_merge, from_dict, load_yaml, require, to_dict
from gears_dist.train.config import RunConfig, run_config_from_dict

# Per-epoch metrics the training loop reports (gears_dist.train.loop.run_worker) that can rank trials.
EPOCH_METRICS = ("val_mse_de", "val_mse", "val_pearson_delta", "train_loss")
# Fields a search may not vary: the trial's resources, its name and tracking belong to the search, and the
# number of epochs is the scheduler's max_epochs.
_RESERVED = ("name", "scaling", "tracking", "train.epochs")
# Store components a trial reads: varying these makes trials build graphs / splits / partitions.
STORE_PATH_PREFIXES = ("graphs.", "data.split", "sharding.")
_SCALAR = (type(None), bool, int, float, str)


@dataclasses.dataclass
class ParamSpec:
    """One searched field. loguniform / uniform: floats in [low, high]; randint: integers low..high (both
    included); choice: one of `values`."""

    type: Literal["loguniform", "uniform", "choice", "randint"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    def validate(self) -> None:
        if self.type == "choice":
            require(self.values is not None, "values", "a choice needs 'values: [...]'")
            require(len(self.values) > 0, "values", "expected a non-empty list of values, received []")
            require(self.low is None and self.high is None, "low", "a choice takes 'values', not 'low'/'high'")
            return
        require(self.values is None, "values", f"a {self.type} takes 'low' and 'high', not 'values'")
        require(self.low is not None, "low", f"a {self.type} needs 'low'")
        require(self.high is not None, "high", f"a {self.type} needs 'high'")
        require(math.isfinite(self.low) and math.isfinite(self.high), "low",
                f"expected finite bounds, received low={self.low}, high={self.high}")
        require(self.low <= self.high, "low", f"low ({self.low}) > high ({self.high}); expected low <= high")
        if self.type == "loguniform":
            require(self.low > 0, "low", f"a log-uniform range needs low > 0, received {self.low}")
        if self.type == "randint":
            require(float(self.low).is_integer() and float(self.high).is_integer(), "low",
                    f"randint bounds must be integers, received low={self.low}, high={self.high}")

    def endpoints(self) -> list[Any]:
        """The values whose validity implies the validity of the whole range (checked at load)."""
        if self.type == "choice":
            return list(self.values)
        if self.type == "randint":
            return [int(self.low), int(self.high)]
        return [float(self.low), float(self.high)]

    def enumerate(self, limit: int) -> list[Any] | None:
        """Every value this parameter can take, if finite and at most `limit` of them; else None."""
        if self.type == "choice":
            return list(self.values)
        if self.type == "randint" and int(self.high) - int(self.low) < limit:
            return list(range(int(self.low), int(self.high) + 1))
        return None


@dataclasses.dataclass
class SchedulerConfig:
    """kind asha: ASHA stops trials whose metric is in the worse part of a rung (rungs at grace_period x
    reduction_factor^k epochs); fifo: every trial runs max_epochs. max_epochs: every trial's train.epochs
    (null: the base config's)."""

    kind: Literal["asha", "fifo"] = "asha"
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_epochs: int | None = None

    def validate(self) -> None:
        require(self.grace_period >= 1, "grace_period", f"expected >= 1 epoch, received {self.grace_period}")
        require(self.reduction_factor > 1, "reduction_factor", f"expected > 1, received {self.reduction_factor}")
        require(self.max_epochs is None or self.max_epochs >= self.grace_period, "max_epochs",
                f"expected null or >= grace_period ({self.grace_period}), received {self.max_epochs}")


@dataclasses.dataclass
class ResourcesConfig:
    """Per trial: one Ray Train worker group of num_workers workers. driver_cpus: the Tune trial function
    itself only waits on its TorchTrainer, so it reserves a sliver of a CPU (Ray refuses zero)."""

    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    driver_cpus: float = 0.01

    def validate(self) -> None:
        require(self.num_workers >= 1, "num_workers", f"expected >= 1, received {self.num_workers}")
        require(self.cpus_per_worker > 0, "cpus_per_worker", f"expected > 0, received {self.cpus_per_worker}")
        require(self.gpus_per_worker >= 0, "gpus_per_worker", f"expected >= 0, received {self.gpus_per_worker}")
        require(0 < self.driver_cpus <= 1, "driver_cpus", f"expected in (0, 1], received {self.driver_cpus}")


@dataclasses.dataclass
class SearchTrackingConfig:
    """uri: MLflow tracking URI (null: $MLFLOW_TRACKING_URI, else sqlite:///<out>/mlflow.db); experiment:
    null means the base config's tracking.experiment."""

    uri: str | None = None
    experiment: str | None = None


@dataclasses.dataclass
class TuneConfig:
    base: str | dict[str, Any]
    space: dict[str, ParamSpec]
    name: str = "search"
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    metric: str = "val_mse_de"
    mode: Literal["min", "max"] = "min"
    num_trials: int = 8
    max_concurrent: int = 2
    searcher: Literal["optuna", "random"] = "optuna"
    seed: int = 0
    points_to_evaluate: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    scheduler: SchedulerConfig = dataclasses.field(default_factory=SchedulerConfig)
    resources: ResourcesConfig = dataclasses.field(default_factory=ResourcesConfig)
    tracking: SearchTrackingConfig = dataclasses.field(default_factory=SearchTrackingConfig)
    # the directory relative base paths are resolved against first (set by load_tune_config)
    source_dir: str | None = None

    def validate(self) -> None:
        require(bool(self.name) and "/" not in self.name, "name",
                f"expected a plain search name without '/', received {self.name!r}")
        require(len(self.space) > 0, "space", "expected at least one parameter to search, received {}")
        require(self.metric in EPOCH_METRICS, "metric",
                f"expected one of the per-epoch metrics {list(EPOCH_METRICS)}, received {self.metric!r}")
        require(self.num_trials >= 1, "num_trials", f"expected >= 1, received {self.num_trials}")
        require(self.max_concurrent >= 1, "max_concurrent", f"expected >= 1, received {self.max_concurrent}")
        if (self.metric == "val_pearson_delta") != (self.mode == "max"):
            warnings.warn(f"tune: metric {self.metric!r} with mode {self.mode!r}: correlations are maximized and "
                          f"errors / losses minimized; check 'mode'", stacklevel=2)
        base = self.base_run_dict()
        for path, spec in self.space.items():
            check_param_path(path)
            for i, value in enumerate(spec.endpoints()):
                where = f"space.{path}.values[{i}]" if spec.type == "choice" else \
                    f"space.{path}.{'low' if i == 0 else 'high'}"
                _check_value(base, path, value, where)
        for i, point in enumerate(self.points_to_evaluate):
            require(isinstance(point, dict), f"points_to_evaluate[{i}]", f"expected a mapping, received {point!r}")
            unknown = sorted(set(point) - set(self.space))
            require(not unknown, f"points_to_evaluate[{i}]",
                    f"names {unknown}, which are not in 'space' (searched: {sorted(self.space)})")
            for path, value in point.items():
                _check_in_space(self.space[path], value, f"points_to_evaluate[{i}].{path}")
                _check_value(base, path, value, f"points_to_evaluate[{i}].{path}")

    # -- derived -----------------------------------------------------------------------------------

    def base_path(self) -> pathlib.Path | None:
        if not isinstance(self.base, str):
            return None
        given = pathlib.Path(self.base).expanduser()
        tried = [given] if given.is_absolute() else \
            ([pathlib.Path(self.source_dir) / given] if self.source_dir else []) + [pathlib.Path.cwd() / given]
        for path in tried:
            if path.is_file():
                return path.resolve()
        raise ConfigError(f"base: training config {self.base!r} not found (tried {[str(p) for p in tried]}); "
                          f"give a path to a training preset such as configs/demo.yaml, or the config inline")

    def base_run_dict(self) -> dict:
        """The base training config (with `overrides` and the scheduler's epochs) as plain data."""
        data = load_yaml(self.base_path()) if isinstance(self.base, str) else dict(self.base)
        data = deep_merge(data, self.overrides)
        where = f"base ({self.base})" if isinstance(self.base, str) else "base"
        try:
            cfg = run_config_from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if self.scheduler.max_epochs is not None:
            cfg.train.epochs = self.scheduler.max_epochs
        return to_dict(cfg)

    @property
    def max_epochs(self) -> int:
        return int(self.base_run_dict()["train"]["epochs"])

    def store_params(self) -> list[str]:
        return sorted(p for p in self.space if p.startswith(STORE_PATH_PREFIXES))

    def store_combinations(self, limit: int = 32) -> list[dict[str, Any]] | None:
        """Every combination of the store-affecting searched values (None if infinite or > limit)."""
        params = self.store_params()
        options = [self.space[p].enumerate(limit) for p in params]
        if any(o is None for o in options) or math.prod(len(o) for o in options) > limit:
            return None
        return [dict(zip(params, combo)) for combo in itertools.product(*options)]


def _walk_fields(path: str) -> Any:
    """Type hint of the RunConfig field at dotted `path` (ConfigError naming it if there is none)."""
    cls: Any = RunConfig
    parts = path.split(".")
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth + 1])
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"space.{path}: {'.'.join(parts[:depth])} is a value, not a section; "
                              f"expected a path to a field of the training config")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        if part not in names:
            section = ".".join(parts[:depth]) or "the training config"
            raise ConfigError(f"space.{path}: unknown parameter {where!r}; {section} has fields {sorted(names)}")
        cls = hints[part]
    if dataclasses.is_dataclass(cls):
        raise ConfigError(f"space.{path}: {path!r} is a config section, not a value; name one of its fields "
                          f"({sorted(f.name for f in dataclasses.fields(cls))})")
    return cls


def check_param_path(path: str) -> None:
    """ConfigError unless `path` names a searchable leaf field of the training config."""
    _walk_fields(path)
    for reserved in _RESERVED:
        if path == reserved or path.startswith(reserved + "."):
            raise ConfigError(f"space.{path}: {reserved!r} cannot be searched (trial resources are set in "
                              f"'resources:', epochs in 'scheduler.max_epochs', tracking by the search)")


def nested(path: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(path.split(".")):
        out = {part: out}
    return out


def apply_params(base: dict, params: dict[str, Any]) -> dict:
    """The base training config (plain data) with the searched values set at their dotted paths."""
    data = base
    for path, value in params.items():
        data = deep_merge(data, nested(path, value))
    return data


def _check_value(base: dict, path: str, value: Any, where: str) -> None:
    try:
        run_config_from_dict(apply_params(base, {path: value}))
    except ConfigError as exc:
        raise ConfigError(f"{where}: value {value!r} is not valid for the training config ({exc})") from None


def _check_in_space(spec: ParamSpec, value: Any, where: str) -> None:
    if spec.type == "choice":
        require(value in spec.values, where, f"expected one of {spec.values}, received {value!r}")
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and spec.low <= value <= spec.high
    if spec.type == "randint":
        ok = ok and float(value).is_integer()
    require(ok, where, f"expected a {spec.type} value in [{spec.low}, {spec.high}], received {value!r}")


# -- encoding of values for the searchers -------------------------------------------------------------
# Optuna's categorical distribution takes scalars only; list-valued choices (hidden layer sizes) travel
# as their JSON text and are decoded in the trial.


def needs_encoding(spec: ParamSpec) -> bool:
    return spec.type == "choice" and not all(isinstance(v, _SCALAR) for v in spec.values)


def encode_value(spec: ParamSpec, value: Any) -> Any:
    return json.dumps(value) if needs_encoding(spec) else value


def decode_params(space: dict[str, ParamSpec], sampled: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for path, value in sampled.items():
        spec = space.get(path)
        if spec is not None and needs_encoding(spec):
            value = json.loads(value)
        elif spec is not None and spec.type == "randint":
            value = int(value)
        out[path] = value
    return out


def load_tune_config(path: str | pathlib.Path) -> TuneConfig:
    path = pathlib.Path(path)
    data = load_yaml(path)
    if "source_dir" in data:
        raise ConfigError("source_dir: set by the loader (the YAML file's directory); remove it from the file")
    data["source_dir"] = str(path.resolve().parent)
    return from_dict(TuneConfig, data)


def tune_config_from_dict(data: dict, source_dir: str | pathlib.Path | None = None) -> TuneConfig:
    data = dict(data)
    if source_dir is not None:
        data["source_dir"] = str(source_dir)
    return from_dict(TuneConfig, data)


__all__ = [
    "EPOCH_METRICS",
    "ConfigError",
    "ParamSpec",
    "ResourcesConfig",
    "SchedulerConfig",
    "SearchTrackingConfig",
    "TuneConfig",
    "apply_params",
    "check_param_path",
    "decode_params",
    "encode_value",
    "load_tune_config",
    "tune_config_from_dict",
]
