"""``qlass report``: results tables and budget curves from evaluation records."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

log = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report(
        records: list[Path] = typer.Argument(..., dir_okay=False, help="records.jsonl file(s) of one or more evaluation runs."),
        out: Path = typer.Option(..., file_okay=False, help="Folder for results.md/json and budget.csv/png."),
        all_tasks: bool = typer.Option(False, "--all-tasks", help="Average every method over all of its records, "
                                       "not only over the tasks every method played."),
        title: str = typer.Option("qlass results", help="Title of results.md."),
    ) -> None:
        """Rebuild the results table, paired differences and budget curve from records (several runs'
        shards combined, or a run stopped part-way: by default restricted to tasks every method played)."""
        from ..report import common_tasks, markdown_table, read_records, write_report

        recs = read_records(records)
        if not all_tasks:
            kept = common_tasks(recs)
            if len(kept) < len(recs):
                log.info("kept %d of %d records: the tasks every method played (--all-tasks keeps all)",
                         len(kept), len(recs))
            recs = kept
        rows = write_report(recs, out, title=title)
        typer.echo(markdown_table(rows))
        typer.echo(f"results.md/json and budget curve in {out}")
