"""Typed, strict configuration from ``KEY=VALUE`` strings or Python values.

Each rule declares a small dataclass; :func:`build_config` fills it from
options given on the command line (strings) or in Python (values), and turns
an unknown key or a value of the wrong type into a one-line ConfigError.
Supported field types: bool, int, float, str, ``Literal[...]`` and
``tuple[T, ...]`` of those (comma-separated on the command line).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from .errors import ConfigError, unknown_name

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def parse_assignments(items: Iterable[str], what: str = "--rule-opt") -> dict[str, str]:
    """Split ``KEY=VALUE`` strings into a dict; a malformed item is a ConfigError."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ConfigError(f"malformed {what} {item!r}; expected KEY=VALUE")
        out[key] = value.strip()
    return out


def _convert(value: Any, kind: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    if origin is Literal:
        choices = typing.get_args(kind)
        if value in choices:
            return value
        raise ConfigError(f"{where} must be one of {', '.join(map(str, choices))}; got {value!r}")
    if origin is tuple:
        item_kind = typing.get_args(kind)[0]
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(_convert(v.strip() if isinstance(v, str) else v, item_kind, where)
                     for v in items if not (isinstance(v, str) and not v.strip()))
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{where} must be true or false; got {value!r}")
    if kind in (int, float):
        noun = "an integer" if kind is int else "a number"
        ok = isinstance(value, (str, int)) or (kind is float and isinstance(value, float))
        try:
            number = kind(value) if ok and not isinstance(value, bool) else None
        except ValueError:
            number = None
        if number is None or (kind is float and not math.isfinite(number)):
            raise ConfigError(f"{where} must be {noun}; got {value!r}")
        return number
    if kind is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} must be a string; got {value!r}")
    raise TypeError(f"unsupported config field type {kind!r} for {where}")


def build_config(cls: type, options: Mapping[str, Any], owner: str) -> Any:
    """Build dataclass ``cls`` from ``options`` (name -> a string from the command line, or a
    typed value), converting strings to the declared types; ``owner`` is what the options
    belong to, for messages ("rule 'layerwise'").

    Raises:
        ConfigError: an unknown option (close matches named) or a value of the wrong type.
    """
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    return cls(**_typed(options, typing.get_type_hints(cls), fields, owner))


def config_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as a JSON-ready dict (tuples become lists)."""
    items = dataclasses.asdict(config).items()
    return {k: list(v) if isinstance(v, tuple) else v for k, v in items}


def call_options(fn: Any, items: Iterable[str], owner: str) -> dict[str, Any]:
    """``KEY=VALUE`` items (e.g. the ``loss_options`` of a rule) typed by the annotated
    keyword parameters of ``fn`` (a factory); ``owner`` as for :func:`build_config`.

    Raises:
        ConfigError: a malformed item, an option ``fn`` does not take (close
            matches named) or a value of the wrong type.
    """
    options = parse_assignments(items, f"option of {owner}")
    return _typed(options, typing.get_type_hints(fn), set(inspect.signature(fn).parameters),
                  owner)


def _typed(options: Mapping[str, Any], hints: dict[str, Any], names: set[str], owner: str
           ) -> dict[str, Any]:
    out = {}
    for key, value in options.items():
        if key not in names:
            if not names:
                raise ConfigError(f"{owner} takes no options; got {key!r}")
            raise unknown_name("option", key, names, owner)
        out[key] = _convert(value, hints.get(key, str), f"option {key!r} of {owner}")
    return out
