"""The Q dataset (``qdata.jsonl``): one record per non-root tree node outside the extra rollout
chains (those with ``rollout >= 1`` only inform their branch's mean), with its history, action and
Q target (:func:`qlass.tree.compute_q`); written by :func:`export_qdata`, read back validated by
:func:`read_qdata`. See ``docs/formats.md``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .config_fields import require_config
from .data import refuse_replacing_other_kind
from .errors import DataError, MissingFileError, QlassError
from .file_checks import refuse_overwriting_inputs
from .file_kinds import other_kind
from .jsonl import is_count, read_numbered_jsonl, write_jsonl
from .locking import refuse_input_being_written, writes_to
from .tree import BackupConfig, Tree, checked_field, checked_messages, compute_q, is_q_value, read_trees

QDATA_SCHEMA_VERSION = 1
log = logging.getLogger(__name__)


def _check_max_per_tree(max_per_tree: int | None) -> None:
    """A cap of at least 1 or None (no cap): 0 wrote an empty file and -1 dropped each tree's last record."""
    if max_per_tree is not None and not is_count(max_per_tree, 1):
        raise QlassError(f"max_per_tree must be a whole number >= 1 or None (no limit), got {max_per_tree!r}")


def _rank(tree_id: str, node_id: int) -> str:
    return hashlib.sha256(f"{tree_id}\x1f{node_id}".encode()).hexdigest()


def qdata_records(tree: Tree, cfg: BackupConfig | None = None, max_per_tree: int | None = 300
                  ) -> list[dict[str, Any]]:
    """One Q-dataset record per non-root node outside the extra rollout chains (``rollout >= 1``:
    they only inform their branch's mean, and their heads would repeat a sibling's action), in
    node-id order.

    With more than ``max_per_tree`` such nodes a deterministic subset is kept: nodes that have
    siblings first (sibling groups carry the ranking signal), each tier ordered by a stable hash of
    (tree id, node id). Without ``cfg``, the backup uses :class:`BackupConfig`'s defaults at the gamma the tree
    was explored with (its stored ``q`` values use that one).
    """
    if cfg is None:
        cfg = BackupConfig(gamma=explored_gamma([tree], tree.tree_id))
    require_config(cfg, BackupConfig, "qdata_records")
    _check_max_per_tree(max_per_tree)
    q = compute_q(tree, cfg)
    ids = [i for i in q if tree.nodes[i].rollout == 0]
    group_size: dict[int, int] = {}
    for i in ids:
        group_size[tree.nodes[i].parent] = group_size.get(tree.nodes[i].parent, 0) + 1  # type: ignore[index]
    if max_per_tree is not None and len(ids) > max_per_tree:
        lonely = {i for i in ids if group_size[tree.nodes[i].parent] < 2}  # type: ignore[index]
        ids = sorted(sorted(ids, key=lambda i: (i in lonely, _rank(tree.tree_id, i)))[:max_per_tree])
    histories: dict[int, list[dict[str, str]]] = {}
    out = []
    for i in ids:
        n = tree.nodes[i]
        if n.parent not in histories:
            histories[n.parent] = [{"role": m.role, "content": m.content} for m in tree.history(n.parent)]  # type: ignore[arg-type]
        out.append({"schema_version": QDATA_SCHEMA_VERSION, "tree_id": tree.tree_id, "task": tree.task,
                    "node_id": n.id, "parent_id": n.parent, "group": f"{tree.tree_id}:{n.parent}",
                    "depth": n.depth, "messages": list(histories[n.parent]), "action": n.output, "q": q[i]})
    return out


@writes_to("out_path", folder=False)
def export_qdata(trees_path: str | os.PathLike, out_path: str | os.PathLike, cfg: BackupConfig | None = None,
                 max_per_tree: int | None = 300, own_gamma: bool = False) -> dict[str, Any]:
    """Write ``qdata.jsonl`` for every tree of ``trees_path`` (sorted by tree id); returns counts.

    The backup discounts by the gamma the trees were explored with (:func:`explored_gamma`, as ``qlass qdata``
    does) when ``cfg`` is not given or ``own_gamma`` is set (``cfg``'s other fields still apply); otherwise by
    ``cfg.gamma``, with a warning when that differs from the trees' own."""
    if cfg is None:
        cfg, own_gamma = BackupConfig(), True
    require_config(cfg, BackupConfig, "export_qdata")
    _check_max_per_tree(max_per_tree)
    refuse_overwriting_inputs(out_path, [trees_path])
    refuse_replacing_other_kind(out_path, "a Q-data file", lambda r: r.keys() >= {"tree_id", "node_id", "q"})
    refuse_input_being_written(trees_path, "exporting Q data from it")  # exploration still adds trees
    trees = sorted(read_trees(trees_path), key=lambda t: t.tree_id)
    if not trees:
        raise DataError(str(trees_path), "holds no trees (nothing to export)")
    if own_gamma:
        cfg = replace(cfg, gamma=explored_gamma(trees, trees_path))
    else:
        others = sorted({float(t.config.get("gamma", BackupConfig.gamma)) for t in trees} - {cfg.gamma})
        if others:
            log.warning("%s: backing up with gamma %g; trees in it were explored with %s (their stored q values "
                        "use it)", trees_path, cfg.gamma, ", ".join(f"{g:g}" for g in others))
    records = [r for t in trees for r in qdata_records(t, cfg, max_per_tree)]
    write_jsonl(out_path, records)
    return {"trees": len(trees), "records": len(records),
            "nodes": sum(t.edges for t in trees), "path": str(Path(out_path))}


