"""Shared fixtures: tiny random models with the default tokenizer (built once per test session)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 64-wide random Llama with SmolLM2's tokenizer and chat template."""
    from qlass.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
