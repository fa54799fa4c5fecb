"""Stage 2: exploration trees (paper §4.2, Fig. 2) — construction of one tree per task.

For a task the root is the initial state. *Expanding* a node samples ``candidates`` actions in its
state in one policy call (``temperature``); actions equal to an existing child's or to each other
after normalisation (:func:`qlass.search.normalise_action`) are merged. Every new child is executed
and rolled out to the end of the episode with the policy (:func:`qlass.agent.continue_episode`), so
that it has an outcome reward; the rollout's steps become a chain under it.

Pruning (Fig. 2): when a new branch's rollout ends with reward 0, the whole branch (its first node
and its chain) is marked ``pruned`` and never expanded. Branches with a non-zero outcome are
expanded node by node, depth-first, down to the maximum expansion depth ``D`` (nodes at depth < D
are expanded; defaults per environment from the paper's Table 5).

Expert graft (on when the environment has expert outputs for the task): the expert chain is put
under the root, and at every expert step one sampled sibling branch (rolled out, then expanded as
above when its outcome is non-zero).

Per-tree caps (nodes, policy tokens, env steps) are checked before each new branch; a branch that
has started is rolled out to its end, so a cap can be overshot by one rollout.

Env steps. The explorer never steps an environment to sample (the tree stores every observation,
so a node's history is known) nor for merged candidates, and it positions its environment by
continuing from the current position when that is an ancestor and by reset + replay otherwise.
Without a snapshot/restore API every root-to-leaf path must be walked once by some environment, so
``sum(depth(leaf))`` env steps is the minimum for a tree; the explorer spends exactly that (see
``benchmarks/bench_explore.py``). An environment that also offers ``snapshot()`` (an opaque copy
of the episode's state) and ``restore(state)`` has the state of every expanded node kept, and is
positioned from the deepest kept ancestor when that is cheaper than continuing, so each edge
costs one env step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .agent import EpisodeConfig, apply_output, continue_episode
from .config import config_hash, option, to_dict
from .envs.base import Env, parse_action
from .errors import QlassError
from .seeding import stable_seed
from .executor import Executor, LocalExecutor
from .jsonl import append_jsonl
from .policy.base import Policy, ready_policy
from .search import normalise_action
from .tree import BackupConfig, Node, Tree, assign_q, read_trees, tree_from_dict
from .types import Completion, Step, StepResult, Task

log = logging.getLogger(__name__)

DEFAULT_MAX_DEPTH = {"webshop": 3, "sciworld": 6, "alfworld": 8}
FALLBACK_MAX_DEPTH = 6


@dataclass(frozen=True)
class ExploreConfig:
    """How exploration trees are built (defaults follow the paper)."""

    max_depth: int | None = option(None, "maximum expansion depth D (None: webshop 3, sciworld 6, alfworld 8, else 6)")
    candidates: int = option(2, "actions sampled per expansion (one policy call per node)")
    temperature: float = option(0.7, "sampling temperature of expansions")
    rollout_temperature: float = option(0.7, "sampling temperature of the rollouts that give new branches an outcome")
    max_new_tokens: int = option(128, "token limit of one agent output")
    max_steps: int = option(30, "episode step limit for rollouts (the environment's own limit applies too)")
    expert_graft: bool = option(True, "graft the environment's expert chain under the root when it has one")
    expert_siblings: int = option(1, "sampled sibling branches per expert step")
    max_nodes: int | None = option(300, "per-tree cap on nodes (checked before each new branch)")
    max_tokens: int | None = option(None, "per-tree cap on policy tokens, prompt + completion")
    max_env_steps: int | None = option(None, "per-tree cap on environment steps")
    gamma: float = option(0.9, "discount of the Q values stored in the trees (Eq. 7)")

    def __post_init__(self) -> None:
        EpisodeConfig(self.max_steps, self.rollout_temperature, self.max_new_tokens)
        if self.max_depth is not None and self.max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {self.max_depth}")
        if self.candidates < 1 or self.expert_siblings < 0:
            raise ValueError("candidates must be >= 1 and expert_siblings >= 0")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        for name in ("max_nodes", "max_tokens", "max_env_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or null")
        BackupConfig(gamma=self.gamma)

    def depth_for(self, env_name: str) -> int:
        """D for an environment."""
        return self.max_depth if self.max_depth is not None else DEFAULT_MAX_DEPTH.get(env_name, FALLBACK_MAX_DEPTH)


class Cursor:
    """One environment and the tree path it is positioned at; moves by continuing, by restoring a
    snapshot (environments with ``snapshot()``/``restore()``) or by reset + replay, whichever takes
    the fewest env steps."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.position: tuple[int, ...] | None = None
        self.steps = 0
        self.resets = 0
        self.restores = 0
        self.snapshots = callable(getattr(env, "snapshot", None)) and callable(getattr(env, "restore", None))
        self.saved: dict[int, Any] = {}

    def start(self, task: Task) -> str:
        """Reset on ``task`` (a new tree); returns the first observation."""
        self.task = task
        self.resets += 1
        self.position = ()
        first = self.env.reset(task)
        self.saved = {0: self.env.snapshot()} if self.snapshots else {}  # type: ignore[attr-defined]
        return first

    def recording(self, keep: Callable[[int], bool]) -> _Recording | Env:
        """The env to step a new chain with: with snapshots, one that also keeps the state after
        its ``k``-th step when ``keep(k)``; the plain env otherwise."""
        return _Recording(self.env, keep) if self.snapshots else self.env

    def goto(self, tree: Tree, node_id: int) -> int:
        """Position the env at ``node_id``'s state; returns the env steps this took. With snapshots,
        the state of every node gone to is kept (it is about to get children, each needing it)."""
        path = tree.path(node_id)
        ids = tuple(n.id for n in path)
        pos = self.position
        can_continue = pos is not None and ids[: len(pos)] == pos
        if self.snapshots:
            # the deepest ancestor (or the node itself) with a saved state; the root always has one
            k = max(i for i in range(len(ids) + 1) if (ids[i - 1] if i else 0) in self.saved)
            if not can_continue or k > len(pos):  # type: ignore[arg-type]
                self.env.restore(self.saved[ids[k - 1] if k else 0])  # type: ignore[attr-defined]
                self.restores += 1
                pos, can_continue = ids[:k], True
        if not can_continue:
            first = self.env.reset(self.task)
            self.resets += 1
            if first != tree.nodes[0].observation:
                raise QlassError(f"{self.env.name}: reset on {self.task.id} gave a different first observation; "
                                 "exploration needs a deterministic environment")
            pos = ()
        spent = 0
        for node in path[len(pos):]:  # type: ignore[arg-type]
            result = self.env.step(node.output)
            spent += 1
            if result.observation != node.observation or abs(float(result.reward) - node.reward) > 1e-9:
                raise QlassError(f"{self.env.name}: replaying {self.task.id} diverged at node {node.id} (depth "
                                 f"{node.depth}); exploration needs a deterministic environment")
        self.position = ids
        self.steps += spent
        if self.snapshots and node_id not in self.saved:
            self.saved[node_id] = self.env.snapshot()  # type: ignore[attr-defined]
        return spent


