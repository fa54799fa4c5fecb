"""A config dataclass made in Python checked field by field the way :func:`qlass.config.build` checks the values
of a YAML file, so that ``ExploreConfig(temperature=float("nan"))`` or ``QlassConfig(m="4")`` is an error naming
the option rather than a config that range checks let through (``nan < 0`` is false) or a ``TypeError`` from a
comparison that names nothing."""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Mapping
from typing import Any

from .config import _check_value
from .errors import QlassError


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
