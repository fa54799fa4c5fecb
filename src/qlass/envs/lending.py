"""Environments lent to a run's episodes one at a time (:class:`EnvPool`), as decision collection plays and rolls out
many episodes over a few environments; ``qlass serve``'s own pool of instances is :mod:`qlass.serve_pool`."""

from __future__ import annotations

from collections.abc import Callable

from .base import Env, env_close


class EnvPool:
    """Environments lent to episodes one at a time; made on first need, kept for reuse, closed together."""

    def __init__(self, make_env: Callable[[], Env]) -> None:
        self.make_env = make_env
        self.free: list[Env] = []
        self.made: list[Env] = []

    def take(self) -> Env:
        if not self.free:
            self.made.append(self.make_env())
            self.free.append(self.made[-1])
        return self.free.pop()

    def give(self, env: Env) -> None:
        self.free.append(env)

    def name(self) -> str:
        env = self.take()
        self.give(env)
        return env.name

    def close(self) -> None:
        for env in self.made:
            env_close(env)
