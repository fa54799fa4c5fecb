"""Decision states as Q data (``qlass decisions to-qdata``): one sibling group per decision, the
decision's task as its tree (see :mod:`qlass.decision_head`). Reads and writes files only, so a bad
decision file is reported without loading torch."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config_fields import require_paths
from .data import refuse_replacing_other_kind
from .decision_files import MAX_CANDIDATES, check_pooled, one_environment, read_decisions
from .errors import QlassError
from .file_checks import refuse_overwriting_inputs
from .jsonl import write_jsonl
from .locking import refuse_input_being_written, writes_to
from .qdata import QDATA_SCHEMA_VERSION
from .qnet_data import QRecord
from .types import Message

log = logging.getLogger(__name__)


def decision_tree_id(rec: dict[str, Any]) -> str:
    """The Q-data tree of a decision: its split and task (``split/task``)."""
    return f"{rec['split']}/{rec['task']}"


def decision_qrecords(records: Sequence[dict[str, Any]]) -> list[QRecord]:
    """Q records of checked decision records (:func:`qlass.decision_files.read_decisions`): one
    sibling group per decision, one record per candidate with its Monte-Carlo mean as ``q``. The
    tasks name the trees, so decisions of two environments are refused rather than mixed."""
    one_environment(records)
    out = []
    owners: dict[str, tuple[str, str]] = {}
    for rec in records:
        tree, step = decision_tree_id(rec), int(rec["step"])  # node ids: checked decisions have < MAX_CANDIDATES
        owner = owners.setdefault(tree, (rec["split"], rec["task"]))
        if owner != (rec["split"], rec["task"]):
            raise QlassError(f"task {owner[1]!r} of split {owner[0]!r} and task {rec['task']!r} of split "
                             f"{rec['split']!r} would both be Q-data tree {tree!r} (split/task): rename a split")
        messages = tuple(Message(m["role"], m["content"]) for m in rec["history"])
        for j, cand in enumerate(rec["candidates"]):
            out.append(QRecord(tree_id=tree, task=rec["task"], node_id=step * MAX_CANDIDATES + j + 1, parent_id=step,
                               group=f"{tree}:{step}", depth=step + 1, messages=messages, action=cand["output"],
                               q=float(cand["mean"])))
    return out


def _qdata_row(r: QRecord) -> dict[str, Any]:
    return {"schema_version": QDATA_SCHEMA_VERSION, "tree_id": r.tree_id, "task": r.task, "node_id": r.node_id,
            "parent_id": r.parent_id, "group": r.group, "depth": r.depth,
            "messages": [{"role": m.role, "content": m.content} for m in r.messages], "action": r.action, "q": r.q}


@writes_to("out", folder=False)
def write_decision_qdata(paths: Sequence[str | Path], out: str | Path, allow_mixed: bool = False) -> int:
    """Write the decisions of ``paths`` as Q data (``qdata.jsonl`` format) to ``out``; returns the
    number of records. Files collected with other settings are refused unless ``allow_mixed``
    (:func:`~qlass.decision_files.check_pooled`)."""
    paths = require_paths(paths, "write_decision_qdata", "paths")
    refuse_overwriting_inputs(out, paths)
    refuse_replacing_other_kind(out, "a Q-data file", lambda r: r.keys() >= {"tree_id", "node_id", "q"})
    for path in paths:  # a collection still adds decisions
        refuse_input_being_written(path, "exporting Q data from it")
    for change in check_pooled(paths, allow_mixed):
        log.warning("pooling decisions collected with other settings: %s", change)
    records = decision_qrecords(read_decisions(paths))
    if not records:
        raise QlassError(f"{', '.join(map(str, paths))}: no decisions (nothing to export)")
    write_jsonl(out, [_qdata_row(r) for r in records])
    return len(records)
