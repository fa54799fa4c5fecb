"""k-fold cross-validation of the QNet by tree: K models on K tree-disjoint splits, their held-out
predictions pooled.

Each fold is an ordinary :func:`qlass.training.qnet.train_qnet` run in ``OUT/fold-k`` with that fold's
trees held out (resumable, refused for other settings like any QNet folder); its
``val_predictions.jsonl`` holds every held-out record's QNet score and the SFT policy's
log-likelihoods. Pooled over the folds every tree is held out exactly once, so a small Q data set
still yields all of its sibling pairs for validation. Each fold reports its last epoch: ``select_best``
is refused, since it would keep the epoch that scores best on the very trees the fold reports.

Intervals: the pairs of one tree share a policy, a task and often a record, so they are not
independent; 95% intervals come from a bootstrap over held-out trees (the trees holding pairs are
resampled with replacement, accuracy = credited pairs / pairs of the resample), and so does the
interval of the paired difference QNet − per-token log-likelihood on the same pairs.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .config import to_dict
from .config_fields import require_config, require_count
from .errors import QlassError
from .jsonl import read_jsonl, write_text_atomic
from .qnet_data import fold_trees, pair_credits, read_qdata, spearman
from .training.common import Snapshot, input_snapshot
from .training.qnet import PREDICTIONS_FILE, QNetTrainConfig, train_qnet

log = logging.getLogger(__name__)

SUMMARY = "cv_summary"
RANKERS = {"qnet": "qnet_score", "sft_loglik": "loglik_mean", "sft_loglik_sum": "loglik_sum"}
"""ranker name → the prediction field it ranks by"""


def cross_validate_qnet(qdata: str | Path, sft_dir: str | Path, out_dir: str | Path, cfg: QNetTrainConfig,
                        folds: int, resamples: int = 2000) -> dict[str, Any]:
    """Train ``folds`` QNets on tree-disjoint splits of ``qdata`` and pool their held-out predictions;
    writes ``cv_summary.json`` and ``cv_summary.md`` to ``out_dir`` and returns the summary."""
    require_config(cfg, QNetTrainConfig, "cross_validate_qnet")
    require_count(folds, "cross_validate_qnet", "folds")  # before every fold trains, not after (fold_trees: >= 2)
    require_count(resamples, "cross_validate_qnet", "resamples")
    if cfg.select_best:
        raise QlassError("select_best would keep each fold's epoch by its accuracy on the held-out trees that "
                         "the fold then reports, so the pooled accuracy would be optimistic; cross-validate with "
                         "select_best false (--set select_best=false): each fold then reports its last epoch")
    with input_snapshot(qdata) as source:  # a pipe is read once, and every fold trains on its copy
        return _cross_validate(source, sft_dir, Path(out_dir), cfg, folds, resamples)


def _cross_validate(source: Snapshot, sft_dir: str | Path, out: Path, cfg: QNetTrainConfig, folds: int,
                    resamples: int) -> dict[str, Any]:
    records = read_qdata(source.path)
    splits = fold_trees(records, folds, cfg.seed, source.name)
    rows: list[dict[str, Any]] = []
    per_fold = []
    for k, held in enumerate(splits, 1):
        log.info("fold %d/%d: %d held-out trees", k, folds, len(held))
        result = train_qnet(source, sft_dir, out / f"fold-{k}", cfg, held_out=held)
        fold_rows = read_jsonl(out / f"fold-{k}" / PREDICTIONS_FILE)
        rows += fold_rows
        per_fold.append({"fold": k, "trees": len(held), "records": len(fold_rows),
                         "pairs": (result.get("qnet") or {}).get("pairs"),
                         "qnet_pair_accuracy": (result.get("qnet") or {}).get("pair_accuracy"),
                         "kept_epoch": result.get("kept_epoch")})
    summary = pooled_summary(rows, cfg.seed, resamples)
    summary.update({"folds": per_fold, "settings": to_dict(cfg), "qdata": source.name})
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / f"{SUMMARY}.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomic(out / f"{SUMMARY}.md", "\n".join(summary_markdown(summary)) + "\n")
    return summary


def pooled_summary(rows: Sequence[dict[str, Any]], seed: int, resamples: int = 2000) -> dict[str, Any]:
    """Pair accuracy (95% tree-bootstrap interval), pairs and Spearman of every ranker present in
    ``rows`` (prediction records of held-out trees), the QNet's MSE, and the paired difference QNet −
    per-token log-likelihood."""
    keys = [(r["tree_id"], r["group"]) for r in rows]
    targets = [float(r["q"]) for r in rows]
    rankers: dict[str, Any] = {}
    per_tree: dict[str, dict[str, list[float]]] = {}
    for name, field in RANKERS.items():
        if not rows or field not in rows[0]:
            continue
        preds = [float(r[field]) for r in rows]
        credits = pair_credits(keys, targets, preds)
        per_tree[name] = _tree_credits(credits)
        correct = sum(c for _, c in credits)
        rankers[name] = {"pair_accuracy": correct / len(credits) if credits else None, "pairs": len(credits),
                         "ci95": _bootstrap(per_tree[name], None, seed, resamples),
                         "spearman": spearman(targets, [float(r["qnet_q"]) for r in rows] if name == "qnet" else preds)}
    if "qnet" in rankers:
        rankers["qnet"]["mse"] = float(np.mean([(float(r["qnet_q"]) - t) ** 2 for r, t in zip(rows, targets)]))
    summary: dict[str, Any] = {"records": len(rows), "trees": len({r["tree_id"] for r in rows}), "rankers": rankers}
    if "qnet" in per_tree and "sft_loglik" in per_tree and rankers["qnet"]["pairs"]:
        diff = rankers["qnet"]["pair_accuracy"] - rankers["sft_loglik"]["pair_accuracy"]
        summary["qnet_minus_sft_loglik"] = {"difference": diff,
                                            "ci95": _bootstrap(per_tree["qnet"], per_tree["sft_loglik"], seed,
                                                               resamples)}
    return summary


def _tree_credits(credits: Sequence[tuple[Hashable, float]]) -> dict[str, list[float]]:
    by_tree: dict[str, list[float]] = defaultdict(list)
    for key, c in credits:
        by_tree[key[0]].append(c)  # type: ignore[index]
    return dict(by_tree)


def _bootstrap(a: dict[str, list[float]], b: dict[str, list[float]] | None, seed: int,
               resamples: int) -> list[float] | None:
    """Percentile 95% interval of the pair accuracy of ``a`` (or of ``a`` − ``b`` on the same pairs),
    resampling trees."""
    trees = sorted(a)
    if not trees:
        return None
    pairs = np.array([len(a[t]) for t in trees], float)
    wins = np.array([sum(a[t]) - (sum(b[t]) if b is not None else 0.0) for t in trees])
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(trees), size=(resamples, len(trees)))
    stats = wins[draws].sum(1) / pairs[draws].sum(1)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return [float(lo), float(hi)]


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def summary_markdown(summary: dict[str, Any]) -> list[str]:
    """The summary as Markdown lines (also what ``qlass train-qnet --folds`` prints)."""
    lines = [(f"{len(summary['folds'])}-fold cross-validation by tree: {summary['trees']} held-out trees, "
              f"{summary['records']} records"), "",
             "| ranker | sibling pair accuracy | 95% interval (tree bootstrap) | pairs | Spearman | MSE |",
             "|---|---|---|---|---|---|"]
    for name, m in summary["rankers"].items():
        ci = m["ci95"]
        lines.append(f"| {name} | {_fmt(m['pair_accuracy'])} | {'n/a' if ci is None else f'{ci[0]:.3f} – {ci[1]:.3f}'} "
                     f"| {m['pairs']} | {_fmt(m['spearman'])} | {_fmt(m.get('mse'))} |")
    d = summary.get("qnet_minus_sft_loglik")
    if d:
        ci = d["ci95"]
        lines += ["", (f"QNet − SFT log-likelihood (per token), same pairs: {d['difference']:+.3f} "
                       f"(95% interval {ci[0]:+.3f} – {ci[1]:+.3f})")]
    lines += ["", "| fold | trees | records | pairs | QNet pair accuracy | kept epoch |", "|---|---|---|---|---|---|"]
    for f in summary["folds"]:
        lines.append(f"| {f['fold']} | {f['trees']} | {f['records']} | {f['pairs']} | "
                     f"{_fmt(f['qnet_pair_accuracy'])} | {f['kept_epoch']} |")
    return lines
