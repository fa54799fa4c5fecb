"""One evaluation worker: the method runs it plays, the record of a played task, and
:class:`EvalWorker`, which plays ``(method, task, seed)`` jobs ``concurrency`` at a time in lockstep
(:func:`qlass.lockstep.drive`) on environments it keeps for later episodes. The harness around it
(resume, task selection, executors) is :mod:`qlass.evaluate`, whose docstring lists the
record fields.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from .data import trajectory_to_record
from .envs.base import Env, env_close
from .errors import QlassError
from .lockstep import Episode, drive, run_one
from .policy.base import Policy, ready_policy
from .search import METHODS, SearchContext, ValueModel, method_label, sampling_label
from .types import Task, Trajectory

RECORD_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class MethodRun:
    """One method with its validated config, as evaluated."""

    name: str
    config: Any

    @property
    def label(self) -> str:
        return method_label(self.name, self.config)

    @property
    def sampling_label(self) -> str:
        """The label of what it samples (:func:`~qlass.search.sampling_label`): its episodes' seeds."""
        return sampling_label(self.name, self.config)


def make_record(run: MethodRun, env_name: str, task: Task, traj: Trajectory, wall: float) -> dict[str, Any]:
    """The evaluation record of one played task."""
    meta = traj.meta
    rec = {
        "schema_version": RECORD_SCHEMA_VERSION,
        "method": run.label,
        "method_name": run.name,
        "config": asdict(run.config),
        "env": env_name,
        "split": task.split,
        "task": task.id,
        "task_type": task.task_type,
        "reward": traj.reward,
        "success": traj.success,
        "prompt_tokens": meta.get("prompt_tokens", traj.prompt_tokens),
        "completion_tokens": meta.get("completion_tokens", traj.completion_tokens),
        "qnet_tokens": meta.get("qnet_tokens", sum(s.qnet_tokens for s in traj.steps)),
        "env_steps": meta.get("env_steps", len(traj.steps)),
        "steps": len(traj.steps),
        "wall_time": round(wall, 3),
        "oracle": bool(meta.get("oracle", False)),
        "trajectory": trajectory_to_record(traj, with_steps=True),
    }
    if "decisions" in meta:
        rec["qnet_choices"] = len(meta["decisions"])
    if "trials" in meta:
        rec["trials"] = meta["trials"]
    if "candidates" in meta:
        rec["candidates"] = meta["candidates"]
        rec["oracle_pass_at_n"] = meta["oracle_pass_at_n"]
    return rec


Job = tuple[MethodRun, Task, int]
"""One episode to play: the method, the task and the episode seed."""


class EvalWorker:
    """Plays (method, task) pairs in one worker (executor ``setup``): ``EvalWorker(...)()`` makes the
    policy, QNet and a first environment once; the result plays jobs ``(run, task, seed)`` —
    ``concurrency`` of them at once through its ``stream`` method, or one by calling it.

    ``policy`` and ``qnet`` may be ready objects (local backend) or picklable factories such as
    ``functools.partial(load_policy, path)`` (process and Ray backends); ``make_env`` must be
    picklable for those backends too."""

    def __init__(self, make_env: Callable[[], Env], policy: Policy | Callable[[], Policy],
                 qnet: ValueModel | Callable[[], ValueModel] | None = None, concurrency: int = 1) -> None:
        if concurrency < 1:
            raise QlassError(f"concurrency must be >= 1, got {concurrency}")
        self.make_env, self.policy, self.qnet, self.concurrency = make_env, policy, qnet, concurrency

    def __call__(self) -> _BoundEvalWorker:
        policy = ready_policy(self.policy)
        qnet = self.qnet() if callable(self.qnet) and not hasattr(self.qnet, "score") else self.qnet
        return _BoundEvalWorker(policy, qnet, self.make_env, self.concurrency)


class _BoundEvalWorker:
    def __init__(self, policy: Policy, qnet: ValueModel | None, make_env: Callable[[], Env], concurrency: int) -> None:
        self.policy, self.qnet, self.make_env, self.concurrency = policy, qnet, make_env, concurrency
        self.envs: list[Env] = [make_env()]
        self.free: list[Env] = list(self.envs)

    def _take(self, k: int) -> list[Env]:
        """``k`` idle environments, made when none is idle (kept for later episodes)."""
        taken = []
        for _ in range(k):
            if not self.free:
                self.envs.append(self.make_env())
                self.free.append(self.envs[-1])
            taken.append(self.free.pop())
        return taken

    def _episode(self, job: Job) -> Episode[dict[str, Any]]:
        """One job as a lockstep episode on environments of its own, which it gives back when it ends."""
        run, task, seed = job
        held = self._take(1)

        def pool(k: int) -> list[Env]:
            held.extend(self._take(k - len(held)))
            return held[:k]

        try:
            ctx = SearchContext(env=held[0], policy=self.policy, qnet=self.qnet, make_env=self.make_env, seed=seed,
                                env_pool=pool)
            start = time.perf_counter()
            traj = yield from METHODS[run.name].episode(task, ctx, run.config)
            return make_record(run, held[0].name, task, traj, time.perf_counter() - start)
        finally:
            self.free.extend(held)

    def stream(self, jobs: Iterable[Job]) -> Iterator[tuple[int, dict[str, Any]]]:
        """Play ``jobs``, ``concurrency`` at a time in lockstep, taking the next job only when a slot is
        free; yields ``(position in jobs, record)`` as episodes finish."""
        starters = (functools.partial(self._episode, job) for job in jobs)
        yield from drive(starters, self.policy, self.qnet, self.concurrency)

    def __call__(self, job: Job) -> dict[str, Any]:
        return run_one(self._episode(job), self.policy, self.qnet)

    def close(self) -> None:
        for env in self.envs:
            env_close(env)
