"""Loading user-named objects (``package.module:Name``) with errors that say what failed."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
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
        raise QlassError(f"cannot load {what} {spec!r}: {exc}{_cwd_hint(exc, module)}") from exc
    except SyntaxError as exc:
        raise QlassError(f"cannot load {what} {spec!r}: {exc.filename}:{exc.lineno}: {exc.msg}") from exc
    except Exception as exc:  # the module's own code failed while it was imported
        raise raised_in_user_code(f"cannot load {what} {spec!r}: importing {module}", exc) from exc
    try:
        return getattr(loaded, name)
    except AttributeError as exc:
        raise QlassError(f"cannot load {what} {spec!r}: {exc}") from exc


def _cwd_hint(exc: ImportError, module: str) -> str:
    """Where the missing module's top package is in the working folder, which the ``qlass`` command (unlike
    ``python -m qlass``) does not search: how to make it importable."""
    top = module.split(".")[0]
    here = Path.cwd().resolve()
    searched = any(p in ("", ".") or Path(p).resolve() == here for p in sys.path)
    if not isinstance(exc, ModuleNotFoundError) or exc.name not in (top, module) or searched:
        return ""
    if not (Path(f"{top}.py").is_file() or Path(top).is_dir()):
        return ""
    return (f" ({top} is in the working folder, which the qlass command does not search: run it with "
            "PYTHONPATH=. or as python -m qlass)")
