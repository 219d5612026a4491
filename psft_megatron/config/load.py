"""Typed dataclasses from YAML, with ``key.sub=value`` overrides and errors that name file, line and field.

Written by hand (rather than OmegaConf/Hydra) to keep the dependency list short and
to report the YAML line of a bad value, which generic loaders lose.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from psft_megatron.errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A bad recipe: the message names the file, line (when known) and the dotted field."""


class FieldError(ConfigError):
    """A bad value of one named field, raised by a section's ``validate``.

    ``FieldError("training.mini_batch_size", "must be >= 1, got 0")`` reads
    ``training.mini_batch_size must be >= 1, got 0``. The recipe loader puts the file and
    line of ``field`` in front, so cross-field errors point at a line as single-field ones do.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field} {message}")
        self.field = field


def check_choices(obj: Any) -> None:
    """Raise ValueError when a ``Literal``-typed field of dataclass ``obj`` holds another value.

    The one check for choice fields: :func:`build_dataclass` runs it for YAML input and
    each section's ``__post_init__`` for objects built in code.
    """
    hints = get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        optional, tp = _is_optional(hints[f.name])
        value = getattr(obj, f.name)
        if get_origin(tp) is Literal and not (optional and value is None) and value not in get_args(tp):
            raise ValueError(f"{f.name} must be one of {list(get_args(tp))}, got {value!r}")


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


_KEY_PART = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)$")


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """``a.b[0].c=value`` -> (["a", "b", 0, "c"], value parsed as a YAML scalar/list)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    keys: list[str | int] = []
    for part in key.split("."):
        m = _KEY_PART.match(part)
        if not m:
            raise ConfigError(f"override {text!r}: {part!r} is not a key (letters, digits, _ and [index])")
        keys.append(m.group(1))
        keys.extend(int(i) for i in re.findall(r"\d+", m.group(2)))
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return keys, value


def dotted(keys: list[str | int]) -> str:
    """``["data", "train", 0, "on_error"]`` -> ``data.train[0].on_error``."""
    out = ""
    for k in keys:
        out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else k)
    return out


OVERRIDE_LINE = -1  # in a lines map: the key was set by a command-line override


def apply_overrides(data: dict[str, Any], overrides: list[str], lines: dict[str, int]) -> dict[str, str]:
    """Set each ``key.sub=value`` (``data.train[0].on_error=skip``) into ``data`` in place.

    Overridden keys are marked in ``lines`` so errors about them name the override, not
    the YAML file. Returns ``{dotted key: override text}``.
    """
    applied: dict[str, str] = {}
    for text in overrides:
        keys, value = parse_override(text)
        cursor: Any = data
        for i, k in enumerate(keys[:-1]):
            where = dotted(keys[: i + 1])
            if isinstance(k, int):
                if not isinstance(cursor, list) or not -len(cursor) <= k < len(cursor):
                    size = len(cursor) if isinstance(cursor, list) else 0
                    raise ConfigError(f"override {text!r}: {where} does not exist (the list has {size} entries)")
                cursor = cursor[k]
                continue
            nxt = cursor.get(k)
            if nxt is None:
                nxt = cursor[k] = [] if isinstance(keys[i + 1], int) else {}
            if not isinstance(nxt, (dict, list)):
                raise ConfigError(f"override {text!r}: {where} is a value, not a section")
            cursor = nxt
        last = keys[-1]
        if isinstance(last, int):
            if not isinstance(cursor, list) or not -len(cursor) <= last < len(cursor):
                raise ConfigError(f"override {text!r}: {dotted(keys)} does not exist")
        elif not isinstance(cursor, dict):
            raise ConfigError(f"override {text!r}: {dotted(keys[:-1])} is a list; give an index, e.g. [0]")
        cursor[last] = value
        path = dotted(keys)
        # Every key at or under an overridden one now comes from the command line.
        for known in [p for p in lines if p == path or p.startswith(path + ".") or p.startswith(path + "[")]:
            del lines[known]
        lines[path] = OVERRIDE_LINE
        applied[path] = text
    return applied


_LAST_PART = re.compile(r"(\.[^.\[]+|\[\d+\])$")


def where(source: str, lines: dict[str, int], path: str) -> str:
    """``file:line: `` (or ``file: ``, or ``command-line override: ``) to start a message about
    ``path``; empty when built from a mapping. A key not in the file takes the position of
    its nearest enclosing key (e.g. the section an unknown key sits in)."""
    if not source:
        return ""
    probe = path
    while probe:
        line = lines.get(probe)
        if line == OVERRIDE_LINE:
            return "command-line override: "
        if line:
            return f"{source}:{line}: "
        shorter = _LAST_PART.sub("", probe)
        probe = shorter if shorter != probe else ""
    return f"{source}: "


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
        raise ConfigError(f"{where(source, lines, path)}{path} must not be null")
    tp = inner
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):  # already built (e.g. passed from code)
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where(source, lines, path)}{path} must be a section (mapping), got {value!r}")
        return build_dataclass(tp, value, path, ctx)
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where(source, lines, path)}{path} must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where(source, lines, path)}{path} must be a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        return [_convert(v, item_tp, f"{path}[{i}]", ctx) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where(source, lines, path)}{path} must be a mapping, got {value!r}")
        return dict(value)
    if origin in (Union, types.UnionType):
        for option in get_args(tp):
            try:
                return _convert(value, option, path, ctx)
            except ConfigError:
                continue
        raise ConfigError(f"{where(source, lines, path)}{path}: {value!r} matches none of {tp}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where(source, lines, path)}{path} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where(source, lines, path)}{path} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-6 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where(source, lines, path)}{path} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where(source, lines, path)}{path} must be a string, got {value!r}")
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
            raise ConfigError(f"{where(source, lines, path)}unknown key {path}{hint}; known keys here: {known}")
        kwargs[key] = _convert(value, hints[key], path, ctx)
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where(source, lines, prefix)}missing required key(s) {', '.join((prefix + '.' if prefix else '') + m for m in missing)}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where(source, lines, prefix)}{prefix or cls.__name__}: {e}") from None


@dataclasses.dataclass
class Origin:
    """Where a config came from: its file and the line of each dotted key (empty when built in code)."""

    source: str = ""
    lines: dict[str, int] = dataclasses.field(default_factory=dict)

    def where(self, path: str) -> str:
        """The ``file:line: `` prefix for a message about dotted field ``path``."""
        return where(self.source, self.lines, path)


def load_dataclass(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> tuple[T, Origin]:
    """Read YAML ``path``, apply ``overrides`` (``key.sub=value``) and build ``cls``; also return
    the :class:`Origin` that later (cross-field) checks use to name file and line."""
    data, lines = read_yaml(path)
    apply_overrides(data, list(overrides or []), lines)
    origin = Origin(str(path), lines)
    return build_dataclass(cls, data, "", (origin.source, origin.lines)), origin


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain YAML/JSON-able data (for the resolved config in the run dir)."""
    if dataclasses.is_dataclass(obj):  # init=False fields are derived state, not recipe keys
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


