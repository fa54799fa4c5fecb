"""``qlass view``: one self-contained, offline HTML page for trees, episodes, decisions and results.

:func:`write_view` reads a ``trees.jsonl``, an evaluation ``records.jsonl``, a decisions file
(``qlass decisions collect``) or a whole run folder (every such file under it, plus the
``results.json`` / ``results.md`` / ``budget.csv`` of its evaluation folders) and writes one HTML
file. The page's script and styles are inline (``qlass/view_assets``); the data sits in a
``<script type="application/json">`` block whose ``<``, ``>`` and ``&`` are JSON-escaped, and the
script builds the page with ``textContent`` only, so no environment or model text is ever parsed as
HTML. A Content-Security-Policy allows only the page's own script (by hash) and no network access.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import json
import logging
import math
import os
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import DataError, QlassError
from .file_checks import check_output_file
from .jsonl import JSONContentError, loads, with_replacement_characters, write_text_atomic
from .tree import BackupConfig, Tree, compute_q, contrast_pairs, read_tree_records, tree_summary
from .view_inputs import (
    KINDS,
    detect_kind,
    find_inputs,
)

log = logging.getLogger(__name__)

VIEW_SCHEMA_VERSION = 1
EVAL_RECORDS = ("records.jsonl", "records.jsonl.gz")
"""The records file of an evaluation folder (``qlass eval``), whose results its ``results.json`` shows; the
results of any other records file in the folder are computed from it."""


# -- the page's data ---------------------------------------------------------------------------
def _label(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base)) or path.name
    except ValueError:
        return str(path)


def tree_view(tree: Tree, raw: dict[str, Any], file: str = "") -> dict[str, Any]:
    """The page's record of one tree of ``file`` (its label): its nodes and summary. A tree with no Q value
    gets them backed up here (``q_computed``); one with some keeps them, and the nodes without one show
    none (``q_missing``): a value backed up from rewards beside recorded ones could contradict them."""
    missing = sum(n.q is None for n in tree.nodes[1:])
    computed = bool(missing) and missing == len(tree.nodes) - 1
    if computed:
        gamma = float(tree.config.get("gamma", BackupConfig.gamma))
        backed = compute_q(tree, BackupConfig(gamma=gamma))
        for n in tree.nodes:
            n.q = backed.get(n.id)
    nodes = []
    for n, rn in zip(tree.nodes, raw["nodes"]):
        nodes.append({
            "id": n.id, "parent": n.parent, "depth": n.depth, "source": n.source, "rollout": n.rollout,
            "output": n.output, "action": n.action, "observation": n.observation, "reward": n.reward,
            "done": n.done, "q": n.q, "expanded": n.expanded, "pruned": n.pruned,
            "merged": int(rn.get("merged", 0) or 0), "env_steps": n.env_steps,
            "tokens": n.prompt_tokens + n.completion_tokens,
        })
    summ = tree_summary([tree])
    stats = tree.stats
    summary = {
        "nodes": len(tree.nodes),
        "branches": int(stats.get("branches", sum(n.source == "sample" for n in tree.nodes))),
        "contrast_pairs": contrast_pairs(tree),
        "env_steps": summ["env_steps"],
        "prompt_tokens": summ["prompt_tokens"], "completion_tokens": summ["completion_tokens"],
        "tokens": summ["prompt_tokens"] + summ["completion_tokens"],
        "max_depth": max(n.depth for n in tree.nodes),
        "leaves": len(tree.nodes) - len({n.parent for n in tree.nodes[1:]}),
        "best_reward": max(n.reward for n in tree.nodes),
        "pruned": sum(n.pruned for n in tree.nodes), "merged": int(stats.get("merged", 0)),
        "stopped_by": stats.get("stopped_by"), "q_computed": computed, "q_missing": 0 if computed else missing,
    }
    return {"tree_id": tree.tree_id, "task": tree.task, "env": tree.env, "split": tree.split,
            "task_type": tree.task_type, "file": file, "summary": summary, "nodes": nodes}


def read_tree_views(path: Path, source: str) -> list[dict[str, Any]]:
    """Every tree of a ``trees.jsonl`` file (labelled ``source``), validated
    (:func:`qlass.tree.read_tree_records`), as page records."""
    return [tree_view(tree, rec, source) for tree, rec in read_tree_records(path, skip_torn_tail=True)]


def first_observation(traj: dict[str, Any]) -> str:
    """The task and first observation of an episode: the user turn before its first agent step."""
    conv = traj.get("conversations") or []
    steps = traj.get("steps") or []
    gpt = [i for i, t in enumerate(conv) if t.get("from") == "gpt"]
    at = gpt[-len(steps)] - 1 if steps and len(gpt) >= len(steps) else len(conv) - 1
    while at >= 0 and conv[at].get("from") != "human":
        at -= 1
    return str(conv[at].get("value", "")) if at >= 0 else ""


def episode_view(rec: dict[str, Any], source: str) -> dict[str, Any]:
    """The page's record of one evaluation record."""
    traj = rec.get("trajectory") or {}
    steps = [{"output": s.get("output", ""), "action": s.get("action"), "observation": s.get("observation", ""),
              "reward": s.get("reward"), "done": bool(s.get("done", False))} for s in traj.get("steps") or []]
    decisions = [{"step": d.get("step"), "actions": d.get("actions", []), "values": d.get("values", []),
                  "scores": d.get("scores"), "chosen": d.get("chosen")} for d in traj.get("decisions") or []]
    keep = ("method", "method_name", "env", "split", "task", "task_type", "reward", "success", "prompt_tokens",
            "completion_tokens", "qnet_tokens", "env_steps", "wall_time", "oracle", "oracle_pass_at_n")
    out = {k: rec.get(k) for k in keep}
    out.update(source=source, first_observation=first_observation(traj), steps=steps, decisions=decisions,
               candidates=rec.get("candidates") or [])
    return out


