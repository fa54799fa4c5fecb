"""``qlass rft`` (the RFT baseline) and ``qlass self-train`` (tree-guided self-training, paper Fig. 4):
agents fine-tuned again on the expert data plus trajectories of their own."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import QlassError


def register(app: typer.Typer) -> None:
    @app.command("rft")
    def rft_cmd(
        model: Optional[str] = typer.Option(None, help="The SFT agent that samples: a model folder, an "
                                                       "OpenAI-compatible base URL (http://.../v1) or "
                                                       "package.module:Class."),
        expert: Optional[Path] = typer.Option(None, dir_okay=False,
            help="The expert trajectories the SFT agent was trained on (its successes are added to them)."),
        base: str = typer.Option("default", help="The base causal-LM folder, or 'default' (fine-tuned with "
                                                 "init=base)."),
        env: str = typer.Option("sciworld", help="Environment name or package.module:Class."),
        task_types: Optional[str] = typer.Option(None, help="Comma-separated task types to keep."),
        out: Optional[Path] = typer.Option(None, file_okay=False,
            help="Output folder: samples/ (records, resumable), data.json, sft/ (the RFT agent)."),
        rft_set: list[str] = typer.Option([], "--rft",
            help="An RFT option key=value (repeatable), e.g. --rft samples=8 --rft init=sft; --list-options lists "
                 "them."),
        config: Optional[Path] = typer.Option(None, dir_okay=False,
            help="YAML file of SFTConfig options for the fine-tuning (e.g. configs/sft-cpu.yaml)."),
        set_: list[str] = typer.Option([], "--set", help="Override one SFTConfig option, key=value (repeatable)."),
        env_arg: list[str] = typer.Option([], help="Environment constructor option key=value (repeatable)."),
        policy_arg: list[str] = typer.Option([], help="Policy option key=value for sampling (repeatable)."),
        seed: int = typer.Option(0, help="Run seed (each draw's seed comes from it, the draw and the task)."),
        backend: str = typer.Option("local", help="Executor for sampling: local, process or ray."),
        workers: int = typer.Option(2, min=1, help="Worker processes / Ray actors (process and ray backends)."),
        concurrency: int = typer.Option(16, min=1, help="Episodes each worker plays at once in lockstep."),
        list_options: bool = typer.Option(False, "--list-options",
            help="Print every RFT option (--rft) and SFTConfig option (--set, --config) with its default and help, "
                 "then exit."),
    ) -> None:
        """Rejection-sampling fine-tuning: sample K episodes per training task with the SFT agent, keep the
        successful ones, fine-tune on the expert data plus them; rerun the same command to resume."""
        from ..config import build, describe_sections, load_config, parse_kv
        from ..models import model_folder
        from ..policy import is_class_spec
        from ..rft import RFTConfig, run_rft
        from ..training.configs import SFTConfig
        from .explore import policy_factory

        if list_options:
            typer.echo(describe_sections([("--rft (RFT options)", RFTConfig),
                                          ("--set / --config (SFTConfig)", SFTConfig)]))
            return
        if model is None or expert is None or out is None:
            raise QlassError("qlass rft needs --model (the SFT agent), --expert FILE and --out DIR")
        cfg = build(RFTConfig, parse_kv(rft_set, "--rft"), "--rft")
        sft_cfg = load_config(config, SFTConfig, parse_kv(set_, "--set"))
        policy_opts = parse_kv(policy_arg, "--policy-arg")
        agent, data = run_rft(
            model=str(model_folder(model)) if model == "default" else model, expert=expert, base=model_folder(base),
            env_spec=env, out_dir=out, cfg=cfg, sft_cfg=sft_cfg, env_kwargs=parse_kv(env_arg, "--env-arg"),
            task_types=task_types.split(",") if task_types else None, policy_kwargs=policy_opts,
            seed=seed, backend=backend, workers=workers, concurrency=concurrency,
            policy=policy_factory(model, policy_opts) if is_class_spec(model) else None)
        typer.echo(f"{data.expert} expert + {data.added} sampled trajectories ({data.below_threshold} below "
                   f"min_reward, {data.duplicates} duplicates and {data.unusable} without an action left out); "
                   f"the RFT agent: {agent}")

    @app.command("self-train")
    def self_train_cmd(
        trees: Optional[Path] = typer.Argument(None, dir_okay=False, help="trees.jsonl written by `qlass explore`."),
        reward: str = typer.Option("q", help="Process reward that selects each task's trajectory: q (Q-value, Eq. 7), "
                                             "avg (average reward of the leaves below) or reward (the node's own)."),
        expert: Optional[Path] = typer.Option(None, dir_okay=False,
            help="The expert trajectories (the selection is added to them)."),
        model: str = typer.Option("default", help="The model to fine-tune: the base causal-LM folder, 'default', or an "
                                                  "SFT checkpoint."),
        out: Optional[Path] = typer.Option(None, file_okay=False,
            help="Output folder: selection.json, data.json, sft/ (the agent)."),
        gamma: Optional[float] = typer.Option(None, help="Discount of the Q-value reward (default: the trees' gamma)."),
        keep_intermediate: bool = typer.Option(False,
            help="Q-value reward: keep intermediate rewards (as the qdata option)."),
        min_reward: Optional[float] = typer.Option(None,
            help="Leave out a selected trajectory whose outcome is below this (default: keep one per task)."),
        prefer_agent: bool = typer.Option(True, help="Choose among the agent's own nodes where there are any, taking a "
                                                     "grafted expert step only where it has no alternative "
                                                     "(--no-prefer-agent: expert nodes compete too)."),
        config: Optional[Path] = typer.Option(None, dir_okay=False,
            help="YAML file of SFTConfig options for the fine-tuning."),
        set_: list[str] = typer.Option([], "--set", help="Override one SFTConfig option, key=value (repeatable)."),
        list_options: bool = typer.Option(False, "--list-options",
            help="Print every SFTConfig option (--set, --config) with its default and help, then exit."),
    ) -> None:
        """Select one trajectory per exploration tree by a process reward (paper Fig. 4) and fine-tune on the
        expert data plus the selection; rerun the same command to resume. Evaluate the agent with `qlass eval`."""
        from ..config import build, describe, load_config, parse_kv
        from ..models import model_folder
        from ..self_train import SelfTrainConfig, check_reward, self_train
        from ..training.configs import SFTConfig

        if list_options:
            typer.echo(describe(SFTConfig))
            return
        if trees is None or expert is None or out is None:
            raise QlassError("qlass self-train needs TREES (a trees.jsonl), --expert FILE and --out DIR")
        check_reward(reward)
        cfg = build(SelfTrainConfig, {"gamma": gamma, "keep_intermediate": keep_intermediate, "min_reward": min_reward,
                                      "prefer_agent": prefer_agent},
                    "qlass self-train")
        sft_cfg = load_config(config, SFTConfig, parse_kv(set_, "--set"))
        agent, data, summary = self_train(trees, expert, model_folder(model), out, reward, sft_cfg, cfg)
        typer.echo(f"{summary['selected']} of {summary['trees']} trees give a trajectory (mean outcome "
                   f"{summary['mean_outcome']:.3f}, {summary['successes']} successes); {data.added} added to "
                   f"{data.expert} expert trajectories ({data.duplicates} repeat one, {data.unusable} without an "
                   f"action); the agent: {agent}")
