"""Paired comparisons of methods on the same tasks.

Average rewards over a few dozen tasks differ by chance; since every method plays the same tasks,
the honest comparison is paired: per task, a method's reward minus the baseline's. ``paired_rows``
gives, per (env, split) and method, the mean difference with a percentile bootstrap interval (95%
unless asked otherwise; tasks resampled with replacement, seeded) and the wins, ties and losses
against the baseline; where a method and the baseline share tasks of more than one split of an
environment, one more row (split ``all``; ``all (pooled)`` where the environment has a split named
``all``) pools them, each (split, task) counted once. A row of one task has no interval (``null``; ``—``
in tables): resampling one difference only gives it back.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from .config_fields import require_count
from .errors import QlassError

TIE = 1e-9


def md_cell(text: Any) -> str:
    """``text`` as one markdown table cell: a ``|`` (in a method label or split name) escaped, line
    breaks as spaces, so the row keeps its columns."""
    return str(text).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def check_confidence(confidence: float) -> float:
    """``confidence`` if it is a level strictly between 0 and 1, else a :class:`QlassError`."""
    if not 0.0 < confidence < 1.0:
        raise QlassError(f"confidence must be between 0 and 1 (e.g. 0.95), got {confidence}")
    return confidence


def confidence_label(confidence: float) -> str:
    """``0.95`` → ``'95%'``, ``0.975`` → ``'97.5%'``."""
    return f"{100 * confidence:g}%"


def points(x: float) -> str:
    """A reward difference in signed reward points, one decimal: ``+5.7`` (``-0.0``: below zero by less than
    0.05 points, which an interval's end should show)."""
    return f"{100 * x + 0.0:+.1f}"  # + 0.0: an exact zero is +0.0


def interval_cell(low: float | None, high: float | None) -> str:
    """``[-1.2, +3.4]`` in reward points, or ``—`` where there is no interval (one task)."""
    return "—" if low is None or high is None else f"[{points(low)}, {points(high)}]"


def interval_positions(resamples: int, confidence: float) -> tuple[int, int]:
    """Where a percentile interval's ends lie among ``resamples`` sorted resampled statistics: the lower
    end at ⌊tail·(R − 1)⌋ (tail = (1 − confidence) / 2) and the upper end at its mirror image, as many
    places from the top, so that the interval of B − A is that of A − B negated."""
    low = int((1.0 - check_confidence(confidence)) / 2 * (resamples - 1) + 1e-9)  # 0.05 · 100 is 4.999… in floats
    return low, resamples - 1 - low


def bootstrap_interval(diffs: Sequence[float], resamples: int, seed: int, confidence: float = 0.95
                       ) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``diffs`` at level ``confidence``."""
    low, high = interval_positions(resamples, confidence)
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return means[low], means[high]


def paired_interval(diffs: Sequence[float], resamples: int, seed: int, confidence: float
                    ) -> tuple[float, float] | tuple[None, None]:
    """:func:`bootstrap_interval` of paired differences, or none for a single one (resampling it gives it back)."""
    return bootstrap_interval(diffs, resamples, seed, confidence) if len(diffs) > 1 else (None, None)


def reward_table(records: Sequence[dict[str, Any]]) -> tuple[dict[tuple[str, str, str], dict[str, float]], set[str]]:
    """Each (env, split, method)'s reward per task, and the methods that are oracles (they read the reward)."""
    reward: dict[tuple[str, str, str], dict[str, float]] = defaultdict(dict)
    oracle: set[str] = set()
    for r in records:
        reward[(r["env"], r["split"], r["method"])][r["task"]] = float(r["reward"])
        if r.get("oracle"):
            oracle.add(r["method"])
    return reward, oracle


def paired_rows(records: Sequence[dict[str, Any]], baseline: str = "greedy", resamples: int = 10_000,
                seed: int = 0, confidence: float = 0.95) -> list[dict[str, Any]]:
    """Every other method against ``baseline`` on the tasks both played, per (env, split), then pooled
    over the splits (split ``all``) where there are several.

    Oracle methods are left out (they read the reward), and one is refused as the baseline. Empty when
    the baseline was not run."""
    require_count(resamples, "paired_rows", "resamples")
    reward, oracle = reward_table(records)
    if baseline in oracle:
        raise QlassError(f"baseline {baseline!r} is an oracle method (it reads the environment's reward); "
                         "pair the methods with a row that does not")
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
        rows.append(_paired_row(env, split, method, baseline, diffs, resamples, seed, confidence))
    named_all = {env for env, split, _ in reward if split == "all"}  # a real split: the pooled row is renamed
    for (env, method), by_key in sorted(pairs.items()):
        if len({split for split, _ in by_key}) > 1:
            pooled = "all (pooled)" if env in named_all else "all"
            rows.append(_paired_row(env, pooled, method, baseline, [by_key[k] for k in sorted(by_key)], resamples,
                                    seed, confidence))
    return rows


def _paired_row(env: str, split: str, method: str, baseline: str, diffs: Sequence[float], resamples: int,
                seed: int, confidence: float) -> dict[str, Any]:
    low, high = paired_interval(diffs, resamples, seed, confidence)
    return {"env": env, "split": split, "method": method, "baseline": baseline, "tasks": len(diffs),
            "mean_diff": sum(diffs) / len(diffs), "ci_low": low, "ci_high": high, "confidence": confidence,
            "wins": sum(d > TIE for d in diffs), "ties": sum(abs(d) <= TIE for d in diffs),
            "losses": sum(d < -TIE for d in diffs)}


def paired_table(rows: Sequence[dict[str, Any]], confidence: float = 0.95) -> str:
    """The paired rows (of level ``confidence``) as a markdown table (differences in reward points, as in
    the paper's %)."""
    head = (f"| env | split | method | vs | tasks | Δ avg reward | {confidence_label(confidence)} CI (bootstrap) "
            "| wins / ties / losses |\n"
            "|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {md_cell(r['env'])} | {md_cell(r['split'])} | {md_cell(r['method'])} | {md_cell(r['baseline'])} "
        f"| {r['tasks']} "
        f"| {points(r['mean_diff'])} | {interval_cell(r['ci_low'], r['ci_high'])} "
        f"| {r['wins']} / {r['ties']} / {r['losses']} |\n"
        for r in rows
    )
    return head + body
