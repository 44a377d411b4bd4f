"""YAML configuration validated into typed dataclasses.

A config file is a YAML mapping whose keys are the fields of a dataclass (nested dataclasses for
sections). Loading checks every key and every value type; an unknown or misspelled key, or a value
of the wrong type, raises :class:`ConfigError` naming the dotted key and the file. Command-line
overrides ``key.sub=value`` are parsed as YAML scalars and validated the same way. A float field also
takes decimal text such as ``1e-3``, which PyYAML's YAML 1.1 rules read as a string.

Example::

    @dataclass
    class Optim:
        lr: float = 1e-3

    @dataclass
    class Recipe:
        optim: Optim = field(default_factory=Optim)

    recipe = load_config(Recipe, "configs/demo.yaml", overrides=["optim.lr=3e-3"])
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Sequence, Tuple, Type, TypeVar, Union

import yaml

T = TypeVar("T")
# Decimal text a float field accepts although YAML 1.1 leaves it a string ("1e-3", "5E-2"); no nan/inf.
FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A config value or key is invalid; the message names the key and the file."""


def load_config(cls: Type[T], path: Union[str, Path, None], overrides: Sequence[str] = ()) -> T:
    """Reads ``path`` (YAML), applies ``key.sub=value`` overrides and validates into ``cls``."""
    source = str(path) if path is not None else "<defaults>"
    data: Dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as error:
            raise ConfigError(f"{source}: cannot read config: {error.strerror}") from error
        except UnicodeDecodeError as error:
            raise ConfigError(f"{source}: not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
                              f"{error.start})") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"{source}: not valid YAML: {error}") from error
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: top level must be a mapping, got {type(loaded).__name__}")
        data = _unaliased(loaded)
    for override in overrides:
        apply_override(data, override)
    return from_dict(cls, data, source=source)


def _unaliased(node: Any) -> Any:
    """A copy in which no two paths share a mapping or list. YAML anchors (``optim: *optim``) load
    as one shared object, so without this an override of ``finetune.schedule.warmup_steps`` would
    change every section that aliases the same anchor."""
    if isinstance(node, dict):
        return {key: _unaliased(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_unaliased(value) for value in node]
    return node


def apply_override(data: Dict[str, Any], override: str) -> None:
    """Sets ``data[a][b] = value`` for an override ``a.b=value`` (value parsed as YAML)."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r}: expected key.sub=value")
    parts = key.strip().split(".")
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[: depth + 1])} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override {override!r}: value is not valid YAML: {error}") from error


def from_dict(cls: Type[T], data: Any, source: str = "<dict>", prefix: str = "") -> T:
    """Validates a mapping into dataclass ``cls``; errors name ``prefix``-qualified keys and ``source``."""
    where = prefix or "top level"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {where}: expected a mapping, got {_describe(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    unknown = [key for key in data if key not in fields]
    if unknown:
        key = str(unknown[0])
        close = difflib.get_close_matches(key, list(fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(sorted(fields))})"
        raise ConfigError(f"{source}: unknown key {_join(prefix, key)!r}{hint}")
    values = {}
    for name, spec in fields.items():
        if name in data:
            values[name] = _coerce(hints[name], data[name], source, _join(prefix, name))
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key {_join(prefix, name)!r}")
    instance = cls(**values)
    validate = getattr(instance, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as error:
            raise ConfigError(f"{source}: {where}: {error}") from error
    return instance


def to_dict(instance: Any) -> Any:
    """A dataclass config as plain YAML/JSON-able data (inverse of :func:`from_dict`)."""
    if dataclasses.is_dataclass(instance):
        return {f.name: to_dict(getattr(instance, f.name)) for f in dataclasses.fields(instance)}
    if isinstance(instance, (list, tuple)):
        return [to_dict(item) for item in instance]
    if isinstance(instance, dict):
        return {key: to_dict(value) for key, value in instance.items()}
    return instance


def _coerce(hint: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own error names the nested key that is wrong
            return _coerce(options[0], value, source, key)
        for option in options:
            try:
                return _coerce(option, value, source, key)
            except ConfigError:
                continue
        raise ConfigError(f"{source}: {key}: expected {_type_name(hint)}, got {_describe(value)}")
    if hint is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key}: expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, source, key)
    if origin in (list, List, tuple, Tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key}: expected a list, got {_describe(value)}")
        item_type = args[0] if args else Any
        items = [_coerce(item_type, item, source, f"{key}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if origin in (tuple, Tuple) else items
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a mapping, got {_describe(value)}")
        key_type, value_type = args if args else (Any, Any)
        return {
            _coerce(key_type, _yaml_key(key_type, k), source, f"{key}.{k}"): _coerce(value_type, v, source, f"{key}.{k}")
            for k, v in value.items()
        }
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: expected true/false, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key}: expected an integer, got {_describe(value)}")
        return value
    if hint is float:
        if isinstance(value, str) and FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key}: expected a number, got {_describe(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key}: expected a string, got {_describe(value)}")
        return value
    raise TypeError(f"config type {hint!r} at {key} is not supported")


def _yaml_key(key_type: Any, key: Any) -> Any:
    """YAML reads the key ``1:`` as an int; a mapping keyed by strings takes it as "1"."""
    return str(key) if key_type is str and isinstance(key, int) and not isinstance(key, bool) else key


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    return f"{type(value).__name__} {value!r}"


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))
