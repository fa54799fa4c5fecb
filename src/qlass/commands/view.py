"""``qlass view``: one offline HTML page for trees, evaluation episodes, decisions and results."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("view")
    def view(
        path: Path = typer.Argument(..., help="A trees.jsonl, an evaluation records.jsonl, a decisions file "
                                              "(qlass decisions collect) or a run folder (every such file under it)."),
        out: Path = typer.Option(..., "--out", dir_okay=False,
            help="The HTML file to write (self-contained; opens from disk)."),
        title: str | None = typer.Option(None, help="Title of the page (default: 'qlass view: NAME')."),
    ) -> None:
        """Write one self-contained HTML page (no network, no CDN) showing exploration trees, evaluation
        episodes side by side with the QNet's decisions, decision states and the results of a run."""
        from ..view import write_view

        written = write_view(path, out, title=title)
        typer.echo(f"wrote {written}; open it in a browser: {written.resolve().as_uri()}")
