"""``qlass run CONFIG.yaml``: every stage of QLASS, resumable."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run(config: Path = typer.Argument(..., help="Pipeline YAML (see configs/demo.yaml).")) -> None:
        """Expert data → SFT → exploration trees → Q data → QNet → evaluation, skipping finished stages."""
        from ..pipeline import run_pipeline
        from ..report import markdown_table

        rows = run_pipeline(config)
        typer.echo(markdown_table(rows))
