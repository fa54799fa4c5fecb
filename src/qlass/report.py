"""Result tables and token-budget curves from evaluation records.

``summarise`` groups records by (env, split, method) into average reward, success rate and tokens
per task (a Table-2-style view); ``budget_points`` gives average reward against completion tokens
per task — best-of-n at N' = 1, 2, 4, 8 below N and at N itself, read from one best-of-n run (its first N'
candidates, the same selection rule), reflexion at every trial count T' <= T read from one run (its first T'
trials), and each qlass(m=...) run as one point. A curve is named by the method label without its budget
option (:func:`budget_curve`), so qlass(m=2) and qlass(m=4) share one and qlass(m=4,select=random) has its
own. ``write_report`` writes
``results.json``, ``results.md``, ``budget.csv`` and ``budget.png``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from .compare import (
    confidence_label,
    interval_cell,
    md_cell,
    paired_interval,
    paired_rows,
    paired_table,
    points,
    reward_table,
)
from .config_fields import require_names
from .errors import QlassError
from .eval_records import BUDGET_OPTIONS
from .file_checks import check_output_file
from .jsonl import write_bytes_atomic, write_text_atomic
from .search import argmax

log = logging.getLogger(__name__)

BUDGET_NS = (1, 2, 4, 8)
RESULTS_SCHEMA_VERSION = 1
REPORT_FILES = ("results.json", "results.md", "budget.csv", "budget.png")


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _qnet_choices(record: dict[str, Any]) -> int | None:
    """A qlass record's QNet choices; records written before the field existed count the steps
    that consulted the QNet (the same thing: it is consulted only between distinct actions)."""
    if "qnet_choices" in record:
        return record["qnet_choices"]
    if record["method_name"] == "qlass" and "steps" in record.get("trajectory", {}):
        return sum(1 for s in record["trajectory"]["steps"] if s.get("qnet_tokens", 0) > 0)
    return None


def summarise(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (env, split, method) with averages over its tasks; oracle rows are labelled."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["env"], r["split"], r["method"])].append(r)
    rows = []
    for (env, split, method), rs in sorted(groups.items()):
        row = {
            "env": env, "split": split, "method": method, "tasks": len(rs),
            "avg_reward": _mean([r["reward"] for r in rs]),
            "success_rate": _mean([1.0 if r["success"] else 0.0 for r in rs]),
            "completion_tokens": _mean([r["completion_tokens"] for r in rs]),
            "prompt_tokens": _mean([r["prompt_tokens"] for r in rs]),
            "qnet_tokens": _mean([r["qnet_tokens"] for r in rs]),
            "env_steps": _mean([r["env_steps"] for r in rs]),
            "wall_time": _mean([r["wall_time"] for r in rs]),
            "oracle": any(r["oracle"] for r in rs),
        }
        choices = [_qnet_choices(r) for r in rs]
        if all(c is not None for c in choices):
            row["qnet_choices"] = _mean(choices)
        rows.append(row)
        if all("oracle_pass_at_n" in r for r in rs):  # the reward picks: no QNet is consulted
            kept = {k: v for k, v in row.items() if k != "qnet_choices"}
            rows.append({**kept, "method": f"{method} pass@N [oracle]", "oracle": True, "qnet_tokens": 0.0,
                         "avg_reward": _mean([r["oracle_pass_at_n"] for r in rs]),
                         "success_rate": _mean([1.0 if r["oracle_pass_at_n"] >= 1.0 - 1e-9 else 0.0 for r in rs])})
    return rows


def budget_curve(record: dict[str, Any]) -> str:
    """The budget curve of a record: its method label without the option the curve runs along (and without
    best-of-n's default ``qnet`` selection): ``qlass(m=4,anchor=greedy)`` → ``qlass(anchor=greedy)``,
    ``qlass(m=2)[oracle]`` → ``qlass[oracle]``, ``best-of-n(n=4,qnet)`` → ``best-of-n``, ``greedy`` →
    ``greedy``."""
    label, name = record["method"], record["method_name"]
    option = BUDGET_OPTIONS.get(name)  # left out of the curve's name
    head, sep, rest = label.partition("(")
    if option is None or not sep or head != name:
        return label + ("[oracle]" if record["oracle"] and "[oracle]" not in label else "")
    inner, _, tail = rest.rpartition(")")
    kept = [o for o in inner.split(",") if not o.startswith(f"{option}=") and (name, o) != ("best-of-n", "qnet")]
    curve = head + (f"({','.join(kept)})" if kept else "") + tail
    return curve + ("[oracle]" if record["oracle"] and "[oracle]" not in curve else "")


def budget_points(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Average reward vs. completion tokens per task, per (env, split, method label), each placed on the
    curve :func:`budget_curve` names. Where two runs of one curve give a point at the same budget (the
    first N' candidates of ``best-of-n(n=4)`` and of ``best-of-n(n=8)``), the run with the larger N (or
    trial count) gives it, so that a curve has one point per budget."""
    runs: list[list[dict[str, Any]]] = []  # each method label's points, its own budget last
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["env"], r["split"], r["method"])].append(r)
    for (env, split, method), rs in sorted(groups.items()):
        run: list[dict[str, Any]] = []
        if rs[0]["method_name"] == "best-of-n" and all("candidates" in r for r in rs):
            n_max = min(len(r["candidates"]) for r in rs)
            for n in [k for k in BUDGET_NS if k < n_max] + [n_max]:
                rewards, tokens = [], []
                for r in rs:
                    cands = r["candidates"][:n]
                    rewards.append(cands[argmax([c["score"] for c in cands])]["reward"])
                    tokens.append(sum(c["completion_tokens"] for c in cands))
                run.append({"env": env, "split": split, "curve": budget_curve(rs[0]), "budget_param": n,
                            "completion_tokens": _mean(tokens), "avg_reward": _mean(rewards)})
        elif rs[0]["method_name"] == "reflexion" and all("trials" in r for r in rs):
            for t in range(1, rs[0]["config"]["trials"] + 1):
                played = [r["trials"][:t] for r in rs]  # an episode that succeeded earlier stopped there
                tokens = [sum(tr["completion_tokens"] for tr in ts) + sum(tr.get("reflection_completion_tokens", 0)
                                                                          for tr in ts[:-1]) for ts in played]
                run.append({"env": env, "split": split, "curve": budget_curve(rs[0]), "budget_param": t,
                            "completion_tokens": _mean(tokens),
                            "avg_reward": _mean([ts[-1]["reward"] for ts in played])})
        elif rs[0]["method_name"] in ("qlass", "greedy", "sample"):
            param = rs[0]["config"].get("m", 1)
            run.append({"env": env, "split": split, "curve": budget_curve(rs[0]), "budget_param": param,
                        "completion_tokens": _mean([r["completion_tokens"] for r in rs]),
                        "avg_reward": _mean([r["reward"] for r in rs])})
        runs.append(run)
    owner: dict[tuple[Any, ...], int] = {}  # (env, split, curve, budget) -> the run that gives the point
    for i, run in enumerate(runs):
        for p in run:
            j = owner.setdefault(_budget_key(p), i)
            if run[-1]["budget_param"] > runs[j][-1]["budget_param"]:
                owner[_budget_key(p)] = i
    return [p for i, run in enumerate(runs) for p in run if owner[_budget_key(p)] == i]


