"""``qlass explore`` (stage 2: exploration trees) and ``qlass qdata`` (trees → Q dataset)."""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any, Optional

import typer

from ..errors import QlassError


def policy_factory(spec: str, options: dict[str, Any]) -> functools.partial:
    """A picklable policy factory: a model folder, ``default``, a server URL, or a user's own class
    as ``package.module:Class`` (see :func:`qlass.policy.load_policy`)."""
    from ..policy import load_policy

    return functools.partial(load_policy, spec, **options)


def register(app: typer.Typer) -> None:
    @app.command("explore")
    def explore_cmd(
        model: Optional[str] = typer.Option(None, help="Policy: model folder, 'default', server URL (http://.../v1) or "
                                                       "package.module:Class."),
        env: str = typer.Option("sciworld", help="Environment name or package.module:Class."),
        split: str = typer.Option("train", help="Split the tasks come from."),
        task_types: Optional[str] = typer.Option(None, help="Comma-separated task types to keep."),
        skip: int = typer.Option(0, min=0, help="Skip the first this-many tasks of each task type."),
        exclude_tasks_of: Optional[Path] = typer.Option(None, dir_okay=False,
            help="Leave out the tasks of this trajectory file (e.g. the expert/SFT data)."),
        limit: Optional[int] = typer.Option(None, min=1, help="At most this many tasks (round-robin over task types)."),
        out: Path = typer.Option(Path("runs/explore/trees.jsonl"), dir_okay=False,
            help="trees.jsonl to append to (resumable)."),
        config: Optional[Path] = typer.Option(None, dir_okay=False, help="YAML file with ExploreConfig options."),
        set_: list[str] = typer.Option([], "--set", help="Override an ExploreConfig option: key=value (repeatable)."),
        env_arg: list[str] = typer.Option([], help="Environment constructor option key=value (repeatable)."),
        policy_arg: list[str] = typer.Option([], help="Policy option key=value (repeatable)."),
        seed: int = typer.Option(0, help="Run seed (each tree's seed is derived from it and the task id)."),
        backend: str = typer.Option("local", help="Executor: local, process or ray."),
        workers: int = typer.Option(2, min=1, help="Worker processes / Ray actors (process and ray backends)."),
        concurrency: int = typer.Option(8, min=1,
            help="Trees each worker builds at once in lockstep (batched policy calls); the trees do not depend on it."),
        ray_address: Optional[str] = typer.Option(None, help="Address of an existing Ray cluster (ray backend)."),
        progress: bool = typer.Option(True, help="Show the progress display."),
        list_options: bool = typer.Option(False, "--list-options",
            help="Print every ExploreConfig option with its default and help, then exit."),
    ) -> None:
        """Build one exploration tree per task (paper stage 2) and append it to OUT; rerun to resume."""
        from ..config import describe, load_config, parse_kv
        from ..envs.base import check_splits, env_close, env_tasks, make_env
        from ..evaluate import cache_for
        from ..executor import make_executor
        from ..explore import EXPLORE_CACHE_PER_TREE, ExploreConfig, check_trees_output, explore_tasks
        from ..explore_config import expert_task_ids, exploration_tasks
        from ..policy import check_policy_spec, is_class_spec
        from ..tree import tree_summary

        if list_options:
            typer.echo(describe(ExploreConfig))
            return
        if model is None:
            raise QlassError("qlass explore needs --model (a model folder, 'default', a server URL or module:Class)")
        cfg = load_config(config, ExploreConfig, parse_kv(set_, "--set"))
        env_kwargs = parse_kv(env_arg, "--env-arg")
        make = functools.partial(make_env, env, **env_kwargs)
        probe = make()
        try:
            check_splits(probe, [split], env)
            tasks = env_tasks(probe, split, task_types.split(",") if task_types else None)
        finally:
            env_close(probe)
        exclude = expert_task_ids(exclude_tasks_of) if exclude_tasks_of else set()
        tasks = exploration_tasks(tasks, max(skip, 0), limit, exclude)
        if not tasks:
            raise QlassError(f"{env}: no tasks in split {split!r} (task types {task_types}, skip {skip} per type, "
                             f"{len(exclude)} excluded)")
        if concurrency < 1:
            raise QlassError(f"--concurrency must be >= 1, got {concurrency}")
        check_trees_output(out)  # before the policy loads
        policy_opts = parse_kv(policy_arg, "--policy-arg")
        policy_opts = cache_for(model, policy_opts, EXPLORE_CACHE_PER_TREE * concurrency)
        factory = policy_factory(model, policy_opts)
        options = {"address": ray_address} if backend == "ray" and ray_address else {}
        executor = make_executor(backend, workers, **options)
        # A built-in backend's model and options are checked here without loading it: the worker loads it once,
        # after explore_tasks has locked the output (a read-only disk is refused before torch loads) and before
        # a tree is built. A user's class is built here, so its options too are checked before the output's
        # settings are recorded.
        check_policy_spec(model, policy_opts)
        policy = factory() if backend == "local" and is_class_spec(model) else factory
        start = time.perf_counter()
        settings = {"model": model, "env": env, "env_args": env_kwargs, "policy": policy_opts}
        trees = explore_tasks(make, tasks, policy, cfg, out, seed=seed, executor=executor, progress=progress,
                              concurrency=concurrency, settings=settings)
        s = tree_summary(trees)
        typer.echo(f"{s['trees']} trees, {s['nodes']} nodes, {s['edges']} edges, {s['branches']} sampled branches "
                   f"({s['truncated']} outputs cut off by max_new_tokens, left out), {s['env_steps']} env steps "
                   f"({s['env_steps_per_edge']:.2f} per edge), {s['trees_with_success']} with a reward-1 leaf, "
                   f"{s['prompt_tokens'] + s['completion_tokens']} policy tokens; "
                   f"{time.perf_counter() - start:.1f} s this run")
        typer.echo(str(out))

    @app.command("qdata")
    def qdata_cmd(
        trees: Path = typer.Argument(..., dir_okay=False, help="trees.jsonl written by `qlass explore`."),
        out: Path = typer.Option(..., dir_okay=False, help="qdata.jsonl to write (one record per non-root node)."),
        gamma: Optional[float] = typer.Option(
            None, min=0.0, max=1.0,
            help="Discount of Eq. 7 (default: the trees' own, explore's gamma: 0.9 unless set)."),
        keep_intermediate: bool = typer.Option(False,
            help="Keep intermediate rewards (as score increments) instead of zeroing them."),
        normalize: bool = typer.Option(False, help="Min-max normalise Q per tree."),
        max_per_tree: int = typer.Option(300, min=0, help="At most this many records per tree (0: no limit)."),
    ) -> None:
        """Compute Q values (Bellman backup, Eq. 7) and export the Q dataset for QNet training."""
        from ..qdata import export_qdata, read_qdata
        from ..tree import BackupConfig

        try:
            backup = BackupConfig(gamma=BackupConfig.gamma if gamma is None else gamma,
                                  keep_intermediate=keep_intermediate, normalize=normalize)
        except ValueError as exc:
            raise QlassError(str(exc)) from None
        counts = export_qdata(trees, out, backup, max_per_tree or None, own_gamma=gamma is None)
        read_qdata(out)
        typer.echo(f"{counts['records']} records from {counts['trees']} trees ({counts['nodes']} non-root nodes) "
                   f"→ {out}")
