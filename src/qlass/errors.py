"""Error types that carry enough context for a clear, actionable message."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
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


def interrupted_during(exc: BaseException) -> bool:
    """Whether ``exc`` was raised while a Ctrl-C (``KeyboardInterrupt``) was being handled: a library that
    turns the interrupt into another error (py4j, under ScienceWorld's steps, raises ``AttributeError``) has
    not failed, the user has stopped the command."""
    seen: set[int] = set()
    context = exc.__context__
    while context is not None and id(context) not in seen:
        if isinstance(context, KeyboardInterrupt):
            return True
        seen.add(id(context))
        context = context.__context__
    return False


SAVERS = frozenset({"save_pretrained", "save_model", "_save_checkpoint", "save_file"})
"""Functions of transformers and safetensors that write a model or checkpoint (torch.save runs under them)."""
WRITE_FAILURES = ("No space left", "I/O error", "iostream error", "unexpected pos", "file write failed",
                  "Disk quota exceeded")
"""How safetensors and torch.save word a failed write (their errors are no OSError)."""


@contextlib.contextmanager
def naming_failed_saves(out: Path, hint: str = "free space and rerun the same command to resume"
                        ) -> Iterator[None]:
    """Re-raise a model or checkpoint write into ``out`` that failed inside torch or safetensors as a
    :class:`QlassError` naming ``out`` and its free space: they report a full disk with no file name, as
    ``RuntimeError('basic_ios::clear: iostream error')`` or ``SafetensorError('... I/O error: No space left on
    device')``, which the command line showed as a traceback. ``hint`` says what to do, after 'if the disk is
    full'. Other errors (one worded otherwise, or raised elsewhere) pass unchanged."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, (QlassError, OSError)) or not _raised_in_savers(exc) or not any(
                words in str(exc) for words in WRITE_FAILURES):
            raise
        try:
            free = f"{shutil.disk_usage(out).free / 2**20:.1f} MiB free there"
        except OSError:
            free = "its free space unknown"
        raise QlassError(f"{out}: writing the model or a checkpoint failed ({type(exc).__name__}: {exc}; {free}); "
                         f"if the disk is full, {hint}") from exc


def _raised_in_savers(exc: BaseException) -> bool:
    """Whether ``exc``, or an exception it was raised while handling, came from inside one of :data:`SAVERS`."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        tb = exc.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_name in SAVERS:
                return True
            tb = tb.tb_next
        exc = exc.__context__  # type: ignore[assignment]
    return False
