"""Evaluation records read back and checked: every field a report, a comparison or the viewer reads
(:func:`check_record`), the method label against its budget option, Reflexion trials, and files
read together (:func:`read_records`: a task recorded twice, or one method label run with two
settings, is refused). Files of other stages are named as what they are.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from .file_kinds import other_kind
from .jsonl import find_value, is_count

_RECORD_FIELDS: dict[str, tuple[type, ...]] = {
    "method": (str,), "method_name": (str,), "config": (dict,), "env": (str,), "split": (str,), "task": (str,),
    "reward": (int, float), "success": (bool,), "prompt_tokens": (int,), "completion_tokens": (int,),
    "qnet_tokens": (int,), "env_steps": (int,), "wall_time": (int, float), "oracle": (bool,),
}
_CANDIDATE_FIELDS: dict[str, tuple[type, ...]] = {"reward": (int, float), "score": (int, float),
                                                  "completion_tokens": (int,)}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _reward(value: Any) -> bool:
    return _number(value) and -1e-9 <= value <= 1.0 + 1e-9  # rewards are in [0, 1], give or take rounding


_STEP_FIELDS: tuple[tuple[str, Any, str], ...] = (
    ("output", lambda v: isinstance(v, str), "a string"),
    ("action", lambda v: v is None or isinstance(v, str), "a string or null"),
    ("observation", lambda v: isinstance(v, str), "a string"),
    ("reward", _number, "a finite number"),
    ("done", lambda v: isinstance(v, bool), "true or false"),
    ("qnet_tokens", is_count, "an integer >= 0"),
)


def _check_steps(steps: list[dict[str, Any]], path: str, line: int) -> None:
    """The fields of ``trajectory.steps`` that the viewer shows (each optional, as a bring-your-own
    writer may leave some out; present, it must have its type)."""
    from .errors import DataError

    for k, st in enumerate(steps):
        for name, ok, want in _STEP_FIELDS:
            if name in st and not ok(st[name]):
                raise DataError(path, f"line {line}: field 'trajectory.steps[{k}].{name}' must be {want}, "
                                      f"got {st[name]!r:.80}")


def _values(value: Any, n: int) -> bool:
    return (isinstance(value, list) and len(value) == n
            and all(_number(v) or v == -math.inf for v in value))  # a likelihood of an empty output is -inf


def _check_decisions(decisions: list[dict[str, Any]], path: str, line: int) -> None:
    """``trajectory.decisions`` (qlass's choices among distinct actions, see
    :func:`qlass.search_qlass.qlass_episode`): a step index, two or more actions, one value (and
    selection score, where recorded) per action and the chosen index among them."""
    from .errors import DataError

    for k, d in enumerate(decisions):
        where = f"line {line}: field 'trajectory.decisions[{k}]"
        actions = d.get("actions")
        if not (isinstance(actions, list) and len(actions) >= 2 and all(isinstance(a, str) for a in actions)):
            raise DataError(path, f"{where}.actions' must be a list of two or more strings, got {actions!r:.80}")
        n = len(actions)
        checks = [("step", is_count(d.get("step")), "an integer >= 0"),
                  ("values", _values(d.get("values"), n), f"a list of {n} numbers (one per action)"),
                  ("chosen", is_count(d.get("chosen")) and d["chosen"] < n, f"an index below {n}")]
        if "scores" in d:
            checks.append(("scores", _values(d["scores"], n), f"a list of {n} numbers (one per action)"))
        for name, ok, want in checks:
            if not ok:
                raise DataError(path, f"{where}.{name}' must be {want}, got {d.get(name)!r:.80}")


def _check_trials(rec: dict[str, Any], path: str, line: int) -> None:
    """A Reflexion record's ``trials`` (one object per trial played) against its ``config.trials``."""
    from .errors import DataError

    trials, allowed = rec["trials"], rec["config"].get("trials")
    if not isinstance(allowed, int) or isinstance(allowed, bool) or allowed < 1:
        raise DataError(path, f"line {line}: field 'config.trials' must be an integer >= 1 (a record with "
                              f"'trials'), got {allowed!r}")
    if not isinstance(trials, list) or not 1 <= len(trials) <= allowed:
        raise DataError(path, f"line {line}: field 'trials' must be a list of 1 to config.trials ({allowed}) "
                              f"objects, got {trials!r:.80}")
    for k, trial in enumerate(trials):
        for name, ok, want in (("reward", _reward, "a number in [0, 1]"),
                               ("completion_tokens", is_count, "an integer >= 0"),
                               ("reflection_completion_tokens", is_count, "an integer >= 0 where present")):
            value = trial.get(name) if isinstance(trial, dict) else None
            if name == "reflection_completion_tokens" and isinstance(trial, dict) and name not in trial:
                continue  # no reflection followed this trial
            if not isinstance(trial, dict) or not ok(value):
                raise DataError(path, f"line {line}: field 'trials[{k}].{name}' must be {want}, got {value!r}")


