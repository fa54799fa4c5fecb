"""``qlass sft``: behaviour cloning of a causal LM on expert trajectories."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("sft")
    def sft(
        data: Path = typer.Option(..., help="Expert trajectories (conversation JSON/JSONL)."),
        model: str = typer.Option("default", help="Base causal-LM folder, or 'default' (SmolLM2-135M-Instruct)."),
        out: Path = typer.Option(..., help="Output folder: the fine-tuned model (HF format), metrics.jsonl."),
        config: Optional[Path] = typer.Option(None, help="YAML file with SFTConfig options."),
        set_: list[str] = typer.Option([], "--set", help="Override an option: key=value (repeatable)."),
    ) -> None:
        """Fine-tune on the agent turns of expert trajectories; resumes if interrupted."""
        from ..config import build, load_yaml
        from ..models import default_model_dir
        from ..sft import SFTConfig, train_sft
        from .evaluate import parse_kv

        options = load_yaml(config) if config else {}
        options.update(parse_kv(set_, "--set"))
        cfg = build(SFTConfig, options, str(config) if config else "--set")
        base = default_model_dir() if model == "default" else Path(model)
        typer.echo(str(train_sft(data, base, out, cfg)))
