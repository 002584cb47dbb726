"""Generic config machinery: type checks against annotations, from_dict, error messages, to_plain.

Nothing here knows a particular section; the dataclasses in the sibling modules build on
:class:`ConfigSection`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
from functools import cache
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from moetune.errors import ConfigError, did_you_mean

T = TypeVar("T")
Key = tuple[str | int, ...]

# Field metadata marking a path that load_train_config resolves against the run file's folder.
PATH_FIELD = {"path": True}
_FLOAT_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


class ConfigFieldError(ConfigError):
    """A ConfigError about one key; its key path grows a prefix as it leaves each nested section.

    ``template`` holds ``{key}`` where the dotted key goes, e.g. ``"{key} must be >= 1, got 0"``.
    """

    def __init__(self, template: str, path: Key = ()) -> None:
        super().__init__(template)
        self.template = template
        self.path: Key = tuple(path)

    def prefixed(self, key: str | int) -> ConfigFieldError:
        self.path = (key, *self.path)
        return self

    def __str__(self) -> str:
        return self.template.replace("{key}", dotted(self.path), 1)


def dotted(path: Key) -> str:
    """Format a key path the way users write it: ``("adapters", 0, "r")`` -> ``adapters[0].r``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def show_value(value: Any) -> str:
    """Show a value as YAML would spell it, shortened for one-line messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(tp: Any) -> str:
    """Say in words which values a type annotation allows."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(arm) for arm in args)
    if origin is Literal:
        return ("one of " if len(args) > 1 else "") + ", ".join(show_value(a) for a in args)
    if origin is list:
        return f"a list of {_plural(args[0])}"
    if origin is tuple:
        return f"a list of {len(args)} {_plural(args[0])}"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, "null" if tp is type(None) else getattr(tp, "__name__", str(tp)))


def _plural(tp: Any) -> str:
    names = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
    return names.get(tp, "mappings" if dataclasses.is_dataclass(tp) else f"({_describe(tp)})")


def _mismatch(value: Any, tp: Any, hint: str = "") -> ConfigFieldError:
    return ConfigFieldError(f"{{key}}: expected {_describe(tp)}, got {show_value(value)}{hint}")


def _convert(value: Any, tp: Any) -> Any:
    """Check ``value`` against annotation ``tp`` and return it normalised (int -> float, list -> tuple).

    Raises:
        ConfigFieldError: with a path relative to ``value`` when it does not fit.
    """
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return _convert_union(value, tp, args)
    if origin is Literal:
        if any(value == arm and type(value) is type(arm) for arm in args):
            return value
        hint = did_you_mean(value, [str(a) for a in args]) if isinstance(value, str) else ""
        raise _mismatch(value, tp, hint)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)) or (origin is tuple and len(value) != len(args)):
            raise _mismatch(value, tp)
        items = [_convert_child(i, item, args[0]) for i, item in enumerate(value)]
        return items if origin is list else tuple(items)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return build_section(tp, value)
        raise _mismatch(value, tp)
    return _convert_scalar(value, tp)


def _convert_child(index: int, value: Any, tp: Any) -> Any:
    try:
        return _convert(value, tp)
    except ConfigFieldError as err:
        raise err.prefixed(index) from None


def _convert_union(value: Any, tp: Any, arms: tuple[Any, ...]) -> Any:
    deep: ConfigFieldError | None = None
    for arm in arms:
        try:
            return _convert(value, arm)
        except ConfigFieldError as err:
            # An error inside a list or mapping means the value had that arm's shape: report it.
            deep = deep or (err if err.path else None)
    raise deep or _mismatch(value, tp)


def _convert_scalar(value: Any, tp: Any) -> Any:
    if tp is Any:
        return value
    if tp is type(None) and value is None:
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    if tp is float:
        # PyYAML reads `1e-4` (no dot) as a string, so number-shaped strings count as numbers.
        number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            number = float(value)
        if number is not None and math.isfinite(number):
            return float(number)
        if number is not None:
            raise ConfigFieldError(f"{{key}}: expected a finite number, got {show_value(value)}")
    if tp not in (bool, int, str, float, type(None)):
        raise TypeError(f"unsupported config annotation {tp!r}")
    raise _mismatch(value, tp)


@cache
def type_hints_of(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def check_types(obj: Any) -> None:
    """Check every field of a config dataclass against its annotation, normalising in place.

    Raises:
        ConfigError: naming the field, the value and what the annotation allows.
    """
    hints = type_hints_of(type(obj))
    for f in dataclasses.fields(obj):
        try:
            value = _convert(getattr(obj, f.name), hints[f.name])
        except ConfigFieldError as err:
            raise err.prefixed(f.name) from None
        object.__setattr__(obj, f.name, value)


def require(ok: bool, name: str, what: str, value: Any) -> None:
    if not ok:
        raise ConfigFieldError(f"{{key}} must be {what}, got {show_value(value)}", (name,))


def build_section(cls: type[T], data: dict[Any, Any]) -> T:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            hint = did_you_mean(str(key), fields) or f" (allowed: {', '.join(fields)})"
            raise ConfigFieldError(f"unknown key '{{key}}'{hint}", (str(key),))
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in data:
            raise ConfigFieldError(f"missing required key '{{key}}' ({_describe(type_hints_of(cls)[name])})", (name,))
    return cls(**data)


def from_dict(cls: type[T], data: Any, where: str = "config") -> T:
    """Build config dataclass ``cls`` (nested sections included) from a plain mapping.

    Args:
        cls: a config dataclass, e.g. :class:`LoraConfig` or :class:`TrainConfig`.
        data: the mapping, typically parsed from YAML or JSON.
        where: the source named in error messages, usually the file name.

    Raises:
        ConfigError: for an unknown or missing key, a wrong type or a value out of range,
            naming ``where`` and the dotted key.
    """
    try:
        if not isinstance(data, dict):
            raise ConfigFieldError(f"expected a mapping of {cls.__name__} keys, got {show_value(data)}")
        return build_section(cls, data)
    except ConfigFieldError as err:
        raise ConfigError(f"{where}: {err}") from None


def to_plain(obj: Any) -> Any:
    """Turn a config dataclass into plain dicts and lists (tuples become lists), for YAML/JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        first = getattr(obj, "dump_first", ())
        names = [*first, *(f.name for f in dataclasses.fields(obj) if f.name not in first)]
        return {name: to_plain(getattr(obj, name)) for name in names}
    if isinstance(obj, (list, tuple)):
        return [to_plain(item) for item in obj]
    return obj


class ConfigSection:
    """Base of every config dataclass: type-check all fields, then run :meth:`validate`."""

    def __new__(cls, *_args: Any, **kwargs: Any) -> ConfigSection:
        obj = super().__new__(cls)
        obj.__dict__["_given"] = frozenset(kwargs)  # the keyword arguments the caller wrote (all of them: kw_only)
        return obj

    def given(self, name: str) -> bool:
        """True when field ``name`` was passed to the constructor (a file or override key), even
        with its default value; decide "left out" with this, never by comparing with the default."""
        return name in self.__dict__.get("_given", ())

    def __post_init__(self) -> None:
        check_types(self)
        self.validate()

    def validate(self) -> None:
        """Range and cross-field checks; raise ConfigError naming the field (override)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, the inverse of :func:`from_dict`."""
        return to_plain(self)
