"""Shared fixtures: tiny random models with the default tokenizer (built once per test session)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Tests run in several worker processes (pytest -n): one torch/OpenMP thread each, inherited by
    # the subprocesses the tests start, so workers do not oversubscribe the cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 64-wide random Llama with SmolLM2's tokenizer and chat template."""
    from qlass.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def native_bf16(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Treat this CPU as one with native bf16 kernels, so tests of the bf16 paths run them on any CPU
    (qlass falls back to fp32 on CPUs without; see qlass.precision). The capability check is the
    one thing replaced: a CPU cannot be given an instruction set."""
    import torch

    from qlass import precision

    precision.cpu_runs_bf16.cache_clear()
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    yield
    precision.cpu_runs_bf16.cache_clear()
