"""Q data for the QNet: reading ``qdata.jsonl``, the split by tree, sibling groups, ranking metrics.

The record format is fixed by exploration (:func:`qlass.qdata.qdata_records`; see also
:mod:`qlass.training.qnet`); every problem is reported with the file, the line and the field.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable, Sequence

import numpy as np

from .errors import DataError, QlassError
from .types import Message


@dataclass(frozen=True)
class QRecord:
    """One training example: the history before an action, the action, and its Q target."""

    tree_id: str
    task: str
    node_id: int
    parent_id: int
    group: str
    depth: int
    messages: tuple[Message, ...]
    action: str
    q: float


@dataclass
class Group:
    """Siblings: records of one tree and sibling group, sharing one history."""

    tree_id: str
    group: str
    messages: list[Message]
    records: list[QRecord]


def read_qdata(path: str | Path) -> list[QRecord]:
    """Every record of a qdata JSONL file, validated by :func:`qlass.qdata.read_qdata` (errors name the
    file, line and field), as typed records."""
    from .qdata import read_qdata as read_records

    records = [QRecord(tree_id=r["tree_id"], task=r["task"], node_id=r["node_id"], parent_id=r["parent_id"],
                       group=r["group"], depth=r["depth"],
                       messages=tuple(Message(m["role"], m["content"]) for m in r["messages"]),
                       action=r["action"], q=float(r["q"])) for r in read_records(path)]
    if not records:
        raise DataError(str(path), "no records")
    return records


def split_by_tree(records: Sequence[QRecord], val_fraction: float, seed: int) -> tuple[list[QRecord], list[QRecord]]:
    """Seeded train/validation split of whole trees (at least one tree each side when possible)."""
    trees = sorted({r.tree_id for r in records})
    random.Random(seed).shuffle(trees)
    n_val = round(len(trees) * val_fraction)
    if val_fraction > 0 and len(trees) >= 2:
        n_val = min(max(n_val, 1), len(trees) - 1)
    held = set(trees[:n_val])
    return [r for r in records if r.tree_id not in held], [r for r in records if r.tree_id in held]


def fold_trees(records: Sequence[QRecord], folds: int, seed: int, source: str) -> list[set[str]]:
    """The trees of ``records`` (read from ``source``) dealt into ``folds`` disjoint sets (seeded
    shuffle, then round robin), for cross-validation by tree."""
    trees = sorted({r.tree_id for r in records})
    if folds < 2:
        raise QlassError(f"cross-validation by tree needs at least 2 folds, got {folds}")
    if folds > len(trees):
        raise DataError(source, f"{len(trees)} tree(s) cannot be dealt into {folds} folds (cross-validation by tree "
                                "needs a tree in each fold at least): lower folds or add trees")
    random.Random(seed).shuffle(trees)
    return [set(trees[k::folds]) for k in range(folds)]


def make_groups(records: Sequence[QRecord], source: str) -> list[Group]:
    """Sibling groups in first-seen order; siblings must share their history."""
    groups: dict[tuple[str, str], Group] = {}
    for r in records:
        key = (r.tree_id, r.group)
        g = groups.get(key)
        if g is None:
            groups[key] = Group(r.tree_id, r.group, list(r.messages), [r])
        elif tuple(g.messages) != r.messages:
            raise DataError(source, f"field 'messages' differs from its sibling node {g.records[0].node_id}'s "
                            f"(tree {r.tree_id!r}, group {r.group!r}); siblings must share one history",
                            record_id=f"{r.tree_id}/{r.node_id}")
        else:
            g.records.append(r)
    return list(groups.values())


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    sorted_x = x[order]
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = (start + end - 1) / 2.0
            start = end
    return ranks


def spearman(targets: Sequence[float], preds: Sequence[float]) -> float | None:
    """Spearman's rank correlation; ``None`` when either side is constant or there are < 2 values."""
    if len(targets) < 2:
        return None
    a, b = _ranks(np.asarray(targets, float)), _ranks(np.asarray(preds, float))
    if a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def pair_credits(keys: Sequence[Hashable], targets: Sequence[float], preds: Sequence[float],
                 eps: float = 1e-6) -> list[tuple[Hashable, float]]:
    """Per pair of records sharing a key (sibling group) whose targets differ by more than ``eps``:
    its key and 1 if the predictions order it like the targets, 0.5 on a tied prediction, else 0."""
    by_key: dict[Hashable, list[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        by_key[k].append(i)
    out: list[tuple[Hashable, float]] = []
    for key, idx in by_key.items():
        for a in range(len(idx)):
            for b in range(a + 1, len(idx)):
                i, j = idx[a], idx[b]
                dt = targets[i] - targets[j]
                if abs(dt) <= eps:
                    continue
                dp = preds[i] - preds[j]
                out.append((key, 0.5 if dp == 0 else float((dp > 0) == (dt > 0))))
    return out


def ranking_metrics(keys: Sequence[Hashable], targets: Sequence[float], preds: Sequence[float],
                    eps: float = 1e-6) -> dict[str, Any]:
    """Pairwise ranking accuracy among records sharing a key (sibling group) whose targets differ by
    more than ``eps`` (a tied prediction counts half), and Spearman over all records."""
    credits = pair_credits(keys, targets, preds, eps)
    correct, pairs = sum(c for _, c in credits), len(credits)
    return {"pair_accuracy": correct / pairs if pairs else None, "pairs": pairs,
            "spearman": spearman(targets, preds), "n": len(targets)}


def fmt(x: float | None) -> str:
    """A metric for a log line (``n/a`` when undefined)."""
    return "n/a" if x is None else f"{x:.3f}"
