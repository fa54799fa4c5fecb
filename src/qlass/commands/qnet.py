"""``qlass train-qnet``: train the QNet (stage 3) on Q data from exploration."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("train-qnet")
    def train_qnet_cmd(
        qdata: Path = typer.Argument(..., help="Q data (qdata.jsonl) written by exploration."),
        model: str = typer.Option(..., help="SFT policy folder (HF causal LM) that initialises the backbone, or 'default'."),
        out: Path = typer.Option(..., help="Output folder: the QNet (HF sequence classifier), metrics.jsonl, results."),
        config: Optional[Path] = typer.Option(None, help="YAML file with QNetTrainConfig options (e.g. configs/qnet-cpu.yaml)."),
        set_: list[str] = typer.Option([], "--set", help="Override an option: key=value (repeatable)."),
    ) -> None:
        """Regress Q values with MSE; report validation sibling-ranking accuracy of the QNet and of the
        SFT policy's log-likelihood. Resumes if interrupted."""
        from ..config import build, load_yaml
        from ..models import default_model_dir
        from ..qnet_train import QNetTrainConfig, summary_lines, train_qnet
        from .evaluate import parse_kv

        options = load_yaml(config) if config else {}
        options.update(parse_kv(set_, "--set"))
        cfg = build(QNetTrainConfig, options, str(config) if config else "--set")
        sft = default_model_dir() if model == "default" else Path(model)
        result = train_qnet(qdata, sft, out, cfg)
        for line in summary_lines(result):
            typer.echo(line)
        typer.echo(str(out))
