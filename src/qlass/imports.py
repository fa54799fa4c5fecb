"""Loading user-named objects (``package.module:Name``) with errors that say what failed."""

from __future__ import annotations

import importlib
from typing import Any

from .errors import QlassError


def load_object(spec: str, what: str) -> Any:
    """The object named by ``spec`` (``package.module:Name``); ``what`` names it in errors
    (e.g. ``"environment"``)."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise QlassError(f"cannot load {what} {spec!r}: expected 'package.module:Name'")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise QlassError(f"cannot load {what} {spec!r}: {exc}") from None
