"""Expert trajectories for SFT, built from an environment's expert outputs and verified by replay.

For every task, ``env.expert(task)`` gives ``Thought: ...\\nAction: ...`` outputs; they are played
through the same episode loop the agent uses (:mod:`qlass.agent`), so the conversation layout is
exactly what the policy sees later. A trajectory is kept only if its replay reaches reward 1.0;
the others are excluded and reported (count and ids), never silently dropped.

Long exports can keep a progress file (JSON Lines, one finished task per line): a rerun after a
crash reuses the tasks recorded there and verifies only the rest. Each line records what decided
its result (environment, options, split, ``max_steps``); a rerun with other ones is refused.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import Progress

from .agent import apply_output, finish, start_messages
from .console import stderr_console
from .data import record_to_trajectory, trajectory_to_record
from .envs.base import Env, check_tasks, env_expert, env_label
from .errors import QlassError
from .jsonl import append_jsonl, is_count, read_jsonl
from .recorded import check_recorded
from .types import Completion, Step, Task, Trajectory

log = logging.getLogger(__name__)


@dataclass
class ExpertExport:
    """Verified expert trajectories plus the tasks that were left out and why."""

    trajectories: list[Trajectory] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)


def replay_expert(env: Env, task: Task, outputs: Sequence[str]) -> Trajectory:
    """Play ``outputs`` on ``task`` from reset; the trajectory as the agent loop would record it."""
    messages = start_messages(env, task)
    steps: list[Step] = []
    for text in outputs:
        apply_output(env, messages, steps, Completion(text, 0, 0))
        if steps[-1].done:
            break
    typed = {"task_type": task.task_type} if task.task_type else {}  # what limited supervision spreads over
    return finish(task, messages, steps, source="expert", **typed)


def verify_expert(env: Env, task: Task, max_steps: int | None = None) -> tuple[Trajectory | None, str]:
    """The verified expert trajectory of ``task``, or ``None`` and the reason it was excluded."""
    outputs = env_expert(env, task)
    if not outputs:
        return None, "no expert trajectory"
    limits = [(max_steps, f"max {max_steps}")] if max_steps is not None else []
    env_limit = getattr(env, "step_limit", None)
    if isinstance(env_limit, int):
        limits.append((env_limit, f"the env's step limit {env_limit} (raise step_limit)"))
    cap, why = min(limits, key=lambda kept: kept[0]) if limits else (len(outputs), "")
    # a gold path may go on after the task is done (ScienceWorld's): only what the limit allows is played
    traj = replay_expert(env, task, outputs[:cap])
    if not traj.success and len(outputs) > cap:
        return None, f"expert needs {len(outputs)} steps > {why}, and its first {cap} do not finish the task"
    if not traj.success:
        return None, f"replay ended with reward {traj.reward:.2f} after {len(traj.steps)} steps"
    return traj, ""


def _made_with(env: Env, max_steps: int | None, env_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """What decides a task's result besides the task: the environment (its class as
    ``module:Class``), its constructor options as read back from the instance (those with
    plain values) and as given (``env_kwargs``: an option the instance keeps under another name, such
    as WebShop's ``seed``, cannot be read back), and ``max_steps``. A progress record adds the task's
    split."""
    cls = type(env)
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}
    options = {}
    for name in params:
        value = getattr(env, name, getattr(env, f"_{name}", None))
        if isinstance(value, (str, int, float, bool)):
            options[name] = value
    return {"env": env_label(env), "env_args": {**options, **(env_kwargs or {})}, "max_steps": max_steps}


def _load_progress(path: Path | None, made_with: dict[str, Any], splits: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Finished tasks recorded in ``path``; a record made with other settings (environment, its
    options, the task's split, ``max_steps``: see :func:`_made_with`) is refused, naming them."""
    if path is None:
        return {}
    done = {}
    for rec in read_jsonl(path, repair_tail=True):
        recorded = {k: rec.get(k) for k in ("env", "env_args", "max_steps", "split") if k in rec}
        now = {**made_with, "split": splits.get(rec.get("task"), rec.get("split"))}
        check_recorded(path, now, f"the unfinished expert export (its task {rec.get('task')!r})",
                       advice="rerun with the same settings, or delete that progress file to start over",
                       recorded={"env_args": {}, "max_steps": None, **recorded})
        done[rec["task"]] = rec
    return done


def adopt_finished(finished: Path, progress: Path, env: Env, tasks: Sequence[Task], max_steps: int | None = None,
                   env_kwargs: dict[str, Any] | None = None) -> None:
    """Make ``finished`` (the progress record of a finished export) the progress file of a new export of
    ``tasks`` when it was made with the same settings (see :func:`export_expert`), so that its tasks are not
    replayed again; remove it otherwise (other settings replay every task, as a first export does)."""
    try:
        _load_progress(finished, _made_with(env, max_steps, env_kwargs), {t.id: t.split for t in tasks})
    except QlassError as exc:
        log.info("other settings than the finished export's: every task is replayed")
        log.debug("the finished export's record: %s", exc)
        finished.unlink()
        return
    os.replace(finished, progress)


def _check_arguments(tasks: Sequence[Task], per_task_type: int | None, max_steps: int | None) -> None:
    """Tasks as Task objects and limits of at least 1 (or None): ``max_steps=0`` excluded every task as too long,
    ``per_task_type=-1`` kept none, ``True`` counted as 1 and NaN as no limit, all silently."""
    for name, value in (("per_task_type", per_task_type), ("max_steps", max_steps)):
        if value is not None and not is_count(value, 1):
            raise QlassError(f"export_expert: {name} must be a whole number >= 1 or None, got {value!r}")
    check_tasks(tasks, "export_expert")
    if not tasks:
        log.warning("export_expert: no tasks given; nothing to export")


def export_expert(
    env: Env,
    tasks: Sequence[Task],
    per_task_type: int | None = None,
    max_steps: int | None = None,
    *,
    progress_file: str | Path | None = None,
    env_kwargs: dict[str, Any] | None = None,
) -> ExpertExport:
    """Verified expert trajectories for ``tasks``: at most ``per_task_type`` per task type (taking
    tasks in order, skipping excluded ones), each at most ``max_steps`` actions long.

    With ``progress_file``, every finished task is appended there and reused by a later call made
    with the same environment class, constructor options (``env_kwargs``: those ``env`` was built
    with), split and ``max_steps`` (recorded with each task); a call with others is refused, naming them.
    """
    _check_arguments(tasks, per_task_type, max_steps)
    path = Path(progress_file) if progress_file is not None else None
    made_with = _made_with(env, max_steps, env_kwargs)
    done = _load_progress(path, made_with, {t.id: t.split for t in tasks})
    if done:
        log.info("resuming expert export: %d tasks already done in %s", len(done), path)
    out = ExpertExport()
    kept: dict[str, int] = {}
    with Progress(transient=True, console=stderr_console()) as bar:  # stdout is for results
        job = bar.add_task("expert replay", total=len(tasks))
        for task in tasks:
            bar.advance(job)
            if per_task_type is not None and kept.get(task.task_type, 0) >= per_task_type:
                continue
            if task.id in done:
                rec = done[task.id]
                traj = record_to_trajectory(rec["trajectory"]) if rec.get("trajectory") else None
                why = rec.get("excluded", "")
            else:
                traj, why = verify_expert(env, task, max_steps)
                if path is not None:
                    append_jsonl(path, {"task": task.id, **made_with, "split": task.split, "excluded": why,
                                        "trajectory": trajectory_to_record(traj) if traj else None})
            if traj is None:
                out.excluded[task.id] = why
                continue
            out.trajectories.append(traj)
            kept[task.task_type] = kept.get(task.task_type, 0) + 1
    types = dict.fromkeys(t.task_type for t in tasks)
    short = [t for t in types if per_task_type is not None and kept.get(t, 0) < per_task_type]
    if short:
        log.warning("fewer than %d verified trajectories for task type(s): %s", per_task_type, ", ".join(short))
    return out
