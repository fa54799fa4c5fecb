"""``qlass sft``: behaviour cloning of a causal LM on expert trajectories (stage 1); ``qlass dpo``: DPO on
preference pairs of trajectories (the ETO baseline's step)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("sft")
    def sft(
        data: Optional[Path] = typer.Option(None, dir_okay=False,
            help="Expert trajectories (conversation JSON/JSONL)."),
        model: str = typer.Option("default", help="Base causal-LM folder, or 'default' (SmolLM2-135M-Instruct)."),
        out: Optional[Path] = typer.Option(None, file_okay=False,
            help="Output folder: the fine-tuned model (HF format), metrics.jsonl; checkpoint-N folders while "
                 "training."),
        config: Optional[Path] = typer.Option(None, dir_okay=False,
            help="YAML file of SFTConfig options, e.g. configs/sft-cpu.yaml (defaults: paper Table 5)."),
        set_: list[str] = typer.Option([], "--set",
            help="Override one option, key=value (repeatable), e.g. --set epochs=1."),
        list_options: bool = typer.Option(False, "--list-options",
            help="Print every SFTConfig option with its default and help, then exit."),
    ) -> None:
        """Fine-tune on the agent turns of expert trajectories (TRL SFTTrainer); rerun the same command to resume.

        Runs as it is or under `accelerate launch [--num_processes N] -m qlass sft ...` with the same arguments."""
        from ..config import describe, load_config, parse_kv
        from ..errors import QlassError
        from ..models import model_folder
        from ..training.configs import SFTConfig

        if list_options:
            typer.echo(describe(SFTConfig))
            return
        if data is None or out is None:
            raise QlassError("qlass sft needs --data FILE and --out DIR")
        cfg = load_config(config, SFTConfig, parse_kv(set_, "--set"))
        base = model_folder(model)
        from ..training.sft import train_sft

        typer.echo(str(train_sft(data, base, out, cfg)))

    @app.command("sft-export")
    def sft_export(
        run: Path = typer.Argument(..., file_okay=False,
            help="An SFT output folder in training (or one of its checkpoint-N folders)."),
        dest: Path = typer.Argument(..., file_okay=False, help="Where to write the HF causal-LM folder."),
        model: str = typer.Option("default", help="The run's base causal-LM folder, or 'default' (needed for a LoRA "
                                                  "run)."),
    ) -> None:
        """Write the latest checkpoint of an SFT run as a plain HF model folder (to evaluate it mid-training)."""
        from ..models import model_folder
        from ..training.sft_export import export_checkpoint

        base = model_folder(model)
        step = export_checkpoint(run, base, dest)
        typer.echo(f"{dest} (step {step})")

    @app.command("dpo")
    def dpo(
        pairs: Optional[Path] = typer.Option(None, dir_okay=False,
            help="Preference pairs: JSON/JSONL records {id, chosen, rejected}, each side a trajectory record."),
        model: str = typer.Option("default", help="The causal-LM folder to start from (usually the SFT model), or "
                                                  "'default'."),
        out: Optional[Path] = typer.Option(None, file_okay=False,
            help="Output folder: the trained model (HF format), metrics.jsonl; checkpoint-N folders while training."),
        config: Optional[Path] = typer.Option(None, dir_okay=False, help="YAML file of DPOConfig options."),
        set_: list[str] = typer.Option([], "--set",
            help="Override one option, key=value (repeatable), e.g. --set beta=0.1."),
        list_options: bool = typer.Option(False, "--list-options",
            help="Print every DPOConfig option with its default and help, then exit."),
    ) -> None:
        """DPO (TRL DPOTrainer) on the agent turns of preference pairs; rerun the same command to resume.

        Runs as it is or under `accelerate launch [--num_processes N] -m qlass dpo ...` with the same arguments."""
        from ..config import describe, load_config, parse_kv
        from ..errors import QlassError
        from ..models import model_folder
        from ..training.configs import DPOConfig

        if list_options:
            typer.echo(describe(DPOConfig))
            return
        if pairs is None or out is None:
            raise QlassError("qlass dpo needs --pairs FILE and --out DIR")
        cfg = load_config(config, DPOConfig, parse_kv(set_, "--set"))
        base = model_folder(model)
        from ..training.dpo import train_dpo

        typer.echo(str(train_dpo(pairs, base, out, cfg)))
