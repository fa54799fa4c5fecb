"""Paired comparisons of methods on the same tasks.

Average rewards over a few dozen tasks differ by chance; since every method plays the same tasks,
the honest comparison is paired: per task, a method's reward minus the baseline's. ``paired_rows``
gives, per (env, split) and method, the mean difference with a percentile bootstrap 95% interval
(tasks resampled with replacement, seeded) and the wins, ties and losses against the baseline; where
a method and the baseline share tasks of more than one split of an environment, one more row (split
``all``) pools them, each (split, task) counted once.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

TIE = 1e-9


def bootstrap_interval(diffs: Sequence[float], resamples: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean of ``diffs``."""
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return means[int(0.025 * (resamples - 1))], means[int(0.975 * (resamples - 1))]


def paired_rows(records: Sequence[dict[str, Any]], baseline: str = "greedy", resamples: int = 10_000,
                seed: int = 0) -> list[dict[str, Any]]:
    """Every other method against ``baseline`` on the tasks both played, per (env, split), then pooled
    over the splits (split ``all``) where there are several.

    Oracle methods are left out (they read the reward). Empty when the baseline was not run."""
    reward: dict[tuple[str, str, str], dict[str, float]] = defaultdict(dict)
    oracle: set[str] = set()
    for r in records:
        reward[(r["env"], r["split"], r["method"])][r["task"]] = float(r["reward"])
        if r.get("oracle"):
            oracle.add(r["method"])
    pairs: dict[tuple[str, str], dict[tuple[str, str], float]] = defaultdict(dict)  # (env, method) -> diffs
    rows = []
    for (env, split, method), by_task in sorted(reward.items()):
        base = reward.get((env, split, baseline))
        if method == baseline or method in oracle or not base:
            continue
        tasks = sorted(set(by_task) & set(base))
        if not tasks:
            continue
        diffs = [by_task[t] - base[t] for t in tasks]
        pairs[(env, method)].update(((split, t), d) for t, d in zip(tasks, diffs))
        rows.append(_paired_row(env, split, method, baseline, diffs, resamples, seed))
    for (env, method), by_key in sorted(pairs.items()):
        if len({split for split, _ in by_key}) > 1:
            rows.append(_paired_row(env, "all", method, baseline, [by_key[k] for k in sorted(by_key)], resamples, seed))
    return rows


def _paired_row(env: str, split: str, method: str, baseline: str, diffs: Sequence[float], resamples: int,
                seed: int) -> dict[str, Any]:
    low, high = bootstrap_interval(diffs, resamples, seed)
    return {"env": env, "split": split, "method": method, "baseline": baseline, "tasks": len(diffs),
            "mean_diff": sum(diffs) / len(diffs), "ci_low": low, "ci_high": high,
            "wins": sum(d > TIE for d in diffs), "ties": sum(abs(d) <= TIE for d in diffs),
            "losses": sum(d < -TIE for d in diffs)}


def paired_table(rows: Sequence[dict[str, Any]]) -> str:
    """The paired rows as a markdown table (differences in reward points, as in the paper's %)."""
    head = ("| env | split | method | vs | tasks | Δ avg reward | 95% CI (bootstrap) | wins / ties / losses |\n"
            "|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['env']} | {r['split']} | {r['method']} | {r['baseline']} | {r['tasks']} "
        f"| {100 * r['mean_diff']:+.1f} | [{100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f}] "
        f"| {r['wins']} / {r['ties']} / {r['losses']} |\n"
        for r in rows
    )
    return head + body
