"""Exploration trees: nodes, the ``trees.jsonl`` format and the Q-value backup.

A tree belongs to one task. Node 0 is the root: the task's initial state (its ``observation`` is
the environment's first observation, no action). Every other node is one agent step: the raw
``output`` (``Thought: ...\\nAction: ...``) taken in its parent's state and what the environment
answered (``observation``, cumulative ``reward`` in [0, 1], ``done``). A node's id is larger than
its parent's (ids are creation order), so ``reversed(nodes)`` visits children before parents.

The conversation a policy saw before a node's action is ``prefix`` (the environment's fixed prompt),
the root observation as a user turn, then per ancestor ``assistant: output`` and
``user: Observation: ...`` — exactly the layout of :mod:`qlass.agent`.

Q values (paper Eq. 7) are computed bottom-up by :func:`compute_q`::

    Q(leaf)       = r(leaf)
    Q(s_t, a_t)   = r_t + gamma * max_{a'} Q(s_{t+1}, a')

A sampled branch rolled out K ≥ 2 times has K rollout chains under its first node (``source ==
"rollout"`` children tagged ``rollout`` 0..K-1): draws of the policy's own continuation, which
stand for *one* option whose value is their mean. The max above then runs over the node's other
children and that mean. A node with one rollout chain (K = 1, and every tree of
``schema_version`` 1) is backed up by Eq. 7 exactly.

By default intermediate rewards are zeroed (``r_t = 0`` below the leaves) and a leaf's ``r`` is its
outcome (the final cumulative score). With ``keep_intermediate`` every node's ``r_t`` is its reward
*increment* (its score minus its parent's), so an undiscounted chain sums to the final score. With
``normalize`` the Q values of a tree are min–max scaled to [0, 1] (left as they are when all equal).

Format (see ``docs/formats.md``): ``trees.jsonl`` holds one tree per line (:meth:`Tree.to_dict`). The
Q dataset made from trees is :mod:`qlass.qdata`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .agent import observation_message
from .config import differences
from .config_fields import check_field_types, require_config
from .errors import DataError, MissingFileError
from .file_kinds import other_kind
from .jsonl import is_count, read_numbered_jsonl
from .types import Message

TREE_SCHEMA_VERSION = 2
READABLE_TREE_VERSIONS = (1, 2)
"""Version 2 added the node field ``rollout``; version 1 trees read with ``rollout = 0``."""
SOURCES = ("root", "expert", "sample", "rollout")
ROLES = ("system", "user", "assistant")


@dataclass
class Node:
    """One tree node (see module docstring). ``env_steps`` counts every env step spent to create it
    (replay included); ``pruned`` marks nodes whose expansion a zero-outcome rollout stopped;
    ``rollout`` is the index of the rollout chain a ``rollout`` node belongs to within its branch
    (0 for every other node)."""

    id: int
    parent: int | None
    depth: int
    output: str
    action: str | None
    observation: str
    reward: float
    done: bool
    source: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    env_steps: int = 0
    expanded: bool = False
    pruned: bool = False
    rollout: int = 0
    q: float | None = None


@dataclass
class Tree:
    """The exploration tree of one task."""

    tree_id: str
    task: str
    env: str
    split: str
    task_type: str
    prefix: list[Message]
    nodes: list[Node]
    seed: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    config_hash: str = ""
    stats: dict[str, Any] = field(default_factory=dict)

    def children(self) -> list[list[int]]:
        """Children ids of every node, in creation order."""
        out: list[list[int]] = [[] for _ in self.nodes]
        for n in self.nodes[1:]:
            out[n.parent].append(n.id)  # type: ignore[index]
        return out

    def path(self, node_id: int) -> list[Node]:
        """The nodes from the root's child down to ``node_id`` (empty for the root)."""
        chain = []
        n = self.nodes[node_id]
        while n.parent is not None:
            chain.append(n)
            n = self.nodes[n.parent]
        return chain[::-1]

    def history(self, node_id: int) -> list[Message]:
        """The conversation after ``node_id``'s step: what the policy reads to act in its state."""
        msgs = list(self.prefix) + [Message("user", self.nodes[0].observation)]
        for n in self.path(node_id):
            msgs += [Message("assistant", n.output), observation_message(n.observation)]
        return msgs

    @property
    def edges(self) -> int:
        return len(self.nodes) - 1

    def to_dict(self) -> dict[str, Any]:
        """The ``trees.jsonl`` record."""
        return {
            "schema_version": TREE_SCHEMA_VERSION, "tree_id": self.tree_id, "task": self.task, "env": self.env,
            "split": self.split, "task_type": self.task_type, "seed": self.seed, "config": self.config,
            "config_hash": self.config_hash, "stats": self.stats,
            "prefix": [{"role": m.role, "content": m.content} for m in self.prefix],
            "nodes": [asdict(n) for n in self.nodes],
        }


