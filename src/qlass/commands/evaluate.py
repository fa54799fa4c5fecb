"""``qlass eval``: run inference methods over environment splits and write the results table."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..config import parse_kv
from ..errors import QlassError


def method_options() -> str:
    """Every registered method with its options (name, default, help), for ``--list-options``."""
    from ..config import describe
    from ..search import METHODS

    blocks = []
    for name, method in METHODS.items():
        doc = " ".join((method.config.__doc__ or "").split())
        options = "\n".join(f"  {line}" for line in describe(method.config).splitlines())
        blocks.append(f"{name}: {doc}\n{options}")
    return "\n\n".join(blocks)


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        model: Optional[str] = typer.Option(None, help="Policy: a local causal-LM folder, 'default', an "
                                                       "OpenAI-compatible base URL (http://.../v1) or "
                                                       "package.module:Class."),
        env: str = typer.Option("sciworld", help="Environment name or package.module:Class."),
        split: list[str] = typer.Option(["seen"], help="Split(s) to evaluate (repeatable)."),
        method: list[str] = typer.Option(["greedy"],
            help="Method spec NAME[:k=v,...], e.g. greedy, 'qlass:m=2', 'best-of-n:n=4,select=likelihood', "
                 "'reflexion:trials=3' (repeatable)."),
        task_types: Optional[str] = typer.Option(None, help="Comma-separated task types to keep."),
        limit: Optional[int] = typer.Option(None, min=1, help="At most this many tasks per split."),
        offset: int = typer.Option(0, min=0, help="Skip the first N tasks of each split's round-robin order "
                                   "(e.g. the tasks a decision benchmark used: --offset 40 --limit 30)."),
        qnet: Optional[Path] = typer.Option(None, file_okay=False,
            help="QNet folder (for qlass and best-of-n select=qnet)."),
        max_steps: Optional[int] = typer.Option(None, min=1,
            help="Step limit per episode (sets every method's max_steps)."),
        oracle_terminal: bool = typer.Option(False, "--oracle-terminal", help="The reference code's shortcut for every "
                                             "qlass method: episode-ending candidates scored by the true reward "
                                             "(rows labelled \\[oracle]; same as qlass:oracle_terminal=true)."),
        env_arg: list[str] = typer.Option([], help="Environment constructor option key=value (repeatable)."),
        policy_arg: list[str] = typer.Option([], help="Policy option key=value, e.g. autocast=true (repeatable)."),
        seed: int = typer.Option(0, help="Run seed."),
        backend: str = typer.Option("local", help="Executor: local, process or ray (each worker loads its own policy, "
                                                  "QNet and env)."),
        workers: int = typer.Option(2, min=1, help="Worker processes / Ray actors (process and ray backends)."),
        concurrency: int = typer.Option(16, min=1, help="Episodes each worker plays at once in lockstep (one batched "
                                        "policy call and one batched QNet call per wave; results do not depend "
                                        "on it). A local model's cache_slots is raised to hold every live "
                                        "conversation unless --policy-arg cache_slots=N is given."),
        ray_address: Optional[str] = typer.Option(None, help="Address of an existing Ray cluster (ray backend)."),
        out: Path = typer.Option(Path("runs/eval"), file_okay=False,
            help="Run folder: records.jsonl (resumable), results.md/json, budget curve."),
        list_options: bool = typer.Option(False, "--list-options",
            help="Print every method's options with their defaults and help, then exit."),
    ) -> None:
        """Evaluate methods on a split: per-task records (resumable), a results table and budget curves."""
        from ..evaluate import run_evaluation
        from ..search import parse_method, set_method_option

        if list_options:
            typer.echo(method_options())
            return
        if model is None:
            raise QlassError("qlass eval needs --model (a model folder, 'default', an OpenAI-compatible base URL or "
                             "package.module:Class)")

        methods = []
        for spec in method:
            name, opts = parse_method(spec)
            if max_steps is not None:
                set_method_option(spec, opts, "max_steps", max_steps, "--max-steps")
            if oracle_terminal and name == "qlass":
                set_method_option(spec, opts, "oracle_terminal", True, "--oracle-terminal")
            methods.append((name, opts))
        rows = run_evaluation(
            model=model, env_spec=env, env_kwargs=parse_kv(env_arg, "--env-arg"), splits=split,
            methods=methods, task_types=task_types.split(",") if task_types else None, limit=limit,
            qnet_dir=qnet, policy_kwargs=parse_kv(policy_arg, "--policy-arg"), seed=seed, out_dir=out,
            backend=backend, workers=workers, concurrency=concurrency, offset=offset,
            executor_options={"address": ray_address} if backend == "ray" and ray_address else None,
        )
        from ..report import markdown_table

        typer.echo(markdown_table(rows))
        typer.echo(f"records, results.md/json and budget curve in {out}")
