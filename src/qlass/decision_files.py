"""The files of a decision collection and their consistency: each decision record checked
(:func:`check_decision`, :func:`read_decisions`), the settings beside a decisions file, the
finished tasks, log-probabilities given alike, and files read together made alike.

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

import numpy as np

from .candidates import normalise_action
from .config import load_yaml, save_yaml
from .config_fields import require_paths
from .envs.base import REWARD_SLACK
from .errors import DataError, MissingFileError, QlassError
from .file_checks import check_output_file, refuse_repeated_inputs
from .file_kinds import other_kind
from .jsonl import is_count, read_numbered_jsonl
from .recorded import check_recorded, records_setting, setting_changes, with_model_files
from .tree import ROLES

log = logging.getLogger(__name__)

DECISIONS_SCHEMA_VERSION = 1
MAX_CANDIDATES = 1000
"""Candidates a decision may have, plus one: Q-data node ids are step * MAX_CANDIDATES + candidate + 1
(:mod:`qlass.decision_head`)."""
RESUMABLE_SETTINGS = ("limit",)
"""Settings that may change between a collection and its resumption, besides the runtime ones."""
POOLABLE_SETTINGS = ("splits", "task_types", "limit", "offset", "exclude_tasks_of", "model_files")
"""Settings that may differ between decision files read together: they choose tasks, not values (or, for
``model_files``, tell copies of one model on several collectors' machines apart)."""
REQUIRED_SETTINGS = ("model", "env", "seed", "options", "options.m", "options.k", "options.temperature",
                     "options.rollout_temperature", "options.max_steps", "options.max_new_tokens")
"""What a settings file beside earlier work must record (the options every qlass version has saved):
one emptied or cut by hand (``options: {}``) leaves that work's settings unknown."""


def sidecar(out: Path, suffix: str) -> Path:
    """``NAME.<suffix>`` beside the decisions file ``NAME.jsonl``."""
    return out.with_name(f"{out.stem}.{suffix}")


def check_settings(out: Path, settings: dict[str, Any], save: bool = True) -> None:
    """Refuse to add to ``out`` when it was collected with other settings (naming them,
    :func:`qlass.recorded.check_recorded`); else (with ``save``) save ``settings`` as ``NAME.config.yaml``.
    Task limits and runtime options may change; an option added to DecisionConfig since does not count."""
    path = sidecar(out, "config.yaml")
    check_output_file(path)  # a named pipe there would block the read
    settings = with_model_files(settings)
    started = [f for f in (out, sidecar(out, "tasks.jsonl")) if f.exists() and f.stat().st_size > 0]
    if started:
        check_recorded(path, settings, str(started[0]), RESUMABLE_SETTINGS, "use another output file for these "
                       "settings", required=REQUIRED_SETTINGS)
    if save:
        save_yaml(path, settings)


def greedy_rollouts(paths: Sequence[str | Path]) -> bool:
    """Whether every file of ``paths`` records greedy rollouts (``rollout_temperature: 0`` in its
    ``NAME.config.yaml``): then each candidate's rollouts are one rollout copied."""
    paths = require_paths(paths, "greedy_rollouts", "paths")
    for path in map(Path, paths):
        config = sidecar(path, "config.yaml")
        if not config.is_file():
            return False
        settings = load_yaml(config)
        options = settings.get("options") if isinstance(settings, dict) else None
        if not isinstance(options, dict) or options.get("rollout_temperature") != 0:
            return False
    return bool(paths)


def check_pooled(paths: Sequence[str | Path], allow_mixed: bool = False) -> list[str]:
    """Compare the ``NAME.config.yaml`` of every decisions file in ``paths`` with the first one's
    (:data:`POOLABLE_SETTINGS` and runtime options may differ). Files made with other settings are
    refused, naming both files and every difference, unless ``allow_mixed``; then the differences
    are returned (``"file: setting: old → new"``) for the report to state. A file without a
    settings file cannot be compared: a warning names it."""
    paths = require_paths(paths, "check_pooled", "paths")
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
        check_output_file(config)  # a named pipe there would block the read
        settings = load_yaml(config)
        missing = [k for k in REQUIRED_SETTINGS if not records_setting(settings, k)]
        if missing and not allow_mixed:
            raise QlassError(f"{config} does not record {', '.join(map(repr, missing))}, so the settings of {path} "
                             "cannot be compared with the other files'; restore the file (or pass "
                             "--allow-mixed-settings to pool the decisions anyway)")
        found += [f"{path}: does not record {k!r}" for k in missing]
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


REWARDS = (-REWARD_SLACK, 1.0 + REWARD_SLACK)
"""The range a recorded reward or value may take: [0, 1], give or take rounding (as the other readers allow)."""


def _number(value: Any, low: float, high: float) -> bool:
    """Whether ``value`` is a finite real number (not a bool) within ``[low, high]``."""
    real = isinstance(value, (int, float)) and not isinstance(value, bool)
    return real and math.isfinite(value) and low <= value <= high


def check_decision(path: Path, line: int, rec: Any) -> None:
    """Raise :class:`DataError` naming the record and field of a decision record that a ranker, the
    Q-data export or a resumed collection could not read, or that holds an impossible value."""
    if not isinstance(rec, dict):
        raise DataError(str(path), f"a decision record is a JSON object, got {type(rec).__name__}", line=line)
    other = other_kind(rec, "decisions")
    if other is not None:
        raise DataError(str(path), f"this is {other}, not a decisions file (qlass decisions collect)", line=line)
    rid = f"{rec.get('task')}@{rec.get('step')}"
    version = rec.get("schema_version")
    if type(version) is not int or version != DECISIONS_SCHEMA_VERSION:
        raise DataError(str(path), f"field 'schema_version' must be {DECISIONS_SCHEMA_VERSION}, got "
                        f"{rec.get('schema_version')!r} (not a decision file, or one from another version)",
                        line=line, record_id=rid)
    for name, kind in (("env", str), ("split", str), ("task", str), ("history", list), ("candidates", list)):
        if not isinstance(rec.get(name), kind):
            raise DataError(str(path), f"field {name!r} missing or not a {kind.__name__}", line=line, record_id=rid)
    step = rec.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise DataError(str(path), f"field 'step' must be an integer >= 0, got {step!r}", line=line, record_id=rid)
    if not 2 <= len(rec["candidates"]) < MAX_CANDIDATES:
        raise DataError(str(path), f"field 'candidates': a decision needs 2 to {MAX_CANDIDATES - 1}, got "
                        f"{len(rec['candidates'])}", line=line, record_id=rid)
    for k, m in enumerate(rec["history"]):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise DataError(str(path), f"field 'history[{k}]': a message needs 'role' ({', '.join(ROLES)}) and "
                            "'content' (a string)", line=line, record_id=rid)
    if not any(m["role"] != "assistant" for m in rec["history"]):
        raise DataError(str(path), "field 'history' holds no system or user message (the state a decision is made "
                        "in starts with the task)", line=line, record_id=rid)
    for j, c in enumerate(rec["candidates"]):
        if not isinstance(c, dict):
            raise DataError(str(path), f"field 'candidates[{j}]' must be an object, got {type(c).__name__}",
                            line=line, record_id=rid)
        for name, ok, expected in (
                ("output", isinstance(c.get("output"), str), "a string"),
                ("action", c.get("action") is None or isinstance(c["action"], str), "null or a string"),
                ("mean", _number(c.get("mean"), *REWARDS), "a number in [0, 1]"),
                ("std", c.get("std") is None or _number(c.get("std"), 0.0, 0.5 + REWARD_SLACK),
                 "null or a number in [0, 0.5] (the spread of rewards in [0, 1])"),
                ("terminal", isinstance(c.get("terminal"), bool), "true or false"),
                ("anchor", isinstance(c.get("anchor"), bool), "true or false"),
                ("logprob", c.get("logprob") is None or _number(c.get("logprob"), -float("inf"), 0.0),
                 "null or a finite number <= 0"),
                ("mean_logprob", c.get("mean_logprob") is None or _number(c.get("mean_logprob"), -float("inf"), 0.0),
                 "null or a finite number <= 0"),
                ("rollout_rewards", c.get("rollout_rewards") is None or (
                    isinstance(c["rollout_rewards"], list) and all(_number(r, *REWARDS) for r in c["rollout_rewards"])),
                 "null or a list of numbers in [0, 1]")):
            if not ok:
                raise DataError(str(path), f"field 'candidates[{j}].{name}' must be {expected}, got "
                                f"{c.get(name)!r}", line=line, record_id=rid)
        average = float(np.mean(c["rollout_rewards"])) if c.get("rollout_rewards") else c["mean"]
        if abs(average - c["mean"]) > 1e-9:
            raise DataError(str(path), f"field 'candidates[{j}].mean' is {c['mean']!r} but its 'rollout_rewards' "
                            f"average {average!r}", line=line, record_id=rid)
        if j > 0 and c["anchor"]:
            raise DataError(str(path), f"field 'candidates[{j}].anchor' is true: the greedy anchor is candidate 0 "
                            "or none (collection puts it first)", line=line, record_id=rid)
        if (c.get("logprob") is None) != (rec["candidates"][0].get("logprob") is None) or (
                c.get("mean_logprob") is None) != (c.get("logprob") is None):
            raise DataError(str(path), f"field 'candidates[{j}]': log-probabilities ('logprob', 'mean_logprob') "
                            "must be given for every candidate of a decision or for none", line=line, record_id=rid)
        _check_counts(path, line, rid, j, c)
    _check_collection_fields(path, line, rid, rec)


def _check_counts(path: Path, line: int, rid: str, j: int, c: dict[str, Any]) -> None:
    """The fields of candidate ``j`` that collection writes besides those every reader needs: when
    present they must be possible and agree with each other."""
    where = f"field 'candidates[{j}]"
    for name, ok, expected in (
            ("count", "count" not in c or is_count(c["count"], 1), "an integer >= 1 (samples merged into it)"),
            ("completion_tokens", "completion_tokens" not in c or is_count(c["completion_tokens"]), "an integer >= 0"),
            ("logprob_tokens", "logprob_tokens" not in c or (
                is_count(c["logprob_tokens"]) and is_count(c.get("completion_tokens"))
                and c["logprob_tokens"] <= c["completion_tokens"]),
             "an integer >= 0, at most 'completion_tokens' (the output's own tokens, discarded draws left out)"),
            ("reward", c.get("reward") is None or _number(c["reward"], *REWARDS), "null or a number in [0, 1]"),
            ("rollout_lengths", c.get("rollout_lengths") is None or (
                isinstance(c["rollout_lengths"], list) and all(is_count(n) for n in c["rollout_lengths"])),
             "null or a list of integers >= 0")):
        if not ok:
            raise DataError(str(path), f"{where}.{name}' must be {expected}, got {c.get(name)!r}",
                            line=line, record_id=rid)
    rewards, lengths = c.get("rollout_rewards"), c.get("rollout_lengths")
    if rewards is not None and lengths is not None and len(rewards) != len(lengths):
        raise DataError(str(path), f"{where}': {len(rewards)} 'rollout_rewards' but {len(lengths)} "
                        "'rollout_lengths' (one of each per rollout)", line=line, record_id=rid)
    if c.get("logprob") is not None and is_count(c.get("completion_tokens")):
        tokens = "logprob_tokens" if "logprob_tokens" in c else "completion_tokens"
        expected_mean = c["logprob"] / max(c[tokens], 1)
        if abs(c["mean_logprob"] - expected_mean) > 1e-6 * max(1.0, abs(expected_mean)):
            raise DataError(str(path), f"{where}.mean_logprob' is {c['mean_logprob']!r} but 'logprob' / "
                            f"'{tokens}' is {expected_mean!r}", line=line, record_id=rid)


def _check_collection_fields(path: Path, line: int, rid: str, rec: dict[str, Any]) -> None:
    """The decision-level fields collection writes besides those every reader needs (``played``,
    ``prefix``, ``samples``, ``truncated``) and distinct candidates: when present they must be
    possible and agree with the candidates."""
    cands = rec["candidates"]
    played, prefix = rec.get("played"), rec.get("prefix")
    if played is not None and not (is_count(played) and played < len(cands)):
        raise DataError(str(path), f"field 'played' must be null or a candidate's index (0 to {len(cands) - 1}), "
                        f"got {played!r}", line=line, record_id=rid)
    if prefix is not None and not (isinstance(prefix, list) and len(prefix) == rec["step"]
                                   and all(isinstance(p, str) for p in prefix)):
        raise DataError(str(path), f"field 'prefix' must list the {rec['step']} output(s) played before step "
                        f"{rec['step']}, got {prefix!r:.200}", line=line, record_id=rid)
    for name in ("samples", "truncated"):
        if name in rec and not is_count(rec[name]):
            raise DataError(str(path), f"field {name!r} must be an integer >= 0, got {rec[name]!r}",
                            line=line, record_id=rid)
    counts = [c.get("count") for c in cands]
    if all(n is not None for n in counts) and is_count(rec.get("samples")) and is_count(rec.get("truncated")):
        if sum(counts) + rec["truncated"] != rec["samples"]:
            raise DataError(str(path), f"field 'samples' is {rec['samples']} but the candidates' counts "
                            f"({sum(counts)}) and 'truncated' ({rec['truncated']}) add up to "
                            f"{sum(counts) + rec['truncated']}", line=line, record_id=rid)
    seen: dict[str, int] = {}
    for j, c in enumerate(cands):
        key = normalise_action(c["output"])
        if key in seen:
            raise DataError(str(path), f"field 'candidates[{j}]' is the same action as candidates[{seen[key]}] "
                            f"({key!r}): a decision's candidates are distinct (collection merges repeats into "
                            "'count')", line=line, record_id=rid)
        seen[key] = j


def check_once(seen: dict[tuple[Any, ...], tuple[Path, int]], path: Path, line: int, rec: dict[str, Any],
               hint: str = "") -> None:
    """Refuse a decision (its env, split, task and step) that ``seen`` holds (the file and line where it
    was read); else note it. A copy would count twice in a report, and towards its task's decisions on
    resume, hiding a lost one. ``hint`` ends the message."""
    key = (rec["env"], rec["split"], rec["task"], rec["step"])
    if key in seen:
        first, first_line = seen[key]
        where = f"at line {first_line}" if first == path else f"in {first}, line {first_line}"
        raise DataError(str(path), f"decision {key} is also {where}{hint}", line=line)
    seen[key] = (path, line)


def read_decisions(paths: Sequence[str | Path], skip_torn_tail: bool = False) -> list[dict[str, Any]]:
    """The decision records of ``paths``, each checked. Refused: a file without decisions, a
    decision recorded twice, decisions of two environments, and log-probabilities in some decisions
    only (the likelihood rankers would silently drop out). ``skip_torn_tail``: see
    :func:`~qlass.jsonl.read_numbered_jsonl`."""
    paths = require_paths(paths, "read_decisions", "paths")
    refuse_repeated_inputs(paths)
    records: list[dict[str, Any]] = []
    seen: dict[tuple[Any, ...], tuple[Path, int]] = {}
    first_at = ""  # where the first decision was read
    for path in map(Path, paths):
        if not path.exists():
            raise MissingFileError(str(path))
        rows = read_numbered_jsonl(path, skip_torn_tail=skip_torn_tail)
        if not rows:
            raise DataError(str(path), "holds no decision records")
        for line, rec in rows:
            check_decision(path, line, rec)
            rid, here = f"{rec['task']}@{rec['step']}", f"{path}, line {line}"
            check_once(seen, path, line, rec)
            if records and rec["env"] != records[0]["env"]:
                raise DataError(str(path), f"field 'env' is {rec['env']!r} but {first_at} is "
                                f"{records[0]['env']!r}: use one environment's decisions at a time", line=line,
                                record_id=rid)
            has_lp = rec["candidates"][0].get("logprob") is not None
            if records and has_lp != (records[0]["candidates"][0].get("logprob") is not None):
                raise DataError(str(path), f"log-probabilities are {'given' if has_lp else 'missing (null)'} here but "
                                f"{'missing' if has_lp else 'given'} in {first_at}: the likelihood rankers need "
                                "them in every decision (collected by another backend? report the files separately)",
                                line=line, record_id=rid)
            first_at = first_at or here
            records.append(rec)
    return records


def one_environment(records: Sequence[dict[str, Any]]) -> None:
    """Raise :class:`QlassError` when ``records`` come from more than one environment: their tasks
    and step counts are not comparable, and a task names a tree only within one environment."""
    envs = sorted({str(rec.get("env")) for rec in records})
    if len(envs) > 1:
        raise QlassError(f"decisions from {len(envs)} environments ({', '.join(envs)}); use one environment's "
                         "decisions at a time")