def _budget_key(point: dict[str, Any]) -> tuple[Any, ...]:
    return point["env"], point["split"], point["curve"], point["budget_param"]


def _choices_cell(row: dict[str, Any]) -> str:
    return f"{row['qnet_choices']:.1f}" if "qnet_choices" in row else "–"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The summary rows as a markdown table (reward and success in percent, as in the paper).

    "choices/task" counts the steps where Q-guided search chose between two or more distinct actions: by the
    QNet, or by the ``select=likelihood``/``random`` control ("–" for methods that make no such choice)."""
    head = ("| env | split | method | tasks | avg reward | success % | completion tok/task "
            "| prompt tok/task | QNet tok/task | choices/task | env steps/task |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {md_cell(r['env'])} | {md_cell(r['split'])} | {md_cell(r['method'])} | {r['tasks']} "
        f"| {100 * r['avg_reward']:.1f} "
        f"| {100 * r['success_rate']:.1f} | {r['completion_tokens']:.0f} | {r['prompt_tokens']:.0f} "
        f"| {r['qnet_tokens']:.0f} | {_choices_cell(r)} "
        f"| {r['env_steps']:.1f} |\n"
        for r in rows
    )
    return head + body


def _plot(points: Sequence[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'qlass[plot]'): skipping %s", path)
        return False
    panels = sorted({(p["env"], p["split"]) for p in points})
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5 * max(len(panels), 1), 4), squeeze=False)
    for ax, (env, split) in zip(axes[0], panels):
        for curve in sorted({p["curve"] for p in points if (p["env"], p["split"]) == (env, split)}):
            pts = sorted((p for p in points if (p["env"], p["split"], p["curve"]) == (env, split, curve)),
                         key=lambda p: p["completion_tokens"])
            xs = [p["completion_tokens"] for p in pts]
            ys = [100 * p["avg_reward"] for p in pts]
            ax.plot(xs, ys, marker="o", label=curve)
            for p, x, y in zip(pts, xs, ys):
                ax.annotate(str(p["budget_param"]), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=8)
        ax.set_title(f"{env} / {split}")
        ax.set_xlabel("completion tokens per task")
        ax.set_ylabel("average reward (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    png = io.BytesIO()  # drawn first, then written whole: a killed run never leaves a torn or empty budget.png
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    write_bytes_atomic(path, png.getvalue())
    return True


def common_tasks(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of the (env, split, task) triples that every method of that (env, split) played,
    so that each row of a report averages over the same tasks (a run stopped part-way)."""
    methods: dict[tuple[str, str], set[str]] = defaultdict(set)
    played: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for r in records:
        methods[(r["env"], r["split"])].add(r["method"])
        played[(r["env"], r["split"], r["task"])].add(r["method"])
    return [r for r in records if played[(r["env"], r["split"], r["task"])] == methods[(r["env"], r["split"])]]


