"""One writer per output: an advisory lock held while a command writes a run folder or an output file.

A second process that would write the same folder or file (two ``qlass eval --out DIR``, two
``qlass explore --out F``) is refused with a message naming the holder, instead of doubling every
record. The lock is ``fcntl.flock`` on a small file (``DIR/.qlass.lock``, or ``.NAME.lock`` beside a
file): the kernel releases it when its holder exits, however it exits, so a lock left by a killed
process never blocks a rerun. The lock file itself stays (it only names the last holder), except
after a failed command: one it created is removed, and so is a folder it created (a run folder, or an
output file's) that it left otherwise empty.

Readers look at the same lock (:func:`writer_of`): a command that would turn a file still being written into
something lasting (Q data, a trained model) refuses it, and a report on one says it reads part of it.
"""

from __future__ import annotations

import fcntl
import functools
import inspect
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from .errors import QlassError
from .file_checks import check_output_file, followed

F = TypeVar("F", bound=Callable[..., Any])

log = logging.getLogger(__name__)

PROBE_WAIT_S = 0.5
"""How long a writer that finds its lock taken waits before refusing: a reader's probe holds it for an instant."""


def lock_path(target: Path, folder: bool) -> Path:
    """Where the lock of ``target`` lives: inside a folder, beside a file."""
    return target / ".qlass.lock" if folder else target.with_name(f".{target.name}.lock")


@contextmanager
def writer_lock(target: str | os.PathLike, folder: bool, beside: bool = False) -> Iterator[None]:
    """Hold the writer lock of ``target`` (a folder, or a file when ``folder`` is false) for the block;
    :class:`QlassError` naming the holder when another process holds it. A lock file this call made is
    removed again when the block fails (a refused output keeps no lock file beside or in it). ``beside``: a
    folder that is replaced whole (written elsewhere, then renamed) keeps its lock beside it, as a file does,
    since a lock inside would move away with the old folder."""
    target = followed(target)
    if not folder:
        check_output_file(target)
    elif target.exists() and not target.is_dir():  # was a FileExistsError from making the lock's folder
        raise QlassError(f"{target}: is a file; this output is a folder")
    path = lock_path(target, folder and not beside)
    made = _first_missing(path.parent)  # the outermost folder this call creates, if any
    path.parent.mkdir(parents=True, exist_ok=True)
    fh, created = _locked_file(target, path)
    try:
        try:
            _name_holder(fh, target, path)
            yield
        except BaseException:
            if made is not None:
                _remove_if_only_lock(made, path)
            elif created:
                path.unlink(missing_ok=True)  # while held: a waiting opener sees it gone and locks a new one
            raise
    finally:
        fh.close()  # closing the file releases the lock


def _name_holder(fh: Any, target: Path, path: Path) -> None:
    """Write this process into the lock file ``path`` of ``target`` (unbuffered: a failed write leaves nothing
    for ``close`` to retry); a failure (a full disk) is a :class:`QlassError` naming the output."""
    try:
        fh.seek(0)
        fh.truncate()
        os.write(fh.fileno(), f"{_this_process()}\n".encode())
    except OSError as exc:
        raise QlassError(f"{target}: cannot be written there ({exc.strerror or exc}: its writer lock {path} "
                         "could not be written)") from None


def _locked_file(target: Path, path: Path) -> tuple[Any, bool]:
    """The lock file ``path`` of ``target``, opened and locked, and whether this call created it. A lock
    file removed by its holder between our open and our lock is opened again (the holder's successor
    locks the new file, so two processes never hold two files of one path)."""
    while True:
        created = not path.exists()
        try:
            fh = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the whole block
        except OSError as exc:
            if exc.filename != str(path):  # a folder of the output's path: the error names it
                raise
            # the lock file could not be made: the output, which the user named, is the one to report
            raise QlassError(f"{target}: cannot be written there ({exc.strerror or exc}: its writer lock {path} "
                             "could not be created)") from None
        try:
            _lock_waiting_out_probes(fh)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise QlassError(f"{target} is being written by another qlass process ({holder}); wait for it to "
                             "finish or choose another output") from None
        try:
            if os.fstat(fh.fileno()).st_ino == os.stat(path).st_ino:
                return fh, created
        except FileNotFoundError:
            pass
        fh.close()