class _Recording:
    """An env proxy that keeps the env's state after each step it makes (``None`` where not kept)."""

    def __init__(self, env: Env, keep: Callable[[int], bool]) -> None:
        self.env, self.keep = env, keep
        self.states: list[Any] = []

    def step(self, output: str) -> StepResult:
        result = self.env.step(output)
        wanted = not result.done and self.keep(len(self.states))
        self.states.append(self.env.snapshot() if wanted else None)  # type: ignore[attr-defined]
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.env, name)

    def keep_states(self, saved: dict[int, Any], nodes: Sequence[Node]) -> None:
        """Store the kept states of the chain ``nodes`` (stepped in order) into ``saved``."""
        saved.update((n.id, state) for n, state in zip(nodes, self.states) if state is not None)


def _step_of(node: Node) -> Step:
    return Step(node.output, node.action, node.observation, node.reward, node.done)


class TreeBuilder:
    """Builds the tree of one task (see module docstring); ``build()`` returns it."""

    def __init__(self, env: Env, policy: Policy, task: Task, cfg: ExploreConfig, seed: int) -> None:
        self.env, self.policy, self.task, self.cfg, self.seed = env, policy, task, cfg, seed
        self.depth = cfg.depth_for(env.name)
        self.episode = EpisodeConfig(cfg.max_steps, cfg.rollout_temperature, cfg.max_new_tokens)
        self.cursor = Cursor(env)
        self.stats: dict[str, Any] = {"policy_calls": 0, "prompt_tokens": 0, "completion_tokens": 0,
                                      "merged": 0, "stopped_by": None}

    # -- bookkeeping -------------------------------------------------------------------------
    def _tokens(self) -> int:
        return self.stats["prompt_tokens"] + self.stats["completion_tokens"]

    def _cap_hit(self) -> str | None:
        c = self.cfg
        if c.max_nodes is not None and len(self.tree.nodes) >= c.max_nodes:
            return "max_nodes"
        if c.max_tokens is not None and self._tokens() >= c.max_tokens:
            return "max_tokens"
        if c.max_env_steps is not None and self.cursor.steps >= c.max_env_steps:
            return "max_env_steps"
        return None

    def _expandable(self, node: Node) -> bool:
        return not (node.done or node.pruned or node.expanded) and node.depth < min(self.depth, self.cfg.max_steps)

    def _add(self, parent: int, step: Step, source: str, env_steps: int) -> Node:
        node = Node(id=len(self.tree.nodes), parent=parent, depth=self.tree.nodes[parent].depth + 1,
                    output=step.output, action=step.action, observation=step.observation, reward=step.reward,
                    done=step.done, source=source, prompt_tokens=step.prompt_tokens,
                    completion_tokens=step.completion_tokens, env_steps=env_steps)
        self.tree.nodes.append(node)
        return node

    # -- the three operations ----------------------------------------------------------------
    def _sample(self, node_id: int, n: int) -> list[Completion]:
        """``n`` candidate outputs in ``node_id``'s state, from one policy call."""
        history = self.tree.history(node_id)
        out = self.policy.sample([history], n, self.cfg.temperature, self.cfg.max_new_tokens,
                                 seed=stable_seed(self.seed, "expand", node_id))[0]
        self.stats["policy_calls"] += 1
        self.stats["prompt_tokens"] += out[0].prompt_tokens
        self.stats["completion_tokens"] += sum(c.completion_tokens for c in out)
        return out

    def _branch(self, parent: int, completion: Completion, source: str) -> list[Node]:
        """Execute ``completion`` under ``parent`` and roll out to the end; returns the new chain."""
        replay = self.cursor.goto(self.tree, parent)
        messages = self.tree.history(parent)
        steps = [_step_of(n) for n in self.tree.path(parent)]
        base = len(steps)
        depth = self.tree.nodes[parent].depth
        env = self.cursor.recording(lambda k: depth + 1 + k < self.depth)  # only expandable depths
        apply_output(env, messages, steps, completion)
        first_id = len(self.tree.nodes)
        continue_episode(env, self.policy, messages, steps, self.episode,
                         seed=stable_seed(self.seed, "rollout", first_id))
        chain: list[Node] = []
        for k, step in enumerate(steps[base:]):
            parent_id = parent if k == 0 else chain[-1].id
            chain.append(self._add(parent_id, step, source if k == 0 else "rollout", replay + 1 if k == 0 else 1))
        rollout = steps[base + 1:]
        self.stats["policy_calls"] += len(rollout)
        self.stats["prompt_tokens"] += sum(s.prompt_tokens for s in rollout)
        self.stats["completion_tokens"] += sum(s.completion_tokens for s in rollout)
        self.cursor.position = self.cursor.position + tuple(n.id for n in chain)
        self.cursor.steps += len(chain)
        if chain[-1].reward <= 0.0:
            for n in chain:
                n.pruned = True
        elif isinstance(env, _Recording):
            env.keep_states(self.cursor.saved, chain)
        return chain

    def _expand(self, node_id: int, n: int, limit: int | None = None) -> list[Node]:
        """Sample at ``node_id`` and grow a branch for each new distinct action (at most ``limit``);
        returns the expandable nodes of the new branches, in order."""
        kids = {normalise_action(self.tree.nodes[c].output) for c in self.tree.children()[node_id]}
        completions = self._sample(node_id, n)
        self.tree.nodes[node_id].expanded = True
        todo: list[Node] = []
        grown = 0
        for comp in completions:
            key = normalise_action(comp.text)
            if key in kids or (limit is not None and grown >= limit):
                self.stats["merged"] += key in kids
                continue
            kids.add(key)
            if (cap := self._cap_hit()) is not None:
                self.stats["stopped_by"] = cap
                break
            todo += [c for c in self._branch(node_id, comp, "sample") if self._expandable(c)]
            grown += 1
        return todo

    # -- the whole tree ----------------------------------------------------------------------
    def _graft_expert(self, outputs: list[str]) -> list[Node]:
        """The expert chain under the root plus sampled siblings; returns their expandable nodes."""
        self.cursor.goto(self.tree, 0)
        env = self.cursor.recording(lambda k: True)  # expert steps get siblings at any depth
        parent = 0
        chain = []
        for text in outputs:
            result = env.step(text)
            self.cursor.steps += 1
            step = Step(text, parse_action(text), result.observation, float(result.reward), bool(result.done))
            node = self._add(parent, step, "expert", 1)
            self.cursor.position = self.cursor.position + (node.id,)
            chain.append(node)
            parent = node.id
            if node.done:
                break
        if isinstance(env, _Recording):
            env.keep_states(self.cursor.saved, chain)
        self.stats["expert_reward"] = chain[-1].reward if chain else None
        todo: list[Node] = [chain[-1]] if chain and self._expandable(chain[-1]) else []
        for node in chain:
            if self.stats["stopped_by"] is not None or (cap := self._cap_hit()) is not None:
                self.stats["stopped_by"] = self.stats["stopped_by"] or cap
                break
            if self.cfg.expert_siblings:
                todo += self._expand(node.parent, self.cfg.candidates, limit=self.cfg.expert_siblings)  # type: ignore[arg-type]
        return todo

    def build(self) -> Tree:
        """Explore the task and return its tree, Q values assigned."""
        outputs = self.env.expert(self.task) if self.cfg.expert_graft else []
        first = self.cursor.start(self.task)
        root = Node(0, None, 0, "", None, first, 0.0, False, "root")
        self.tree = Tree(tree_id=self.task.id, task=self.task.id, env=self.env.name, split=self.task.split,
                         task_type=self.task.task_type, prefix=list(self.env.prompt()), nodes=[root], seed=self.seed,
                         config=to_dict(self.cfg), config_hash=config_hash(self.cfg))
        if outputs:
            stack = self._graft_expert(outputs)[::-1]
        else:
            stack = [root]
        while stack and self.stats["stopped_by"] is None:
            node = stack.pop()
            if not self._expandable(node):
                continue
            if (cap := self._cap_hit()) is not None:
                self.stats["stopped_by"] = cap
                break
            stack += self._expand(node.id, self.cfg.candidates)[::-1]
        t = self.tree
        self.stats.update(nodes=len(t.nodes), edges=t.edges, env_steps=self.cursor.steps, resets=self.cursor.resets,
                          restores=self.cursor.restores,
                          max_depth=max(n.depth for n in t.nodes), expansion_depth=self.depth,
                          leaves=sum(1 for k in t.children() if not k) - (len(t.nodes) == 1),
                          best_reward=max(n.reward for n in t.nodes))
        t.stats = dict(self.stats)
        return assign_q(t, BackupConfig(gamma=self.cfg.gamma))


