"""What a training call leaves as it found it in the caller's process: transformers' ``Trainer`` seeds Python's,
NumPy's and torch's generators (``set_seed``), so a library call left a caller's later draws at those after the
run's seed, whatever the caller had seeded; and a config's ``threads`` set torch's thread count for good."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np


@contextlib.contextmanager
def keeping_caller_state() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's generators (the CPU one, and the current CUDA device's when CUDA is
    in use) and torch's thread count as they were on entry, however the block ends. It imports torch: a trainer
    enters it once its data and options are checked."""
    import torch

    py_state, np_state, threads = random.getstate(), np.random.get_state(), torch.get_num_threads()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
