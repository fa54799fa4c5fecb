"""Loading user-named objects (``package.module:Name``) with errors that say what failed."""

from __future__ import annotations

import importlib
from typing import Any

from .errors import QlassError, raised_in_user_code


def load_object(spec: str, what: str) -> Any:
    """The object named by ``spec`` (``package.module:Name``); ``what`` names it in errors
    (e.g. ``"environment"``)."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise QlassError(f"cannot load {what} {spec!r}: expected 'package.module:Name'")
    try:
        loaded = importlib.import_module(module)
    except ImportError as exc:
        raise QlassError(f"cannot load {what} {spec!r}: {exc}") from exc
    except SyntaxError as exc:
        raise QlassError(f"cannot load {what} {spec!r}: {exc.filename}:{exc.lineno}: {exc.msg}") from exc
    except Exception as exc:  # the module's own code failed while it was imported
        raise raised_in_user_code(f"cannot load {what} {spec!r}: importing {module}", exc) from exc
    try:
        return getattr(loaded, name)
    except AttributeError as exc:
        raise QlassError(f"cannot load {what} {spec!r}: {exc}") from exc
