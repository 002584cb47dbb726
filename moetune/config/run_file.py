"""Reading a run file: strict YAML, ``key.sub=value`` overrides, path resolution; and dumping."""

from __future__ import annotations

import dataclasses
import os
import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml

from moetune.errors import ConfigError, did_you_mean

from .schema import ConfigFieldError, ConfigSection, Key, build_section, type_hints_of, show_value, dotted
from .train import TrainConfig


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys, which PyYAML otherwise resolves silently (last wins)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if isinstance(key, (str, int, float, bool)) and key != "<<":
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{where}{line}: invalid YAML: {problem}") from None


def _read_run_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = _parse_yaml(path.read_text(encoding="utf-8"), str(path))
    if raw is None:
        raise ConfigError(f"{path}: the file is empty; expected a mapping with model, data, optim, ...")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {show_value(raw)}")
    return raw


def _normalise_adapters(raw: dict[str, Any], where: str) -> bool:
    """Turn ``adapter:`` into ``adapters: [..]`` in place; return True for the single-adapter form."""
    if "adapter" in raw and "adapters" in raw:
        raise ConfigError(f"{where}: give either 'adapter' (one) or 'adapters' (a list), not both")
    if "adapters" in raw:
        return False
    single = raw.pop("adapter", None)
    raw["adapters"] = [{} if single is None else single]
    return True


def _section(tp: Any) -> Any:
    """``X | None`` -> ``X`` for an optional section (``mixture``, an adapter's ``optim``), so
    overrides can reach into it."""
    if get_origin(tp) in (Union, types.UnionType):
        arms = [a for a in get_args(tp) if a is not type(None)]
        if len(arms) == 1 and dataclasses.is_dataclass(arms[0]):
            return arms[0]
    return tp


def _override_key(text: str, raw: dict[str, Any], single: bool) -> Key:
    """Check the key of override ``text`` against the TrainConfig schema; return its path in ``raw``."""
    parts: list[str] = text.partition("=")[0].strip().split(".")
    if parts[0] == "adapter":
        if not single:
            raise ConfigError(
                f"override '{text}': the config has an 'adapters' list; write adapters.N.{'.'.join(parts[1:])}"
            )
        parts[:1] = ["adapters", "0"]
    cls: Any = TrainConfig
    path: list[str | int] = []
    for depth, part in enumerate(parts):
        if cls is None:
            raise ConfigError(f"override '{text}': '{dotted(tuple(path))}' is a value, not a section")
        names = {f.name for f in dataclasses.fields(cls)}
        if part not in names:
            hint = did_you_mean(part, names) or f" (allowed: {', '.join(sorted(names))})"
            raise ConfigError(f"unknown key '{dotted((*path, part))}' in override '{text}'{hint}")
        path.append(part)
        tp = _section(type_hints_of(cls)[part])
        cls = tp if dataclasses.is_dataclass(tp) else None
        if get_origin(tp) is list and dataclasses.is_dataclass(get_args(tp)[0]):
            index = parts[depth + 1] if depth + 1 < len(parts) else ""
            if not index.isdigit() or int(index) >= len(raw.get(part) or []):
                raise ConfigError(
                    f"override '{text}': '{part}' needs an index below {len(raw.get(part) or [])}, e.g. {part}.0.<key>"
                )
            parts.pop(depth + 1)
            path.append(int(index))
            cls = get_args(tp)[0]
    return tuple(path)


def _apply_overrides(raw: dict[str, Any], overrides: list[str], single: bool) -> set[Key]:
    """Apply ``key.sub=value`` overrides to ``raw`` in place; return the keys they set."""
    done: set[Key] = set()
    for text in overrides:
        key_text, sep, value_text = text.partition("=")
        if not sep or not key_text.strip():
            raise ConfigError(f"override '{text}': expected key.sub=value, e.g. optim.lr=1e-4")
        key = _override_key(text, raw, single)
        value = _parse_yaml(value_text, f"override '{text}'")
        node: Any = raw
        for depth, part in enumerate(key[:-1]):
            if isinstance(part, str) and node.get(part) is None:
                node[part] = {}
            node = node[part]
            want = list if isinstance(key[depth + 1], int) else dict
            if not isinstance(node, want):
                raise ConfigError(
                    f"override '{text}': '{dotted(key[: depth + 1])}' in the config "
                    f"is {show_value(node)}, not a {'list' if want is list else 'mapping'}"
                )
        node[key[-1]] = value
        done.add(key)
    return done


def _resolve_paths(obj: Any, base: Path, overridden: set[Key], prefix: Key = ()) -> None:
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), (*prefix, f.name)
        if dataclasses.is_dataclass(value):
            _resolve_paths(value, base, overridden, key)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    _resolve_paths(item, base, overridden, (*key, index))
        elif f.metadata.get("path") and isinstance(value, str) and value not in f.metadata.get("keep", ()):
            root = Path.cwd() if key in overridden else base
            setattr(obj, f.name, os.path.abspath(root / Path(value).expanduser()))


def load_train_config(path: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a run file, apply command-line overrides and validate everything.

    Args:
        path: the YAML run file.
        overrides: ``key.sub=value`` strings; each value is parsed as YAML, so
            ``optim.lr=1e-4``, ``data.packing=true`` and ``adapter.target_modules=[q_proj]`` work.
            ``adapter.<key>`` addresses the single adapter, ``adapters.N.<key>`` one of a list.

    Returns:
        The config, with every relative path made absolute (see the module docstring).

    Raises:
        ConfigError: naming the file (and line, for bad YAML) or the override, and the key.
    """
    path = Path(path)
    raw = _read_run_file(path)
    single = _normalise_adapters(raw, str(path))
    overridden = _apply_overrides(raw, list(overrides), single)
    try:
        config = build_section(TrainConfig, raw)
    except ConfigFieldError as err:
        source = "override" if any(err.path[: len(k)] == k for k in overridden) else str(path)
        if single and err.path[:2] == ("adapters", 0):
            err.path = ("adapter", *err.path[2:])  # name the key as the file wrote it
        raise ConfigError(f"{source}: {err}") from None
    _resolve_paths(config, path.parent.absolute(), overridden)
    return config


def dump_config(config: ConfigSection) -> str:
    """The resolved config as YAML (what ``--print-config`` shows); loading it gives it back."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)
