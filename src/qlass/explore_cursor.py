"""Where the explorer's environment stands in a tree, and the cheapest way to move it elsewhere.

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

from collections.abc import Callable, Sequence
from typing import Any

from .agent import executed_text
from .envs.base import Env, env_reset, env_step, parse_action
from .errors import QlassError
from .tree import Node, Tree
from .types import Completion, StepResult, Task


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
        first = env_reset(self.env, task)
        self.saved = {0: self.env.snapshot()} if self.snapshots else {}  # type: ignore[attr-defined]
        return first

    def recording(self, keep: Callable[[int], bool]) -> Recording | Env:
        """The env to step a new chain with: with snapshots, one that also keeps the state after
        its ``k``-th step when ``keep(k)``; the plain env otherwise."""
        return Recording(self.env, keep) if self.snapshots else self.env

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
            first = env_reset(self.env, self.task)
            self.resets += 1
            if first != tree.nodes[0].observation:
                raise QlassError(f"{self.env.name}: reset on {self.task.id} gave a different first observation; "
                                 "exploration needs a deterministic environment")
            pos = ()
        spent = 0
        for node in path[len(pos):]:  # type: ignore[arg-type]
            result = env_step(self.env, sent_text(node))
            spent += 1
            if result.observation != node.observation or abs(float(result.reward) - node.reward) > 1e-9:
                raise QlassError(f"{self.env.name}: replaying {self.task.id} diverged at node {node.id} (depth "
                                 f"{node.depth}); exploration needs a deterministic environment")
        self.position = ids
        self.steps += spent
        if self.snapshots and node_id not in self.saved:
            self.saved[node_id] = self.env.snapshot()  # type: ignore[attr-defined]
        return spent


def sent_text(node: Node) -> str:
    """What the environment received for ``node``: its output, or for an output cut by the token limit
    (its recorded action is not the one its text reads) the text before its unfinished ``Action:`` line
    (:func:`~qlass.agent.executed_text`)."""
    if parse_action(node.output) == node.action:
        return node.output
    return executed_text(Completion(node.output, 0, 0, truncated=True))


class Recording:
    """An env proxy that keeps the env's state after each step it makes (``None`` where not kept)."""

    def __init__(self, env: Env, keep: Callable[[int], bool]) -> None:
        self.env, self.keep = env, keep
        self.states: list[Any] = []

    def step(self, output: str) -> StepResult:
        result = env_step(self.env, output)
        wanted = not result.done and self.keep(len(self.states))
        self.states.append(self.env.snapshot() if wanted else None)  # type: ignore[attr-defined]
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.env, name)

    def keep_states(self, saved: dict[int, Any], nodes: Sequence[Node]) -> None:
        """Store the kept states of the chain ``nodes`` (stepped in order) into ``saved``."""
        saved.update((n.id, state) for n, state in zip(nodes, self.states) if state is not None)


__all__ = ["Cursor", "Recording", "sent_text"]
