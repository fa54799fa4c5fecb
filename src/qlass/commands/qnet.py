"""``qlass train-qnet``: train the QNet (stage 3) on Q data from exploration; ``qlass train-qnet-head``:
fit only its value head on the frozen SFT model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("train-qnet")
    def train_qnet_cmd(
        qdata: Optional[Path] = typer.Argument(None, dir_okay=False,
            help="Q data (qdata.jsonl) written by exploration."),
        model: str = typer.Option("default", help="SFT policy folder (HF causal LM) that initialises the backbone, or "
                                                  "'default'."),
        out: Optional[Path] = typer.Option(None, file_okay=False,
            help="Output folder: the QNet (HF sequence classifier), metrics.jsonl, qnet_result.json."),
        config: Optional[Path] = typer.Option(None, dir_okay=False,
            help="YAML file of QNetTrainConfig options, e.g. configs/qnet-cpu.yaml (defaults: the paper's)."),
        set_: list[str] = typer.Option([], "--set",
            help="Override one option, key=value (repeatable), e.g. --set epochs=1."),
        folds: int = typer.Option(0, min=0,
            help="Cross-validate instead: train K QNets on K tree-disjoint splits (OUT/fold-k) and report pooled "
                 "held-out sibling-pair accuracy with 95% intervals beside the SFT log-likelihood ranker's "
                 "(OUT/cv_summary.json, .md); 0: one QNet."),
        list_options: bool = typer.Option(False, "--list-options",
            help="Print every QNetTrainConfig option with its default and help, then exit."),
    ) -> None:
        """Train the QNet on Q values (regression by `rank`, optionally a sibling pairwise loss); report
        validation sibling-ranking accuracy of the QNet and of the SFT policy's log-likelihood, or with
        --folds K cross-validate by tree. Rerun the same command to resume."""
        from ..config import describe, load_config, parse_kv
        from ..errors import QlassError
        from ..models import model_folder
        from ..training.configs import QNetTrainConfig

        if list_options:
            typer.echo(describe(QNetTrainConfig))
            return
        if qdata is None or out is None:
            raise QlassError("qlass train-qnet needs QDATA and --out DIR")
        cfg = load_config(config, QNetTrainConfig, parse_kv(set_, "--set"))
        sft = model_folder(model)
        if folds:
            from ..qnet_cv import cross_validate_qnet, summary_markdown

            for line in summary_markdown(cross_validate_qnet(qdata, sft, out, cfg, folds)):
                typer.echo(line)
            typer.echo(str(out))
            return
        from ..training.qnet import summary_lines, train_qnet

        result = train_qnet(qdata, sft, out, cfg)
        for line in summary_lines(result):
            typer.echo(line)
        typer.echo(str(out))

    @app.command("train-qnet-head")
    def train_qnet_head_cmd(
        qdata: Optional[Path] = typer.Argument(None, dir_okay=False,
            help="Q data (qdata.jsonl) written by exploration."),
        model: str = typer.Option("default", help="SFT policy folder (HF causal LM): the frozen backbone, or "
                                                  "'default'."),
        out: Optional[Path] = typer.Option(None, file_okay=False,
            help="Output folder: the QNet, features.jsonl, qnet_head_result.json/.md."),
        config: Optional[Path] = typer.Option(None, dir_okay=False, help="YAML file of QNetHeadConfig options."),
        set_: list[str] = typer.Option([], "--set",
            help="Override one option, key=value (repeatable), e.g. --set folds=3."),
        list_options: bool = typer.Option(False, "--list-options",
            help="Print every QNetHeadConfig option with its default and help, then exit."),
    ) -> None:
        """Fit a head-only QNet: the SFT model's hidden states as features, a ridge value head picked by
        cross-validation by tree against the SFT log-likelihood ranker. Rerun to resume."""
        from ..config import describe, load_config, parse_kv
        from ..errors import QlassError
        from ..models import model_folder
        from ..training.configs import QNetHeadConfig

        if list_options:
            typer.echo(describe(QNetHeadConfig))
            return
        if qdata is None or out is None:
            raise QlassError("qlass train-qnet-head needs QDATA and --out DIR")
        cfg = load_config(config, QNetHeadConfig, parse_kv(set_, "--set"))
        sft = model_folder(model)
        from ..qnet_head import result_markdown, train_qnet_head

        for line in result_markdown(train_qnet_head(qdata, sft, out, cfg)):
            typer.echo(line)
        typer.echo(str(out))
