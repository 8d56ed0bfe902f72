"""Plugin config schemas: declared once, given to Kong as is, and enforced again in Python.

Kong validates a plugin's config against the schema the plugin server reports (`--dump`), but
only when the config is written through the Admin API or loaded from `kong.yml`. The plugin server
receives the config as JSON in `StartInstance`, with Kong's quirks: unset fields are `null`, and Kong
adds its own keys (`route_id`, `__plugin_id`, `__seq__` ...). `validate` applies the same schema to
that JSON so a config that reaches us by any path is checked, defaulted and refused with a message
naming the field. A plugin whose constructor refuses its config answers every request 500
(`kong_mtls.kong.server`): it fails closed.

The builders produce Kong's field format (`{name: {type: ..., ...}}`); `validate` understands the
subset used here: string, integer, number, boolean, array/set (elements), map (keys, values) and
record (fields), with `default`, `required`, `one_of`, `between`, `len_min`, `len_max`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from kong_mtls.constants import DEFAULT_VERDICT_CACHE_TTL, MAX_VERDICT_CACHE_TTL

Field = dict[str, dict[str, Any]]


class ConfigError(ValueError):
    """A plugin config that cannot be used; the message names the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"invalid config: {field}: {problem}")
        self.field = field
        self.problem = problem


def _field(name: str, ftype: str, **attrs: Any) -> Field:
    spec: dict[str, Any] = {"type": ftype}
    spec.update({k: v for k, v in attrs.items() if v is not None})
    return {name: spec}


def string(name: str, *, default: str | None = None, required: bool | None = None,
           one_of: Sequence[str] | None = None, len_min: int | None = None) -> Field:
    return _field(name, "string", default=default, required=required,
                  one_of=list(one_of) if one_of else None, len_min=len_min)


def integer(name: str, *, default: int | None = None, required: bool | None = None,
            between: tuple[int, int] | None = None) -> Field:
    return _field(name, "integer", default=default, required=required,
                  between=list(between) if between else None)


def number(name: str, *, default: float | None = None, required: bool | None = None,
           between: tuple[float, float] | None = None) -> Field:
    return _field(name, "number", default=default, required=required,
                  between=list(between) if between else None)


def boolean(name: str, *, default: bool | None = None, required: bool | None = None) -> Field:
    return _field(name, "boolean", default=default, required=required)


def array(name: str, elements: dict[str, Any], *, default: list | None = None,
          required: bool | None = None, len_min: int | None = None, len_max: int | None = None) -> Field:
    return _field(name, "array", elements=elements, default=default, required=required,
                  len_min=len_min, len_max=len_max)


def strings(name: str, *, default: list[str] | None = None, one_of: Sequence[str] | None = None,
            required: bool | None = None, len_min: int | None = None) -> Field:
    """An array of strings (the commonest list in our configs)."""
    elements: dict[str, Any] = {"type": "string"}
    if one_of:
        elements["one_of"] = list(one_of)
    return array(name, elements, default=default, required=required, len_min=len_min)


def records(name: str, fields: list[Field], *, default: list | None = None,
            required: bool | None = None) -> Field:
    """An array of records (credential and mapping tables)."""
    return array(name, {"type": "record", "fields": fields}, default=default, required=required)


def string_map(name: str, *, required: bool | None = None) -> Field:
    return _field(name, "map", keys={"type": "string"}, values={"type": "string"},
                  required=required)


def verdict_cache_ttl() -> Field:
    """`verdict_cache_ttl`: seconds the guard plugin's verdict cache may answer for the plugin (0: never)."""
    return integer("verdict_cache_ttl", default=DEFAULT_VERDICT_CACHE_TTL, between=(0, MAX_VERDICT_CACHE_TTL))


def validate(fields: list[Field], config: Mapping[str, Any] | None, path: str = "") -> dict[str, Any]:
    """Check `config` against `fields`, fill defaults, and return only the declared fields.

    Unknown keys are ignored: Kong adds its own (`route_id`, `__seq__` ...) to every config.
    """
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise ConfigError(path or "config", "expected a record")
    out: dict[str, Any] = {}
    for item in fields:
        ((name, spec),) = item.items()
        out[name] = _value(spec, config.get(name), f"{path}.{name}" if path else name)
    return out


def _value(spec: Mapping[str, Any], value: Any, where: str) -> Any:
    if value is None:
        if "default" in spec:
            value = _copy(spec["default"])
        elif spec.get("required"):
            raise ConfigError(where, "required field missing")
        else:
            return None
    ftype = spec["type"]
    checker = _CHECKERS.get(ftype)
    if checker is None:
        raise ConfigError(where, f"unsupported schema type {ftype!r}")
    value = checker(spec, value, where)
    if "one_of" in spec and value not in spec["one_of"]:
        raise ConfigError(where, f"expected one of: {', '.join(map(str, spec['one_of']))}")
    if "between" in spec:
        low, high = spec["between"]
        if not low <= value <= high:
            raise ConfigError(where, f"value should be between {low} and {high}")
    if "len_min" in spec and len(value) < spec["len_min"]:
        raise ConfigError(where, f"length must be at least {spec['len_min']}")
    if "len_max" in spec and len(value) > spec["len_max"]:
        raise ConfigError(where, f"length must be at most {spec['len_max']}")
    return value


def _copy(value: Any) -> Any:
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value


def _check_string(spec: Mapping[str, Any], value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(where, "expected a string")
    return value


def _check_integer(spec: Mapping[str, Any], value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(where, "expected an integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise ConfigError(where, "expected an integer")
        value = int(value)
    return value


def _check_number(spec: Mapping[str, Any], value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(where, "expected a number")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        finite = False
    if not finite:
        raise ConfigError(where, "expected a finite number")
    return value


def _check_boolean(spec: Mapping[str, Any], value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(where, "expected a boolean")
    return value


def _check_array(spec: Mapping[str, Any], value: Any, where: str) -> list:
    # Kong's cjson encodes an empty Lua table as `{}` unless it carries the array metatable.
    if isinstance(value, Mapping) and not value:
        value = []
    if not isinstance(value, list):
        raise ConfigError(where, "expected an array")
    elements = spec["elements"]
    out = []
    for i, element in enumerate(value, start=1):
        if element is None:
            raise ConfigError(f"{where}[{i}]", "null element")
        out.append(_value(elements, element, f"{where}[{i}]"))
    return out


def _check_map(spec: Mapping[str, Any], value: Any, where: str) -> dict:
    if isinstance(value, list) and not value:
        value = {}
    if not isinstance(value, Mapping):
        raise ConfigError(where, "expected a map")
    return {
        _value(spec["keys"], k, f"{where} key"): _value(spec["values"], v, f"{where}.{k}")
        for k, v in value.items()
    }


def _check_record(spec: Mapping[str, Any], value: Any, where: str) -> dict:
    return validate(spec["fields"], value, where)


_CHECKERS = {
    "string": _check_string,
    "integer": _check_integer,
    "number": _check_number,
    "boolean": _check_boolean,
    "array": _check_array,
    "set": _check_array,
    "map": _check_map,
    "record": _check_record,
}
