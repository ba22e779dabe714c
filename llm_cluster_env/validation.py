"""Typed dataclass configs built from plain dicts (YAML, ``gym.make`` kwargs, CLI overrides).

:func:`from_dict` walks a dataclass's type hints and checks every value against them, so a
wrong key or type fails before any work starts, with an error that names the dotted path of the
field and the offending value::

    >>> from_dict(RewardConfig, {"slo_penaltyy": 1.0})
    ConfigError: reward.slo_penaltyy: unknown key (valid keys: ...)

Range checks that types cannot express live in each dataclass's ``__post_init__`` and use
:func:`require`, which raises the same :class:`ConfigError`.

Supported annotations: ``bool``, ``int``, ``float``, ``str``, ``Literal[...]``, ``X | None``,
``tuple[X, ...]``, ``tuple[X, Y]``, ``list[X]``, ``dict[str, X]``, nested dataclasses and
``typing.Any``. Integers are accepted where a float is expected; booleans are never accepted as
numbers (YAML's ``yes`` would otherwise become ``1``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the field and the value."""


def require(condition: bool, field: str, value: Any, expectation: str) -> None:
    """Raise :class:`ConfigError` ``"<field>=<value!r>: <expectation>"`` unless ``condition``."""
    if not condition:
        raise ConfigError(f"{field}={value!r}: {expectation}")


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against annotation ``tp`` and return it in canonical form."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        errors = []
        for candidate in candidates:
            try:
                return _coerce(value, candidate, path)
            except ConfigError as err:
                errors.append(str(err))
        if len(candidates) == 1:
            raise ConfigError(errors[0])
        names = " or ".join(_type_name(a) for a in args)
        raise ConfigError(f"{path}={value!r}: expected {names}")

    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}={value!r}: expected one of {list(args)}")
        return value

    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, path=path)

    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}={value!r}: expected a boolean (true/false)")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}={value!r}: expected an integer")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}={value!r}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}={value!r}: expected a string")
        return value

    if origin in (tuple, list):
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}={value!r}: expected a list")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{path}={value!r}: expected a list of {len(args)} items")
            return tuple(_coerce(v, a, _join(path, i)) for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, _join(path, i)) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items

    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}={value!r}: expected a mapping")
        key_tp, val_tp = args if args else (Any, Any)
        return {
            _coerce(k, key_tp, path): _coerce(v, val_tp, _join(path, str(k)))
            for k, v in value.items()
        }

    if isinstance(tp, type):
        if not isinstance(value, tp):
            raise ConfigError(f"{path}={value!r}: expected {_type_name(tp)}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {path}")  # a bug in a config class


def from_dict(cls: type[T], data: Mapping[str, Any] | None, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, validating keys and value types recursively.

    :param cls: the dataclass to build.
    :param data: a mapping of field names to values; ``None`` means all defaults.
    :param path: dotted prefix used in error messages (e.g. ``"env_kwargs.workload"``).
    :raises ConfigError: on an unknown key, a value of the wrong type, or a failed range check.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or cls.__name__}={data!r}: expected a mapping of settings")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"{_join(path, unknown[0])}: unknown key (valid keys: {', '.join(sorted(fields))})"
        )
    kwargs = {name: _coerce(value, hints[name], _join(path, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        if path and not str(err).startswith(path):
            raise ConfigError(f"{path}.{err}") from None
        raise


def to_dict(config: Any) -> Any:
    """Plain-data form of a config (dataclasses -> dicts, tuples -> lists), for YAML/JSON dumps."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated by ``override``; nested mappings merge key by key, lists replace."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