POOLABLE_SETTINGS = ("splits", "task_types", "limit", "tasks", "offset", "methods", "model_files", "qnet_files")
"""``config.yaml`` entries that may differ between evaluation runs whose records are reported together:
they choose tasks and methods (each record's method settings are compared on their own), or tell copies
of one model on several machines apart."""
QNET_SETTINGS = ("qnet", "qnet_files")
"""The QNet a run used: compared only among the runs that used one (a run of methods without a QNet
records none, or the one an earlier run of its folder recorded)."""

BUDGET_OPTIONS = {"qlass": "m", "best-of-n": "n", "reflexion": "trials"}
"""The option a method's label and budget point are read from (its first in the label); its budget curve runs
along it."""


def _check_label(rec: dict[str, Any], path: str, line: int) -> None:
    """A record's ``method`` label against its ``method_name`` and the budget option of its ``config``:
    the label names the row, the name and option place its budget point (a mismatch moves a point to
    another curve or budget)."""
    from .errors import DataError

    label, name = rec["method"], rec["method_name"]
    rest = label[len(name):] if label.startswith(name) else "?"
    if rest[:1] not in ("", "(", "[", "#"):  # qlass(m=2), qlass(m=2)[oracle], sample#0 (RFT), eto (greedy)
        raise DataError(path, f"line {line}: field 'method' is {label!r}, not a label of method_name {name!r}")
    option = BUDGET_OPTIONS.get(name)
    if option is None:
        return
    value = rec["config"].get(option)
    prefix = f"{name}({option}={value}"
    if not is_count(value, 1) or not label.startswith((prefix + ",", prefix + ")")):
        raise DataError(path, f"line {line}: field 'config.{option}' is {value!r} but the label is {label!r}")
    if name == "best-of-n" and "candidates" in rec and isinstance(rec["candidates"], list) \
            and len(rec["candidates"]) != value:
        raise DataError(path, f"line {line}: field 'candidates' holds {len(rec['candidates'])} trajectories; "
                              f"config.n is {value}")