def build_tree(env: Env, policy: Policy, task: Task, cfg: ExploreConfig, seed: int) -> Tree:
    """The exploration tree of ``task`` (see module docstring); ``seed`` fixes every sample."""
    return TreeBuilder(env, policy, task, cfg, seed).build()


def tree_seed(run_seed: int, task: Task) -> int:
    """The seed of a task's tree: a stable hash of the run seed and the task id."""
    return stable_seed(run_seed, "tree", task.id)


class TreeWorker:
    """Builds trees in one worker (executor ``setup``): ``TreeWorker(...)()`` makes the env and
    policy once; calling the result on ``(task, seed)`` returns the tree as a ``trees.jsonl`` record.

    ``make_env`` and ``policy`` must be picklable for the process and Ray backends (e.g.
    ``functools.partial(make_env, "sciworld")`` and ``functools.partial(load_policy, path)``);
    ``policy`` may also be a ready :class:`Policy` object for the local backend."""

    def __init__(self, make_env: Callable[[], Env], policy: Policy | Callable[[], Policy], cfg: ExploreConfig) -> None:
        self.make_env, self.policy, self.cfg = make_env, policy, cfg

    def __call__(self) -> Callable[[tuple[Task, int]], dict[str, Any]]:
        env = self.make_env()
        policy = ready_policy(self.policy)
        return _BoundWorker(env, policy, self.cfg)


