"""Stage 3: train the QNet on Q data (transformers' ``Trainer``, :mod:`.qnet_trainer`), validated by
sibling ranking. This module checks a run's options, folder and Q data without importing torch or
transformers; :mod:`.qnet_fit` trains.

Q data (``qdata.jsonl``, written by exploration) holds one record per (history, action)::

    {"schema_version": 1, "tree_id": str, "task": str, "node_id": int, "parent_id": int,
     "group": str, "depth": int, "messages": [{"role", "content"}, ...], "action": str, "q": float}

Training packs the records of each tree into token rows, one per path (:mod:`qlass.qnet_pack`): a
record's input (the policy's prompt, then the action, exactly what inference scores) is a prefix of
its descendants' inputs, so one causal forward over a path gives every value on it, with gradients.
An optimizer step covers at least ``batch_size`` records from at least ``min_trees_per_step`` trees
(whole rows; with a pairwise loss, all rows through a sibling group with contrast together); the loss
(:mod:`qlass.qnet_loss`: a regression chosen by ``rank`` plus ``pair_weight`` × a Bradley–Terry term
over sibling pairs) is averaged per record, whatever the rows' lengths. The same steps run on one
device and under ``accelerate launch`` (dealt to the processes, :mod:`.qnet_trainer`).

Validation holds out whole trees (seeded; no tree in both splits; or given trees, for
:mod:`qlass.qnet_cv`). At each epoch end (and at step 0 with ``eval_before``) the Trainer's
evaluation loop reports MSE of Q, pairwise ranking accuracy (by the inference score) among siblings
with different targets (prediction ties count half) and Spearman's rank correlation of Q
(``val_mse``, ``val_pair_accuracy``, ``val_pairs``, ``val_spearman`` in ``metrics.jsonl`` and to
``report_to``). ``select_best`` keeps the epoch with the best pair accuracy. At the end the kept
weights are saved (LoRA merged) and, on the saved model, every held-out record is scored beside the
SFT policy's own log-likelihood of its action given the same history, as a ranker on the same split:
per token (the ranker reported) and summed (length-biased: a longer thought loses), the baseline the
QNet must beat; ``val_predictions.jsonl`` keeps every held-out record's scores.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any

from ..config import build, config_differences, load_yaml
from ..config_fields import require_config
from ..errors import QlassError, naming_failed_saves
from ..file_checks import refuse_classifier
from ..qnet_data import QRecord, fmt, make_groups, read_qdata, split_by_tree
from ..recorded import model_files, setting_changes
from .caller_state import keeping_caller_state
from .common import (
    DONE_MARK,
    Snapshot,
    effective_precision,
    input_snapshot,
    is_main_process,
    last_checkpoint,
    main_process_lock,
)
from .configs import QNetTrainConfig, check_report_to
from .run_folders import drop_leftovers, refuse_overwriting_run

log = logging.getLogger(__name__)
RESULT_FILE = "qnet_result.json"
CONFIG_FILE = "qnet_config.yaml"
PREDICTIONS_FILE = "val_predictions.jsonl"
BEST_DIR = "best_epoch"
TRAINED_DIR = ".trained"
"""The last epoch's weights between the end of training and the final save (hidden: not the QNet)."""
LEGACY_TRAINED_DIR = "trained"
"""Its name before it was hidden; a run an older qlass left there is cleaned up the same way."""
SNAPSHOT_DIRS = (BEST_DIR, BEST_DIR + ".tmp", TRAINED_DIR, LEGACY_TRAINED_DIR)
"""Weights kept only while a run trains (a cut best-epoch snapshot leaves the ``.tmp`` one)."""
LEGACY = {"min_trees_per_step": 1}
"""How QNets finished before an option existed were trained, where that differs from its default."""


# -- the run -----------------------------------------------------------------------------------------

def _check_run(out: Path, cfg: QNetTrainConfig, source: Snapshot, held_out: list[str] | None,
               sft_dir: str | Path, finished: bool) -> None:
    """Refuse to hand back a finished QNet, or to resume one in training, made with other settings,
    other Q data, another SFT model or other held-out trees than asked for, and one in training where
    it would compute in another precision (:func:`.common.effective_precision`). (Folders made before the
    Q data's digest or the SFT model was recorded are checked on what they record; options they
    predate count as :data:`LEGACY`.)"""
    path = out / CONFIG_FILE
    held = "a finished QNet" if finished else "a QNet in training"
    saved = load_yaml(path) if path.exists() else {}
    if "qdata" not in saved:  # every qlass that trained QNets recorded it: the file is gone or emptied
        what = f"{path} does not record its Q data or settings" if path.exists() else f"{path} is missing"
        raise QlassError(f"{out}: holds {held} but {what}, so what it was trained with is unknown; "
                         "use a new output folder (or restore the file)")
    digest = saved.pop("qdata_sha256", None)
    trees = saved.pop("held_out_trees", None)
    saved.pop("qdata", None)
    sft_recorded = {k: saved.pop(k) for k in ("sft_model", "sft_model_files") if k in saved}
    precision = saved.pop("precision", None)
    try:
        before = build(QNetTrainConfig, {**LEGACY, **saved}, str(path))
    except QlassError:
        raise QlassError(f"{out}: holds {held} whose settings ({path}) this qlass cannot read; "
                         "use a new output folder") from None
    changed = config_differences(before, cfg)
    if trees != held_out:
        changed.append("held-out trees")
    if "sft_model" in sft_recorded:  # another spelling of the folder, or its files moved, is the same model
        changed += setting_changes(sft_recorded, sft_inputs(sft_dir))
    now = effective_precision(cfg)
    if not finished and precision is not None and precision != now:
        changed.append(f"precision: {precision!r} → {now!r} (where this machine runs it)")
    if changed:
        raise QlassError(f"{out}: holds {held} trained with other settings ({', '.join(changed)}); "
                         "use a new output folder")
    if digest is not None and source.digest is not None and digest != source.digest:
        raise QlassError(f"{out}: holds {held} trained on other Q data than {source.name}; use a new output folder")


