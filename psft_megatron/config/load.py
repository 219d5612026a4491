"""Typed dataclasses from YAML, with ``key.sub=value`` overrides and errors that name file, line and field.

Written by hand (rather than OmegaConf/Hydra) to keep the dependency list short and
to report the YAML line of a bad value, which generic loaders lose.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad recipe: the message names the file, line (when known) and the dotted field."""


def _marks(node: yaml.Node, prefix: str, out: dict[str, int]) -> None:
    """Record the 1-based line of every dotted key path in a composed YAML tree."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            out[path] = key_node.start_mark.line + 1
            _marks(value_node, path, out)


def read_yaml(path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Parse a YAML mapping; return it with a map of dotted key -> line number."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    lines: dict[str, int] = {}
    if node is not None:
        _marks(node, "", lines)
    return data, lines


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as a YAML scalar/list)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str], lines: dict[str, int]) -> None:
    """Set each ``key.sub=value`` into ``data`` in place; overridden keys lose their YAML line."""
    for text in overrides:
        keys, value = parse_override(text)
        cursor = data
        for k in keys[:-1]:
            nxt = cursor.get(k)
            if nxt is None:
                nxt = cursor[k] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {k} is a value, not a section")
            cursor = nxt
        cursor[keys[-1]] = value
        lines.pop(".".join(keys), None)


def _where(source: str, lines: dict[str, int], path: str) -> str:
    """``file:line: `` (or ``file: ``) to start a message; empty when built from a mapping."""
    if not source:
        return ""
    line = lines.get(path)
    return f"{source}:{line}: " if line else f"{source}: "


def _is_optional(tp: Any) -> tuple[bool, Any]:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) != len(get_args(tp)):
            return True, (args[0] if len(args) == 1 else Union[tuple(args)])
    return False, tp


def _convert(value: Any, tp: Any, path: str, ctx: tuple[str, dict[str, int]]) -> Any:
    source, lines = ctx
    optional, inner = _is_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"{_where(source, lines, path)}{path} must not be null")
    tp = inner
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):  # already built (e.g. passed from code)
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{_where(source, lines, path)}{path} must be a section (mapping), got {value!r}")
        return build_dataclass(tp, value, path, ctx)
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{_where(source, lines, path)}{path} must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{_where(source, lines, path)}{path} must be a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        return [_convert(v, item_tp, f"{path}[{i}]", ctx) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{_where(source, lines, path)}{path} must be a mapping, got {value!r}")
        return dict(value)
    if origin in (Union, types.UnionType):
        for option in get_args(tp):
            try:
                return _convert(value, option, path, ctx)
            except ConfigError:
                continue
        raise ConfigError(f"{_where(source, lines, path)}{path}: {value!r} matches none of {tp}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{_where(source, lines, path)}{path} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{_where(source, lines, path)}{path} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-6 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{_where(source, lines, path)}{path} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{_where(source, lines, path)}{path} must be a string, got {value!r}")
    return value


def build_dataclass(cls: type[T], data: dict[str, Any], prefix: str = "", ctx: tuple[str, dict[str, int]] = ("", {})) -> T:
    """Build ``cls`` from a mapping, checking every key and type; unknown keys are errors."""
    source, lines = ctx
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)" if close else ""
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{_where(source, lines, path)}unknown key {path}{hint}; known keys here: {known}")
        kwargs[key] = _convert(value, hints[key], path, ctx)
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{_where(source, lines, prefix)}missing required key(s) {', '.join((prefix + '.' if prefix else '') + m for m in missing)}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{_where(source, lines, prefix)}{prefix or cls.__name__}: {e}") from None


def load_dataclass(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    """Read YAML ``path``, apply ``overrides`` (``key.sub=value``) and build ``cls``."""
    data, lines = read_yaml(path)
    apply_overrides(data, list(overrides or []), lines)
    return build_dataclass(cls, data, "", (str(path), lines))


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain YAML/JSON-able data (for the resolved config in the run dir)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


