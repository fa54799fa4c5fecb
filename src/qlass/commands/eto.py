"""``qlass eto``: the ETO baseline (the agent's failures paired with the expert trajectories, DPO, for one
or more explore-train rounds)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import QlassError


def register(app: typer.Typer) -> None:
    @app.command("eto")
    def eto_cmd(
        model: Optional[Path] = typer.Option(None, file_okay=False,
            help="The SFT agent: a local model folder (it explores, then DPO trains it)."),
        expert: Optional[Path] = typer.Option(None, dir_okay=False,
            help="The expert trajectories the SFT agent was trained on (the chosen side of each pair)."),
        env: str = typer.Option("sciworld", help="Environment name or package.module:Class."),
        task_types: Optional[str] = typer.Option(None, help="Comma-separated task types to keep."),
        out: Optional[Path] = typer.Option(None, file_okay=False,
            help="Output folder: round-K/ (explore/ records, pairs.jsonl, summary.json, dpo/ the agent of round K)."),
        eto_set: list[str] = typer.Option([], "--eto",
            help="An ETO option key=value (repeatable), e.g. --eto iterations=3 --eto temperature=0.7; --list-options "
                 "lists them."),
        config: Optional[Path] = typer.Option(None, dir_okay=False,
            help="YAML file of DPOConfig options for the DPO of every round."),
        set_: list[str] = typer.Option([], "--set", help="Override one DPOConfig option, key=value (repeatable)."),
        env_arg: list[str] = typer.Option([], help="Environment constructor option key=value (repeatable)."),
        policy_arg: list[str] = typer.Option([], help="Policy option key=value for exploration (repeatable)."),
        seed: int = typer.Option(0, help="Run seed (round K explores with seed + K - 1)."),
        backend: str = typer.Option("local", help="Executor for exploration: local, process or ray."),
        workers: int = typer.Option(2, min=1, help="Worker processes / Ray actors (process and ray backends)."),
        concurrency: int = typer.Option(16, min=1, help="Episodes each worker plays at once in lockstep."),
        list_options: bool = typer.Option(False, "--list-options",
            help="Print every ETO option (--eto) and DPOConfig option (--set, --config) with its default and help, "
                 "then exit."),
    ) -> None:
        """Exploration-based trajectory optimisation: the SFT agent plays the training tasks, each failure is
        paired with the expert trajectory of its task, DPO on the pairs; repeated for --eto iterations=N rounds.
        Rerun the same command to resume. Evaluate the agent with `qlass eval`."""
        from ..config import build, describe_sections, load_config, parse_kv
        from ..eto_config import ETOConfig
        from ..training.configs import DPOConfig

        if list_options:
            typer.echo(describe_sections([("--eto (ETO options)", ETOConfig),
                                          ("--set / --config (DPOConfig)", DPOConfig)]))
            return
        if model is None or expert is None or out is None:
            raise QlassError("qlass eto needs --model (the SFT agent's folder), --expert FILE and --out DIR")
        cfg = build(ETOConfig, parse_kv(eto_set, "--eto"), "--eto")
        dpo_cfg = load_config(config, DPOConfig, parse_kv(set_, "--set"))
        from ..eto import run_eto

        agent, rounds = run_eto(model, expert, env, out, cfg, dpo_cfg, env_kwargs=parse_kv(env_arg, "--env-arg"),
                                task_types=task_types.split(",") if task_types else None,
                                policy_kwargs=parse_kv(policy_arg, "--policy-arg"), seed=seed, backend=backend,
                                workers=workers, concurrency=concurrency)
        for k, summary in enumerate(rounds, start=1):
            typer.echo(f"round {k}: {summary['episodes']} episodes, average reward {summary['mean_reward']:.3f}, "
                       f"{summary['failures']} failures → {summary['pairs']} pairs ({summary['no_expert']} without an "
                       f"expert trajectory, {summary['expert_not_better']} where the expert is no better, "
                       f"{summary['unusable']} unusable)")
        typer.echo(f"the ETO agent: {agent}")
