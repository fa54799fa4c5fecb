"""The agent's own episodes on a split's tasks, played through the evaluation harness (the RFT
baseline's samples, the ETO baseline's exploration).

:func:`play_split` is :func:`qlass.evaluate.evaluate` on the tasks of one split: episodes run in
lockstep, each seeded by the run seed, its method label and its task, and ``records.jsonl`` in the
output folder resumes after a crash (a rerun with other settings is refused, naming them).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from .errors import QlassError
from .eval_worker import EvalWorker, MethodRun
from .evaluate import cache_for, evaluate, live_histories, select_tasks, split_tasks

log = logging.getLogger(__name__)

TASK_SOURCES = ("expert", "split")
"""Which tasks a baseline plays: those of its expert data, or its split's."""


def play_split(
    model: str,
    env_spec: str,
    out_dir: Path,
    runs: Sequence[MethodRun],
    split: str,
    limit: int | None,
    env_kwargs: dict[str, Any] | None,
    task_types: Sequence[str] | None,
    policy_kwargs: dict[str, Any] | None,
    seed: int,
    backend: str,
    workers: int,
    concurrency: int,
    policy: Any = None,
    what: str = "playing",
    only: Collection[str] | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Play every run of ``runs`` on each task of ``split`` (``limit`` of them, round-robin over task
    types; with ``only``, of the split's tasks whose id it holds, e.g. the expert data's) with the agent
    ``model``; records go to ``out_dir/records.jsonl`` (resumable). ``policy``:
    a ready policy or a picklable factory to play with instead of ``load_policy(model,
    **policy_kwargs)`` (``model`` then only names it in ``config.yaml``); ``what`` starts the log line.
    Returns the records of these
    runs and tasks, and the task ids in order."""
    from .envs.base import env_maker
    from .executor import make_executor
    from .policy import load_policy

    if concurrency < 1:
        raise QlassError(f"concurrency must be >= 1, got {concurrency}")
    policy_kwargs = dict(policy_kwargs or {})
    if policy is None:
        policy_kwargs = cache_for(model, policy_kwargs, concurrency * max(map(live_histories, runs)))
        policy = functools.partial(load_policy, model, **policy_kwargs)
    make = env_maker(env_spec, **dict(env_kwargs or {}))
    if only is None:
        env_name, tasks = split_tasks(make, env_spec, [split], task_types, limit)
    else:
        env_name, every = split_tasks(make, env_spec, [split], task_types, None)
        tasks = select_tasks([t for t in every if t.id in only], limit)
        if not tasks:
            raise QlassError(f"{env_spec}: none of the {len(only)} given tasks is in split {split!r} "
                             f"(task types {list(task_types or []) or 'all'})")
    settings = {
        "model": model, "qnet": None, "env": env_spec, "env_args": dict(env_kwargs or {}), "splits": [split],
        "task_types": list(task_types or []) or None, "limit": limit, "tasks": {split: len(tasks)},
        "policy": policy_kwargs, "backend": backend, "workers": workers, "concurrency": concurrency,
    }
    log.info("%s: %d episode(s) on each of %d %s tasks → %s", what, len(runs), len(tasks), split, out_dir)
    worker = EvalWorker(make, policy, None, concurrency)
    records = evaluate(env_name, tasks, runs, worker, out_dir, seed=seed, executor=make_executor(backend, workers),
                       settings=settings)
    return records, [t.id for t in tasks]
