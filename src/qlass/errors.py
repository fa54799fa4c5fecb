"""Error types that carry enough context for a clear, actionable message."""

from __future__ import annotations

from types import ModuleType


class QlassError(Exception):
    """Base class: a user-facing error; the CLI prints its message and exits non-zero."""


class DataError(QlassError):
    """A problem in an input file, naming the file, the record and the field."""

    def __init__(self, path: str, problem: str, index: int | None = None, record_id: str | None = None,
                 line: int | None = None):
        where = str(path)
        if line is not None:  # a JSON Lines file: the line an editor shows (1-based, blank lines counted)
            where += f", line {line}"
        elif index is not None:
            where += f", record {index}"
        if record_id is not None:
            where += f" (id {record_id!r})"
        super().__init__(f"{where}: {problem}")
        self.path, self.index, self.record_id, self.problem, self.line = path, index, record_id, problem, line


class MissingFileError(DataError):
    """An input file that does not exist."""

    def __init__(self, path: str):
        super().__init__(path, "file not found")


class MissingExtraError(QlassError):
    """An optional dependency is not installed."""

    def __init__(self, extra: str, module: str):
        super().__init__(
            f"this feature needs the optional dependency {module!r}: "
            f"pip install 'qlass[{extra}]'"
        )
        self.extra, self.module = extra, module


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming the extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised by tests through a fake module name
        raise MissingExtraError(extra, module) from exc


def raised_in_user_code(what: str, exc: BaseException) -> QlassError:
    """The error for an exception that a user's own code (an environment, a policy, a module) raised:
    ``what`` failed, the exception and where it was raised; chain it (``raise ... from exc``) so that
    ``qlass -v`` logs the whole traceback."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return QlassError(f"{what} raised {type(exc).__name__}: {exc}{where}")
