"""A config dataclass made in Python checked field by field the way :func:`qlass.config.build` checks the values
of a YAML file, so that ``ExploreConfig(temperature=float("nan"))`` or ``QlassConfig(m="4")`` is an error naming
the option rather than a config that range checks let through (``nan < 0`` is false) or a ``TypeError`` from a
comparison that names nothing."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import _check_value
from .errors import QlassError
from .jsonl import is_count


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_field_types(cfg: Any) -> None:
    """Raise ``ValueError`` for a float field of the dataclass ``cfg`` that is NaN or infinite and ``TypeError``
    for a value a YAML file could not give its field: another type than declared (``True`` or ``2.5`` for an
    int, ``"0.7"`` for a float, ``"no"`` for a bool), or ``None`` for a field that is not optional. For the start
    of a config's ``__post_init__``."""
    owner = type(cfg).__name__
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{owner}: option {f.name!r} must be a finite number, got {value!r}")
        try:
            checked = _check_value(f.name, value, _hints(type(cfg)).get(f.name, Any), owner)
        except QlassError as exc:
            raise TypeError(str(exc)) from None
        if isinstance(value, str) and not isinstance(checked, str):  # build converts YAML's "1e-5"; Python has floats
            raise TypeError(f"{owner}: option {f.name!r} expects float, got {value!r} (str)")


def require_config(value: Any, cls: type, where: str, argument: str = "cfg") -> None:
    """Raise ``TypeError`` naming ``argument`` of ``where`` when ``value`` is not a ``cls``: a dict of options or
    ``None`` handed where a config object belongs (was an ``AttributeError`` from deep inside, naming nothing)."""
    if isinstance(value, cls):
        return
    hint = f"; make one with {cls.__name__}(**options)" if isinstance(value, Mapping) else ""
    raise TypeError(f"{where}: argument {argument!r} must be an instance of {cls.__name__}, "
                    f"got {type(value).__name__}{hint}")


def require_names(value: Any, where: str, argument: str, empty_ok: bool = False) -> list[str]:
    """``value`` (a sequence of strings) as a list; a bare string, read letter by letter (``splits="seen"`` asked
    for split ``'s'``), anything else, or no names unless ``empty_ok``, is a ``TypeError`` naming the argument."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        hint = f" (give [{value!r}])" if isinstance(value, str) else ""
        raise TypeError(f"{where}: argument {argument!r} must be a list of names, got {value!r:.80}{hint}")
    if not value and not empty_ok:
        raise TypeError(f"{where}: argument {argument!r} names nothing (an empty list)")
    return list(value)


def require_paths(value: Any, where: str, argument: str) -> list[Path]:
    """``value`` (a sequence of paths) as a list of :class:`Path`; one path given bare, anything else, or an empty
    list is a ``TypeError`` naming the argument."""
    if isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{where}: argument {argument!r} must be a list of paths, got one path ({value!r}: give "
                        f"[{os.fspath(value)!r}])")
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, os.PathLike)) for v in value) or not value:
        raise TypeError(f"{where}: argument {argument!r} must be a non-empty list of paths, got {value!r:.80}")
    return [Path(v) for v in value]


def require_count(value: Any, where: str, argument: str, low: int = 1, optional: bool = False) -> None:
    """Raise ``TypeError`` naming the argument unless ``value`` is a whole number >= ``low`` (or None when
    ``optional``): ``limit=-1`` played all tasks but one and ``limit=1.5`` failed in a slice."""
    if value is None and optional:
        return
    if not is_count(value, low):
        raise TypeError(f"{where}: argument {argument!r} must be a whole number >= {low}"
                        f"{' or None' if optional else ''}, got {value!r}")
