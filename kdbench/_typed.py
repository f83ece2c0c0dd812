"""Building frozen dataclasses from config mappings, with one set of type checks (a leaf module).

Used for every section of a config (:mod:`kdbench.config`) and for every method's ``Config``
(:meth:`kdbench.methods.base.DistillMethod.make_config`), so both accept and reject the same values.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import re
import types
import typing
from typing import Any, Mapping

from kdbench._util import did_you_mean
from kdbench.errors import ConfigError


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple:
        item_types = _item_types(tp, len(value)) if isinstance(value, (list, tuple)) else None
        return item_types is not None and all(_type_ok(v, t) for v, t in zip(value, item_types))
    if origin in (dict, collections.abc.Mapping):
        key_type, value_type = typing.get_args(tp)
        return isinstance(value, Mapping) and all(_type_ok(k, key_type) and _type_ok(v, value_type)
                                                  for k, v in value.items())
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _item_types(tp: Any, n: int) -> tuple | None:
    """Types of the ``n`` items of a ``tuple[X, ...]`` or ``tuple[X, Y]`` field; ``None`` if ``n`` does not fit."""
    args = typing.get_args(tp)
    if len(args) == 2 and args[1] is Ellipsis:
        return (args[0],) * n
    return args if len(args) == n else None


#: A decimal number, which YAML 1.1 (PyYAML) leaves a string when it has an exponent but no dot: ``5e-2``.
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _numeric_strings_to_float(value: Any, tp: Any) -> Any:
    """``'5e-2'`` -> ``0.05`` where ``tp`` takes a float (also the items of a float tuple); else ``value``."""
    if isinstance(value, str):
        return float(value) if _takes_float(tp) and _NUMBER.fullmatch(value) else value
    if typing.get_origin(tp) is tuple and isinstance(value, (list, tuple)):
        item_types = _item_types(tp, len(value))
        if item_types is not None:
            return [_numeric_strings_to_float(v, t) for v, t in zip(value, item_types)]
    return value


def _takes_float(tp: Any) -> bool:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_takes_float(a) for a in typing.get_args(tp))
    return tp is float


def coerce_value(value: Any, tp: Any) -> Any:
    """``value`` as a field of type ``tp`` takes it: numeric strings to float, lists to tuples.

    Raises:
        TypeError: ``must be <type>, got <value>``.
    """
    value = _numeric_strings_to_float(value, tp)
    if not _type_ok(value, tp):
        raise TypeError(f"must be {_type_name(tp)}, got {value!r}")
    if typing.get_origin(tp) in (dict, collections.abc.Mapping):
        return dict(value)
    return tuple(value) if typing.get_origin(tp) is tuple else value


def build_dataclass(cls: type, raw: Any, where: str, source: str, base: Any = None) -> Any:
    """Builds dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types.

    Args:
        cls: The frozen dataclass.
        raw: The mapping from the config (``None`` = all defaults).
        where: Dotted key of this mapping, for messages.
        source: The config file, for messages.
        base: An instance whose values replace the defaults (e.g. the student protocol for a teacher's).

    Numeric strings are read as floats where the field is a float: YAML 1.1 (PyYAML) reads ``5e-2`` as the
    string ``'5e-2'``.
    """
    raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: key '{where}' must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key '{where}.{unknown[0]}'; valid keys of '{where}': {', '.join(sorted(fields))}"
            f"{did_you_mean(unknown[0], fields)}"
        )
    values: dict[str, Any] = {}
    for name, value in raw.items():
        tp = hints[name]
        key = f"{where}.{name}"
        if dataclasses.is_dataclass(tp):
            nested_base = getattr(base, name) if base is not None else None
            value = build_dataclass(tp, value, key, source, nested_base)
        else:
            try:
                value = coerce_value(value, tp)
            except TypeError as e:
                raise ConfigError(f"{source}: key '{key}' {e}") from None
        values[name] = value
    if base is not None:
        return dataclasses.replace(base, **values)
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"{source}: key '{where}': {e}") from e


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (dict, collections.abc.Mapping):
        return "a mapping of {} -> {}".format(*(_type_name(a) for a in typing.get_args(tp)))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