# -- reading and validation ------------------------------------------------------------------
_NODE_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (int,), "depth": (int,), "output": (str,), "observation": (str,), "reward": (int, float),
    "done": (bool,), "source": (str,), "prompt_tokens": (int,), "completion_tokens": (int,),
    "env_steps": (int,), "expanded": (bool,), "pruned": (bool,),
}
_TREE_FIELDS: dict[str, tuple[type, ...]] = {
    "tree_id": (str,), "task": (str,), "env": (str,), "split": (str,), "task_type": (str,), "seed": (int,),
    "config": (dict,), "config_hash": (str,), "stats": (dict,), "prefix": (list,), "nodes": (list,),
}


def checked_field(rec: dict[str, Any], name: str, kinds: tuple[type, ...], where: str, path: str) -> Any:
    """``rec[name]``, which must be present and of one of ``kinds`` (a bool is not an int); else a
    :class:`DataError` naming ``path``, ``where`` (the record) and the field."""
    if name not in rec:
        raise DataError(path, f"{where}: missing field {name!r}")
    value = rec[name]
    ok = isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))
    if not ok:
        want = " or ".join(k.__name__ for k in kinds)
        raise DataError(path, f"{where}: field {name!r} must be {want}, got {type(value).__name__}")
    return value


def checked_messages(value: list[Any], where: str, name: str, path: str) -> list[Message]:
    """``value`` (field ``name``) as messages: each ``{'role': one of ROLES, 'content': str}``."""
    out = []
    for k, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(path, f"{where}: field '{name}[{k}]' must be {{'role': one of {ROLES}, 'content': str}}")
        out.append(Message(m["role"], m["content"]))
    return out


_COUNTED_STATS = ("branches", "merged", "probe_steps", "prompt_tokens", "completion_tokens", "score_tokens")
"""The tree statistics that summaries add up (optional; an integer >= 0 where present)."""


def is_q_value(q: float) -> bool:
    """Whether ``q`` is a possible Q value: rewards lie in [0, 1] and gamma <= 1, so a backed-up Q lies in
    [0, 1], and one built from reward increments (``keep_intermediate``) in [-1, 1] (NaN is not)."""
    return -1.0 - 1e-9 <= q <= 1.0 + 1e-9


