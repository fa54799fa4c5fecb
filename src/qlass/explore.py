"""Stage 2: exploration trees (paper §4.2, Fig. 2) for a list of tasks, appended to ``trees.jsonl`` as
they finish: workers of an executor (in process, processes or Ray) each build ``concurrency`` trees
at once in lockstep (their policy requests batched), a rerun resumes after the finished trees and
refuses a file made with other settings or another seed. How one tree grows (sampling, probes,
rollouts, pruning, the expert graft, caps) is :mod:`qlass.explore_tree`.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .config import differences, save_yaml, to_dict
from .config_fields import require_config
from .console import stderr_console
from .data import refuse_replacing_other_kind
from .envs.base import Env, check_env_factory, check_tasks, env_close
from .errors import QlassError
from .executor import Executor, LocalExecutor, runs_here
from .explore_config import LEGACY, ExploreConfig, expert_task_ids, exploration_tasks, explore_digest
from .explore_tree import TreeBuilder, build_tree, tree_seed
from .jsonl import append_jsonl
from .locking import writes_to
from .lockstep import Episode, drive, run_one
from .policy.base import Policy, check_policy_argument, ready_policy
from .precision import with_precision
from .recorded import check_recorded, with_model_files
from .tree import Tree, read_trees, tree_from_dict
from .types import Task

EXPLORE_CACHE_PER_TREE = 4
"""Prompt caches a local policy keeps per live tree (its current branch and a few siblings' prefixes)."""

log = logging.getLogger(__name__)


class TreeWorker:
    """Builds trees in one worker (executor ``setup``): ``TreeWorker(...)()`` makes the policy and a
    first env once; the result builds ``(task, seed)`` jobs into ``trees.jsonl`` records —
    ``concurrency`` trees at once through its ``stream`` method (their policy requests batched wave by
    wave, each tree on an environment of its own), or one by calling it. A tree does not depend on
    ``concurrency`` (its samples are seeded per node), up to the rounding of batched bf16 arithmetic.

    ``make_env`` and ``policy`` must be picklable for the process and Ray backends (e.g.
    ``functools.partial(make_env, "sciworld")`` and ``functools.partial(load_policy, path)``);
    ``policy`` may also be a ready :class:`Policy` object for the local backend."""

    def __init__(self, make_env: Callable[[], Env], policy: Policy | Callable[[], Policy], cfg: ExploreConfig,
                 concurrency: int = 1) -> None:
        if concurrency < 1:
            raise QlassError(f"concurrency must be >= 1, got {concurrency}")
        self.make_env, self.policy, self.cfg, self.concurrency = make_env, policy, cfg, concurrency

    def __call__(self) -> _BoundWorker:
        return _BoundWorker(self.make_env, ready_policy(self.policy), self.cfg, self.concurrency)


class _BoundWorker:
    def __init__(self, make_env: Callable[[], Env], policy: Policy, cfg: ExploreConfig, concurrency: int) -> None:
        self.make_env, self.policy, self.cfg, self.concurrency = make_env, policy, cfg, concurrency
        self.envs: list[Env] = [make_env()]
        self.free: list[Env] = list(self.envs)

    def _tree(self, job: tuple[Task, int]) -> Episode[dict[str, Any]]:
        task, seed = job
        if not self.free:
            self.envs.append(self.make_env())
            self.free.append(self.envs[-1])
        env = self.free.pop()
        try:
            tree = yield from TreeBuilder(env, self.policy, task, self.cfg, seed).grow()
            return tree.to_dict()
        finally:
            self.free.append(env)

    def stream(self, jobs: Iterable[tuple[Task, int]]) -> Iterator[tuple[int, dict[str, Any]]]:
        """Build ``jobs``, ``concurrency`` trees at a time in lockstep; yields ``(position, record)`` as
        trees finish."""
        starters = (functools.partial(self._tree, job) for job in jobs)
        yield from drive(starters, self.policy, None, self.concurrency)

    def __call__(self, job: tuple[Task, int]) -> dict[str, Any]:
        return run_one(self._tree(job), self.policy)

    def close(self) -> None:
        for env in self.envs:
            env_close(env)


def settings_file(path: Path) -> Path:
    """``NAME.config.yaml`` beside the trees file ``NAME.jsonl``: what made its trees (policy, env, seed)."""
    return path.with_name(f"{path.stem}.config.yaml")


def check_trees_output(path: str | Path) -> None:
    """Refuse an output path that holds another stage's file (Q data, evaluation records, ...), which
    exploration would append trees to; a trees file (its first record has ``tree_id`` and ``nodes``) passes."""
    refuse_replacing_other_kind(path, "a trees file", lambda rec: rec.keys() >= {"tree_id", "nodes"})


def _finished(path: Path, tasks: Sequence[Task], cfg: ExploreConfig, run_seed: int,
              settings: dict[str, Any] | None = None, here: bool = True) -> dict[str, Tree]:
    """Trees already in ``path`` for ``tasks``; refuses trees made with other exploration settings or
    seed (each tree records both) and, given ``settings`` (model, env, env_args, policy options), a
    file whose :func:`settings_file` records others, naming the differences; then records ``settings``
    and the seed there (and the policy's precision when it runs ``here``, :func:`~qlass.precision.with_precision`).
    A file without that record (trees written before it existed) resumes on each tree's settings and
    seed alone; a record that lacks the model, env or seed is refused."""
    check_trees_output(path)
    trees = {t.tree_id: t for t in read_trees(path, repair_tail=True)} if path.exists() else {}
    if settings is not None:
        settings = with_model_files(with_precision({**settings, "seed": run_seed}, here))
        sidecar = settings_file(path)
        if trees:
            check_recorded(sidecar, settings, str(path), advice="use a new output file",
                           required=("model", "env", "seed") if sidecar.exists() else ())
        save_yaml(settings_file(path), settings)
    elif trees and settings_file(path).exists():  # made with settings: this run's own cannot be left unsaid
        check_recorded(settings_file(path), {"seed": run_seed}, str(path), advice="use a new output file",
                       required=("model", "env", "seed"))
    want = explore_digest(cfg)
    recorded = next((t for t in trees.values() if t.config_hash), None)  # read_trees: all of one run's settings
    for tree in [trees[task.id] for task in tasks if task.id in trees] + ([recorded] if recorded else []):
        if tree.config_hash != want:  # another task's tree too: new trees would make a file qdata refuses
            diff = "; ".join(differences({**LEGACY, **tree.config}, to_dict(cfg)))
            raise QlassError(f"{path}: tree {tree.tree_id!r} was made with other exploration settings "
                             f"({diff or f'config hash {tree.config_hash}, now {want}'}); use a new output file")
    for task in tasks:
        tree = trees.get(task.id)
        if tree is not None and tree.seed != tree_seed(run_seed, task):
            raise QlassError(f"{path}: tree {task.id!r} was made with another run seed; use a new output file")
    return trees


@writes_to("out_path", folder=False)
def explore_tasks(
    make_env: Callable[[], Env],
    tasks: Sequence[Task],
    policy: Policy | Callable[[], Policy],
    cfg: ExploreConfig,
    out_path: str | Path,
    seed: int = 0,
    executor: Executor | None = None,
    progress: bool = True,
    concurrency: int = 1,
    settings: dict[str, Any] | None = None,
) -> list[Tree]:
    """Build the tree of every task not yet in ``out_path`` and append each as it finishes.

    Resumable: a rerun skips finished tasks (a torn last line is cut first); returns the trees of
    ``tasks`` in task order. ``executor`` defaults to in-process; each of its workers builds
    ``concurrency`` trees at once in lockstep (:class:`TreeWorker`). ``settings`` describe the
    policy and environment (``model``, ``env``, ``env_args``, ``policy``); with the seed they are
    checked against and saved to ``NAME.config.yaml`` (see :func:`_finished`).
    """
    check_env_factory(make_env, "explore_tasks")
    require_config(cfg, ExploreConfig, "explore_tasks")
    check_tasks(tasks, "explore_tasks")
    check_policy_argument(policy, "explore_tasks")
    if not tasks:
        log.warning("explore_tasks: no tasks given; nothing to explore")
    path = Path(out_path)
    if settings is not None and cfg.paraphrases is not None:  # how the cache was made: another one is refused
        settings = {**settings, "paraphrases": cfg.paraphrases.settings}
    if settings is None and tasks:
        log.warning("explore_tasks: no settings given (model, env, env_args, policy): %s records none, so a rerun "
                    "cannot refuse another policy's trees", settings_file(path))
    done = _finished(path, tasks, cfg, seed, settings, runs_here(executor))
    todo = [t for t in tasks if t.id not in done]
    missing = cfg.paraphrases.missing(todo) if cfg.paraphrases is not None else []
    if missing:
        raise QlassError(f"{cfg.paraphrase}: no paraphrase of {len(missing)} task(s) to explore (first: "
                         f"{missing[0]!r}); add them with qlass paraphrase")
    if len(todo) < len(tasks):
        log.info("resuming: %d of %d trees already in %s", len(tasks) - len(todo), len(tasks), path)
    jobs = [(t, tree_seed(seed, t)) for t in todo]
    columns = (TextColumn("[bold]explore[/]"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[nodes]} nodes  {task.fields[tokens]} tok  {task.fields[steps]} env steps  "
                          "{task.fields[rate]:.1f} nodes/min"), TimeElapsedColumn(),
               TextColumn("{task.description}", markup=False))  # a tree id is text, never markup
    start = time.perf_counter()
    totals = {"nodes": 0, "tokens": 0, "steps": 0}
    with Progress(*columns, disable=not progress, console=stderr_console()) as bar:  # stdout: results
        handle = bar.add_task("", total=len(jobs), rate=0.0, **totals)
        for _, record in (executor or LocalExecutor()).run(TreeWorker(make_env, policy, cfg, concurrency), jobs):
            tree = tree_from_dict(record, "<worker result>")
            append_jsonl(path, record)
            done[tree.tree_id] = tree
            totals["nodes"] += len(tree.nodes)
            totals["tokens"] += tree.stats["prompt_tokens"] + tree.stats["completion_tokens"]
            totals["steps"] += tree.stats["env_steps"]
            rate = totals["nodes"] / max((time.perf_counter() - start) / 60, 1e-9)
            bar.update(handle, advance=1, description=tree.tree_id, rate=rate, **totals)
            log.info("tree %s: %d nodes, %d sampled branches (%d outputs cut off by max_new_tokens, left out), %d "
                     "env steps, best reward %.2f, stopped by %s", tree.tree_id, len(tree.nodes),
                     tree.stats.get("branches", 0), tree.stats.get("truncated", 0), tree.stats["env_steps"],
                     tree.stats["best_reward"], tree.stats["stopped_by"])
    trees = [done[t.id] for t in tasks]
    if trees and not any(t.stats.get("branches", 0) for t in trees):
        log.warning("%s: no tree holds a sampled alternative (%d outputs were cut off by max_new_tokens, %d merged "
                    "into an equal sibling): the Q data has no sibling actions to rank, so a QNet learns no choice; "
                    "raise max_new_tokens or candidates", path, sum(t.stats.get("truncated", 0) for t in trees),
                    sum(t.stats.get("merged", 0) for t in trees))
    return trees


__all__ = [
    "ExploreConfig",
    "TreeBuilder",
    "TreeWorker",
    "build_tree",
    "expert_task_ids",
    "exploration_tasks",
    "explore_tasks",
    "tree_seed",
]