def _lock_waiting_out_probes(fh: Any) -> None:
    """Take the exclusive lock of the open lock file ``fh``; ``BlockingIOError`` when it is still taken after
    :data:`PROBE_WAIT_S` (a writer holds it for its whole run, a reader's :func:`writer_of` for an instant)."""
    deadline = time.monotonic() + PROBE_WAIT_S
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


def _this_process() -> str:
    """How a lock file names its holder."""
    return f"pid {os.getpid()} on {socket.gethostname()}"


def writer_of(path: str | os.PathLike, in_folder: bool = False) -> str | None:
    """The process writing the file ``path`` now (``pid N on HOST``, as its writer lock names it), or None when
    no qlass process but this one holds that lock. ``in_folder``: the lock of the folder holding the file counts
    too (an evaluation folder's ``records.jsonl``). The probe holds a lock shared for an instant only."""
    target = followed(path)
    for lock in [lock_path(target, False), *([lock_path(target.parent, True)] if in_folder else [])]:
        holder = _holder(lock)
        if holder is not None:
            return holder
    return None


def _holder(lock: Path) -> str | None:
    """Who holds the lock file ``lock`` when another process than this one does."""
    try:
        fh = open(lock, "rb")  # noqa: SIM115 - closed below; never created here
    except OSError:  # no lock file: never written by a qlass command (or by one before locks)
        return None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = fh.read().decode("utf-8", "replace").strip()
            return None if holder == _this_process() else holder or "another process"
        except OSError:  # a file system without locks: no writer can be told
            return None
    return None


def refuse_input_being_written(path: str | os.PathLike, use: str) -> None:
    """Raise :class:`QlassError` when another qlass process is still writing the input ``path`` (:func:`writer_of`):
    ``use`` (e.g. "training on it") would keep a part of it, and a rerun on the whole file be refused or differ."""
    holder = writer_of(path)
    if holder is not None:
        raise QlassError(f"{path}: is still being written by another qlass process ({holder}); {use} now would use "
                         "part of it. Wait for that process to finish, or copy the file to use what it holds now")


def warn_if_being_written(path: str | os.PathLike, in_folder: bool = False) -> None:
    """Log a warning when another qlass process is still writing the input ``path`` (``in_folder``: or the folder
    holding it; :func:`writer_of`): a report on it reads what it holds so far."""
    holder = writer_of(path, in_folder)
    if holder is not None:
        log.warning("%s: still being written by another qlass process (%s); reading what it holds so far", path,
                    holder)


def _first_missing(folder: Path) -> Path | None:
    """The outermost folder on the way to ``folder`` that does not exist yet (None: ``folder`` exists)."""
    if folder.exists():
        return None
    while not folder.parent.exists():
        folder = folder.parent
    return folder


def _remove_if_only_lock(made: Path, lock: Path) -> None:
    """Remove the folders from ``lock``'s up to ``made``, which this process created (a run folder, or
    the folders of an output file), when a failed command left nothing in them but its lock file (a
    model that did not load leaves no empty folders behind)."""
    try:
        if [p.name for p in lock.parent.iterdir()] != [lock.name]:
            return
        lock.unlink()
        folder = lock.parent
        while True:
            folder.rmdir()  # fails, and stops the climb, when something else is there
            if folder == made:
                return
            folder = folder.parent
    except OSError:  # something appeared meanwhile: keep it
        pass


def writes_to(param: str, folder: bool) -> Callable[[F], F]:
    """Decorator: the call holds the writer lock of its argument ``param`` (see :func:`writer_lock`)."""

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            target = bound.arguments[param]
            if isinstance(target, (str, os.PathLike)) and Path(target).is_symlink():  # sidecars derive from it
                bound.arguments[param] = followed(target)
            with writer_lock(bound.arguments[param], folder):
                return fn(*bound.args, **bound.kwargs)

        return locked  # type: ignore[return-value]

    return decorate


__all__ = ["lock_path", "refuse_input_being_written", "warn_if_being_written", "writer_lock", "writer_of",
           "writes_to"]
