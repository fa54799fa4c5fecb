"""Value heads learned from decision states (``qlass decisions to-qdata`` and ``qlass decisions cv-head``).

A decision record (:mod:`qlass.decisions`) is a state where the policy's samples disagree, with a
Monte-Carlo value for every distinct candidate — exactly the supervision a ranker needs, at exactly
the states where ranking matters. Trees (stage 2) mostly hold expert-path states; a head fitted on
them ranked tree siblings above the likelihood but not decisions (docs/results.md). Here decision
states become Q data:

- one *sibling group* per decision (its history; one record per candidate, the candidate's full
  output as the action, its Monte-Carlo mean as the target), the decision's task as the "tree", so
  every cross-validation by tree is a cross-validation by task;
- :func:`qlass.decision_qdata.write_decision_qdata` writes them as an ordinary ``qdata.jsonl`` (so ``qlass
  train-qnet-head`` or ``qlass train-qnet`` can fit a QNet on decisions of training tasks, and
  ``qlass decisions report --qnet`` scores it on held-out decisions);
- :func:`cross_validate_on_decisions` measures the idea on one decision set without a second
  collection: nested cross-validation by task — each outer fold's head is fitted on the other tasks'
  decisions (plus any ``extra`` decisions, e.g. from training tasks, which are never scored), its
  ridge strength and fit mode picked by an inner cross-validation on those training tasks only — and
  the pooled held-out values go through the decision benchmark's own report, so the head is compared
  with the likelihood, anchor and random rankers on the same decisions with paired intervals.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import to_dict
from .config_fields import require_config, require_paths
from .decision_files import MAX_CANDIDATES, check_pooled, read_decisions
from .decision_qdata import decision_qrecords, decision_tree_id
from .decision_report import ReportConfig, markdown, score_decisions
from .errors import DataError, QlassError
from .file_checks import check_output_file, refuse_overwriting_inputs
from .jsonl import write_text_atomic
from .locking import warn_if_being_written, writes_to
from .policy.loading import check_causal_lm_folder
from .qnet_data import fold_trees
from .training.configs import QNetHeadConfig

log = logging.getLogger(__name__)

RESULT_FILE = "decision_cv.json"


@writes_to("out_dir", folder=True)
def cross_validate_on_decisions(paths: Sequence[str | Path], sft_dir: str | Path, out_dir: str | Path,
                                cfg: QNetHeadConfig, report: ReportConfig | None = None,
                                extra: Sequence[str | Path] = (), allow_mixed: bool = False) -> dict[str, Any]:
    """Nested cross-validation by task of a head-only QNet on the decisions of ``paths`` (see the
    module docstring): every decision is scored by a head that never saw its task; ``extra``
    decisions only ever train, and may have been collected with other settings; the scored files
    may not unless ``allow_mixed`` (:func:`~qlass.decision_files.check_pooled`; the result lists
    the differences). Writes ``features.jsonl`` (resumable), ``decisions.md`` and
    ``decision_cv.json`` to ``out_dir`` and returns the result."""
    report = report or ReportConfig()
    require_config(cfg, QNetHeadConfig, "cross_validate_on_decisions")  # before hours of features, not after
    require_config(report, ReportConfig, "cross_validate_on_decisions", "report")
    paths = require_paths(paths, "cross_validate_on_decisions", "paths")
    extra = require_paths(extra, "cross_validate_on_decisions", "extra") if extra else []
    mixed = check_pooled(paths, allow_mixed)
    out = Path(out_dir)
    for name in ("features.jsonl", RESULT_FILE, "decisions.md"):  # before hours of features, not after
        refuse_overwriting_inputs(out / name, [*paths, *extra])
        check_output_file(out / name)
    out.mkdir(parents=True, exist_ok=True)
    for path in [*paths, *extra]:
        warn_if_being_written(path)
    scored = read_decisions(paths)
    trained_only = read_decisions(extra) if extra else []
    if trained_only and trained_only[0]["env"] != scored[0]["env"]:
        raise QlassError(f"the scored decisions are from {scored[0]['env']!r} ({paths[0]}), the extra ones from "
                         f"{trained_only[0]['env']!r} ({extra[0]}): use one environment's decisions at a time")
    held = {decision_tree_id(r): (r["split"], r["task"]) for r in scored}
    extra_tasks = {decision_tree_id(r): (r["split"], r["task"]) for r in trained_only}
    clash = sorted(set(held) & set(extra_tasks))
    if clash:
        same = [t for t in clash if held[t] == extra_tasks[t]]
        if same:
            raise QlassError(f"tasks {same[:3]} are both in the scored decisions and in the extra ones: a head would "
                             "be scored on a task it was fitted on")
        t = clash[0]
        raise QlassError(f"task {held[t][1]!r} of split {held[t][0]!r} (scored) and task {extra_tasks[t][1]!r} of "
                         f"split {extra_tasks[t][0]!r} (extra) would both be Q-data tree {t!r} (split/task): rename "
                         "a split")
    records = decision_qrecords(scored)
    extra_records = decision_qrecords(trained_only)
    source = ",".join(str(p) for p in [*paths, *extra])
    folds = fold_trees(records, cfg.folds, cfg.seed, ",".join(map(str, paths)))  # checked before the model loads
    extra_trees = {r.tree_id for r in extra_records}
    for k, held in enumerate(folds, 1):
        fitted_on = len({r.tree_id for r in records if r.tree_id not in held} | extra_trees)
        if fitted_on < 2:
            raise DataError(source, f"fold {k} would fit its head on {fitted_on} task(s), and the head's settings "
                                    "are picked by cross-validation inside the fold (2 tasks at least): add "
                                    "decisions from more tasks (or --extra ones) or lower folds")
    check_causal_lm_folder(sft_dir)
    # the feature code loads torch: only now, once the inputs are checked
    from .qnet_head import cross_validate_head, features_of, fit_records, inputs_digest, record_key

    _, feats = features_of(records + extra_records, sft_dir, out, cfg, source, inputs_digest([*paths, *extra]))
    values: dict[tuple[str, int], float] = {}
    kept = []
    for k, held in enumerate(folds, 1):
        train = [r for r in records if r.tree_id not in held] + extra_records
        inner = QNetHeadConfig(**{**to_dict(cfg), "folds": min(cfg.folds, len({r.tree_id for r in train}))})
        best = cross_validate_head(train, feats, inner, source)[0]
        w = fit_records(train, feats, best["l2"], best["contrast"])
        values.update({(r.tree_id, r.node_id): float(feats[record_key(r)][0] @ w)
                       for r in records if r.tree_id in held})
        kept.append({"fold": k, "tasks": len(held), "fitted_on": len({r.tree_id for r in train}), "l2": best["l2"],
                     "contrast": best["contrast"]})
        log.info("fold %d/%d: %d held-out tasks, kept l2 %g on %s", k, len(folds), len(held), best["l2"],
                 "contrasts" if best["contrast"] else "records")
    q = [[values[(decision_tree_id(d), int(d["step"]) * MAX_CANDIDATES + j + 1)]
          for j in range(len(d["candidates"]))] for d in scored]
    result = {**score_decisions(scored, q, report), "files": [str(p) for p in paths],
              "extra": [str(p) for p in extra], "extra_decisions": len(trained_only), "folds": kept,
              "mixed_settings": mixed, "settings": to_dict(cfg)}
    write_text_atomic(out / RESULT_FILE, json.dumps(result, indent=1) + "\n")
    write_text_atomic(out / "decisions.md", cv_markdown(result))
    return result


def cv_markdown(result: dict[str, Any]) -> str:
    """The decision report of cross-validated head values, with a line on how they were obtained."""
    kept = ", ".join(f"fold {f['fold']}: l2 {f['l2']:g} on {'contrasts' if f['contrast'] else 'records'}"
                     for f in result["folds"])
    note = ("\nThe `qnet` rankers in these tables use a head-only QNet cross-validated by task "
            f"({len(result['folds'])} folds): "
            "each decision is valued by a head fitted on other tasks' decisions"
            + (f" and {result['extra_decisions']} extra decisions" if result["extra_decisions"] else "")
            + f"; the head's settings were picked by an inner cross-validation on its training tasks ({kept}).\n")
    return markdown(result, "Decision benchmark, head-only QNet cross-validated on decisions") + note