def write_report(records: Sequence[dict[str, Any]], out_dir: str | os.PathLike[str], title: str = "qlass results",
                 baselines: Sequence[str] | None = None, confidence: float = 0.95) -> list[dict[str, Any]]:
    """Write results.json/.md (the summary rows and every other method's paired difference to each of
    ``baselines``, with bootstrap intervals at level ``confidence``) and the budget curve (CSV + PNG) into
    ``out_dir``; returns the rows. ``baselines`` must be methods of the records; without them, ``greedy`` is the
    baseline where it was run. Every output is checked before the first is written, so a failure never leaves
    new files beside old ones."""
    out_dir = Path(out_dir)
    if baselines is None:
        baselines = ["greedy"]
    else:
        baselines = require_names(baselines, "write_report", "baselines")
        methods = {r["method"] for r in records}
        missing = [b for b in baselines if b not in methods]
        if missing:
            raise QlassError(f"write_report: baseline {missing[0]!r} is no method of the records (they hold: "
                             f"{', '.join(sorted(methods))})")
    for name in REPORT_FILES:
        check_output_file(out_dir / name)
    rows = summarise(records)
    points = budget_points(records)
    paired = [row for baseline in baselines for row in paired_rows(records, baseline, confidence=confidence)]
    results = {"schema_version": RESULTS_SCHEMA_VERSION, "rows": rows, "budget": points, "paired": paired}
    write_text_atomic(out_dir / "results.json", json.dumps(results, indent=1) + "\n")
    md = f"# {title}\n\n{markdown_table(rows)}\n"
    if any(r["oracle"] for r in rows):
        md += "\nRows marked [oracle] use the environment's reward and are not comparable to the others.\n"
    if paired:
        md += ("\n## Paired differences\n\nPer task, the method's reward minus the baseline's on the same "
               "task, averaged; the interval resamples tasks (10,000 times, seeded).\n\n"
               + paired_table(paired, confidence))
    write_text_atomic(out_dir / "results.md", md)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["env", "split", "curve", "budget_param", "completion_tokens",
                                             "avg_reward"])
    writer.writeheader()
    writer.writerows(points)
    write_text_atomic(out_dir / "budget.csv", buf.getvalue())
    if points:
        _plot(points, out_dir / "budget.png")
    return rows