class _BoundWorker:
    def __init__(self, env: Env, policy: Policy, cfg: ExploreConfig) -> None:
        self.env, self.policy, self.cfg = env, policy, cfg

    def __call__(self, job: tuple[Task, int]) -> dict[str, Any]:
        task, seed = job
        return build_tree(self.env, self.policy, task, self.cfg, seed).to_dict()

    def close(self) -> None:
        self.env.close()


def _finished(path: Path, tasks: Sequence[Task], cfg: ExploreConfig, run_seed: int) -> dict[str, Tree]:
    """Trees already in ``path`` for ``tasks``; refuses trees made with other settings or seed."""
    trees = {t.tree_id: t for t in read_trees(path, repair_tail=True)} if path.exists() else {}
    want = config_hash(cfg)
    for task in tasks:
        tree = trees.get(task.id)
        if tree is None:
            continue
        if tree.config_hash != want:
            raise QlassError(f"{path}: tree {task.id!r} was made with other exploration settings "
                             f"(config hash {tree.config_hash}, now {want}); use a new output file")
        if tree.seed != tree_seed(run_seed, task):
            raise QlassError(f"{path}: tree {task.id!r} was made with another run seed; use a new output file")
    return trees


def explore_tasks(
    make_env: Callable[[], Env],
    tasks: Sequence[Task],
    policy: Policy | Callable[[], Policy],
    cfg: ExploreConfig,
    out_path: str | Path,
    seed: int = 0,
    executor: Executor | None = None,
    progress: bool = True,
) -> list[Tree]:
    """Build the tree of every task not yet in ``out_path`` and append each as it finishes.

    Resumable: a rerun skips finished tasks (a torn last line is cut first); returns the trees of
    ``tasks`` in task order. ``executor`` defaults to in-process.
    """
    path = Path(out_path)
    done = _finished(path, tasks, cfg, seed)
    todo = [t for t in tasks if t.id not in done]
    if len(todo) < len(tasks):
        log.info("resuming: %d of %d trees already in %s", len(tasks) - len(todo), len(tasks), path)
    jobs = [(t, tree_seed(seed, t)) for t in todo]
    columns = (TextColumn("[bold]explore[/]"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[nodes]} nodes  {task.fields[tokens]} tok  {task.fields[steps]} env steps  "
                          "{task.fields[rate]:.1f} nodes/min"), TimeElapsedColumn(), TextColumn("{task.description}"))
    start = time.perf_counter()
    totals = {"nodes": 0, "tokens": 0, "steps": 0}
    with Progress(*columns, disable=not progress) as bar:
        handle = bar.add_task("", total=len(jobs), rate=0.0, **totals)
        for _, record in (executor or LocalExecutor()).run(TreeWorker(make_env, policy, cfg), jobs):
            tree = tree_from_dict(record, "<worker result>")
            append_jsonl(path, record)
            done[tree.tree_id] = tree
            totals["nodes"] += len(tree.nodes)
            totals["tokens"] += tree.stats["prompt_tokens"] + tree.stats["completion_tokens"]
            totals["steps"] += tree.stats["env_steps"]
            rate = totals["nodes"] / max((time.perf_counter() - start) / 60, 1e-9)
            bar.update(handle, advance=1, description=tree.tree_id, rate=rate, **totals)
            log.info("tree %s: %d nodes, %d env steps, best reward %.2f, stopped by %s", tree.tree_id,
                     len(tree.nodes), tree.stats["env_steps"], tree.stats["best_reward"], tree.stats["stopped_by"])
    return [done[t.id] for t in tasks]


__all__ = ["ExploreConfig", "TreeBuilder", "TreeWorker", "build_tree", "explore_tasks", "tree_seed"]
