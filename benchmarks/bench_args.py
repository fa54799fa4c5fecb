"""Command-line argument types shared by the benchmark scripts.

A count of zero or below (``--repeats 0``, ``--tasks -1``) measured nothing: the scripts then failed
with a traceback (``no median for empty data``, a division by zero, an unbound variable) or printed
a ratio of nothing. These types make such a value argparse's usage error instead: one line naming
the option, exit status 2.
"""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer (at least 1)")
    return value


def positive_ints(text: str) -> list[int]:
    """A comma-separated list of integers of at least 1 (e.g. ``2,4,8``)."""
    return [positive_int(part.strip()) for part in text.split(",")]


def nonnegative_int(text: str) -> int:
    """An integer of at least 0 (e.g. a number of items to skip)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative (at least 0)")
    return value
