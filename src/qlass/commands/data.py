"""``qlass data ...``: trajectory files (validate; expert export)."""

from __future__ import annotations

from pathlib import Path

import typer


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
                       f"{len(report.errors)} problems, {n_turns} turns in valid records")
            for err in report.errors:
                typer.echo(err, err=True)
            bad |= not report.ok
        raise typer.Exit(1 if bad else 0)

    app.add_typer(data_app, name="data")
