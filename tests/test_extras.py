"""Missing optional dependencies and unknown environments give actionable messages."""

from __future__ import annotations

import pytest

from qlass.envs.base import make_env, registered_envs
from qlass.errors import MissingExtraError, QlassError, require


def test_missing_extra_names_the_pip_command() -> None:
    with pytest.raises(MissingExtraError, match=r"pip install 'qlass\[sciworld\]'"):
        require("surely_not_an_installed_module", "sciworld")


def test_unknown_environment_lists_the_known_ones() -> None:
    with pytest.raises(QlassError, match="unknown environment 'nope'; known: .*sciworld"):
        make_env("nope")
    with pytest.raises(QlassError, match="cannot load environment 'no_such_module:Env'"):
        make_env("no_such_module:Env")
    assert {"sciworld", "alfworld", "webshop"} <= set(registered_envs())
