"""The kinds of JSON Lines files qlass writes, told apart by the fields of their records: a reader given
another stage's file names it as what it is, instead of reporting every record's missing fields."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

FILE_KINDS: dict[str, tuple[frozenset[str], str]] = {
    "records": (frozenset({"method", "trajectory"}), "evaluation records (qlass eval's records.jsonl)"),
    "trees": (frozenset({"tree_id", "nodes"}), "a trees file (qlass explore)"),
    "qdata": (frozenset({"tree_id", "node_id", "q"}), "a Q-data file (qlass qdata or decisions to-qdata)"),
    "decisions": (frozenset({"history", "candidates"}),
                  "a decisions file (qlass decisions collect; see qlass decisions report)"),
    "trajectories": (frozenset({"id", "conversations"}), "a trajectory file (expert or SFT data)"),
    "pairs": (frozenset({"chosen", "rejected"}), "preference pairs (qlass dpo's data)"),
    "paraphrases": (frozenset({"kind", "settings"}), "a paraphrase cache (qlass paraphrase)"),
    "finished-tasks": (frozenset({"task", "stop"}), "a decisions file's finished-task list (NAME.tasks.jsonl)"),
}
"""Each kind of file: the fields its records have (all of them), and what it is, in words."""

ALSO_KNOWN_BY: dict[str, tuple[frozenset[str], ...]] = {"trajectories": (frozenset({"id", "messages"}),)}
"""Other fields that make a record of a kind: a trajectory's turns may be a 'messages' list
(:data:`qlass.data.TURN_LISTS`)."""


def _is(record: Mapping[str, Any], kind: str) -> bool:
    return any(record.keys() >= fields for fields in (FILE_KINDS[kind][0], *ALSO_KNOWN_BY.get(kind, ())))


def kind_of(record: Mapping[str, Any]) -> str | None:
    """The kind of file (a key of :data:`FILE_KINDS`) whose record ``record`` is, None when none fits."""
    return next((kind for kind in FILE_KINDS if _is(record, kind)), None)


def other_kind(record: Mapping[str, Any], expected: str) -> str | None:
    """What ``record`` shows its file to be, in words, when that is a kind of file other than ``expected``
    (a key of :data:`FILE_KINDS`); None when it is of that kind, or of none known (its reader then names
    the field it lacks)."""
    if _is(record, expected):
        return None
    kind = kind_of(record)
    return None if kind is None else FILE_KINDS[kind][1]