def tree_from_dict(rec: dict[str, Any], path: str = "<trees>", line: int = 0) -> Tree:
    """Validate a ``trees.jsonl`` record and build the :class:`Tree`; errors name file, line, field."""
    where = f"line {line}"
    other = other_kind(rec, "trees")
    if other is not None:
        raise DataError(path, f"{where}: this is {other}, not a trees file (qlass explore)")
    version = checked_field(rec, "schema_version", (int,), where, path)
    if version not in READABLE_TREE_VERSIONS:
        raise DataError(path, f"{where}: field 'schema_version' is {version}; this qlass reads "
                              f"{', '.join(map(str, READABLE_TREE_VERSIONS))}")
    vals = {k: checked_field(rec, k, kinds, where, path) for k, kinds in _TREE_FIELDS.items()}
    where = f"line {line} (tree {vals['tree_id']!r})"
    gamma = vals["config"].get("gamma", BackupConfig.gamma)
    if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not 0.0 <= gamma <= 1.0:
        raise DataError(path, f"{where}: field 'config.gamma' must be a number in [0, 1], got {gamma!r}")
    for key in _COUNTED_STATS:
        if key in vals["stats"] and not is_count(vals["stats"][key]):
            raise DataError(path, f"{where}: field 'stats.{key}' must be an integer >= 0, got {vals['stats'][key]!r}")
    expert_reward = vals["stats"].get("expert_reward")
    real = isinstance(expert_reward, (int, float)) and not isinstance(expert_reward, bool)
    if expert_reward is not None and not (real and -1e-9 <= expert_reward <= 1.0 + 1e-9):  # NaN is not
        raise DataError(path, f"{where}: field 'stats.expert_reward' must be null or a number in [0, 1], "
                              f"got {expert_reward!r}")
    if not isinstance(vals["stats"].get("stopped_by"), (str, type(None))):
        raise DataError(path, f"{where}: field 'stats.stopped_by' must be a cap's name or null, "
                              f"got {vals['stats']['stopped_by']!r}")
    prefix = checked_messages(vals["prefix"], where, "prefix", path)
    nodes: list[Node] = []
    for i, raw in enumerate(vals["nodes"]):
        nw = f"{where}, nodes[{i}]"
        if not isinstance(raw, dict):
            raise DataError(path, f"{nw}: must be an object")
        nv = {k: checked_field(raw, k, kinds, nw, path) for k, kinds in _NODE_FIELDS.items()}
        nv["rollout"] = checked_field(raw, "rollout", (int,), nw, path) if version >= 2 else 0
        if nv["rollout"] < 0 or (nv["rollout"] and nv["source"] != "rollout"):
            raise DataError(path, f"{nw}: field 'rollout' must be 0, or >= 1 on a 'rollout' node; got {nv['rollout']}")
        parent, action, q = raw.get("parent", "missing"), raw.get("action", "missing"), raw.get("q", "missing")
        if nv["id"] != i:
            raise DataError(path, f"{nw}: field 'id' is {nv['id']}, expected {i} (ids are positions)")
        if "merged" in raw and not is_count(raw["merged"]):
            raise DataError(path, f"{nw}: field 'merged' must be an integer >= 0, got {raw['merged']!r}")
        if i == 0:
            if parent is not None or nv["depth"] != 0 or nv["source"] != "root":
                raise DataError(path, f"{nw}: the root must have parent null, depth 0 and source 'root'")
        elif not isinstance(parent, int) or isinstance(parent, bool) or not 0 <= parent < i:
            raise DataError(path, f"{nw}: field 'parent' must be the id of an earlier node, got {parent!r}")
        elif nv["depth"] != nodes[parent].depth + 1:
            raise DataError(path, f"{nw}: field 'depth' is {nv['depth']}, expected parent depth + 1")
        if nv["source"] not in SOURCES:
            raise DataError(path, f"{nw}: field 'source' must be one of {SOURCES}, got {nv['source']!r}")
        if action is not None and not isinstance(action, str):
            raise DataError(path, f"{nw}: field 'action' must be str or null")
        if q is not None and (isinstance(q, bool) or not isinstance(q, (int, float)) or not is_q_value(q)):
            raise DataError(path, f"{nw}: field 'q' must be a number in [-1, 1] or null, got {q!r}")
        if not -1e-9 <= nv["reward"] <= 1.0 + 1e-9:  # rewards are in [0, 1], give or take rounding
            raise DataError(path, f"{nw}: field 'reward' must be in [0, 1], got {nv['reward']!r}")
        nodes.append(Node(parent=parent, action=action, q=None if q is None else float(q),
                          **{**nv, "reward": float(nv["reward"])}))
    if not nodes:
        raise DataError(path, f"{where}: field 'nodes' is empty (a tree has at least its root)")
    return Tree(prefix=prefix, nodes=nodes, **{k: v for k, v in vals.items() if k not in ("prefix", "nodes")})


def read_tree_records(path: str | os.PathLike, repair_tail: bool = False, skip_torn_tail: bool = False,
                      one_run: bool = False) -> list[tuple[Tree, dict[str, Any]]]:
    """Every tree of a ``trees.jsonl`` file, validated (a duplicated tree id is an error), with the
    record it was read from; ``repair_tail`` and ``skip_torn_tail`` as :func:`~qlass.jsonl.read_jsonl`
    takes them. With ``one_run``, a tree explored with other settings than the file's first (another
    ``config_hash``: files joined by hand) is an error naming both and the settings that differ."""
    out, seen = [], set()
    first: tuple[Tree, int] | None = None  # the first tree that records its settings, and its line
    if not Path(path).exists():
        raise MissingFileError(str(path))
    for line, rec in read_numbered_jsonl(path, repair_tail, skip_torn_tail):
        tree = tree_from_dict(rec, str(path), line)
        if tree.tree_id in seen:
            raise DataError(str(path), f"line {line}: tree {tree.tree_id!r} appears twice")
        seen.add(tree.tree_id)
        if one_run and tree.config_hash:
            if first is None:
                first = (tree, line)
            elif tree.config_hash != first[0].config_hash:
                diff = "; ".join(differences(first[0].config, tree.config)) or (
                    f"config hash {first[0].config_hash} → {tree.config_hash}")
                raise DataError(str(path), f"line {line}: tree {tree.tree_id!r} was explored with other settings "
                                           f"than tree {first[0].tree_id!r} (line {first[1]}): {diff}; one file "
                                           "would mix them: keep each exploration run's trees in their own file "
                                           "(the Q data exported from each may be joined for one QNet)")
        out.append((tree, rec))
    return out


def read_trees(path: str | os.PathLike, repair_tail: bool = False) -> list[Tree]:
    """Every tree of a ``trees.jsonl`` file, validated (a duplicated tree id is an error; so is a tree
    explored with other settings than the others, as by ``read_tree_records(one_run=True)``)."""
    return [tree for tree, _ in read_tree_records(path, repair_tail, one_run=True)]


