"""The batch-first policy protocol.

``sample(histories, n, ...)`` returns, for each history, ``n`` completions produced from one shared
prefill of that history (never n separate calls). ``temperature == 0`` is greedy decoding (then the
``n`` completions are identical and backends may compute one and copy it). Given the same ``seed``,
a backend returns the same completions. ``seed`` may be one int or a list with one base seed per
history; with a list, a history's completions do not depend on which other histories share the
call (what lockstep play relies on, :mod:`qlass.lockstep`).

A backend may also offer ``sample_jobs(jobs)``: one call for histories that each want their own
``n``, temperature and token limit (:class:`SampleJob`), answered as ``sample`` would answer each
alone. Lockstep play uses it to decode a whole wave of mixed requests in one batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ..types import Completion, History


@dataclass(frozen=True)
class SampleJob:
    """One history of a mixed call: ``n`` completions at ``temperature`` of at most ``max_new_tokens``,
    from base seed ``seed`` (``None``: the policy's own unseeded draw)."""

    history: History
    n: int
    temperature: float
    max_new_tokens: int
    seed: int | None = None


@runtime_checkable
class Policy(Protocol):
    """Anything that turns conversations into sampled agent outputs with token accounting."""

    def sample(
        self,
        histories: Sequence[History],
        n: int = 1,
        temperature: float = 0.0,
        max_new_tokens: int = 128,
        seed: int | Sequence[int] | None = None,
    ) -> list[list[Completion]]:
        """``n`` completions per history; each is one ``Thought: ...\\nAction: ...`` output."""


def check_sample_args(n: int, temperature: float, max_new_tokens: int) -> None:
    """A ValueError unless ``n >= 1``, ``temperature >= 0`` and ``max_new_tokens >= 1`` (a sample request's)."""
    if n < 1 or temperature < 0 or max_new_tokens < 1:
        raise ValueError(f"need n >= 1, temperature >= 0, max_new_tokens >= 1 (got {n}, {temperature}, "
                         f"{max_new_tokens})")


def check_policy_argument(policy: Any, where: str) -> None:
    """Raise ``TypeError`` naming ``where`` when ``policy`` is a model's path or name rather than a policy or a
    factory of one (was "'str' object is not callable" from the first tree)."""
    if isinstance(policy, (str, os.PathLike)):
        raise TypeError(f"{where}: argument 'policy' must be a policy or a factory of one, got {policy!r:.80}; load "
                        "a model folder, 'default' or a server URL with qlass.policy.load_policy(...)")


def ready_policy(policy: Policy | Callable[[], Policy]) -> Policy:
    """``policy`` itself, or what it makes when it is a factory (as executors' workers receive it)."""
    if isinstance(policy, Policy) and not isinstance(policy, type):
        return policy
    return policy()  # type: ignore[operator]
