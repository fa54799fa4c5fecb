"""The decision benchmark's report: rankers scored on the same decision states.

Every ranker picks one candidate of each decision (see :mod:`qlass.decisions` for the records);
the candidates' Monte-Carlo values say how good the pick was:

- *accuracy*: the picked candidate's value is the decision's maximum (ties count as correct, so
  the report also counts decisions with a unique best);
- *regret*: the maximum value minus the picked one (reward points, ×100 in the tables).

Rankers (ties go to the earliest candidate, as in qlass search):

- ``qnet``: the QNet's value (:meth:`QNet.score`; a checkpoint trained to rank by advantage
  returns Q − V there);
- ``likelihood``: the policy's mean log-probability per completion token;
- ``qnet+β·likelihood``: QNet value + β × mean log-probability, unstandardised — exactly the
  score an inference-time ``Q + β·likelihood`` selection computes, so a β picked here carries over;
- ``policy-mode``: the highest summed log-probability (the policy's most likely candidate);
- ``anchor``: the greedy candidate (collection puts it first). A decision whose greedy output was cut
  off by the token limit has none: when some decisions lack it, the anchor rankers are scored in a
  group of their own, ``with a greedy anchor``, beside every other ranker on the same decisions;
- ``anchor+margin τ``: the QNet's best candidate when its value exceeds the anchor's by more than
  τ, else the anchor (qlass search's ``margin`` rule, :func:`qlass.candidates.choose`);
- ``random``: the expected accuracy and regret of a uniform pick, computed exactly;
- ``oracle``: the best candidate by its true value (accuracy 1, regret 0; the ceiling).

Each ranker is compared with ``likelihood`` and ``anchor`` on the same decisions: the mean paired
difference with a percentile bootstrap 95% interval (decisions resampled with replacement, seeded,
``resamples`` times — :mod:`qlass.compare`'s procedure, vectorised because a report asks for a few
hundred intervals), overall, per split and by whether the choice was irreversible (a candidate
ended the episode). A ranker appears in a group only when it picks in every decision of the group.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .candidates import argmax, choose
from .compare import TIE, interval_positions
from .config import option
from .config_fields import check_field_types, require_config, require_paths
from .decision_files import check_pooled, greedy_rollouts, read_decisions
from .errors import QlassError
from .file_checks import check_output_file, refuse_overwriting_inputs
from .jsonl import write_text_atomic
from .locking import warn_if_being_written
from .types import Message

log = logging.getLogger(__name__)

REPORT_SCHEMA_VERSION = 1
BASELINES = ("likelihood", "anchor")
_BLOCK = 1000  # bootstrap resamples drawn at once
NO_PICK = -1  # a ranker's pick where it has none (the anchor rankers in a decision without an anchor)
ANCHORED = "with a greedy anchor"
MAX_RESAMPLES = 1_000_000
"""The most bootstrap resamples per interval (every resample's mean is kept: 10**6 take about 2 s)."""


@dataclass(frozen=True)
class ReportConfig:
    """Which rankers the report scores and how its intervals are drawn."""

    betas: list[float] = option([0.1, 0.3, 1.0], "β of the qnet+β·likelihood rankers")
    margins: list[float] = option([0.05, 0.1, 0.2], "τ of the anchor+margin rankers (in QNet value units)")
    resamples: int = option(10_000, "bootstrap resamples per interval")
    seed: int = option(0, "seed of the bootstrap")
    qnet_batch: int = option(16, "decisions per QNet score_batch call")

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("betas", "margins"):
            values = getattr(self, name)
            if len(set(values)) < len(values) or len({f"{v:g}" for v in values}) < len(values):
                raise ValueError(f"{name} must be distinct (as the report prints them, to 6 significant digits), "
                                 f"got {values}")
        if any(tau < 0 for tau in self.margins):
            raise ValueError(f"margins must be >= 0 (as qlass search's margin), got {self.margins}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not 100 <= self.resamples <= MAX_RESAMPLES:
            raise ValueError(f"resamples must be in 100..{MAX_RESAMPLES}, got {self.resamples}")
        if self.qnet_batch < 1:
            raise ValueError(f"qnet_batch must be >= 1, got {self.qnet_batch}")


def qnet_values(records: Sequence[dict[str, Any]], qnet: Any, batch: int = 16) -> list[list[float]]:
    """The QNet's value of every candidate, one ``score_batch`` call per ``batch`` decisions."""
    values: list[list[float]] = []
    for at in range(0, len(records), batch):
        chunk = records[at: at + batch]
        items = [([Message(m["role"], m["content"]) for m in r["history"]], [c["output"] for c in r["candidates"]])
                 for r in chunk]
        values += [[float(v) for v in vals] for vals in qnet.score_batch(items)]
        log.info("QNet: %d of %d decisions scored", min(at + batch, len(records)), len(records))
    return values


def _outcome(values: Sequence[float], pick: int) -> tuple[float, float]:
    best = max(values)
    return float(values[pick] >= best - TIE), best - values[pick]


def _pick_outcome(values: Sequence[float], pick: int) -> tuple[float, float]:
    """:func:`_outcome`, or NaNs where the ranker has no pick."""
    return (math.nan, math.nan) if pick == NO_PICK else _outcome(values, pick)


def _random(values: Sequence[float]) -> tuple[float, float]:
    best = max(values)
    return sum(v >= best - TIE for v in values) / len(values), best - sum(values) / len(values)


def rankers(records: Sequence[dict[str, Any]], q: Sequence[Sequence[float]] | None, cfg: ReportConfig
            ) -> dict[str, Callable[[int], int] | None]:
    """Ranker name → function from a decision's index to the picked candidate (``None``: random;
    :data:`NO_PICK`: the ranker has no pick there). QNet rankers need ``q``; likelihood rankers need
    log-probabilities in every record; anchor rankers pick only in decisions with an anchor."""
    mean_lp = [[c.get("mean_logprob") for c in r["candidates"]] for r in records]  # absent is null
    sum_lp = [[c.get("logprob") for c in r["candidates"]] for r in records]
    has_lp = all(v is not None for vs in mean_lp + sum_lp for v in vs)
    anchored = [bool(r["candidates"][0]["anchor"]) for r in records]  # collection puts the anchor first
    true = [[c["mean"] for c in r["candidates"]] for r in records]
    out: dict[str, Callable[[int], int] | None] = {"oracle": lambda i: argmax(true[i])}
    if q is not None:
        out["qnet"] = lambda i: argmax(q[i])
        if has_lp:
            for beta in cfg.betas:
                out[f"qnet+{beta:g}·likelihood"] = lambda i, b=beta: argmax(
                    [v + b * lp for v, lp in zip(q[i], mean_lp[i], strict=True)])
    if has_lp:
        out["likelihood"] = lambda i: argmax(mean_lp[i])
        out["policy-mode"] = lambda i: argmax(sum_lp[i])
    if any(anchored):
        out["anchor"] = lambda i: 0 if anchored[i] else NO_PICK
        if q is not None:
            for tau in cfg.margins:  # as qlass search's margin rule
                out[f"anchor+margin {tau:g}"] = lambda i, t=tau: choose(q[i], t) if anchored[i] else NO_PICK
    out["random"] = None
    return out


def _intervals(diffs: np.ndarray, resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap 95% intervals of the mean of each row of ``diffs`` ``[V, n]``, all rows
    resampled with the same draws (the comparisons are paired on the same decisions)."""
    rng = np.random.default_rng(seed)
    n = diffs.shape[1]
    means = []
    for at in range(0, resamples, _BLOCK):
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=min(_BLOCK, resamples - at))
        means.append(diffs @ counts.T / n)
    ordered = np.sort(np.concatenate(means, axis=1), axis=1)
    low, high = interval_positions(resamples, 0.95)
    return ordered[:, low], ordered[:, high]


def _group_rows(scores: dict[str, np.ndarray], members: np.ndarray, cfg: ReportConfig) -> list[dict[str, Any]]:
    """Per ranker that picks in every decision of ``members``: accuracy, regret and the paired
    comparisons with each baseline among them."""
    names = [name for name, s in scores.items() if not np.isnan(s[members]).any()]
    rows = [{"ranker": name, "accuracy": float(scores[name][members, 0].mean()),
             "regret": float(scores[name][members, 1].mean()), "vs": {}} for name in names]
    pairs = [(r, b, m) for r in range(len(names)) for b in BASELINES if b in names and names[r] != b for m in (0, 1)]
    if not pairs or len(members) < 2:
        return rows
    diffs = np.stack([scores[names[r]][members, m] - scores[b][members, m] for r, b, m in pairs])
    low, high = _intervals(diffs, cfg.resamples, cfg.seed)
    for (r, b, m), d, lo, hi in zip(pairs, diffs, low, high, strict=True):
        metric = ("accuracy", "regret")[m]
        rows[r]["vs"].setdefault(b, {})[metric] = {"mean_diff": float(d.mean()), "ci_low": float(lo),
                                                   "ci_high": float(hi)}
    return rows


def split_half(records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """How far the Monte-Carlo values can separate rankers: each candidate's rollouts split in two
    halves (first and second), a ranker that picks by the first half's means scored against the
    second half's (an episode-ending candidate's outcome is exact, the same in both halves), beside
    a uniform pick scored the same way. ``None`` when no decision has a non-terminal candidate with
    two rollouts or more."""
    picks, chance = [], []
    for rec in records:
        cands = rec["candidates"]
        if all(c["terminal"] for c in cands) or any(
                not c["terminal"] and len(c.get("rollout_rewards") or []) < 2 for c in cands):
            continue
        halves = []
        for c in cands:
            if c["terminal"]:
                halves.append((float(c["mean"]),) * 2)
                continue
            rolls = c["rollout_rewards"]
            k = len(rolls) // 2
            halves.append((float(np.mean(rolls[:k])), float(np.mean(rolls[k:]))))
        first, second = [h[0] for h in halves], [h[1] for h in halves]
        picks.append(_outcome(second, argmax(first))[0])
        chance.append(_random(second)[0])
    if not picks:
        return None
    return {"decisions": len(picks), "first_half_accuracy": float(np.mean(picks)),
            "random_accuracy": float(np.mean(chance))}


def score_decisions(records: Sequence[dict[str, Any]], q: Sequence[Sequence[float]] | None = None,
                    cfg: ReportConfig | None = None) -> dict[str, Any]:
    """Every ranker's accuracy and regret on ``records`` (with QNet values ``q`` when given), overall,
    per split and by reversibility, with paired bootstrap intervals against the baselines."""
    cfg = ReportConfig() if cfg is None else cfg
    require_config(cfg, ReportConfig, "score_decisions")
    if not records:
        raise QlassError("no decisions to score")
    values = [[float(c["mean"]) for c in r["candidates"]] for r in records]
    scores = {}
    for name, pick in rankers(records, q, cfg).items():
        scores[name] = np.array([_random(v) if pick is None else _pick_outcome(v, pick(i))
                                 for i, v in enumerate(values)])
    anchored = np.array([bool(r["candidates"][0]["anchor"]) for r in records])
    irreversible = np.array([any(c["terminal"] for c in r["candidates"]) for r in records])
    splits = np.array([r["split"] for r in records])
    groups = [("all", np.ones(len(records), bool))]
    groups += [(f"split {s}", splits == s) for s in dict.fromkeys(splits.tolist())]
    groups += [("irreversible", irreversible), ("reversible", ~irreversible)]
    if anchored.any() and not anchored.all():
        groups.append((ANCHORED, anchored))
    out = []
    for label, mask in groups:
        members = np.flatnonzero(mask)
        if len(members) == 0:
            continue
        unique = sum(sum(v >= max(values[i]) - TIE for v in values[i]) == 1 for i in members)
        out.append({"group": label, "decisions": len(members), "unique_best": int(unique),
                    "tasks": len({(records[i]["split"], records[i]["task"]) for i in members}),
                    "rows": _group_rows(scores, members, cfg)})
    return {"schema_version": REPORT_SCHEMA_VERSION, "config": asdict(cfg), "qnet": q is not None, "groups": out,
            "split_half": split_half(records)}


def _cell(row: dict[str, Any], base: str, metric: str, scale: float) -> str:
    d = row["vs"].get(base, {}).get(metric)
    if d is None:
        return "—"
    lo, mid, hi = (scale * d[k] + 0.0 for k in ("ci_low", "mean_diff", "ci_high"))  # + 0.0: no "-0.0"
    return f"{mid:+.1f} [{lo:+.1f}, {hi:+.1f}]"


def markdown(result: dict[str, Any], title: str = "Decision benchmark") -> str:
    """The report as markdown: one table per group of decisions."""
    lines = [f"# {title}", "",
             ("Accuracy: the ranker picked a candidate whose Monte-Carlo value is the maximum (ties count). Regret: "
             "maximum minus picked value, in reward points. Δ columns: the ranker minus the baseline on the same "
             f"decisions, with a paired bootstrap 95% interval ({result['config']['resamples']:,} resamples).")]
    if not result["qnet"]:
        lines.append("No QNet was given: the QNet rankers are omitted.")
    if result.get("mixed_settings"):
        lines += ["", "**These decisions pool files collected with other settings** (--allow-mixed-settings): "
                  + "; ".join(result["mixed_settings"]) + "."]
    half = result.get("split_half")
    if result.get("greedy_rollouts"):
        lines += ["", ("The rollouts are greedy (rollout_temperature 0): a candidate's rollouts are one rollout "
                       "copied, so the values are exact for that continuation and there is no measurement check by "
                       "split halves.")]
    elif half:
        lines += ["", (f"Measurement check: splitting each candidate's rollouts in two halves, a ranker that picks by "
                       f"the first half scores {100 * half['first_half_accuracy']:.1f}% against the second half "
                       f"(random: {100 * half['random_accuracy']:.1f}%; {half['decisions']} decisions). The values "
                       "separate a ranker that knows the candidates' worth from chance this far; accuracy below that "
                       "is the ranker's, not the measurement's.")]
    anchored = next((g for g in result["groups"] if g["group"] == ANCHORED), None)
    if anchored:
        missing = result["groups"][0]["decisions"] - anchored["decisions"]
        lines += ["", (f"{missing} decision(s) have no greedy anchor among their candidates (its output was cut off by "
                       f"the token limit), so the anchor rankers are left out of the tables that hold one of them, and "
                       f"scored beside every other ranker in the last table, \"{ANCHORED}\", on the same decisions.")]
    for g in result["groups"]:
        bases = [b for b in BASELINES if any(r["ranker"] == b for r in g["rows"])]
        lines += ["", (f"## {g['group']}: {g['decisions']} decisions from {g['tasks']} tasks, "
                      f"{g['unique_best']} with a unique best"), ""]
        head = ["ranker", "accuracy %", "regret (points)"] + [f"Δ {m} vs {b}" for b in bases
                                                               for m in ("accuracy %", "regret")]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in g["rows"]:
            cells = [row["ranker"], f"{100 * row['accuracy']:.1f}", f"{100 * row['regret']:.1f}"]
            cells += [_cell(row, b, m, 100) for b in bases for m in ("accuracy", "regret")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_decision_report(paths: Sequence[str | Path], out_dir: str | Path, qnet: Any = None,
                          cfg: ReportConfig | None = None, load_qnet: Callable[[], Any] | None = None,
                          allow_mixed: bool = False) -> dict[str, Any]:
    """Read decision files, score the rankers (the QNet's when ``qnet``, a loaded :class:`~qlass.qnet.QNet`, is
    given, or the one
    ``load_qnet`` returns: called once the files are read and checked, so that a bad file is reported
    before a model loads) and write ``decisions.md`` and ``decisions.json`` into ``out_dir``. Files
    collected with other settings are refused unless ``allow_mixed`` (:func:`~qlass.decision_files.check_pooled`);
    then the report lists the differences."""
    cfg = ReportConfig() if cfg is None else cfg
    require_config(cfg, ReportConfig, "write_decision_report")
    paths = require_paths(paths, "write_decision_report", "paths")
    if qnet is not None and not callable(getattr(qnet, "score_batch", None)):
        raise TypeError(f"write_decision_report: argument 'qnet' must be a loaded QNet (qlass.qnet.QNet.load(DIR)), "
                        f"got {qnet!r:.80}")
    mixed = check_pooled(paths, allow_mixed)
    for path in paths:  # a report on a collection under way is fine, and says so
        warn_if_being_written(path)
    records = read_decisions(paths)  # one environment's
    out = Path(out_dir)
    if out.exists() and not out.is_dir():  # before a QNet scores every decision, not after
        raise QlassError(f"{out}: is a file; the report's output is a folder (for decisions.md and decisions.json)")
    for name in ("decisions.json", "decisions.md"):
        refuse_overwriting_inputs(out / name, paths)
        check_output_file(out / name)
    if load_qnet is not None:
        qnet = load_qnet()
    q = qnet_values(records, qnet, cfg.qnet_batch) if qnet is not None else None
    result = {**score_decisions(records, q, cfg), "files": [str(p) for p in paths], "mixed_settings": mixed}
    if greedy_rollouts(paths):  # K copies of one greedy rollout: the halves agree by construction
        result["split_half"] = None
        result["greedy_rollouts"] = True
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "decisions.json", json.dumps(result, indent=1) + "\n")
    write_text_atomic(out / "decisions.md", markdown(result))
    return result
