"""Ctrl-C that is not lost: the ``qlass`` command's SIGINT handler remembers that it fired.

Python raises the ``KeyboardInterrupt`` of a Ctrl-C wherever the main thread is. When that is a
finalizer or a weakref callback (py4j, under ScienceWorld, frees its Java objects in one), Python
prints "Exception ignored" with a traceback and goes on: the run did not stop. :func:`install` replaces
Python's handler with one that also keeps a flag, and :func:`raise_if_interrupted` (called after every
environment call) raises the interrupt again when one was lost; the lost one is logged at debug level,
not printed.
"""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType
from typing import Any, Callable

log = logging.getLogger(__name__)

INTERRUPTED = 130
"""The exit code of a command stopped by Ctrl-C."""
STOPPED = "interrupted: rerun the same command to resume (finished records and the last checkpoint are kept)"
"""What a command stopped by Ctrl-C says, on its own line."""


class _Handler:
    """Python's own SIGINT behaviour (raise ``KeyboardInterrupt``), plus a flag that it fired."""

    def __init__(self) -> None:
        self.fired = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.fired = True
        raise KeyboardInterrupt


def install() -> None:
    """Use the remembering handler for SIGINT, where Ctrl-C raises ``KeyboardInterrupt`` today. A process
    that ignores SIGINT (a background job) keeps ignoring it; call from the main thread."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _Handler())
        sys.unraisablehook = _quiet_about_interrupts(sys.unraisablehook)


def _quiet_about_interrupts(hook: Callable[[Any], object]) -> Callable[[Any], None]:
    """``hook`` (Python's report of an exception that could not be raised), except that a lost
    ``KeyboardInterrupt`` goes to the debug log: :func:`raise_if_interrupted` stops the run for it."""
    def report(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            log.debug("a Ctrl-C was lost in %r; the run stops at the next environment call", unraisable.object)
        else:
            hook(unraisable)
    return report


def raise_if_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` if a Ctrl-C reached :func:`install`'s handler (its own interrupt may
    have been swallowed where it was raised); nothing otherwise."""
    handler = signal.getsignal(signal.SIGINT)
    if isinstance(handler, _Handler) and handler.fired:
        raise KeyboardInterrupt
