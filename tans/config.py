"""Typed job configs: YAML files validated into dataclasses, overridable by ``key=value``.

Every job has one dataclass (see :mod:`tans.configs`). A config is loaded from
``configs/<job>/<profile>.yaml`` and then patched by command-line overrides such as
``seed=3`` or ``data.image_size=64``. Anything that does not fit the dataclass - an unknown
key, a value of the wrong type - raises :class:`ConfigError` with one line that names the key
and the file; the command line turns it into exit status 2 without a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit its dataclass (one-line message)."""


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Load ``path`` (YAML mapping; ``None`` means all defaults) into dataclass ``cls``.

    ``overrides`` are ``key=value`` strings (nested keys with dots); values are parsed as YAML
    scalars, so ``epochs=3`` is an int and ``tasks=[a,b]`` a list.
    Returns the validated dataclass instance; raises :class:`ConfigError`.
    """
    source = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            raise ConfigError(f"{source}: not valid YAML{where}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: top level must be a mapping of keys to values")
        raw = loaded
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        _set_nested(raw, key.strip().split("."), value, f"override {key.strip()}")
    return _build(cls, raw, prefix="", source=source)


def to_dict(config: Any) -> dict[str, Any]:
    """A plain (JSON/YAML-safe) dict of a config dataclass."""
    return dataclasses.asdict(config)


def to_json(config: Any) -> str:
    """The resolved config as pretty JSON, to be written next to a job's outputs."""
    return json.dumps(to_dict(config), indent=2, sort_keys=True) + "\n"


def _set_nested(raw: dict[str, Any], keys: list[str], value: Any, what: str) -> None:
    node = raw
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{what}: {k!r} is not a section")
        node = child
    node[keys[-1]] = value


def _build(cls: type[T], raw: dict[str, Any], prefix: str, source: str) -> T:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{source}: unknown key '{prefix}{key}' (known keys: {known})")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}", source)
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {prefix or 'config'}: {exc}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as exc:
            raise ConfigError(f"{source}: {prefix}{exc}") from None
    return obj


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    """Check ``value`` against type ``tp``; convert only lossless cases (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(typing.get_args(tp), value, key, source)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: key '{key}' must be a mapping, got {value!r}")
        return _build(tp, value, prefix=f"{key}.", source=source)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: key '{key}' must be a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(item_tp, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    ok, converted = _coerce_scalar(tp, value)
    if ok:
        return converted
    raise ConfigError(f"{source}: key '{key}' must be {_type_name(tp)}, got {value!r}")


def _coerce_union(args: tuple, value: Any, key: str, source: str) -> Any:
    """The first member of an ``X | Y | None`` that accepts ``value``; else the first member's error."""
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(arg, value, key, source)
        except ConfigError as exc:
            errors.append(exc)
    raise errors[0]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # bool is an int subclass


def _coerce_scalar(tp: Any, value: Any) -> tuple[bool, Any]:
    """``(True, value)`` (converted where lossless) when ``value`` is a ``tp``, else ``(False, None)``."""
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        return (True, float(value)) if _is_number(value) else (False, None)
    if tp is str:
        if isinstance(value, str):
            return True, value
        if _is_number(value):
            return True, str(value)  # e.g. a run name like 2024 written without quotes
        return False, None
    return isinstance(tp, type) and isinstance(value, tp), value
