"""The files of a decision collection and their consistency: the settings beside a decisions file,
the finished tasks, log-probabilities given alike, and files read together made alike.

``qlass decisions collect`` saves how a file ``NAME.jsonl`` was made as ``NAME.config.yaml``
(:func:`check_settings`, which also refuses a rerun with other settings). The readers that pool
several files — ``decisions report``, ``to-qdata`` and ``cv-head`` — compare those files
(:func:`check_pooled`): decisions valued with another model, K, M, temperature, seed or
environment are not the same measurement, so pooling them is refused unless asked for, and then
recorded. The settings that only choose *which* tasks were played (:data:`POOLABLE_SETTINGS`) may
differ: seen and unseen files, or a second collector's ``--offset``, are meant to be read together.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .config import check_recorded, load_yaml, save_yaml, setting_changes
from .errors import QlassError

log = logging.getLogger(__name__)

RESUMABLE_SETTINGS = ("limit",)
"""Settings that may change between a collection and its resumption, besides the runtime ones."""
POOLABLE_SETTINGS = ("splits", "task_types", "limit", "offset", "exclude_tasks_of")
"""Settings that may differ between decision files read together: they choose tasks, not values."""
REQUIRED_SETTINGS = ("model", "env", "seed", "options", "options.m", "options.k", "options.temperature",
                     "options.rollout_temperature", "options.max_steps", "options.max_new_tokens")
"""What a settings file beside earlier work must record (the options every qlass version has saved):
one emptied or cut by hand (``options: {}``) leaves that work's settings unknown."""


def sidecar(out: Path, suffix: str) -> Path:
    """``NAME.<suffix>`` beside the decisions file ``NAME.jsonl``."""
    return out.with_name(f"{out.stem}.{suffix}")


def check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Refuse to add to ``out`` when it was collected with other settings (naming them,
    :func:`qlass.config.check_recorded`); else save ``settings`` as ``NAME.config.yaml``. Task limits
    and runtime options may change; an option added to DecisionConfig since does not count."""
    path = sidecar(out, "config.yaml")
    started = [f for f in (out, sidecar(out, "tasks.jsonl")) if f.exists() and f.stat().st_size > 0]
    if started:
        check_recorded(path, settings, str(started[0]), RESUMABLE_SETTINGS, "use another output file for these "
                       "settings", required=REQUIRED_SETTINGS)
    save_yaml(path, settings)


def check_pooled(paths: Sequence[str | Path], allow_mixed: bool = False) -> list[str]:
    """Compare the ``NAME.config.yaml`` of every decisions file in ``paths`` with the first one's
    (:data:`POOLABLE_SETTINGS` and runtime options may differ). Files made with other settings are
    refused, naming both files and every difference, unless ``allow_mixed``; then the differences
    are returned (``"file: setting: old → new"``) for the report to state. A file without a
    settings file cannot be compared: a warning names it."""
    if len(paths) < 2:
        return []
    first: tuple[Path, Path, dict[str, Any]] | None = None  # data file, settings file, settings
    unknown: list[str] = []
    found: list[str] = []
    for path in map(Path, paths):
        config = sidecar(path, "config.yaml")
        if not config.exists():
            unknown.append(str(path))
            continue
        settings = load_yaml(config)
        if first is None:
            first = (path, config, settings)
            continue
        changes = setting_changes(first[2], settings, POOLABLE_SETTINGS)
        if changes and not allow_mixed:
            raise QlassError(f"{path} was collected with other settings than {first[0]} ({'; '.join(changes)}; see "
                             f"{config} and {first[1]}): their decisions are not the same "
                             "measurement; read them separately, or pass --allow-mixed-settings to pool them anyway "
                             "(the report then lists the differences)")
        found += [f"{path}: {c}" for c in changes]
    if unknown:
        log.warning("no settings file beside %s, so %s cannot be compared with the other files' settings",
                    ", ".join(unknown), "its collection" if len(unknown) == 1 else "their collections")
    return found


def finished_tasks(out: Path, records: Sequence[dict[str, Any]], done: Sequence[dict[str, Any]]
                   ) -> set[tuple[str, str]]:
    """The (split, task) pairs of ``done`` (``NAME.tasks.jsonl``) whose decisions are all in
    ``records`` (``out``'s): a task whose line counts more decisions than the file holds (lines lost
    or cut by hand) is played again, which finds the missing ones (the play is seeded) and keeps the
    others. A line without a count (older files) is trusted."""
    held = Counter((r["split"], r["task"]) for r in records)
    wanted = {(r["split"], r["task"]): r.get("decisions") for r in done}  # the last line of a task counts
    lost = {key: n for key, n in wanted.items() if n is not None and held[key] < n}
    for (split, task), n in lost.items():
        log.warning("decisions: %s holds %d of the %d decisions that %s records for task %s (%s); the task is "
                    "played again to find the missing ones", out, held[split, task], n, sidecar(out, "tasks.jsonl"),
                    task, split)
    return set(wanted) - set(lost)


def check_logprobs(task: str, step: int, values: Sequence[float | None]) -> None:
    """Refuse, before any rollout is spent, a decision whose candidates' log-probabilities ``values``
    the decision readers would refuse: they need a finite number <= 0 for every candidate, or none."""
    if all(v is None for v in values) or all(v is not None and -math.inf < v <= 0 for v in values):
        return
    raise QlassError(f"decisions: at task {task} step {step} the policy gave the candidates log-probabilities "
                     f"{list(values)}; a decision needs a finite number <= 0 for every candidate, or none (a server "
                     "that leaves them out for some choices: run it with logprobs=false)")


def check_logprobs_alike(out: Path, records: Sequence[dict[str, Any]], given: bool | None,
                         found: Iterable[tuple[str, int, bool]]) -> bool | None:
    """Refuse, before their rollouts, new decisions ``found`` (task, step, whether its candidates
    have log-probabilities) that differ there from the file's first decision (``records[0]``, or the
    first found; ``given``: whether it has them, None: no decision yet): the readers refuse such a
    file, since the likelihood rankers would drop out of part of it. Returns the updated ``given``."""
    for task, step, has in found:
        if given is None:
            given = has
        elif has != given:
            first = (f"{out}'s first decision ({records[0]['task']} step {records[0]['step']})" if records
                     else "the first decision of this run")
            raise QlassError(f"decisions: at task {task} step {step} the policy gave "
                             f"{'log-probabilities' if has else 'no log-probabilities'} but {first} has "
                             f"{'none' if has else 'them'}; a decisions file needs them in every decision or in none "
                             "(a server that gives them for some requests only: run it with logprobs=false)")
    return given
