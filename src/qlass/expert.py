"""Expert trajectories for SFT, built from an environment's expert outputs and verified by replay.

For every task, ``env.expert(task)`` gives ``Thought: ...\\nAction: ...`` outputs; they are played
through the same episode loop the agent uses (:mod:`qlass.agent`), so the conversation layout is
exactly what the policy sees later. A trajectory is kept only if its replay reaches reward 1.0;
the others are excluded and reported (count and ids), never silently dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

from rich.progress import Progress

from .agent import apply_output, finish, start_messages
from .envs.base import Env
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
    return finish(task, messages, steps, source="expert")


def export_expert(
    env: Env,
    tasks: Sequence[Task],
    per_task_type: int | None = None,
    max_steps: int | None = None,
) -> ExpertExport:
    """Verified expert trajectories for ``tasks``: at most ``per_task_type`` per task type (taking
    tasks in order, skipping excluded ones), each at most ``max_steps`` actions long."""
    out = ExpertExport()
    kept: dict[str, int] = {}
    with Progress(transient=True) as progress:
        bar = progress.add_task("expert replay", total=len(tasks))
        for task in tasks:
            progress.advance(bar)
            if per_task_type is not None and kept.get(task.task_type, 0) >= per_task_type:
                continue
            outputs = env.expert(task)
            if not outputs:
                out.excluded[task.id] = "no expert trajectory"
                continue
            if max_steps is not None and len(outputs) > max_steps:
                out.excluded[task.id] = f"expert needs {len(outputs)} steps > max {max_steps}"
                continue
            traj = replay_expert(env, task, outputs)
            if not traj.success:
                out.excluded[task.id] = f"replay ended with reward {traj.reward:.2f} after {len(traj.steps)} steps"
                continue
            out.trajectories.append(traj)
            kept[task.task_type] = kept.get(task.task_type, 0) + 1
    short = [t for t, n in kept.items() if per_task_type is not None and n < per_task_type]
    if short:
        log.warning("fewer than %d verified trajectories for task type(s): %s", per_task_type, ", ".join(short))
    return out
