"""The evaluation harness: methods × tasks → per-task records, resumable after a crash.

Each finished (method, task) appends one record to ``records.jsonl`` in the run folder (whole-line
appends, fsynced); a rerun skips the (method, env, split, task) keys already recorded and a torn
last line is cut, so killing and rerunning never duplicates or loses finished work. Record fields:
``method`` (label), ``method_name``, ``config``, ``env``, ``split``, ``task``, ``reward``,
``success``, ``prompt_tokens``, ``completion_tokens``, ``qnet_tokens``, ``env_steps``,
``wall_time``, ``oracle`` and ``trajectory`` (the conversation record) plus ``candidates`` for
best-of-n.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .data import trajectory_to_record
from .envs.base import Env
from .jsonl import append_jsonl, read_jsonl
from .search import METHODS, SearchContext, ValueModel, method_label
from .policy.base import Policy
from .errors import QlassError
from .types import Task

log = logging.getLogger(__name__)

RECORD_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class MethodRun:
    """One method with its validated config, as evaluated."""

    name: str
    config: Any

    @property
    def label(self) -> str:
        return method_label(self.name, self.config)


def stable_seed(*parts: object) -> int:
    """A seed from text parts that is the same in every process (unlike Python's ``hash``)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def select_tasks(tasks: Sequence[Task], limit: int | None) -> list[Task]:
    """At most ``limit`` tasks, taken round-robin over task types (in order) so every type is
    represented; all tasks when ``limit`` is None."""
    if limit is None or limit >= len(tasks):
        return list(tasks)
    by_type: dict[str, list[Task]] = {}
    for t in tasks:
        by_type.setdefault(t.task_type, []).append(t)
    picked: list[Task] = []
    queues = [list(reversed(q)) for q in by_type.values()]
    while len(picked) < limit:
        for q in queues:
            if q and len(picked) < limit:
                picked.append(q.pop())
    return picked


def record_key(rec: dict[str, Any]) -> tuple[str, str, str, str]:
    return (rec["method"], rec["env"], rec["split"], rec["task"])


def make_record(run: MethodRun, env_name: str, task: Task, traj, wall: float) -> dict[str, Any]:
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
    if "candidates" in meta:
        rec["candidates"] = meta["candidates"]
        rec["oracle_pass_at_n"] = meta["oracle_pass_at_n"]
    return rec


def evaluate(
    env: Env,
    tasks: Sequence[Task],
    runs: Iterable[MethodRun],
    policy: Policy,
    out_dir: Path,
    qnet: ValueModel | None = None,
    make_env: Callable[[], Env] | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Run every method on every task, appending to ``out_dir/records.jsonl``; returns all records
    (earlier ones included) for these methods and tasks."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "records.jsonl"
    records = read_jsonl(path, repair_tail=True)
    done = {record_key(r) for r in records}
    runs = list(runs)
    todo = [(run, t) for run in runs for t in tasks if (run.label, env.name, t.split, t.id) not in done]
    if len(todo) < len(runs) * len(tasks):
        log.info("resuming: %d of %d (method, task) pairs already in %s",
                 len(runs) * len(tasks) - len(todo), len(runs) * len(tasks), path)
    columns = (TextColumn("[bold]eval[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("avg reward {task.fields[avg]:.3f}"))
    with Progress(*columns, transient=False) as progress:
        bar = progress.add_task("", total=len(todo), avg=0.0)
        total = 0.0
        for i, (run, task) in enumerate(todo, start=1):
            progress.update(bar, description=f"{run.label} {task.id}")
            ctx = SearchContext(env=env, policy=policy, qnet=qnet, make_env=make_env,
                                seed=stable_seed(seed, run.label, task.id))
            start = time.perf_counter()
            traj = METHODS[run.name].run(task, ctx, run.config)
            rec = make_record(run, env.name, task, traj, time.perf_counter() - start)
            append_jsonl(path, rec)
            records.append(rec)
            total += rec["reward"]
            progress.update(bar, advance=1, avg=total / i)
    wanted = {(run.label, env.name, t.split, t.id) for run in runs for t in tasks}
    return [r for r in records if record_key(r) in wanted]


def run_evaluation(
    model: str,
    env_spec: str,
    splits: Sequence[str],
    methods: Sequence[tuple[str, dict[str, Any]]],
    out_dir: Path,
    env_kwargs: dict[str, Any] | None = None,
    task_types: Sequence[str] | None = None,
    limit: int | None = None,
    qnet_dir: Path | None = None,
    policy_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Load policy, QNet and environment, evaluate every method on every split, write the report.

    Returns the summary rows (see :func:`qlass.report.summarise`).
    """
    from .envs.base import make_env
    from .policy import load_policy
    from .report import write_report
    from .search import make_method_config

    runs = [MethodRun(name, make_method_config(name, opts)) for name, opts in methods]
    needs_qnet = [r.label for r in runs if METHODS[r.name].needs_qnet(r.config)]
    qnet = None
    if needs_qnet:
        if qnet_dir is None:
            raise QlassError(f"method(s) {', '.join(needs_qnet)} need a QNet: pass --qnet DIR")
        from .qnet import QNet

        qnet = QNet.load(qnet_dir)
    policy = load_policy(model, **(policy_kwargs or {}))
    env_kwargs = dict(env_kwargs or {})
    env = make_env(env_spec, **env_kwargs)
    try:
        records: list[dict[str, Any]] = []
        for split in splits:
            tasks = select_tasks(env.tasks(split, task_types), limit)
            if not tasks:
                raise QlassError(f"{env_spec}: no tasks in split {split!r} for task types {task_types}")
            records += evaluate(env, tasks, runs, policy, out_dir, qnet=qnet,
                                make_env=lambda: make_env(env_spec, **env_kwargs), seed=seed)
    finally:
        env.close()
    return write_report(records, out_dir)
