"""``qlass paraphrase``: the paraphrase cache of task perturbation (paper Fig. 9)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import typer

from ..errors import QlassError


def register(app: typer.Typer) -> None:
    @app.command("paraphrase")
    def paraphrase_cmd(
        env: str = typer.Option("sciworld", help="Environment name or package.module:Class."),
        split: str = typer.Option("train", help="Split the tasks come from."),
        task_types: Optional[str] = typer.Option(None, help="Comma-separated task types to keep."),
        limit: Optional[int] = typer.Option(None, min=1, help="At most this many tasks (round-robin over task types)."),
        source: Optional[str] = typer.Option(None, help="'template' (per-environment templates: webshop, sciworld, "
                                                        "alfworld), or the policy that paraphrases: a model folder, "
                                                        "'default', an OpenAI-compatible base URL (http://.../v1) or "
                                                        "package.module:Class."),
        out: Optional[Path] = typer.Option(None, dir_okay=False,
            help="The cache (JSON Lines) to append to; rerun to resume or to add tasks."),
        para_set: list[str] = typer.Option([], "--set",
            help="A sampling option key=value (repeatable): samples, temperature, max_new_tokens, batch."),
        env_arg: list[str] = typer.Option([], help="Environment constructor option key=value (repeatable)."),
        policy_arg: list[str] = typer.Option([], help="Policy option key=value (repeatable)."),
        seed: int = typer.Option(0, help="Run seed (each task's samples and template variant are drawn from it and the "
                                         "task id)."),
        list_options: bool = typer.Option(False, "--list-options",
            help="Print every sampling option (--set) with its default and help, then exit."),
    ) -> None:
        """Paraphrase the task descriptions of a split, keep those that keep every goal constraint and cache
        them for the paraphrase option of `qlass explore` and the qlass method (task perturbation)."""
        from ..config import build, describe, parse_kv
        from ..envs.base import check_splits, env_close, env_tasks, make_env
        from ..evaluate import select_tasks
        from ..paraphrase import ParaphraseConfig, build_paraphrases
        from .explore import policy_factory

        if list_options:
            typer.echo(describe(ParaphraseConfig))
            return
        if source is None or out is None:
            raise QlassError("qlass paraphrase needs --source (template, or a model folder / server URL / "
                             "module:Class) and --out FILE")
        cfg = build(ParaphraseConfig, parse_kv(para_set, "--set"), "--set")
        env_kwargs = parse_kv(env_arg, "--env-arg")
        policy_opts = parse_kv(policy_arg, "--policy-arg")
        if source == "template" and policy_opts:
            raise QlassError("--policy-arg is for a model source; --source template takes none")
        make = functools.partial(make_env, env, **env_kwargs)
        probe = make()
        try:
            check_splits(probe, [split], env)
            tasks = select_tasks(env_tasks(probe, split, task_types.split(",") if task_types else None), limit)
        finally:
            env_close(probe)
        if not tasks:
            raise QlassError(f"{env}: no tasks in split {split!r} (task types {task_types})")
        policy = None if source == "template" else policy_factory(source, policy_opts)
        settings = {"env": env, "env_args": env_kwargs}
        if policy is not None:
            settings.update(model=source, policy=policy_opts)
        counts = build_paraphrases(make, tasks, out, policy, cfg, seed, settings)
        typer.echo(f"{counts['tasks']} tasks paraphrased this run: {counts['model']} by the model, "
                   f"{counts['template']} from templates, {counts['original']} left as they were; "
                   f"{counts['rejected']} paraphrases rejected for dropping a goal constraint (or empty, "
                   f"unchanged, too long, cut off)")
        typer.echo(str(out))
