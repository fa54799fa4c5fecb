"""Paired comparisons pooled over replicates: the same methods on the same tasks, played by several
agents of one recipe (SFT backbones trained with different seeds, say).

Two builds of one recipe can differ by as much as the methods compared on them, so a comparison on
one build says little about the recipe. Within each replicate, a method is paired with the baseline
per task, as in :mod:`qlass.compare`; across replicates, each task's differences are averaged, and the
interval resamples tasks (percentile bootstrap, seeded). The replicates are held fixed: with a handful
of them, the interval is over tasks, and each replicate's own difference is reported beside it so that
their spread shows. Only tasks that every replicate played with both methods count.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .compare import TIE, confidence_label, interval_cell, md_cell, paired_interval, points, reward_table
from .config_fields import require_count
from .errors import QlassError
from .file_checks import check_output_file
from .jsonl import write_text_atomic
from .report import RESULTS_SCHEMA_VERSION

REPLICATE_FILES = ("replicates.json", "replicates.md")


def replicate_rows(replicates: Mapping[str, Sequence[dict[str, Any]]], baseline: str = "greedy",
                   resamples: int = 10_000, seed: int = 0, confidence: float = 0.95) -> list[dict[str, Any]]:
    """Every method (but ``baseline`` and oracle methods) against ``baseline``, per (env, split) and then
    pooled over the splits of an environment (split ``all``): each replicate's average reward of both and
    its mean paired difference, and the difference averaged over replicates per task, with its bootstrap
    interval over tasks at level ``confidence`` and the wins, ties and losses of those averages. A method
    is compared only where every replicate played it and the baseline on common tasks."""
    require_count(resamples, "replicate_rows", "resamples")
    labels = list(replicates)
    tables = {label: reward_table(records) for label, records in replicates.items()}
    if any(baseline in oracle for _, oracle in tables.values()):
        raise QlassError(f"baseline {baseline!r} is an oracle method (it reads the environment's reward)")
    keys = set.intersection(*(set(reward) for reward, _ in tables.values()))
    oracles = set().union(*(oracle for _, oracle in tables.values()))
    rows: list[dict[str, Any]] = []
    pooled: dict[tuple[str, str], dict[str, dict[tuple[str, str], tuple[float, float]]]] = defaultdict(dict)
    for env, split, method in sorted(keys):
        if method == baseline or method in oracles or (env, split, baseline) not in keys:
            continue
        tasks = sorted(set.intersection(*(set(tables[lb][0][(env, split, m)]) for lb in labels
                                          for m in (method, baseline))))
        if not tasks:
            continue
        pairs = {lb: {t: (tables[lb][0][(env, split, method)][t], tables[lb][0][(env, split, baseline)][t])
                      for t in tasks} for lb in labels}
        for lb in labels:
            pooled[(env, method)].setdefault(lb, {}).update({(split, t): v for t, v in pairs[lb].items()})
        rows.append(_row(env, split, method, baseline, pairs, resamples, seed, confidence))
    for (env, method), pairs in sorted(pooled.items()):
        if len({split for split, _ in next(iter(pairs.values()))}) > 1:
            rows.append(_row(env, "all", method, baseline, pairs, resamples, seed, confidence))
    return rows


def _row(env: str, split: str, method: str, baseline: str, pairs: dict[str, dict[Any, tuple[float, float]]],
         resamples: int, seed: int, confidence: float) -> dict[str, Any]:
    """One row: ``pairs`` holds, per replicate, each task's (method's reward, baseline's reward)."""
    tasks = sorted(next(iter(pairs.values())))
    per_replicate = {}
    for label, by_task in pairs.items():
        n = len(by_task)
        per_replicate[label] = {"avg_reward": sum(m for m, _ in by_task.values()) / n,
                                "baseline_avg_reward": sum(b for _, b in by_task.values()) / n,
                                "mean_diff": sum(m - b for m, b in by_task.values()) / n}
    diffs = [sum(pairs[lb][t][0] - pairs[lb][t][1] for lb in pairs) / len(pairs) for t in tasks]
    low, high = paired_interval(diffs, resamples, seed, confidence)
    return {"env": env, "split": split, "method": method, "baseline": baseline, "tasks": len(tasks),
            "replicates": per_replicate, "mean_diff": sum(diffs) / len(diffs), "ci_low": low, "ci_high": high,
            "confidence": confidence, "wins": sum(d > TIE for d in diffs), "ties": sum(abs(d) <= TIE for d in diffs),
            "losses": sum(d < -TIE for d in diffs)}


def replicate_table(rows: Sequence[dict[str, Any]], labels: Sequence[str], confidence: float = 0.95) -> str:
    """The rows of :func:`replicate_rows` as markdown: each replicate's average rewards (method / baseline)
    and paired difference, then the difference averaged over replicates with its interval (reward points)."""
    head = (["env", "split", "method", "vs", "tasks"]
            + [f"{label}: method / vs, Δ" for label in labels]
            + [f"Δ over {len(labels)} replicates", f"{confidence_label(confidence)} CI (bootstrap over tasks)",
               "wins / ties / losses"])
    lines = ["| " + " | ".join(map(md_cell, head)) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [md_cell(r["env"]), md_cell(r["split"]), md_cell(r["method"]), md_cell(r["baseline"]), str(r["tasks"])]
        for label in labels:
            rep = r["replicates"][label]
            cells.append(f"{100 * rep['avg_reward']:.1f} / {100 * rep['baseline_avg_reward']:.1f}, "
                         f"{points(rep['mean_diff'])}")
        cells += [points(r["mean_diff"]), interval_cell(r["ci_low"], r["ci_high"]),
                  f"{r['wins']} / {r['ties']} / {r['losses']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_replicates(replicates: Mapping[str, Sequence[dict[str, Any]]], out_dir: str | os.PathLike[str],
                     baselines: Sequence[str] = ("greedy",), title: str = "qlass results",
                     confidence: float = 0.95) -> list[dict[str, Any]]:
    """Write ``replicates.md`` and ``replicates.json`` (:func:`replicate_rows` against each of ``baselines``)
    into ``out_dir``; returns the rows. Needs two replicates or more, and every baseline played in each."""
    out_dir = Path(out_dir)
    labels = list(replicates)
    if len(labels) < 2:
        raise QlassError("a replicate report needs at least two labelled runs")
    for baseline in baselines:
        lacking = [lb for lb, records in replicates.items() if not any(r["method"] == baseline for r in records)]
        if lacking:
            raise QlassError(f"baseline {baseline!r}: replicate {lacking[0]} has no record of it")
    for name in REPLICATE_FILES:
        check_output_file(out_dir / name)
    rows = [row for b in baselines for row in replicate_rows(replicates, b, confidence=confidence)]
    if not rows:
        raise QlassError(f"replicates {', '.join(labels)}: no method was played on the same tasks as the baseline "
                         "in all of them")
    write_text_atomic(out_dir / "replicates.json", json.dumps(
        {"schema_version": RESULTS_SCHEMA_VERSION, "replicates": labels, "confidence": confidence, "rows": rows},
        indent=1) + "\n")
    md = (f"# {title}\n\nThe same methods played by {len(labels)} replicates ({', '.join(labels)}). Per replicate, "
          "each method's average reward and the baseline's on the tasks every replicate played with both, and the "
          "mean paired difference; then, per task, the difference averaged over the replicates, its mean and a "
          f"bootstrap {confidence_label(confidence)} interval resampling tasks (10,000 times, seeded; the "
          "replicates are held fixed).\n\n" + replicate_table(rows, labels, confidence))
    write_text_atomic(out_dir / "replicates.md", md)
    return rows
