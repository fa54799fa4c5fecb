"""``qlass data ...``: trajectory files (validate; expert export)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

log = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    data_app = typer.Typer(help="Trajectory files: validate, export expert data.", no_args_is_help=True)

    @data_app.command("validate")
    def validate(files: list[Path] = typer.Argument(..., help="JSON or JSONL trajectory files.")) -> None:
        """Check every record (ids, role order, Action lines, rewards); exit 1 if any is invalid."""
        from ..data import validate_file

        bad = False
        for path in files:
            report = validate_file(path)
            n_turns = sum(len(t.messages) for t in report.trajectories)
            typer.echo(f"{path}: {report.records} records, {len(report.trajectories)} valid, "
                       f"{report.invalid_records} invalid ({len(report.errors)} problems), {n_turns} turns in valid records")
            for err in report.errors:
                typer.echo(err, err=True)
            bad |= not report.ok
        raise typer.Exit(1 if bad else 0)

    @data_app.command("expert")
    def expert(
        out: Path = typer.Option(..., help="Output file (.json: a JSON list; otherwise JSON Lines)."),
        env: str = typer.Option("sciworld", help="Environment name or package.module:Class."),
        split: str = typer.Option("train", help="Split to take tasks from."),
        task_types: Optional[str] = typer.Option(None, help="Comma-separated task types (default: all)."),
        per_task: Optional[int] = typer.Option(None, help="At most this many trajectories per task type."),
        max_steps: Optional[int] = typer.Option(None, help="Skip expert trajectories longer than this."),
        env_arg: list[str] = typer.Option([], help="Environment constructor option key=value (repeatable), "
                                          "e.g. step_limit=100 for long expert paths."),
    ) -> None:
        """Export expert trajectories, each verified by replay to reach reward 1.0."""
        from ..data import save_trajectories
        from ..envs.base import make_env
        from ..expert import export_expert
        from .evaluate import parse_kv

        progress = out.with_name(f".{out.name}.progress.jsonl")  # lets a crashed export resume
        environment = make_env(env, **parse_kv(env_arg, "--env-arg"))
        try:
            tasks = environment.tasks(split, task_types.split(",") if task_types else None)
            result = export_expert(environment, tasks, per_task_type=per_task, max_steps=max_steps,
                                   progress_file=progress)
        finally:
            environment.close()
        save_trajectories(out, result.trajectories)
        progress.unlink(missing_ok=True)
        for task_id, why in result.excluded.items():
            log.warning("excluded %s: %s", task_id, why)
        typer.echo(f"wrote {len(result.trajectories)} verified expert trajectories to {out}; "
                   f"excluded {len(result.excluded)}" + (f": {', '.join(result.excluded)}" if result.excluded else ""))

    app.add_typer(data_app, name="data")
