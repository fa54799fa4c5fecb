"""``qlass run CONFIG.yaml``: every stage of QLASS, resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run(
        config: Optional[Path] = typer.Argument(None, dir_okay=False, help="Pipeline YAML (see configs/demo.yaml)."),
        stop_after: Optional[str] = typer.Option(None, help="Stop after this stage: sft, explore or qnet (e.g. "
                                                 "to start a vLLM/SGLang server on the SFT checkpoint)."),
        list_options: bool = typer.Option(False, "--list-options", help="Print every key of a pipeline YAML, "
                                          "section by section, with its default and help, then exit."),
    ) -> None:
        """Expert data → SFT → exploration trees → Q data → QNet → evaluation, skipping finished stages."""
        from ..errors import QlassError
        from ..pipeline import run_pipeline
        from ..pipeline_config import pipeline_options
        from ..report import markdown_table

        if list_options:
            typer.echo(pipeline_options())
            return
        if config is None:
            raise QlassError("qlass run needs a pipeline YAML (see configs/demo.yaml; --list-options lists its keys)")

        rows = run_pipeline(config, stop_after=stop_after)
        if rows is None:
            typer.echo(f"stopped after stage {stop_after}; rerun without --stop-after to continue")
        else:
            typer.echo(markdown_table(rows))
