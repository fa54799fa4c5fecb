"""Trajectory files in the ETO/QLASS conversation format: read, validate, write.

A file is a JSON list or JSON Lines of records::

    {"id": "...", "conversations": [{"from": "human"|"gpt", "value": "..."}, ...],
     "reward": 1.0, "success": true, "task": "sciworld/find-plant/12", ...}

``human`` turns carry the instruction and observations, ``gpt`` turns the agent's
``Thought: ...\nAction: ...`` outputs. Short acknowledgement turns (``OK``) before the first action,
as in ETO's SFT files, are accepted. Every problem is reported with the file, where the record is
(its line in JSON Lines, 1-based with blank lines counted; its index in a JSON list), its id and the field.

Reading also accepts the common chat shape: the turns under ``messages`` instead of
``conversations``, and ``{"role": "user"|"assistant"|"system", "content": ...}`` turns instead of
``{"from", "value"}`` (one shape per record). A ``system`` turn may only come first; it is kept as a
system message, part of the instruction prefix. Writing always uses the canonical form above.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .errors import DataError, MissingFileError, QlassError
from .file_checks import check_output_file, refuse_device
from .file_kinds import other_kind
from .jsonl import GZIP_MAGIC, JSONContentError, gunzip, is_text, loads, not_text_field, write_text_atomic
from .types import Message, Role, Step, Trajectory

ROLE_FROM_ETO = {"human": "user", "gpt": "assistant", "system": "system"}
ETO_FROM_ROLE = {v: k for k, v in ROLE_FROM_ETO.items()}
ROLES: dict[str, Role] = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant",
                          "system": "system"}
"""Accepted turn roles (either turn shape) and the message role each becomes."""
TURN_LISTS = ("conversations", "messages")
TURN_SHAPES = (("from", "value"), ("role", "content"))
ACTION_LINE = re.compile(r"^[^\S\n]*Action:[^\S\n]*\S", re.MULTILINE)  # as parse_action reads one
ACKNOWLEDGEMENTS = {"ok", "ok.", "okay", "okay."}
STEP_FIELDS: dict[str, tuple[type, ...]] = {
    "output": (str,), "action": (str, type(None)), "observation": (str,), "reward": (int, float), "done": (bool,),
    "prompt_tokens": (int,), "completion_tokens": (int,), "qnet_tokens": (int,),
}
"""The fields of a record's ``steps`` objects (:class:`~qlass.types.Step`) and their JSON types."""
STEP_REQUIRED = ("output", "action", "observation", "reward", "done")
MAX_REPORTED = 50


@dataclass
class ValidationReport:
    """Outcome of validating one file: the parsed trajectories and every problem found."""

    path: str
    trajectories: list[Trajectory] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    records: int = 0
    invalid_records: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_if_bad(self) -> None:
        if self.errors:
            shown = self.errors[:MAX_REPORTED]
            more = len(self.errors) - len(shown)
            text = "\n".join(shown) + (f"\n... and {more} more problems" if more > 0 else "")
            raise DataError(self.path, f"{self.invalid_records} invalid record(s), {len(self.errors)} "
                                       f"problem(s):\n{text}")


def load_records(path: Path) -> list[Any]:
    """The raw records of a JSON list or JSON Lines file (see :func:`load_placed_records`)."""
    return [rec for _, rec in load_placed_records(path)]


