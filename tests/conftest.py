"""Shared fixtures: tiny random models with the default tokenizer (built once per test session)."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Tests run in several worker processes (pytest -n): one torch/OpenMP thread each, inherited by
    # the subprocesses the tests start, so workers do not oversubscribe the cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _keep_freed_memory() -> None:
    """Have glibc keep freed memory for reuse, in this process and in those the tests start.

    By default glibc hands every freed block above 32 MB back to the kernel, and the next allocation
    faults its pages in again, zeroed. The tiny test model's logits over SmolLM2's 49,152-token
    vocabulary are such blocks, so about half of each training step went to page faults: the DPO
    tests take 94 s on 2 cores by default and 55 s with this (tests/test_dpo.py, -n 2). Nothing a test
    checks depends on it. It is a setting of the test processes only: qlass leaves the allocator as it is."""
    tunables = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184"
    if "GLIBC_TUNABLES" not in os.environ:
        os.environ["GLIBC_TUNABLES"] = tunables  # read by each new process at its start
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt's parameter numbers (malloc.h)
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, ctypes.c_int(2**31 - 1))


_keep_freed_memory()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 64-wide random Llama with SmolLM2's tokenizer and chat template."""
    from qlass.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def native_bf16(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Treat this CPU as one with native bf16 kernels, so tests of the bf16 paths run them on any CPU
    (qlass falls back to fp32 on CPUs without, or where bf16 is slower; see qlass.precision). The
    capability check and the speed verdict are the things replaced: a CPU cannot be given an
    instruction set or faster bf16 kernels."""
    import torch

    from qlass import precision

    precision.cpu_runs_bf16.cache_clear()
    monkeypatch.delenv(precision.ENV_VAR, raising=False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(precision, "cpu_bf16_is_faster", lambda: (True, "a stand-in for a CPU where bf16 is faster"))
    yield
    precision.cpu_runs_bf16.cache_clear()