def explored_gamma(trees: Sequence[Tree], trees_path: str | os.PathLike) -> float:
    """The discount ``trees`` (of ``trees_path``) were explored with (``config.gamma``, which their stored
    ``q`` values and ``qlass run``'s Q data use); :class:`BackupConfig`'s default for trees that do not
    record it or for no trees. Trees of one file with different discounts are refused."""
    gammas = {float(t.config.get("gamma", BackupConfig.gamma)) for t in trees}
    if len(gammas) > 1:
        raise QlassError(f"{trees_path}: its trees were explored with different gammas ({sorted(gammas)}); "
                         "give --gamma")
    return gammas.pop() if gammas else BackupConfig.gamma


_QDATA_FIELDS: dict[str, tuple[type, ...]] = {
    "schema_version": (int,), "tree_id": (str,), "task": (str,), "node_id": (int,), "parent_id": (int,),
    "group": (str,), "depth": (int,), "messages": (list,), "action": (str,), "q": (int, float),
}


def read_qdata(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of a ``qdata.jsonl`` file, validated; a problem raises :class:`DataError`
    naming the file, line and field."""
    p = str(path)
    if not Path(path).exists():
        raise MissingFileError(p)
    out: list[dict[str, Any]] = []
    seen: dict[tuple[str, int], int] = {}
    histories: dict[str, tuple[int, list[Any]]] = {}  # a sibling group's history, as its first record gave it
    for line, rec in read_numbered_jsonl(path):
        where = f"line {line}"
        other = other_kind(rec, "qdata")
        if other is not None:
            raise DataError(p, f"{where}: this is {other}, not a Q-data file (qlass qdata or decisions to-qdata)")
        vals = {k: checked_field(rec, k, kinds, where, p) for k, kinds in _QDATA_FIELDS.items()}
        if vals["schema_version"] != QDATA_SCHEMA_VERSION:
            raise DataError(p, f"{where}: field 'schema_version' is {vals['schema_version']}; "
                               f"this qlass reads {QDATA_SCHEMA_VERSION}")
        key = (vals["tree_id"], vals["node_id"])
        if key in seen:
            raise DataError(p, f"{where}: node {key[1]} of tree {key[0]!r} is also at line {seen[key]}")
        seen[key] = line
        for name, low in (("node_id", 1), ("parent_id", 0), ("depth", 1)):  # the root (node 0) is no record
            if vals[name] < low:
                raise DataError(p, f"{where}: field {name!r} must be >= {low}, got {vals[name]}")
        if vals["parent_id"] == vals["node_id"]:
            raise DataError(p, f"{where}: field 'parent_id' is the node's own id {vals['node_id']}")
        if not vals["action"].strip():
            raise DataError(p, f"{where}: field 'action' is empty")
        msgs = checked_messages(vals["messages"], where, "messages", p)
        if not msgs:
            raise DataError(p, f"{where}: field 'messages' is empty")
        if msgs[-1].role != "user":
            raise DataError(p, f"{where}: field 'messages' must end with the observation the action answers (a user "
                               f"turn), not a {msgs[-1].role} turn")
        first = histories.setdefault(vals["group"], (line, vals["messages"]))
        if first[1] != vals["messages"]:
            raise DataError(p, f"{where}: field 'messages' differs from its sibling's at line {first[0]} (group "
                               f"{vals['group']!r}); siblings must share one history")
        if not is_q_value(vals["q"]):
            raise DataError(p, f"{where}: field 'q' must be a number in [-1, 1], got {vals['q']}")
        if vals["group"] != f"{vals['tree_id']}:{vals['parent_id']}":
            raise DataError(p, f"{where}: field 'group' must be '<tree_id>:<parent_id>', got {vals['group']!r}")
        out.append({**vals, "q": float(vals["q"])})
    return out
