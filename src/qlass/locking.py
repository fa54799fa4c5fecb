"""One writer per output: an advisory lock held while a command writes a run folder or an output file.

A second process that would write the same folder or file (two ``qlass eval --out DIR``, two
``qlass explore --out F``) is refused with a message naming the holder, instead of doubling every
record. The lock is ``fcntl.flock`` on a small file (``DIR/.qlass.lock``, or ``.NAME.lock`` beside a
file): the kernel releases it when its holder exits, however it exits, so a lock left by a killed
process never blocks a rerun. The lock file itself stays (it only names the last holder), except
after a failed command: one it created is removed, and so is a folder it created (a run folder, or an
output file's) that it left otherwise empty.
"""

from __future__ import annotations

import fcntl
import functools
import inspect
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from .errors import QlassError
from .file_checks import check_output_file, followed

F = TypeVar("F", bound=Callable[..., Any])


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
        os.write(fh.fileno(), f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
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
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
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


__all__ = ["lock_path", "writer_lock", "writes_to"]