def check_record(rec: dict[str, Any], path: str, line: int) -> None:
    """Raise :class:`DataError` naming the field of ``rec`` that the report cannot read: its schema
    version, a missing or mistyped field, a reward outside [0, 1], a malformed best-of-n candidate."""
    from .errors import DataError
    from .eval_worker import RECORD_SCHEMA_VERSION

    other = other_kind(rec, "records")
    if other is not None:
        raise DataError(path, f"line {line}: this is {other}, not evaluation records (qlass eval's records.jsonl)")
    if rec.get("schema_version") != RECORD_SCHEMA_VERSION:
        raise DataError(path, f"line {line}: field 'schema_version' is {rec.get('schema_version')!r}; "
                              f"this qlass reads {RECORD_SCHEMA_VERSION}")
    for name, kinds in _RECORD_FIELDS.items():
        value = rec.get(name)
        if name not in rec or not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
            want = " or ".join(k.__name__ for k in kinds)
            raise DataError(path, f"line {line}: field {name!r} must be {want}, got {value!r}")
    if not _reward(rec["reward"]):
        raise DataError(path, f"line {line}: field 'reward' must be in [0, 1], got {rec['reward']!r}")
    odd = find_value(rec["config"], lambda v: isinstance(v, float) and not math.isfinite(v), "config")
    if odd:  # NaN differs from itself: the record was refused as having other settings than itself
        raise DataError(path, f"line {line}: field {odd[0]!r} must be a finite number, got {odd[1]!r}")
    _check_label(rec, path, line)
    for name in ("prompt_tokens", "completion_tokens", "qnet_tokens", "env_steps", "wall_time"):
        if not 0 <= rec[name] < math.inf:
            raise DataError(path, f"line {line}: field {name!r} must be a finite number >= 0, got {rec[name]!r}")
    traj = rec.get("trajectory", {})
    steps = traj.get("steps", []) if isinstance(traj, dict) else None
    if not isinstance(steps, list) or not all(isinstance(st, dict) for st in steps):
        raise DataError(path, f"line {line}: field 'trajectory' must be an object whose 'steps' is a list of objects")
    for name in ("conversations", "decisions"):
        value = traj.get(name, [])
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            raise DataError(path, f"line {line}: field 'trajectory.{name}' must be a list of objects, "
                                  f"got {value!r:.80}")
    _check_steps(steps, path, line)
    _check_decisions(traj.get("decisions", []), path, line)
    for name, ok, want in (("qnet_choices", is_count, "an integer >= 0"),
                           ("oracle_pass_at_n", _reward, "a number in [0, 1]")):
        if name in rec and not ok(rec[name]):
            raise DataError(path, f"line {line}: field {name!r} must be {want}, got {rec[name]!r}")
    if "trials" in rec:
        _check_trials(rec, path, line)
    candidates = rec.get("candidates", [])
    if not isinstance(candidates, list):
        raise DataError(path, f"line {line}: field 'candidates' must be a list, got {type(candidates).__name__}")
    for k, cand in enumerate(candidates):
        for name, kinds in _CANDIDATE_FIELDS.items():
            value = cand.get(name) if isinstance(cand, dict) else None
            if not isinstance(value, kinds) or isinstance(value, bool):
                want = " or ".join(t.__name__ for t in kinds)
                raise DataError(path, f"line {line}: field 'candidates[{k}].{name}' must be {want}, got {value!r}")
        # a trajectory that never stepped scores -inf; no other value may be infinite or NaN
        for name, ok, want in (("reward", _reward(cand["reward"]), "in [0, 1]"),
                               ("score", cand["score"] == -math.inf or math.isfinite(cand["score"]),
                                "finite (or -inf)"),
                               ("completion_tokens", cand["completion_tokens"] >= 0, ">= 0")):
            if not ok:
                raise DataError(path, f"line {line}: field 'candidates[{k}].{name}' must be {want}, got {cand[name]!r}")
    _check_totals(rec, path, line)


def _check_totals(rec: dict[str, Any], path: str, line: int) -> None:
    """A record's ``reward`` and ``completion_tokens`` against the ``candidates`` or ``trials`` they sum up:
    the row reads the record, its budget curve the parts, so parts that disagree with it would put one
    run's numbers in two places."""
    from .candidates import argmax
    from .errors import DataError

    parts: list[tuple[str, float, str]] = []
    if rec.get("candidates"):
        cands = rec["candidates"]
        picked = argmax([c["score"] for c in cands])
        parts = [("reward", cands[picked]["reward"], f"the reward of candidates[{picked}], the best-scored one"),
                 ("completion_tokens", sum(c["completion_tokens"] for c in cands), "the candidates' sum")]
        if "oracle_pass_at_n" in rec:
            parts.append(("oracle_pass_at_n", max(c["reward"] for c in cands), "the candidates' best reward"))
    elif rec.get("trials"):
        trials = rec["trials"]
        parts = [("reward", trials[-1]["reward"], "the last trial's reward"),
                 ("completion_tokens", sum(t["completion_tokens"] + t.get("reflection_completion_tokens", 0)
                                           for t in trials), "the trials' sum (reflections included)")]
    own = [(name, rec[name], value, what) for name, value, what in parts if abs(rec[name] - value) > 1e-9]
    if own:
        name, value, expected, what = own[0]
        raise DataError(path, f"line {line}: field {name!r} is {value!r}, but {what} is {expected!r}: the "
                              "results row and the budget curve would disagree")


