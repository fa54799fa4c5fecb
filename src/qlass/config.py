"""Dataclass configs with help strings, loaded from and saved to YAML with strict key checking.

Every stage has a config dataclass whose fields carry ``metadata={"help": ...}``; unknown keys in a
YAML file or in command-line overrides are errors naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import DataError, QlassError
from .jsonl import write_text_atomic

T = TypeVar("T")


def option(default: Any, help: str) -> Any:
    """A dataclass field with a default and a help string."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


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


def build(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    """``cls(**data)`` with unknown keys and bad values reported against ``source``."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise QlassError(f"{source}: unknown option(s) {', '.join(unknown)} for {cls.__name__}; "
                         f"known: {', '.join(sorted(names))}")
    try:
        return cls(**data)
    except (TypeError, ValueError) as exc:
        raise QlassError(f"{source}: {exc}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain data."""
    return dataclasses.asdict(cfg)


def config_hash(cfg: Any) -> str:
    """A short stable hash of a config's values (used to refuse resuming with changed settings)."""
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()).hexdigest()[:12]


def save_yaml(path: str | Path, data: dict[str, Any]) -> None:
    """Write ``data`` as YAML atomically."""
    write_text_atomic(path, yaml.safe_dump(data, sort_keys=False))


def help_text(cls: type) -> dict[str, str]:
    """Field name → help string of a config class (for CLI and docs)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
