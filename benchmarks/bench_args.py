"""Command-line argument types shared by the benchmark scripts, and how they report a bad input.

A count of zero or below (``--repeats 0``, ``--tasks -1``) measured nothing: the scripts then failed
with a traceback (``no median for empty data``, a division by zero, an unbound variable) or printed
a ratio of nothing. These types make such a value argparse's usage error instead: one line naming
the option, exit status 2. :func:`run_main` does the same for an input file or folder that qlass refuses.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from qlass.cli import os_error_message
from qlass.errors import QlassError
from qlass.file_checks import check_output_file


def _integer(text: str, low: int, below: str) -> int:
    """``text`` as an integer of at least ``low``; ``below`` says what a smaller one is."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} {below} (at least {low})")
    return value


def positive_int(text: str) -> int:
    """An integer of at least 1."""
    return _integer(text, 1, "is not a positive integer")


def positive_ints(text: str) -> list[int]:
    """A comma-separated list of integers of at least 1 (e.g. ``2,4,8``)."""
    return [positive_int(part.strip()) for part in text.split(",")]


def nonnegative_int(text: str) -> int:
    """An integer of at least 0 (e.g. a number of items to skip)."""
    return _integer(text, 0, "is negative")


def nonnegative_float(text: str) -> float:
    """A finite number of at least 0 (e.g. a sampling temperature)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{value} is not a finite number of at least 0")
    return value


def output_file(text: str) -> Path:
    """A file path a report can be written to, checked before the measurement runs: before, an existing
    folder (or a device, a ``.gz`` name) was refused only when the report was written, after the whole run."""
    try:
        check_output_file(text)
    except QlassError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return Path(text)


def json_and_table_file(text: str) -> Path:
    """:func:`output_file` for a JSON report whose markdown table goes beside it (``NAME.md``): a ``.md`` name
    had the table overwrite the report."""
    path = output_file(text)
    if path.suffix == ".md":
        raise argparse.ArgumentTypeError(f"{text}: the JSON report's name; its table is written beside it as "
                                         f"{path.stem}.md (give {path.stem}.json)")
    return path


def output_folder(text: str) -> Path:
    """A folder path reports can be written into, checked before the measurement runs: before, an existing file
    there was refused only when the folder was made, after the whole run."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a file; this output is a folder (give a folder path)")
    return path


def run_main(main: Callable[[], None]) -> None:
    """Run a benchmark's ``main``: a :class:`~qlass.errors.QlassError` (an input file, folder or option that qlass
    refuses, named with its record and field) or a failed file operation is one line on stderr and exit status
    2, as qlass's own commands give, instead of a traceback that ends with that line."""
    try:
        main()
    except QlassError as exc:
        logging.getLogger(__name__).debug("error", exc_info=True)
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(2)
    except OSError as exc:
        logging.getLogger(__name__).debug("failed file operation", exc_info=True)
        sys.stderr.write(f"error: {os_error_message(exc)}\n")
        sys.exit(2)