def read_records(paths: Sequence[str | Path], skip_torn_tail: bool = False) -> list[dict[str, Any]]:
    """The evaluation records of ``paths`` (``records.jsonl`` files, e.g. shards of one evaluation
    run on several machines), each checked for the fields the report reads (:func:`check_record`). A
    (method, env, split, task) key found twice is an error naming both places, and so is a method
    label whose records ran with different settings (``config``), which one row would mix.
    ``skip_torn_tail``: see :func:`~qlass.jsonl.read_jsonl`."""
    from .config_fields import require_paths
    from .errors import DataError, MissingFileError
    from .file_checks import refuse_repeated_inputs
    from .jsonl import read_numbered_jsonl
    from .recorded import setting_changes

    paths = require_paths(paths, "read_records", "paths")
    refuse_repeated_inputs(paths)
    seen: dict[tuple[str, ...], str] = {}
    first: dict[str, tuple[dict[str, Any], str]] = {}  # method label → its first record's config, where
    out = []
    for path in paths:
        if not Path(path).exists():
            raise MissingFileError(str(path))
        for line, rec in read_numbered_jsonl(path, skip_torn_tail=skip_torn_tail):
            check_record(rec, str(path), line)
            key = (rec["method"], rec["env"], rec["split"], rec["task"])
            where = f"{path} line {line}"
            if key in seen:
                raise DataError(str(path), f"line {line}: {rec['method']} on {rec['split']} {rec['task']} is also "
                                           f"recorded at {seen[key]}")
            seen[key] = where
            config, at = first.setdefault(rec["method"], (rec["config"], where))
            changes = setting_changes(config, rec["config"])
            if changes:
                raise DataError(str(path), f"line {line}: {rec['method']} ran with other settings than at {at} "
                                           f"({'; '.join(changes)}): one row would mix them")
            out.append(rec)
    return out


def check_pooled_runs(paths: Sequence[str | Path], allow_mixed: bool = False) -> list[str]:
    """Compare the ``config.yaml`` beside each records file of ``paths`` (its evaluation run's settings)
    with the first one's, and the QNet of each run that used one with the first such run's: runs made
    with another model, QNet, environment option, policy option, seed or precision are refused, naming
    both files and every difference, unless ``allow_mixed``; then the differences are returned
    (``"file: setting: old → new"``).
    :data:`POOLABLE_SETTINGS` and runtime options may differ. A file without an evaluation's
    ``config.yaml`` beside it cannot be compared: a warning names it."""
    import logging

    from .config import load_yaml
    from .errors import QlassError
    from .file_checks import check_output_file
    from .recorded import setting_changes

    if len(paths) < 2:
        return []
    first: tuple[Path, Path, dict[str, Any]] | None = None  # records file, settings file, settings
    first_qnet: tuple[Path, Path, dict[str, Any]] | None = None  # the same, of the first run that used a QNet
    unknown: list[str] = []
    found: list[str] = []
    for path in map(Path, paths):
        config = path.parent / "config.yaml"
        if config.exists():
            check_output_file(config)  # a named pipe there would block the read
        settings = load_yaml(config) if config.is_file() else {}
        if not {"model", "env", "methods"} <= settings.keys():  # none, or not an evaluation's (e.g. qlass run's)
            unknown.append(str(path))
            continue
        changes: list[tuple[tuple[Path, Path, dict[str, Any]], str]] = []  # (the run compared with, change)
        if first is None:
            first = (path, config, settings)
        else:
            changes = [(first, c) for c in setting_changes(first[2], settings, [*POOLABLE_SETTINGS, *QNET_SETTINGS])]
        if settings.get("qnet") is not None:  # the QNet is compared only among the runs that used one
            if first_qnet is None:
                first_qnet = (path, config, settings)
            else:
                qnet_only = [k for k in settings.keys() | first_qnet[2].keys() if k != "qnet"]
                changes += [(first_qnet, c) for c in setting_changes(first_qnet[2], settings, qnet_only)]
        if changes and not allow_mixed:
            (other, other_config, _), _ = changes[0]
            raise QlassError(f"{path} was evaluated with other settings than {other} "
                             f"({'; '.join(c for (o, _, _), c in changes if o == other)}; see {config} and "
                             f"{other_config}): one row would mix them; report them separately (or side by side "
                             "with --side), or pass --allow-mixed-settings to pool them anyway")
        found += [f"{path}: {c}" for _, c in changes]
    if unknown:
        logging.getLogger(__name__).warning(
            "no evaluation config.yaml beside %s, so the settings of %s cannot be compared with the other files'",
            ", ".join(unknown), "its run" if len(unknown) == 1 else "their runs")
    return found