def load_placed_records(path: Path) -> list[tuple[str, Any]]:
    """The raw records of a JSON list or JSON Lines file, gzip-compressed or not, each with where it is
    for an error to name: ``line N`` in JSON Lines (the line an editor shows: 1-based, blank lines
    counted), ``record N`` in a JSON list (its 0-based index); :class:`DataError` naming the file when
    it is unreadable."""
    refuse_device(path)
    try:
        raw = path.read_bytes()
        text = (gunzip(raw, path) if raw[:2] == GZIP_MAGIC else raw).decode("utf-8-sig")
    except FileNotFoundError:
        raise MissingFileError(str(path)) from None
    except UnicodeDecodeError as exc:
        raise DataError(str(path), f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    stripped = text.lstrip()
    if not stripped:
        raise DataError(str(path), "file is empty")
    try:
        return _parse_records(path, text, stripped)
    except RecursionError:
        raise DataError(str(path), "JSON nested too deeply") from None


def _parse_records(path: Path, text: str, stripped: str) -> list[tuple[str, Any]]:
    """The records of a JSON list or JSON Lines ``text`` read from ``path``, each with where it is
    (:func:`load_placed_records`). Lines end at ``\\n`` only, as for every JSON Lines reader
    (:func:`~qlass.jsonl.read_numbered_jsonl`): a U+2028 in a text written unescaped is no line end."""
    if stripped.startswith("["):
        try:
            data = loads(text)
        except JSONContentError as exc:
            raise DataError(str(path), str(exc)) from None
        except json.JSONDecodeError as exc:
            raise DataError(str(path), f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
        if not isinstance(data, list):
            raise DataError(str(path), "expected a JSON list of records")
        return [(f"record {i}", rec) for i, rec in enumerate(data)]
    out = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            out.append((f"line {lineno}", loads(line)))
        except JSONContentError as exc:
            raise DataError(str(path), f"line {lineno} (record {len(out)}): {exc}") from None
        except json.JSONDecodeError as exc:
            try:  # the shape is what is named: numbers are not converted (5000 digits are a ValueError)
                whole = json.loads(text, parse_int=len)
            except json.JSONDecodeError:
                raise DataError(str(path), f"line {lineno} (record {len(out)}): invalid JSON: {exc.msg}") from None
            raise DataError(str(path), f"valid JSON of another shape: {_describe(whole)}; "
                                       "expected a list of trajectory records or JSON Lines") from None
    return out


def refuse_replacing_other_kind(out: str | Path, kind: str, is_kind: Callable[[dict[str, Any]], bool]) -> None:
    """Raise :class:`QlassError` when ``out`` is a file holding records whose first is not ``kind``
    (``is_kind`` says no): an input of another stage given as the output by mistake would be lost. An
    empty file or list passes; only the first record of a JSON Lines file is read. A device, pipe or
    socket is refused (:func:`~qlass.file_checks.check_output_file`)."""
    p = Path(out)
    check_output_file(p)
    if not p.is_file():
        return
    with open(p, "rb") as fh:
        if fh.read(2) == GZIP_MAGIC:
            raise QlassError(f"{p}: gzip-compressed; {kind} is written uncompressed, never over or onto a compressed "
                             "file: decompress it first (gunzip) or give another output path")
        fh.seek(0)
        lines = list(itertools.islice((raw for raw in fh if raw.strip()), 2))
    line = lines[0].strip() if lines else b""
    if not line or line == b"[]":
        return
    try:
        first = load_records(p)[0] if line.startswith(b"[") else loads(line)  # a JSON list is read whole
    except (DataError, IndexError, ValueError, RecursionError):  # RecursionError: nested too deeply
        if len(lines) == 1 and line.startswith(b"{") and not lines[0].endswith(b"\n"):
            return  # the torn only line of an interrupted first append: its reader cuts it and resumes
        first = None
    if not (isinstance(first, dict) and is_kind(first)):
        raise QlassError(f"{p}: exists and is not {kind} (an input of another stage?); it is only written over a "
                         "file of its kind (give another output path)")


def _describe(data: Any) -> str:
    """A short description of a JSON value's shape, for error messages."""
    if isinstance(data, dict):
        keys = list(data)
        shown = ", ".join(repr(k) for k in keys[:10]) + (", ..." if len(keys) > 10 else "")
        return f"a JSON object with keys [{shown}]"
    kinds = {list: "list", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    kind = kinds.get(type(data), type(data).__name__)
    return f"a JSON {kind}"


def _parse_turns(rec: dict[str, Any], actions: bool = True) -> tuple[list[Message], list[str]]:
    """The record's turns as messages, and the problems found in them (each naming its field path); without
    ``actions``, an agent turn need not hold an ``Action:`` line (a failure, as a DPO pair's rejected side)."""
    present = [k for k in TURN_LISTS if k in rec]
    if len(present) > 1:
        return [], ["fields 'conversations' and 'messages': both present; a record has one list of turns"]
    key = present[0] if present else "conversations"
    conv = rec.get(key)
    if not isinstance(conv, list) or not conv:
        name = f"field {key!r}" if present else "field 'conversations' (or 'messages')"
        return [], [f"{name}: missing or not a non-empty list"]
    messages: list[Message] = []
    problems: list[str] = []
    shape: tuple[str, str] | None = None
    expected = "user"
    seen_action = False
    for i, turn in enumerate(conv):
        where = f"{key}[{i}]"
        shapes = [s for s in TURN_SHAPES if s[0] in turn or s[1] in turn] if isinstance(turn, dict) else []
        if len(shapes) != 1:
            what = ("mixes 'from'/'value' with 'role'/'content' keys" if shapes else
                    f"expected an object with 'from' and 'value' or 'role' and 'content', got {_describe(turn)}")
            problems.append(f"{where}: {what}")
            continue
        rkey, vkey = shapes[0]
        if shape is None:
            shape = shapes[0]
        elif shape != shapes[0]:
            problems.append(f"{where}: has '{rkey}'/'{vkey}' keys but earlier turns have '{shape[0]}'/'{shape[1]}'; "
                            "use one turn shape per record")
            continue
        raw, value = turn.get(rkey), turn.get(vkey)
        role = ROLES.get(raw) if isinstance(raw, str) else None
        if role is None:
            problems.append(f"{where}.{rkey}: {raw!r} is not a known role ({', '.join(map(repr, ROLES))})")
            continue
        if not isinstance(value, str):
            problems.append(f"{where}.{vkey}: missing or not a string")
            continue
        if not is_text(value):
            problems.append(f"{where}.{vkey}: holds an unpaired surrogate (\\ud800-\\udfff), which is not text")
            continue
        messages.append(Message(role, value))
        if role == "system":
            if i != 0:
                problems.append(f"{where}.{rkey}: a system turn may only be the first turn")
            continue
        if role != expected:
            problems.append(f"{where}.{rkey}: roles must alternate user/assistant (human/gpt) starting with user; "
                            f"got {raw!r} where {'a user' if expected == 'user' else 'an assistant'} turn was expected")
        expected = "assistant" if role == "user" else "user"
        if role == "assistant" and actions:
            if ACTION_LINE.search(value):
                seen_action = True
            elif seen_action or value.strip().lower() not in ACKNOWLEDGEMENTS:
                problems.append(f"{where}.{vkey}: agent turn has no 'Action:' line")
    return messages, problems


def record_problems(rec: Any, actions: bool = True) -> list[str]:
    """Problems of one record, each naming the field; empty when the record is valid (``actions``: every agent
    turn must hold an ``Action:`` line, as training data to imitate must)."""
    if not isinstance(rec, dict):
        return [f"expected a JSON object, got {type(rec).__name__}"]
    problems = []
    rid = rec.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
        problems.append("field 'id': missing, or not a non-empty string or an integer")
    problems += _parse_turns(rec, actions)[1]
    bad = not_text_field({k: v for k, v in rec.items() if k not in TURN_LISTS})  # the turns' are named above
    if bad is not None:
        problems.append(f"field {bad!r}: holds an unpaired surrogate (\\ud800-\\udfff), which is not text")
    if "reward" in rec:
        r = rec["reward"]
        if not isinstance(r, (int, float)) or isinstance(r, bool) or not 0.0 <= float(r) <= 1.0:
            problems.append(f"field 'reward': {r!r} is not a number in [0, 1]")
    if "success" in rec and not isinstance(rec["success"], bool):
        problems.append(f"field 'success': {rec['success']!r} is not true/false")
    for name in ("task", "task_type"):  # ids and types group and pair trajectories: text, or left out
        if rec.get(name) is not None and (not isinstance(rec[name], str) or not rec[name]):
            problems.append(f"field {name!r}: {rec[name]!r} is not a non-empty string (or null)")
    return problems + _step_problems(rec.get("steps", []))


def _step_problems(steps: Any) -> list[str]:
    """Problems of a record's optional ``steps``: a list of objects with the :data:`STEP_FIELDS`."""
    if not isinstance(steps, list):
        return [f"field 'steps': expected a list of step objects, got {_describe(steps)}"]
    problems = []
    for i, step in enumerate(steps):
        if not isinstance(step, dict):
            problems.append(f"field 'steps[{i}]': expected an object, got {_describe(step)}")
            continue
        unknown = [k for k in step if k not in STEP_FIELDS]
        missing = [k for k in STEP_REQUIRED if k not in step]
        if unknown or missing:
            problems.append(f"field 'steps[{i}]': " + "; ".join(
                ([f"unknown key(s) {', '.join(map(repr, unknown))}"] if unknown else []) +
                ([f"missing {', '.join(map(repr, missing))}"] if missing else []))
                + f" (keys: {', '.join(STEP_FIELDS)})")
        for name, kinds in STEP_FIELDS.items():
            value = step.get(name)
            if name in step and (not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool))):
                problems.append(f"field 'steps[{i}].{name}': {value!r} is not {' or '.join(k.__name__ for k in kinds)}")
            elif isinstance(value, float) and not math.isfinite(value):
                problems.append(f"field 'steps[{i}].{name}': {value!r} is not a finite number")
    return problems


def record_to_trajectory(rec: dict[str, Any]) -> Trajectory:
    """Convert a *valid* record (either turn shape) to a :class:`Trajectory` (unknown fields go to ``meta``)."""
    messages, problems = _parse_turns(rec)
    turns = rec.get("conversations", rec.get("messages"))
    if not isinstance(turns, list) or len(messages) != len(turns):  # never drop an unreadable turn
        raise ValueError(f"record {rec.get('id')!r}: {problems[0] if problems else 'no turns'}")
    known = {"id", "conversations", "messages", "reward", "success", "task", "steps"}
    steps = [Step(**s) for s in rec.get("steps", [])]
    return Trajectory(
        id=str(rec["id"]),
        messages=messages,
        reward=float(rec.get("reward", 0.0)),
        success=bool(rec.get("success", False)),
        task=rec.get("task"),
        steps=steps,
        meta={k: v for k, v in rec.items() if k not in known},
    )


def trajectory_to_record(traj: Trajectory, with_steps: bool = True) -> dict[str, Any]:
    """The conversation-format record of ``traj`` (inverse of :func:`record_to_trajectory`)."""
    rec: dict[str, Any] = {
        "id": traj.id,
        "conversations": [{"from": ETO_FROM_ROLE[m.role], "value": m.content} for m in traj.messages],
        "reward": traj.reward,
        "success": traj.success,
    }
    if traj.task is not None:
        rec["task"] = traj.task
    if with_steps and traj.steps:
        rec["steps"] = [asdict(s) for s in traj.steps]
    clash = sorted(rec.keys() & traj.meta.keys())
    if clash:  # the meta value replaced the trajectory's own (its id, its reward)
        raise QlassError(f"trajectory {traj.id!r}: meta key {clash[0]!r} is a field of the record itself")
    rec.update(traj.meta)
    return rec


def validate_file(path: str | Path) -> ValidationReport:
    """Validate every record of a trajectory file; raises :class:`DataError` only if unreadable, or when
    it is another stage's file (:func:`~qlass.file_kinds.other_kind`)."""
    p = Path(path)
    raw = load_placed_records(p)
    first = raw[0][1] if raw else None
    other = other_kind(first, "trajectories") if isinstance(first, dict) else None
    if other is not None:
        raise DataError(str(p), f"{raw[0][0]}: this is {other}, not a trajectory file (expert or SFT data)")
    report = ValidationReport(path=str(p), records=len(raw))
    seen: dict[str, str] = {}
    for place, rec in raw:
        rid = str(rec.get("id")) if isinstance(rec, dict) and "id" in rec else None
        problems = record_problems(rec)
        if rid is not None:
            if rid in seen:
                problems.append(f"field 'id': duplicate of {seen[rid]}")
            else:
                seen[rid] = place
        label = place + (f" (id {rid!r})" if rid is not None else "")
        report.errors.extend(f"{p}, {label}: {msg}" for msg in problems)
        if problems:
            report.invalid_records += 1
        else:
            report.trajectories.append(record_to_trajectory(rec))
    return report


def load_trajectories(path: str | Path) -> list[Trajectory]:
    """Load a trajectory file, raising :class:`DataError` listing every invalid record."""
    report = validate_file(path)
    report.raise_if_bad()
    return report.trajectories


def save_trajectories(path: str | Path, trajectories: Iterable[Trajectory], with_steps: bool = True) -> None:
    """Write trajectories atomically: a JSON list for ``.json``, JSON Lines otherwise. A trajectory that
    :func:`load_trajectories` would refuse (a reward outside [0, 1], NaN, an id given twice) is refused here,
    naming it, before anything is written."""
    records = [trajectory_to_record(t, with_steps=with_steps) for t in trajectories]
    seen: dict[Any, int] = {}
    for i, rec in enumerate(records):
        problems = record_problems(rec, actions=False)
        if rec["id"] in seen:
            problems.append(f"field 'id': {rec['id']!r} is also trajectory {seen[rec['id']]}'s")
        seen.setdefault(rec["id"], i)
        if problems:
            raise QlassError(f"{path}: trajectory {i} ({rec['id']!r}) would not read back: {'; '.join(problems)}")
    p = Path(path)
    try:
        if p.suffix == ".json":
            text = json.dumps(records, ensure_ascii=False, indent=1, allow_nan=False) + "\n"
        else:
            text = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in records)
    except ValueError as exc:  # NaN or infinity in a step or meta value: not JSON
        raise QlassError(f"{path}: a trajectory holds a value JSON cannot write ({exc})") from None
    write_text_atomic(p, text)