def read_episode_views(path: Path, source: str) -> list[dict[str, Any]]:
    """Every record of an evaluation ``records.jsonl``, validated, as page records."""
    from .eval_records import read_records

    return [episode_view(r, source) for r in read_records([path], skip_torn_tail=True)]


def decision_view(rec: dict[str, Any], source: str) -> dict[str, Any]:
    """The page's record of one decision state (``qlass decisions collect``)."""
    history = rec.get("history") or []
    state = next((m["content"] for m in reversed(history) if m.get("role") == "user"), "")
    keep = ("output", "action", "mean", "std", "reward", "terminal", "anchor", "count", "rollout_rewards",
            "mean_logprob", "completion_tokens")
    return {"source": source, "env": rec.get("env", ""), "split": rec["split"], "task": rec["task"],
            "task_type": rec.get("task_type", ""), "step": rec["step"], "state": state, "played": rec.get("played"),
            "has_played": "played" in rec, "samples": rec.get("samples"), "truncated": rec.get("truncated"),
            "candidates": [{k: c.get(k) for k in keep} for c in rec["candidates"]]}


def read_decision_views(path: Path, source: str) -> list[dict[str, Any]]:
    """Every record of a decisions file, validated, as page records."""
    from .decision_files import read_decisions

    return [decision_view(r, source) for r in read_decisions([path], skip_torn_tail=True)]


def _budget_csv(path: Path) -> list[dict[str, Any]]:
    """The points of a ``budget.csv`` (:func:`qlass.report.write_report`); a row with a missing cell or
    a value that is not a finite number is refused, naming its line."""
    points = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            for line, row in enumerate(csv.DictReader(fh), start=2):
                try:
                    point = {"env": row["env"], "split": row["split"], "curve": row["curve"],
                             "budget_param": row["budget_param"],
                             "completion_tokens": float(row["completion_tokens"]),
                             "avg_reward": float(row["avg_reward"])}
                except (KeyError, TypeError, ValueError) as exc:
                    raise DataError(str(path), f"line {line}: not a budget.csv row ({type(exc).__name__}: {exc})"
                                    ) from None
                if None in point.values() or not all(map(math.isfinite, (point["completion_tokens"],
                                                                             point["avg_reward"]))):
                    raise DataError(str(path), f"line {line}: a budget.csv row needs every cell, with finite "
                                               f"completion_tokens and avg_reward, got {dict(row)!r:.120}")
                points.append(point)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(str(path), f"not a UTF-8 CSV file ({exc})") from None
    return points


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(str(path), f"not UTF-8 text ({exc})") from None


