"""Dataclass configs with help strings, loaded from and saved to YAML with strict checking.

A stage declares its settings as a (frozen) dataclass whose fields are made with :func:`option`,
so every field carries a help string (for ``--help`` and docs)::

    @dataclass(frozen=True)
    class MyConfig:
        lr: float = option(1e-5, "peak learning rate")

    cfg = load_config("my.yaml", MyConfig, overrides={"lr": 3e-4})   # file, then overrides
    save_config(out / "config.yaml", cfg)

Unknown keys are errors naming the file (or ``--set``) and the key, with the closest known name.
Values are checked against the field's type: ints where an int is declared, numbers for floats
(a YAML string such as ``1e-5``, which YAML 1.1 does not read as a number, is converted), true/false
for bools, strings for strs, lists and mappings for ``list``/``dict`` fields, ``null`` only for
optional fields. The dataclass's own ``__post_init__`` checks (ranges etc.) run last and their
message is reported with the same source.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import DataError, QlassError
from .jsonl import write_text_atomic

T = TypeVar("T")


def option(default: Any, help: str, runtime: bool = False) -> Any:
    """A dataclass field with a default and a help string (lists/dicts are copied per instance).

    ``runtime=True`` marks a setting that changes where or how fast work runs but not its result
    (threads, device): :func:`config_hash` leaves it out, so a run may resume with another value."""
    meta = {"help": help, "runtime": runtime}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path`` (empty file → empty mapping)."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(str(p), "file not found") from None
    except yaml.YAMLError as exc:
        raise DataError(str(p), f"invalid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DataError(str(p), "expected a mapping of option names to values")
    return data


def parse_kv(items: Sequence[str], what: str) -> dict[str, Any]:
    """``["a=1", "b=x"]`` → ``{"a": 1, "b": "x"}`` with YAML scalar typing; ``what`` names the
    option the items came from in errors."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise QlassError(f"{what}: expected key=value, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            raise QlassError(f"{what}: the value of {key.strip()!r} is not a valid YAML scalar: {value!r}") from None
    return out


def _check_value(name: str, value: Any, hint: Any, source: str) -> Any:
    """``value`` checked (and, for float fields given a numeric string, converted) against ``hint``."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            if len(args) < len(typing.get_args(hint)):
                return None
            raise QlassError(f"{source}: option {name!r} may not be null")
        if len(args) == 1:
            return _check_value(name, value, args[0], source)
        return value
    if value is None:
        raise QlassError(f"{source}: option {name!r} may not be null")
    base = origin or hint
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif base is str:
        ok = isinstance(value, str)
    elif base in (list, tuple):
        ok = isinstance(value, (list, tuple))
    elif base is dict:
        ok = isinstance(value, Mapping)
    else:
        return value
    if not ok:
        raise QlassError(f"{source}: option {name!r} expects {getattr(base, '__name__', base)}, "
                         f"got {value!r} ({type(value).__name__})")
    return value


def _checked(cls: type, data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``data`` with every key known to ``cls`` and every value of the declared type, else an error."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields, key=str)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise QlassError(f"{source}: unknown option(s) {', '.join(hints)} for {cls.__name__}; "
                         f"known: {', '.join(sorted(fields))}")
    types_of = typing.get_type_hints(cls)
    return {k: _check_value(k, v, types_of.get(k, Any), source) for k, v in data.items()}


def build(cls: type[T], data: Mapping[str, Any], source: str = "config") -> T:
    """``cls(**data)`` with unknown keys, wrong types and rejected values reported against ``source``."""
    checked = _checked(cls, data, source)
    try:
        return cls(**checked)
    except (TypeError, ValueError) as exc:
        raise QlassError(f"{source}: {exc}") from None


def load_config(path: str | Path | None, cls: type[T], overrides: Mapping[str, Any] | None = None,
                overrides_source: str = "--set") -> T:
    """A ``cls`` config from the YAML file ``path`` (defaults when ``None``) with ``overrides`` on
    top; unknown keys and wrong types name the file or ``overrides_source`` and the key."""
    source = str(path) if path is not None else "defaults"
    values = _checked(cls, load_yaml(path), source) if path is not None else {}
    if overrides:
        values.update(_checked(cls, overrides, overrides_source))
        source = f"{source} with {overrides_source}"
    return build(cls, values, source)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain data."""
    return dataclasses.asdict(cfg)


def config_hash(cfg: Any) -> str:
    """A short stable hash of the values of a config that affect results (used to refuse resuming
    with changed settings); ``runtime`` options are left out."""
    runtime = {f.name for f in dataclasses.fields(cfg) if f.metadata.get("runtime")}
    values = {k: v for k, v in to_dict(cfg).items() if k not in runtime}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:12]


def differences(before: Mapping[str, Any], now: Mapping[str, Any], sep: str = " → ") -> list[str]:
    """``"name: old<sep>new"`` for every key of both mappings whose values differ (a key only one
    has, such as an option added since, does not count)."""
    return [f"{k}: {before[k]!r}{sep}{now[k]!r}" for k in now if k in before and before[k] != now[k]]


def config_differences(before: Any, now: Any) -> list[str]:
    """:func:`differences` of two configs of one class, ``runtime`` options left out (they may
    change between a run and its resumption)."""
    runtime = {f.name for f in dataclasses.fields(now) if f.metadata.get("runtime")}
    old = {k: v for k, v in to_dict(before).items() if k not in runtime}
    return differences(old, to_dict(now))


def save_yaml(path: str | Path, data: dict[str, Any]) -> None:
    """Write ``data`` as YAML atomically."""
    write_text_atomic(path, yaml.safe_dump(data, sort_keys=False))


def save_config(path: str | Path, cfg: Any) -> None:
    """Write a config dataclass as YAML (atomically) so :func:`load_config` reads it back equal."""
    save_yaml(path, to_dict(cfg))


def help_text(cls: type) -> dict[str, str]:
    """Field name → help string of a config class (for CLI and docs)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def describe(cls: type) -> str:
    """One line per option of ``cls``: name, default and help (for ``--help`` epilogs)."""
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        lines.append(f"{f.name} (default {default!r}): {f.metadata.get('help', '')}")
    return "\n".join(lines)