# -- Q backup -------------------------------------------------------------------------------
@dataclass(frozen=True)
class BackupConfig:
    """How Q targets are computed from a tree (paper Eq. 7)."""

    gamma: float = 0.9
    keep_intermediate: bool = False
    normalize: bool = False

    def __post_init__(self) -> None:
        check_field_types(self)
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")


def compute_q(tree: Tree, cfg: BackupConfig = BackupConfig()) -> dict[int, float]:
    """Q value of every non-root node (see module docstring: the max over a node's alternatives and
    the mean of its rollout children)."""
    require_config(cfg, BackupConfig, "compute_q")
    kids = tree.children()
    q: dict[int, float] = {}
    for n in reversed(tree.nodes[1:]):
        parent_reward = tree.nodes[n.parent].reward  # type: ignore[index]
        r = n.reward - parent_reward if cfg.keep_intermediate else 0.0
        if not kids[n.id]:
            q[n.id] = r if cfg.keep_intermediate else n.reward
            continue
        rollouts = [c for c in kids[n.id] if tree.nodes[c].source == "rollout"]
        if any(tree.nodes[c].rollout for c in rollouts):  # K >= 2 rollout chains: one option, their mean
            options = [q[c] for c in kids[n.id] if c not in rollouts] + [sum(q[c] for c in rollouts) / len(rollouts)]
        else:
            options = [q[c] for c in kids[n.id]]
        q[n.id] = r + cfg.gamma * max(options)
    if cfg.normalize and q:
        lo, hi = min(q.values()), max(q.values())
        if hi > lo:
            q = {k: (v - lo) / (hi - lo) for k, v in q.items()}
    return dict(sorted(q.items()))


def mean_leaf_outcome(tree: Tree) -> dict[int, float]:
    """The "average reward" process reward of every non-root node: the mean outcome (final reward)
    of the leaves under it, itself included when it is a leaf — a Monte Carlo estimate of the
    node's value, where Eq. 7 takes the best branch instead."""
    kids = tree.children()
    total: dict[int, float] = {}
    count: dict[int, int] = {}
    for n in reversed(tree.nodes):
        if not kids[n.id]:
            total[n.id], count[n.id] = n.reward, 1
        else:
            total[n.id] = sum(total[c] for c in kids[n.id])
            count[n.id] = sum(count[c] for c in kids[n.id])
    return {i: total[i] / count[i] for i in range(1, len(tree.nodes))}


def assign_q(tree: Tree, cfg: BackupConfig = BackupConfig()) -> Tree:
    """Store :func:`compute_q` on the nodes (the root keeps ``q = None``); returns ``tree``."""
    q = compute_q(tree, cfg)
    for n in tree.nodes:
        n.q = q.get(n.id)
    return tree


def contrast_pairs(tree: Tree) -> int:
    """Sibling pairs with different stored Q among the nodes the Q data exports (``rollout == 0``):
    the ranking signal a tree gives the QNet."""
    groups: dict[int, list[float]] = {}
    for n in tree.nodes[1:]:
        if n.rollout == 0 and n.q is not None:
            groups.setdefault(n.parent, []).append(n.q)  # type: ignore[arg-type]
    return sum(abs(a - b) > 1e-9 for qs in groups.values() for k, a in enumerate(qs) for b in qs[k + 1:])


def tree_summary(trees: Iterable[Tree]) -> dict[str, Any]:
    """Totals over trees: nodes, edges, env steps (the nodes' plus probes' that made no node),
    tokens, steps per edge, sampled branches and outputs cut off (left out), contrast pairs."""
    trees = list(trees)
    edges = sum(t.edges for t in trees)
    steps = sum(n.env_steps for t in trees for n in t.nodes) + sum(int(t.stats.get("probe_steps", 0)) for t in trees)
    return {
        "trees": len(trees), "nodes": sum(len(t.nodes) for t in trees), "edges": edges, "env_steps": steps,
        "env_steps_per_edge": steps / edges if edges else 0.0,
        "prompt_tokens": sum(int(t.stats.get("prompt_tokens", 0)) for t in trees),
        "completion_tokens": sum(int(t.stats.get("completion_tokens", 0)) for t in trees),
        "trees_with_success": sum(any(n.reward >= 1.0 - 1e-9 for n in t.nodes) for t in trees),
        "branches": sum(int(t.stats.get("branches", 0)) for t in trees),
        "truncated": sum(int(t.stats.get("truncated", 0)) for t in trees),
        "contrast_pairs": sum(contrast_pairs(t) for t in trees),
    }
