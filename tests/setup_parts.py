"""What the test setup provides (``bash scripts/setup.sh --test``, with ``../shared`` beside the checkout, as
CI has it): a test that needs a part that is missing fails, saying how to get it, rather than being skipped
(a skip would hide a broken install)."""

from __future__ import annotations

import importlib
import shutil
from types import ModuleType

import pytest

SETUP = "run `bash scripts/setup.sh --test`"


def installed(module: str) -> ModuleType:
    """``module``, imported; the test fails when the setup did not install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(f"needs {module} ({exc}): {SETUP}", pytrace=False)


def shared_data(present: bool, what: str) -> None:
    """Fail unless ``present``: ``what`` (data kept in ``../shared/data`` beside the checkout) is there."""
    if not present:
        pytest.fail(f"needs {what}: put the shared folder beside the checkout (../shared/data), as CI has it",
                    pytrace=False)


def java() -> None:
    """Fail unless a Java runtime is on the PATH (ScienceWorld's simulator)."""
    if shutil.which("java") is None:
        pytest.fail(f"needs Java: {SETUP}", pytrace=False)