def check_results(data: dict[str, Any], path: Path) -> None:
    """Raise :class:`DataError` unless ``data`` (a ``results.json``, :func:`qlass.report.write_report`)
    has a schema version this qlass reads (or none: written before the field, in the same layout) and
    lists of objects under ``rows``, ``paired`` and ``budget``."""
    from .report import RESULTS_SCHEMA_VERSION

    if data.get("schema_version", RESULTS_SCHEMA_VERSION) != RESULTS_SCHEMA_VERSION:  # files before it: the same
        raise DataError(str(path), f"field 'schema_version' is {data.get('schema_version')!r}; this qlass reads "
                                   f"{RESULTS_SCHEMA_VERSION}")
    for name in ("rows", "paired", "budget"):
        items = data.get(name) or []
        if not isinstance(items, list):
            raise DataError(str(path), f"field {name!r} must be a list of objects, got {items!r:.80}")
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise DataError(str(path), f"field '{name}[{i}]' must be an object, got {item!r:.80}")


def results_view(folder: Path, name: str, records: list[Path], summary: bool = True) -> dict[str, Any] | None:
    """The results of an evaluation folder: ``results.json`` when present, else ``results.md`` and
    ``budget.csv``, else (or without ``summary``: the folder's summary is another file's) computed from
    its ``records`` files as ``qlass report`` would: on the tasks every method played (all of them, with a
    warning, where no task was; the caller passes one file at a time where a folder holds several runs'
    records)."""
    rj = folder / "results.json"
    if summary and rj.is_file():
        try:
            data = _finite(loads(rj.read_text(encoding="utf-8-sig")))
        except (json.JSONDecodeError, UnicodeDecodeError, JSONContentError, RecursionError) as exc:
            # as an unreadable .jsonl: left out with a word, the folder's other files still shown
            data = None
            log.warning("%s: not a qlass results file, left out (%s)", rj,
                        "JSON nested too deeply" if isinstance(exc, RecursionError) else f"not JSON: {exc}")
        if isinstance(data, dict) and isinstance(data.get("rows"), list):
            check_results(data, rj)
            return {"name": name, "rows": data["rows"], "paired": data.get("paired") or [],
                    "budget": data.get("budget") or [], "markdown": None}
        elif data is not None:
            log.warning("%s: no 'rows' list; not a qlass results file", rj)
    md, bc = folder / "results.md", folder / "budget.csv"
    if summary and (md.is_file() or bc.is_file()):
        return {"name": name, "rows": [], "paired": [], "budget": _budget_csv(bc) if bc.is_file() else [],
                "markdown": _text(md) if md.is_file() else None}
    if not records:
        return None
    from .compare import paired_rows
    from .eval_records import read_records
    from .report import budget_points, common_tasks, summarise

    recs = read_records(records, skip_torn_tail=True)
    common = common_tasks(recs)
    if common:
        recs = common
    elif recs:
        log.warning("%s: no task was played by every method; the table averages each method over its own tasks "
                    "(qlass report --all-tasks)", ", ".join(map(str, records)))
    return {"name": name, "rows": summarise(recs), "paired": paired_rows(recs), "budget": budget_points(recs),
            "markdown": None}


def _shown(views: Any, path: Path) -> Any:
    """:func:`_finite` of the page records read from ``path``; JSON nested deeper than the page can carry
    (the reader allows about 990 levels) is refused naming the file."""
    try:
        return _finite(views)
    except RecursionError:
        raise DataError(str(path), "a record's JSON is nested too deeply to show") from None