def sft_inputs(sft_dir: str | Path) -> dict[str, Any]:
    """The SFT model a QNet starts from, as ``qnet_config.yaml`` records it: its path and
    :func:`~qlass.recorded.model_files` (another model saved at the same path is refused)."""
    return {"sft_model": str(sft_dir), "sft_model_files": model_files(sft_dir)}


def _split(records: list[QRecord], cfg: QNetTrainConfig, held_out: list[str] | None,
           source: str) -> tuple[list[QRecord], list[QRecord]]:
    if held_out is None:
        return split_by_tree(records, cfg.val_fraction, cfg.seed)
    missing = sorted(set(held_out) - {r.tree_id for r in records})
    if missing:
        raise QlassError(f"{source}: held-out tree(s) {', '.join(missing[:3])} not in the Q data")
    held = set(held_out)
    return [r for r in records if r.tree_id not in held], [r for r in records if r.tree_id in held]


def train_qnet(qdata: str | Path | Snapshot, sft_dir: str | Path, out_dir: str | Path, cfg: QNetTrainConfig,
               held_out: Collection[str] | None = None) -> dict[str, Any]:
    """Train a QNet from the SFT model at ``sft_dir`` on ``qdata`` (a path, or the :class:`.common.Snapshot`
    of an input already read, such as a pipe's copy); returns the kept epoch's validation result.
    ``held_out`` names the validation trees (default: a seeded ``val_fraction`` of them).

    ``out_dir`` receives the QNet (an ``AutoModelForSequenceClassification`` folder, safetensors),
    ``metrics.jsonl`` (per step ``train_loss``, ``train_mse``, ``pair_loss``, ``records``...; per
    validation ``val_mse``, ``val_pair_accuracy``, ``val_spearman``...), ``qnet_config.yaml``,
    ``qnet_result.json`` and ``val_predictions.jsonl``. An interrupted run resumes from its last
    ``checkpoint-N`` (every ``save_every`` steps and at each epoch end) to the weights of an
    uninterrupted one; a finished one returns its saved result. Runs as it is and under
    ``accelerate launch`` (the same optimizer steps, dealt to the processes).
    """
    require_config(cfg, QNetTrainConfig, "train_qnet")
    out = Path(out_dir)
    refuse_overwriting_run(out, sft_dir, "qnet")
    refuse_classifier(Path(sft_dir))  # a QNet loads as a classifier too, and failed only after training
    check_report_to(cfg.report_to)
    read = contextlib.nullcontext(qdata) if isinstance(qdata, Snapshot) else input_snapshot(qdata)
    with main_process_lock(out), naming_failed_saves(out), read as source:
        return _train_qnet(source, sft_dir, out, cfg, sorted(held_out) if held_out is not None else None)


def _train_qnet(source: Snapshot, sft_dir: str | Path, out: Path, cfg: QNetTrainConfig,
                held: list[str] | None) -> dict[str, Any]:
    """The run's checks, which import neither torch nor transformers (a mistake is reported at once), then the
    training, which leaves the caller's generators and threads as they were."""
    qdata = source.name
    if (out / DONE_MARK).exists():
        _check_run(out, cfg, source, held, sft_dir, finished=True)
        if is_main_process():  # what a kill after the mark left
            drop_leftovers(out, SNAPSHOT_DIRS)
        log.info("%s is complete; nothing to do", out)
        return json.loads((out / RESULT_FILE).read_text())
    if last_checkpoint(out) is not None:
        _check_run(out, cfg, source, held, sft_dir, finished=False)
    records = read_qdata(source.path)  # it checks that siblings share their history (else the ranking keys lie)
    train_records, val_records = _split(records, cfg, held, str(qdata))
    if cfg.select_best and not val_records:
        raise QlassError("select_best needs validation trees (val_fraction > 0)")
    if not train_records:
        raise QlassError(f"{qdata}: no training records left (every tree is held out)")
    if all(len(g.records) < 2 for g in make_groups(train_records, str(qdata))):
        log.warning("%s: no training record has a sibling (another action from the same state): the QNet learns "
                    "values along single paths, and no choice between actions (explore with more candidates or a "
                    "larger max_new_tokens)", qdata)
    from .qnet_fit import fit  # torch and transformers: once the options and the Q data are checked

    with keeping_caller_state():
        return fit(source, sft_dir, out, cfg, held, train_records, val_records)


def summary_lines(result: dict[str, Any]) -> list[str]:
    """Human-readable lines comparing the QNet with the SFT log-likelihood ranker."""
    lines = []
    q = result.get("qnet") or {}
    if q:
        lines.append(f"QNet (epoch {q.get('epoch')}, {result.get('kept_by', 'last epoch')}): sibling pair accuracy "
                     f"{fmt(q.get('pair_accuracy'))} over {q.get('pairs')} pairs, spearman {fmt(q.get('spearman'))}, "
                     f"mse {fmt(q.get('mse'))}")
    b = result.get("sft_loglik")
    if b:
        s = b.get("sum") or {}
        lines.append(f"SFT log-likelihood ranker (per token): sibling pair accuracy {fmt(b.get('pair_accuracy'))} "
                     f"over {b.get('pairs')} pairs, spearman {fmt(b.get('spearman'))}; summed: "
                     f"{fmt(s.get('pair_accuracy'))}")
    return lines
