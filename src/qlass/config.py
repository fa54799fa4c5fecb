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
import inspect
import json
import math
import reprlib
import types
import typing
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import DataError, MissingFileError, QlassError
from .file_checks import refuse_device
from .jsonl import MAX_INTEGER, write_text_atomic

T = TypeVar("T")


def option(default: Any, help: str, runtime: bool = False, added: bool = False) -> Any:
    """A dataclass field with a default and a help string (lists/dicts are copied per instance).

    ``runtime=True`` marks a setting that changes where or how fast work runs but not its result
    (threads, device): :func:`config_hash` leaves it out, so a run may resume with another value.
    ``added=True`` marks an option added after runs were recorded, whose default reproduces them:
    at its default :func:`config_hash` leaves it out, so those runs keep their hash."""
    meta = {"help": help, "runtime": runtime, "added": added}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping (PyYAML would keep the last silently)."""


MAX_YAML_VALUES = 100_000
"""Most values (aliases counted again) a configuration file may hold."""


def _short_repr() -> reprlib.Repr:
    """A repr bounded in depth, items and length, for user values in error messages."""
    short = reprlib.Repr()
    short.maxlevel, short.maxdict, short.maxlist, short.maxtuple = 3, 8, 8, 8
    short.maxstring = short.maxother = 200
    return short


_SHORT = _short_repr()


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
            key = loader.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", key_node.start_mark)
            seen.add(key)
    return loader.construct_mapping(node)


def _bounded_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    """A YAML integer no larger than the JSON readers take (:data:`~qlass.jsonl.MAX_INTEGER`): one of over
    4300 digits was a ValueError traceback from Python's conversion of the text."""
    text = str(node.value)
    value = loader.construct_yaml_int(node) if len(text) <= 330 else None
    if value is None or abs(value) > MAX_INTEGER:
        raise yaml.constructor.ConstructorError(None, None, f"an integer of {len(text)} characters is too large "
                                                "for a number (at most about 1.8e308)", node.start_mark)
    return value


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)
_StrictLoader.add_constructor("tag:yaml.org,2002:int", _bounded_int)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error on one line: where (line and column, 1-based) and what, with its context
    (PyYAML's own message spans four or more lines, each source line quoted under a caret)."""
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem_mark is None:
        return " ".join(str(exc).split())
    mark = exc.problem_mark
    text = f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
    if exc.context:
        at = exc.context_mark
        text += f" ({exc.context}" + (f" at line {at.line + 1}, column {at.column + 1}" if at else "") + ")"
    return text


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path`` (empty file → empty mapping); a file that is not UTF-8, not
    YAML or gives a key twice is a :class:`DataError` naming it."""
    p = Path(path)
    refuse_device(p)
    try:
        data = yaml.load(p.read_bytes().decode("utf-8"), Loader=_StrictLoader)
    except (FileNotFoundError, IsADirectoryError):
        raise (DataError(str(p), "is a folder, not a YAML file") if p.is_dir() else MissingFileError(str(p))) from None
    except UnicodeDecodeError as exc:
        raise DataError(str(p), f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise DataError(str(p), "invalid YAML: nested too deeply") from None
    except yaml.YAMLError as exc:
        raise DataError(str(p), f"invalid YAML: {_yaml_problem(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DataError(str(p), "expected a mapping of option names to values")
    if _expands_beyond(data, MAX_YAML_VALUES):
        raise DataError(str(p), f"holds more than {MAX_YAML_VALUES} values once its aliases (*name) are expanded; "
                                "a configuration never needs that many (an alias bomb?)")
    return data


def _expands_beyond(data: Any, limit: int) -> bool:
    """Whether ``data`` holds more than ``limit`` values counting every alias of a shared value again
    (what printing, hashing or copying it costs), without expanding it."""
    count, stack = 0, [data]
    while stack:
        count += 1
        if count > limit:
            return True
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return False


def merge_mappings(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``over``: mappings present in both are merged key by key, anything else
    (lists included) is replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_mappings(out[key], value)
        else:
            out[key] = value
    return out


def load_extended_yaml(path: str | Path, _chain: tuple[Path, ...] = (), bases: list[Path] | None = None
                       ) -> dict[str, Any]:
    """A YAML mapping (:func:`load_yaml`) whose optional ``extends: FILE`` (relative to it) names a
    base file it overrides (:func:`merge_mappings`); bases may extend others, a cycle is an error.
    ``bases``, when given, receives the path of every base file read (for messages about the merged values)."""
    p = Path(path)
    data = load_yaml(p)
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise DataError(str(p), "field 'extends' must be the name of a YAML file")
    base_path = (p.parent / base).resolve()
    chain = (*_chain, p.resolve())
    if base_path in chain:
        raise DataError(str(p), f"field 'extends': {base} is already in the chain {' → '.join(map(str, chain))}")
    if not base_path.exists() or base_path.is_dir():
        raise DataError(str(p), f"field 'extends': {base} ({base_path}) "
                                + ("is a folder, not a YAML file" if base_path.is_dir() else "not found"))
    if bases is not None:
        bases.append(base_path)
    return merge_mappings(load_extended_yaml(base_path, chain, bases), data)


def parse_kv(items: Sequence[str], what: str) -> dict[str, Any]:
    """``["a=1", "b=x"]`` → ``{"a": 1, "b": "x"}`` with YAML scalar typing; ``what`` names the
    option the items came from in errors."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise QlassError(f"{what}: expected key=value, got {item!r}")
        if key.strip() in out:
            raise QlassError(f"{what}: {key.strip()!r} is given twice")
        try:
            out[key.strip()] = yaml.load(value, Loader=_StrictLoader) if value.strip() else ""
        except (yaml.YAMLError, RecursionError) as exc:
            problem = f" ({exc.problem})" if isinstance(exc, yaml.MarkedYAMLError) and exc.problem else ""
            raise QlassError(f"{what}: the value of {key.strip()!r} is not a valid YAML scalar{problem}: "
                             f"{_SHORT.repr(value)}") from None
        if _expands_beyond(out[key.strip()], MAX_YAML_VALUES):
            raise QlassError(f"{what}: the value of {key.strip()!r} holds more than {MAX_YAML_VALUES} values once "
                             "its aliases (*name) are expanded")
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
        if ok and not math.isfinite(value):
            raise QlassError(f"{source}: option {name!r} must be a finite number, got {value!r}")
    elif base is str:
        ok = isinstance(value, str)
    elif base in (list, tuple):
        ok = isinstance(value, (list, tuple))
        item = typing.get_args(hint)
        if ok and len(item) == 1:
            value = type(value)(_check_value(f"{name}[{i}]", v, item[0], source) for i, v in enumerate(value))
    elif base is dict:
        ok = isinstance(value, Mapping)
    else:
        return value
    if not ok:
        raise QlassError(f"{source}: option {name!r} expects {getattr(base, '__name__', base)}, "
                         f"got {_SHORT.repr(value)} ({type(value).__name__})")
    return value


def check_known(data: Mapping[str, Any], known: Collection[str], source: str, owner: str) -> None:
    """Raise :class:`QlassError` for keys of ``data`` not in ``known`` (the options of ``owner``),
    each with the closest known name, and listing the known ones."""
    unknown = sorted(set(data) - set(known), key=str)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise QlassError(f"{source}: unknown option(s) {', '.join(hints)} for {owner}; "
                         f"known: {', '.join(sorted(known))}")


def _checked(cls: type, data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``data`` with every key known to ``cls`` and every value of the declared type, else an error."""
    fields = {f.name for f in dataclasses.fields(cls)}
    check_known(data, fields, source, cls.__name__)
    types_of = typing.get_type_hints(cls)
    return {k: _check_value(k, v, types_of.get(k, Any), source) for k, v in data.items()}


def check_minimums(cfg: Any, **minimums: int) -> None:
    """Raise :class:`ValueError` (reported by :func:`build` with its source) for a field of ``cfg``
    below its minimum; ``None`` (no limit) passes. For ``__post_init__`` checks of limits."""
    optional = {f.name for f in dataclasses.fields(cfg) if "None" in str(f.type)}
    for name, low in minimums.items():
        if (value := getattr(cfg, name)) is not None and value < low:
            raise ValueError(f"{name} must be >= {low}{' (or null: no limit)' * (name in optional)}, got {value}")


def check_call_options(target: Any, options: Mapping[str, Any], source: str,
                       skip: Collection[str] = ()) -> dict[str, Any]:
    """``options`` checked against the parameters of ``target`` (a class or function) before it is
    called with them: an unknown name is an error naming the accepted ones (with the closest), a
    required one missing or a value of the wrong type for an annotated parameter too (see
    :func:`_check_value`). ``skip``: parameters given otherwise. A target that takes ``**kwargs`` or
    has no readable signature accepts any name."""
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return dict(options)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = {n: p for n, p in sig.parameters.items() if p.kind in kinds and n not in skip}
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        unknown = [k for k in options if k not in params]
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(str(key), list(params), n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise QlassError(f"{source} has no option {', '.join(hints)}; options: {', '.join(params) or 'none'}")
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in options]
    if missing:
        raise QlassError(f"{source}: required option(s) {', '.join(map(repr, missing))} not given")
    try:
        types_of = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except (NameError, TypeError, AttributeError):  # annotations that do not resolve: only names are checked
        types_of = {}
    return {k: _check_value(k, v, types_of[k], source) if k in types_of else v for k, v in options.items()}


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
    fields = dataclasses.fields(cfg)
    runtime = {f.name for f in fields if f.metadata.get("runtime")}
    runtime |= {f.name for f in fields if f.metadata.get("added") and getattr(cfg, f.name) == f.default}
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


def describe_sections(sections: Sequence[tuple[str, type]]) -> str:
    """:func:`describe` of several option classes, each under its heading (for a command whose
    options come from more than one class, such as ``--rft`` and ``--set``)."""
    return "\n\n".join(f"{title}:\n{describe(cls)}" for title, cls in sections)
