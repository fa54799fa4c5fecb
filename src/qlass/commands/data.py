"""``qlass data ...``: trajectory files (validate; expert export)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import typer

log = logging.getLogger(__name__)

KINDS = ("trajectories", "trees", "qdata", "decisions", "records")
"""What ``qlass data validate`` checks: trajectory files, exploration trees, Q data, decision files
(``qlass decisions collect``) and evaluation records (``qlass eval``'s ``records.jsonl``)."""


def register(app: typer.Typer) -> None:
    data_app = typer.Typer(help="Trajectory files: validate, export expert data.", no_args_is_help=True)

    @data_app.command("validate")
    def validate(
        files: list[Path] = typer.Argument(..., dir_okay=False, help="Trajectory files (JSON/JSONL), trees.jsonl, "
                                           "qdata.jsonl, decisions files or evaluation records.jsonl[.gz]."),
        kind: str = typer.Option("auto", help=f"{', '.join(KINDS)}, or auto (from the first record's fields)."),
    ) -> None:
        """Check every record (trajectories: ids, role order, Action lines, rewards; trees, Q data,
        decisions and evaluation records: the checks of the commands that read them) of every file;
        exit 1 if any record is invalid, 2 if a file cannot be read."""
        from ..errors import QlassError
        from ..file_checks import refuse_device
        from ..jsonl import read_once
        from ..locking import warn_if_being_written

        if kind != "auto" and kind not in KINDS:
            raise typer.BadParameter(f"unknown kind {kind!r}", param_hint="--kind")
        bad = unreadable = False
        for path in files:
            try:
                refuse_device(path)  # /dev/zero was read as one endless first line
                warn_if_being_written(path)  # its last line may be half-written
                with read_once(path) as readable:
                    if _is_blank(readable):  # the same answer whatever the kind (it was rc 0, 1 or 2 by --kind)
                        raise QlassError(f"{path}: file is empty")
                    try:
                        bad |= not _validate(readable, _detect_kind(readable) if kind == "auto" else kind, str(path))
                    except QlassError as exc:
                        raise QlassError(str(exc).replace(str(readable), str(path))) from None
            except QlassError as exc:  # the file as a whole: the next files are still checked
                typer.echo(f"error: {exc}", err=True)
                unreadable = True
        raise typer.Exit(2 if unreadable else 1 if bad else 0)

    @data_app.command("expert")
    def expert(
        out: Path = typer.Option(..., dir_okay=False, help="Output file (.json: a JSON list; otherwise JSON Lines)."),
        env: str = typer.Option("sciworld", help="Environment name or package.module:Class."),
        split: str = typer.Option("train", help="Split to take tasks from."),
        task_types: Optional[str] = typer.Option(None, help="Comma-separated task types (default: all)."),
        per_task: Optional[int] = typer.Option(None, min=1, help="At most this many trajectories per task type."),
        max_steps: Optional[int] = typer.Option(None, min=1,
            help="Skip expert trajectories that do not finish the task within this many steps."),
        env_arg: list[str] = typer.Option([], help="Environment constructor option key=value (repeatable), "
                                          "e.g. step_limit=100 for long expert paths."),
    ) -> None:
        """Export expert trajectories, each verified by replay to reach reward 1.0. Resumes after a crash; a
        rerun with the same settings reuses the finished export's replays (.OUT.done.jsonl beside OUT)."""
        from ..config import parse_kv
        from ..data import refuse_replacing_other_kind, save_trajectories
        from ..envs.base import check_splits, env_close, env_tasks, make_env
        from ..errors import QlassError
        from ..expert import adopt_finished, export_expert
        from ..locking import writer_lock

        refuse_replacing_other_kind(out, "a trajectory file",
                                    lambda r: "id" in r and ("conversations" in r or "messages" in r))
        with writer_lock(out, folder=False):  # one export per output: two would append to one progress file
            progress = out.with_name(f".{out.name}.progress.jsonl")  # lets a crashed export resume
            finished = out.with_name(f".{out.name}.done.jsonl")  # a finished one's: a rerun need not replay its tasks
            env_kwargs = parse_kv(env_arg, "--env-arg")
            environment = make_env(env, **env_kwargs)
            try:
                check_splits(environment, [split], env)
                types = task_types.split(",") if task_types else None
                tasks = env_tasks(environment, split, types)
                if not tasks:
                    raise QlassError(f"{env}: no tasks in split {split!r}"
                                     + (f" for task types {types}" if types else ""))
                if finished.exists() and not progress.exists():
                    adopt_finished(finished, progress, environment, tasks, max_steps, env_kwargs)
                result = export_expert(environment, tasks, per_task_type=per_task, max_steps=max_steps,
                                       progress_file=progress, env_kwargs=env_kwargs)
            finally:
                env_close(environment)
            save_trajectories(out, result.trajectories)
            if progress.exists():
                os.replace(progress, finished)
            for task_id, why in result.excluded.items():
                log.warning("excluded %s: %s", task_id, why)
            excluded = f": {', '.join(result.excluded)}" if result.excluded else ""
            typer.echo(f"wrote {len(result.trajectories)} verified expert trajectories to {out}; "
                       f"excluded {len(result.excluded)}{excluded}")

    app.add_typer(data_app, name="data")


def _is_blank(path: Path) -> bool:
    """Whether ``path`` (gzip-compressed or not) holds nothing but whitespace (and a byte order mark). An
    unreadable file is not blank: its reader names the problem."""
    import zlib

    from ..view_inputs import first_line

    try:
        return first_line(path) is None
    except (OSError, EOFError, zlib.error):
        return False


def _validate(path: Path, what: str, name: str) -> bool:
    """Check one file of kind ``what`` (``name``: the path to name it by), printing its summary and
    problems; False if a record is invalid. A file that cannot be read as a whole (not JSON Lines, or a file
    of another kind) raises :class:`DataError`."""
    from ..data import validate_file
    from ..decision_files import read_decisions
    from ..errors import DataError, MissingFileError
    from ..eval_records import read_records
    from ..file_kinds import FILE_KINDS, other_kind
    from ..jsonl import read_numbered_jsonl
    from ..qdata import read_qdata
    from ..tree import read_trees

    if what == "trajectories":
        report = validate_file(path)
        n_turns = sum(len(t.messages) for t in report.trajectories)
        typer.echo(f"{name}: {report.records} records, {len(report.trajectories)} valid, "
                   f"{report.invalid_records} invalid ({len(report.errors)} problems), {n_turns} turns in valid "
                   "records")
        for err in report.errors:
            typer.echo(err.replace(str(path), name), err=True)
        return report.ok
    rows = read_numbered_jsonl(path)  # a file that is not JSON Lines cannot be read (exit 2), as trajectories
    other = other_kind(rows[0][1], what) if rows else None
    if other is not None:
        raise DataError(name, f"line {rows[0][0]}: this is {other}, not {FILE_KINDS[what][1]}")
    try:
        if what == "trees":
            trees = read_trees(path)
            typer.echo(f"{name}: {len(trees)} trees, {sum(len(t.nodes) for t in trees)} nodes, all valid")
        elif what == "qdata":
            records = read_qdata(path)
            typer.echo(f"{name}: {len(records)} Q records from {len({r['tree_id'] for r in records})} trees, all valid")
        elif what == "decisions":
            records = read_decisions([path])
            tasks = len({(r["split"], r["task"]) for r in records})
            typer.echo(f"{name}: {len(records)} decisions from {tasks} tasks, all valid")
        else:
            records = read_records([path])
            methods = len({r["method"] for r in records})
            typer.echo(f"{name}: {len(records)} evaluation records of {methods} methods, all valid")
    except DataError as exc:
        if isinstance(exc, MissingFileError):
            raise
        typer.echo(str(exc).replace(str(path), name), err=True)
        return False
    return True


def _detect_kind(path: Path) -> str:
    """One of :data:`KINDS` from the first record's fields (``trajectories`` when none fits)."""
    import gzip
    import json

    from ..errors import DataError, MissingFileError
    from ..file_kinds import FILE_KINDS, kind_of
    from ..jsonl import GZIP_MAGIC

    try:
        with path.open("rb") as fh:  # undecodable bytes are reported by the file's reader, with their place
            zipped = fh.read(2) == GZIP_MAGIC
        with (gzip.open if zipped else open)(path, "rb") as fh:
            first = fh.readline().decode("utf-8-sig", errors="replace").strip()
    except FileNotFoundError:
        raise MissingFileError(str(path)) from None
    except (OSError, EOFError) as exc:
        raise DataError(str(path), f"cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        # the fields tell the kind: numbers are not converted (one too large is the reader's to name)
        record = json.loads(first, parse_int=len) if first and not first.startswith("[") else None
    except (json.JSONDecodeError, RecursionError):  # nested too deeply: the reader names it
        record = None
    if isinstance(record, dict) and "nodes" in record:
        return "trees"
    if isinstance(record, dict) and "q" in record and "node_id" in record:
        return "qdata"
    if isinstance(record, dict) and "candidates" in record and "history" in record:
        return "decisions"
    if isinstance(record, dict) and "method" in record and "trajectory" in record:
        return "records"
    other = kind_of(record) if isinstance(record, dict) else None
    if other is not None and other not in KINDS:  # read as trajectories, every line was invalid
        raise DataError(str(path), f"line 1: this is {FILE_KINDS[other][1]}, which qlass data validate does not check "
                                   f"(it checks {', '.join(KINDS)}; --kind reads it as one of them)")
    return "trajectories"
