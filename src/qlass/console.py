"""The console that progress bars draw on: stderr, since stdout is for results."""

from __future__ import annotations

import os
import sys

from rich.console import Console

LOG_WIDTH = 200
"""Columns of a progress line written to a file or pipe, where rich would otherwise assume 80."""


def stderr_console() -> Console:
    """stderr as rich draws on it. When it is not a terminal (a log file, a pipe), a bar is one line written when
    it ends; it is :data:`LOG_WIDTH` columns wide (or ``$COLUMNS``), so that its counts and the last task id are
    not cut at rich's default 80."""
    if sys.stderr.isatty() or os.environ.get("COLUMNS"):
        return Console(stderr=True)
    return Console(stderr=True, width=LOG_WIDTH)
