"""The code's own rules, checked on every run: ruff finds nothing (unused imports and names, undefined
names, import order, lines over 120 characters: ``[tool.ruff.lint]`` in pyproject.toml), and no module of
the package is longer than 400 lines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_MODULE_LINES = 400


def test_ruff_finds_nothing() -> None:
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "src", "tests", "benchmarks"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]


def test_no_module_is_longer_than_400_lines() -> None:
    long = {str(path.relative_to(ROOT)): n for path in sorted((ROOT / "src").rglob("*.py"))
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long, f"split these modules (lines): {long}"
