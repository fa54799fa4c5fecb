"""Path packing for QNet training: every (history, action) input of a tree inside a few token rows.

A QNet input is the policy's prompt for a turn followed by the candidate action
(:meth:`qlass.qnet.QNet.encode`). Along a path of an exploration tree each input is a prefix of the
next one: the child's history is the parent's history, the parent's action, its end-of-turn token and
the observation. With causal attention, the hidden state at a token depends only on the tokens
before it, so one forward over the longest input of a path gives the value of *every* node on that
path, read at each node's last action token, exactly as a forward over that node's own input would.

:func:`pack_records` groups the records of each tree into such rows (longest input first; an input
joins the first row that starts with it, else opens a new row). Nothing is assumed about the chat
template: inputs that are not prefixes of another (a template that is not prefix-stable, a history
cut to fit ``max_length``) simply get rows of their own. On the reference Q data this cuts the
tokens a training epoch processes by 7.8x against one shared-prefix forward per sibling group.

:func:`batch_units` joins the rows that must share an optimizer step (siblings sit on different
rows, so a pairwise loss needs all rows holding a contrast group in one step), and
:func:`step_batches` groups those units into optimizer steps of at least ``batch_size`` records from
at least ``min_trees`` trees, in a seeded order per epoch, so a resumed run takes the same steps as
an uninterrupted one.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .qnet_data import QRecord
from .types import Message


@dataclass
class PackedRow:
    """One token row and the records whose inputs are prefixes of it."""

    ids: list[int]
    records: list[QRecord] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    """per record, the index of its value token (the last token of its input)"""
    action_lengths: list[int] = field(default_factory=list)
    """per record, how many of the tokens up to ``ends`` are its action's"""

    @property
    def targets(self) -> list[float]:
        return [r.q for r in self.records]


def pack_records(encode_history: Callable[[list[Message]], list[int]], encode_action: Callable[[str], list[int]],
                 records: Sequence[QRecord]) -> list[PackedRow]:
    """Rows holding every record exactly once (trees in first-seen order, never mixed in a row).

    ``encode_history(messages)`` and ``encode_action(action)`` are the QNet's own encoders
    (:meth:`qlass.qnet.QNet.encode_history`, :meth:`~qlass.qnet.QNet.encode_action`); a record's input
    is their concatenation, the same ids inference scores.
    """
    by_tree: dict[str, list[QRecord]] = defaultdict(list)
    for r in records:
        by_tree[r.tree_id].append(r)
    rows: list[PackedRow] = []
    for tree_records in by_tree.values():
        histories: dict[tuple[Message, ...], list[int]] = {}
        inputs = []
        for r in tree_records:
            prefix = histories.get(r.messages)
            if prefix is None:
                prefix = histories[r.messages] = encode_history(list(r.messages))
            action = encode_action(r.action)
            inputs.append((prefix + action, len(action), r))
        inputs.sort(key=lambda x: len(x[0]), reverse=True)  # stable: equal lengths keep file order
        tree_rows: list[PackedRow] = []
        for ids, n_action, r in inputs:
            row = next((row for row in tree_rows if row.ids[:len(ids)] == ids), None)
            if row is None:
                row = PackedRow(ids)
                tree_rows.append(row)
            row.records.append(r)
            row.ends.append(len(ids) - 1)
            row.action_lengths.append(n_action)
        rows += tree_rows
    return rows


def batch_units(rows: Sequence[PackedRow], linked: Callable[[QRecord], bool]) -> list[list[int]]:
    """Rows (by index) grouped so that all rows holding a record of one sibling group for which
    ``linked(record)`` holds share a unit (connected components; a row without such records is a
    unit of its own). Units never span trees, and list rows in index order."""
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, str], int] = {}
    for i, row in enumerate(rows):
        for r in row.records:
            if linked(r):
                j = first.setdefault((r.tree_id, r.group), i)
                parent[find(i)] = find(j)
    units: dict[int, list[int]] = defaultdict(list)
    for i in range(len(rows)):
        units[find(i)].append(i)
    return sorted(units.values())


def step_batches(counts: Sequence[int], batch_size: int, seed: int, epoch: int,
                 trees: Sequence[str] | None = None, min_trees: int = 1) -> list[list[int]]:
    """Units (by index; ``counts[i]`` records each, from tree ``trees[i]``) in a seeded per-epoch
    order, grouped into steps: units are added until the step holds at least ``batch_size`` records
    *and* records of at least ``min_trees`` distinct trees (capped at the number of trees), so a step
    may hold more than ``batch_size``; an epoch's short remainder joins its last full step. No step is
    left with a handful of records, whose full-size Adam update would throw a fresh value head off,
    and no step pulls the model toward one tree's outcome alone."""
    trees = list(trees) if trees is not None else [str(i) for i in range(len(counts))]
    need_trees = min(min_trees, len(set(trees)))
    order = list(range(len(counts)))
    random.Random(seed * 1000 + epoch).shuffle(order)
    steps: list[list[int]] = []
    current: list[int] = []
    n = 0
    for i in order:
        current.append(i)
        n += counts[i]
        if n >= batch_size and len({trees[j] for j in current}) >= need_trees:
            steps.append(current)
            current, n = [], 0
    if current:
        if steps:
            steps[-1] += current
        else:
            steps.append(current)
    return steps
