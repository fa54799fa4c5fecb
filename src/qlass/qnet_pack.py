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

:func:`step_batches` groups rows into optimizer steps of at least ``batch_size`` records, in a
seeded order per epoch, so a resumed run takes the same steps as an uninterrupted one.
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


def step_batches(counts: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Rows (by index; ``counts[i]`` records each) in a seeded per-epoch order, grouped into steps of
    at least ``batch_size`` records: rows are added until the step holds ``batch_size`` (whole rows,
    so a step may hold more); an epoch's short remainder joins its last full step. No step is left
    with a handful of records, whose full-size Adam update would throw a fresh value head off."""
    order = list(range(len(counts)))
    random.Random(seed * 1000 + epoch).shuffle(order)
    steps: list[list[int]] = []
    current: list[int] = []
    n = 0
    for i in order:
        current.append(i)
        n += counts[i]
        if n >= batch_size:
            steps.append(current)
            current, n = [], 0
    if current:
        if steps:
            steps[-1] += current
        else:
            steps.append(current)
    return steps
