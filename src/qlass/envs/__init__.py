"""Text environments: the :class:`~qlass.envs.base.Env` protocol and a registry by name."""

from .base import FORMAT_HINT, Env, make_env, parse_action, register_env, registered_envs

__all__ = ["Env", "FORMAT_HINT", "make_env", "parse_action", "register_env", "registered_envs"]