def side_by_side(sides: dict[str, Sequence[dict[str, Any]]], resamples: int = 10_000, seed: int = 0,
                 confidence: float = 0.95) -> list[dict[str, Any]]:
    """The same methods run under several settings (``sides``: label → records, e.g. full and limited
    expert data, paper Table 3): per (env, split, method) that every side ran, each side's average
    reward and success rate on the tasks all sides played, and every later side's paired difference
    to the first side (per task, bootstrap interval at level ``confidence`` as in :mod:`qlass.compare`)."""
    labels = list(sides)
    reward = {label: reward_table(records)[0] for label, records in sides.items()}
    rows = []
    for key in sorted(set.intersection(*(set(reward[label]) for label in labels))):
        tasks = sorted(set.intersection(*(set(reward[label][key]) for label in labels)))
        if not tasks:
            continue
        row: dict[str, Any] = {"env": key[0], "split": key[1], "method": key[2], "tasks": len(tasks), "sides": {}}
        for label in labels:
            vals = [reward[label][key][t] for t in tasks]
            row["sides"][label] = {"avg_reward": _mean(vals),
                                   "success_rate": _mean([float(v >= 1.0 - 1e-9) for v in vals])}
        for label in labels[1:]:
            diffs = [reward[label][key][t] - reward[labels[0]][key][t] for t in tasks]
            low, high = paired_interval(diffs, resamples, seed, confidence)
            row["sides"][label]["vs_first"] = {"mean_diff": _mean(diffs), "ci_low": low, "ci_high": high}
        rows.append(row)
    return rows


def side_by_side_table(rows: Sequence[dict[str, Any]], labels: Sequence[str], confidence: float = 0.95) -> str:
    """The rows of :func:`side_by_side` as markdown: average reward per side, then each later side's
    paired difference to the first (reward points) with its interval of level ``confidence``."""
    head = (["env", "split", "method", "tasks"] + [f"{label}: avg reward" for label in labels]
            + [f"{label} − {labels[0]} [{confidence_label(confidence)}]" for label in labels[1:]])
    lines = ["| " + " | ".join(map(md_cell, head)) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [md_cell(r["env"]), md_cell(r["split"]), md_cell(r["method"]), str(r["tasks"])]
        cells += [f"{100 * r['sides'][label]['avg_reward']:.1f}" for label in labels]
        for label in labels[1:]:
            d = r["sides"][label]["vs_first"]
            cells.append(f"{points(d['mean_diff'])} {interval_cell(d['ci_low'], d['ci_high'])}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_side_by_side(sides: dict[str, Sequence[dict[str, Any]]], out_dir: str | os.PathLike[str],
                       title: str = "qlass results", confidence: float = 0.95) -> list[dict[str, Any]]:
    """Write ``sides.md`` and ``sides.json`` (:func:`side_by_side`, intervals at level ``confidence``) into
    ``out_dir``; returns the rows."""
    out_dir = Path(out_dir)
    if len(sides) < 2:
        raise QlassError("a side-by-side table needs at least two labelled runs")
    for name in ("sides.json", "sides.md"):
        check_output_file(out_dir / name)
    rows = side_by_side(sides, confidence=confidence)
    if not rows:
        raise QlassError(f"runs {', '.join(sides)} have no method played on the same tasks in all of them")
    labels = list(sides)
    write_text_atomic(out_dir / "sides.json", json.dumps({"schema_version": RESULTS_SCHEMA_VERSION, "sides": labels,
                                                          "confidence": confidence, "rows": rows}, indent=1) + "\n")
    md = (f"# {title}\n\nThe same methods under {len(labels)} settings ({', '.join(labels)}), each averaged over the "
          f"tasks every setting played; the last columns are the paired difference to {labels[0]} on those tasks "
          f"(per task, bootstrap {confidence_label(confidence)} interval, 10,000 resamples).\n\n"
          + side_by_side_table(rows, labels, confidence))
    write_text_atomic(out_dir / "sides.md", md)
    return rows
