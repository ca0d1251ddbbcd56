"""Typed configuration: nested dataclasses loaded from YAML, validated at load.

Every component owns a small dataclass; a run's config is a dataclass of those. `from_dict`
builds one from plain data and rejects unknown keys and wrong types with the dotted field name,
so a typo in a YAML preset fails at load, not an hour into training.
"""

from __future__ import annotations

import dataclasses
import pathlib
import types
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

T = TypeVar("T")

# The YAML presets (configs/<name>.yaml) beside the package: `gears-dist demo`, `gd.train(store, "demo")`.
CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type; the message names the field."""


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, received {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: expected one of {list(allowed)}, received {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, received {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, received {value!r}")
        args = get_args(tp)
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, received {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, received {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, received {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads "1e-3" (no dot) as a string; accept numeric strings for floats only.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{where}: expected a number, received {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, received {value!r}")
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, received {value!r}")


def from_dict(cls: type[T], data: dict | None, where: str = "") -> T:
    """Build dataclass `cls` from `data`, recursively; unknown keys and bad types raise ConfigError."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, received {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; known keys here: {sorted(fields)}"
        )
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required, but missing")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as exc:
            if where and not str(exc).startswith(where):
                raise ConfigError(f"{where}.{exc}") from None
            raise
    return obj


def to_dict(obj: Any) -> Any:
    """Plain-data form of a config (for YAML, MLflow params, checkpoints)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def load_yaml(path: str | pathlib.Path) -> dict:
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass a YAML file (see configs/)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r}: expected a mapping at top level, received {type(data).__name__}")
    return data


def load_yaml_with_base(path: str | pathlib.Path, _chain: tuple[str, ...] = ()) -> dict:
    """A YAML config with its ``base:`` resolved: ``base: other.yaml`` (relative to this file, else to the
    working directory) is loaded first, recursively, and this file's values are merged over it."""
    path = pathlib.Path(path)
    data = load_yaml(path)
    if "base" not in data:
        return data
    base = data.pop("base")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"config file {str(path)!r}: base: expected the path of another YAML config, received "
                          f"{base!r}")
    here = str(path.resolve())
    tried = [path.parent / base, pathlib.Path(base)]
    found = next((p for p in tried if p.is_file()), None)
    if found is None:
        raise ConfigError(f"config file {str(path)!r}: base {base!r} not found (tried {[str(p) for p in tried]})")
    if str(found.resolve()) in (*_chain, here):
        raise ConfigError(f"config file {str(path)!r}: base {base!r} makes a cycle ({' -> '.join((*_chain, here))})")
    return deep_merge(load_yaml_with_base(found, (*_chain, here)), data)


def load_config(cls: type[T], path: str | pathlib.Path, overrides: dict | None = None) -> T:
    """Load a YAML file (its ``base:`` resolved) into `cls`; `overrides` (nested dict) is merged over it first."""
    data = load_yaml_with_base(path)
    if overrides:
        data = deep_merge(data, overrides)
    return from_dict(cls, data)


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def require(cond: bool, field: str, message: str) -> None:
    """For `validate()` methods: raise ConfigError naming `field` unless `cond`."""
    if not cond:
        raise ConfigError(f"{field}: {message}")
