"""The caller's random generators, kept across a training call: transformers' ``Trainer`` seeds Python's,
NumPy's and torch's generators (``set_seed``), so a library call left a caller's later draws at those after
the run's seed, whatever the caller had seeded."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch


@contextlib.contextmanager
def keeping_random_state() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's generators (the CPU one, and the current CUDA device's when CUDA is
    in use) as they were on entry, however the block ends."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