def _finite(x: Any) -> Any:
    """``x`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def load_view_data(path: str | os.PathLike, title: str | None = None) -> dict[str, Any]:
    """Everything the page shows for ``path`` (see :func:`detect_kind`); a file's torn last line (a
    writer killed mid-line, or a run still writing it) is left out with a warning, the file left as it is."""
    p = Path(path)
    kind = detect_kind(p)
    if kind == "run":
        base, found = p, find_inputs(p)
    else:
        base, found = p.parent, {k: [p] if k == kind else [] for k in (*KINDS, "results")}
    data: dict[str, Any] = {"schema_version": VIEW_SCHEMA_VERSION, "title": title or f"qlass view: {p.resolve().name}",
                            "source": str(p), "kind": kind, "trees": [], "episodes": [], "decisions": [],
                            "results": [], "files": []}
    for f in found["trees"]:
        data["trees"] += _shown(read_tree_views(f, _label(f, base)), f)
    for f in found["records"]:
        data["episodes"] += _shown(read_episode_views(f, _label(f, base)), f)
    for f in found["decisions"]:
        data["decisions"] += _shown(read_decision_views(f, _label(f, base)), f)
    if kind == "run" or kind == "records":
        folders = sorted({f.parent for f in found["records"]} | {f.parent for f in found["results"]})
        for folder in folders:
            recs = [f for f in found["records"] if f.parent == folder]
            name = _label(folder, base) if folder != base else (p.name or str(p))
            summarised = any((folder / f).is_file() for f in ("results.json", "results.md", "budget.csv"))
            # the folder's summary is of its records.jsonl; any other records file gets results of its own
            own = [f for f in recs if f.name in EVAL_RECORDS] if summarised else []
            others = [f for f in recs if f not in own]
            if kind == "records":
                sets = [results_view(folder, name, recs, summary=bool(own))]
            elif summarised or len(others) > 1:  # several runs' records (or shards): one result set each
                sets = ([results_view(folder, name, own)] if summarised else []) + [
                    results_view(folder, _label(f, base), [f], summary=False) for f in others]
            else:
                sets = [results_view(folder, name, recs)]
            data["results"] += [_shown(res, folder) for res in sets if res]
    data["files"] = [_label(f, base) for k in KINDS for f in found[k]]
    if not (data["trees"] or data["episodes"] or data["decisions"] or data["results"]):
        raise QlassError(f"{p}: found no trees, evaluation records, decisions or results to show")
    return data  # every file's records went through _shown; the title and file names are text


# -- the page ---------------------------------------------------------------------------------
def _asset(name: str) -> str:
    return resources.files("qlass").joinpath("view_assets", name).read_text(encoding="utf-8")


def data_block(data: dict[str, Any]) -> str:
    """``data`` as JSON that is safe inside a ``<script>`` element: ``<``, ``>`` and ``&`` are
    written as ``\\u003c``, ``\\u003e`` and ``\\u0026`` (so no ``</script>`` or ``<!--`` can appear)."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def render_html(data: dict[str, Any]) -> str:
    """The whole page: inline styles, the data block and the script, under a Content-Security-Policy
    that runs only this script (by its hash) and allows no network request."""
    js, css = _asset("view.js"), _asset("view.css")
    if "</" in js or "</" in css:
        raise QlassError("qlass/view_assets: the page's script and styles must not contain '</'")
    digest = base64.b64encode(hashlib.sha256(js.encode("utf-8")).digest()).decode("ascii")
    csp = (f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; img-src data:; "
           "base-uri 'none'; form-action 'none'")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{csp}\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{html.escape(str(data.get('title', 'qlass view')))}</title>\n"
        f"<style>\n{css}</style>\n</head>\n<body>\n"
        "<noscript>This page draws its content with JavaScript; please enable it.</noscript>\n"
        "<div id=\"app\"></div>\n"
        f"<script type=\"application/json\" id=\"qlass-data\">{data_block(data)}</script>\n"
        f"<script>{js}</script>\n</body>\n</html>\n"
    )


def _head(path: Path, size: int) -> bytes:
    """The first ``size`` bytes of ``path``."""
    with open(path, "rb") as fh:
        return fh.read(size)


def write_view(path: str | os.PathLike, out: str | os.PathLike, title: str | None = None) -> Path:
    """Write the page for ``path`` (a trees, records or decisions file, or a run folder) to ``out``;
    returns ``out``. Bad input raises :class:`QlassError` naming the path."""
    o = Path(out)
    if o.is_dir():
        raise QlassError(f"{o}: is a folder; give the page's file name (e.g. {o / 'view.html'})")
    check_output_file(o)  # a named pipe or device is never opened, nor replaced
    if o.is_file() and not _head(o, 15).lower().startswith(b"<!doctype html"):
        raise QlassError(f"{o}: exists and is not an HTML page (an input of this command?); the page is only "
                         "written over an earlier page (give another output path)")
    data = load_view_data(path, title)
    # a name that is not UTF-8 (a folder's, a --title's: Python holds its bytes as lone surrogates) is shown
    # with U+FFFD, as a browser would show it; the page could not be written
    page = with_replacement_characters(render_html(data))
    write_text_atomic(o, page)
    log.info("wrote %s (%.1f MB): %d trees (%d nodes), %d episodes, %d decisions, %d result sets",
             o, len(page.encode("utf-8")) / 1e6, len(data["trees"]), sum(len(t["nodes"]) for t in data["trees"]),
             len(data["episodes"]), len(data["decisions"]), len(data["results"]))
    return o
