"""Stage 3: train the QNet on Q data (transformers' ``Trainer``, :mod:`.qnet_trainer`), validated by
sibling ranking.

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
import shutil
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

from ..config import build, config_differences, load_yaml, save_yaml, to_dict
from ..config_fields import require_config
from ..errors import QlassError, naming_failed_saves
from ..file_checks import refuse_classifier
from ..jsonl import append_jsonl, write_jsonl
from ..models import resolve_device
from ..policy.loading import loading_weights
from ..qnet import QNet
from ..qnet_data import QRecord, make_groups, read_qdata, split_by_tree
from ..qnet_loss import state_targets
from ..qnet_pack import PackedRow, pack_records
from ..qnet_validate import loglik_ranker_metrics, loglik_scores, qnet_outputs
from ..recorded import model_files, setting_changes
from .caller_state import keeping_caller_state
from .common import (
    DONE_MARK,
    METRICS,
    MetricsLog,
    Snapshot,
    effective_precision,
    input_snapshot,
    is_main_process,
    last_checkpoint,
    main_process_lock,
    prepare_resume,
    training_arguments,
    world_size,
)
from .configs import QNetTrainConfig, check_report_to
from .qnet_trainer import (
    BEST_MARK,
    EpochEnds,
    QNetTrainer,
    StepShares,
    epoch_records,
    fmt,
    schedule,
    selection_key,
    single,
    validation_items,
)
from .quiet import quiet, without_misleading_warnings
from .run_folders import drop_leftovers, mark_done, refuse_overwriting_run

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


def pack(qnet: QNet, records: Sequence[QRecord]) -> list[PackedRow]:
    """``records`` packed into token rows with the QNet's (= the policy's) input encoding."""
    return pack_records(qnet.encode_history, qnet.encode_action, records)


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
        changed += setting_changes(sft_recorded, _sft_inputs(sft_dir))
    now = effective_precision(cfg)
    if not finished and precision is not None and precision != now:
        changed.append(f"precision: {precision!r} → {now!r} (where this machine runs it)")
    if changed:
        raise QlassError(f"{out}: holds {held} trained with other settings ({', '.join(changed)}); "
                         "use a new output folder")
    if digest is not None and source.digest is not None and digest != source.digest:
        raise QlassError(f"{out}: holds {held} trained on other Q data than {source.name}; use a new output folder")


def _sft_inputs(sft_dir: str | Path) -> dict[str, Any]:
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


def _lora(model: Any, cfg: QNetTrainConfig) -> Any:
    """LoRA adapters on the backbone's linear layers, initialised from ``cfg.seed`` (a resumed run's first
    process makes the same ones); PEFT trains the value head in full beside them (``modules_to_save``, so
    checkpoints and the adapter keep it)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)  # train_qnet gives the caller its generator back (keeping_caller_state)
    return get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                            target_modules="all-linear", task_type="SEQ_CLS"))


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
    with keeping_caller_state(), main_process_lock(out), naming_failed_saves(out), read as source:
        return _train_qnet(source, sft_dir, out, cfg, sorted(held_out) if held_out is not None else None)


def _train_qnet(source: Snapshot, sft_dir: str | Path, out: Path, cfg: QNetTrainConfig,
                held: list[str] | None) -> dict[str, Any]:
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
    # one micro-batch per process per optimizer step (see .qnet_trainer); also sets the threads, checks the device
    arguments = training_arguments(cfg, out, epochs=1, lr=cfg.lr, micro_batch=1, batch_size=1, seed=cfg.seed,
                                   evaluate=False, gradient_checkpointing=cfg.gradient_checkpointing)
    qnet = QNet.from_sft(sft_dir, cfg.max_length, cfg.max_action_tokens, cfg.autocast, cfg.seed, rank=cfg.rank)
    train, val = pack(qnet, train_records), pack(qnet, val_records)
    shares, ends = schedule(train, cfg, world_size())
    out.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        save_yaml(out / CONFIG_FILE, {**to_dict(cfg), "qdata": qdata, "qdata_sha256": source.digest,
                                      **_sft_inputs(sft_dir), "precision": effective_precision(cfg),
                                      **({"held_out_trees": held} if held is not None else {})})
    resume = prepare_resume(out)
    if resume is None and is_main_process():  # snapshots of a run that died before its first checkpoint
        for leftover in SNAPSHOT_DIRS:
            shutil.rmtree(out / leftover, ignore_errors=True)
    log.info("QNet (rank %s, pair weight %g): %d train records (%d trees) packed in %d rows (%d tokens in all), %d "
             "validation records (%d trees) in %d rows; %d optimizer steps", cfg.rank, cfg.pair_weight,
             len(train_records), len({r.tree_id for r in train_records}), len(train),
             sum(len(row.ids) for row in train), len(val_records), len({r.tree_id for r in val_records}), len(val),
             ends[-1])
    args = TrainingArguments(**{**arguments, "max_steps": ends[-1]}, train_sampling_strategy="sequential",
                             eval_on_start=bool(val) and cfg.eval_before and resume is None,
                             remove_unused_columns=False, ddp_broadcast_buffers=False, ddp_find_unused_parameters=False)
    trainer = quiet(QNetTrainer(
        model=_lora(qnet.model, cfg) if cfg.lora else qnet.model, args=args,
        train_dataset=StepShares(train, shares, state_targets(train_records)),
        eval_dataset=validation_items(val) if val else None, data_collator=single,
        callbacks=[MetricsLog(out), EpochEnds(ends, bool(val))], rank=cfg.rank, pair_weight=cfg.pair_weight,
        head_lr=cfg.head_lr or cfg.lr, epoch_ends=ends, val_rows=val,
        best_dir=out / BEST_DIR if cfg.select_best else None))
    with without_misleading_warnings(trainer):
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    epochs = epoch_records(trainer.state.log_history, ends)
    kept, kept_by = _kept_epoch(out, epochs, cfg.select_best)
    weights = out / (BEST_DIR if cfg.select_best else TRAINED_DIR)
    if not cfg.select_best:
        trainer.save_model(str(weights))
    accelerator, tokenizer = trainer.accelerator, qnet.tokenizer
    del trainer, qnet  # the training model and optimizer state, before the final model and the SFT ranker load
    accelerator.free_memory()
    if is_main_process():
        result: dict[str, Any] = {"train_records": len(train_records), "val_records": len(val_records),
                                  "qnet": kept, "kept_epoch": kept.get("epoch"), "kept_by": kept_by}
        final = _final_qnet(weights, tokenizer, sft_dir, cfg)
        if val:
            result["sft_loglik"] = _write_predictions(out, final, val, sft_dir, cfg)
        final.model.to("cpu")
        final.save(out, extra={"trained_on": str(qdata), "sft_model": str(sft_dir), "validation": result})
        (out / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
        mark_done(out, "qnet", SNAPSHOT_DIRS)
    accelerator.wait_for_everyone()
    return json.loads((out / RESULT_FILE).read_text())


def _kept_epoch(out: Path, epochs: list[dict[str, Any]], select_best: bool) -> tuple[dict[str, Any], str]:
    """The validation record of the epoch whose weights are kept, and why (with ``select_best`` the
    snapshot in ``best_epoch/`` must be that epoch's)."""
    trained = [e for e in epochs if e["epoch"] >= 1]
    if not trained:
        return {}, "last epoch"
    if not select_best:
        return trained[-1], "last epoch"
    best = max(trained, key=selection_key)  # the earliest of equals
    mark = out / BEST_DIR / BEST_MARK
    saved = json.loads(mark.read_text())["epoch"] if mark.exists() else None
    if saved != best["epoch"]:
        raise QlassError(f"{out}: the snapshot of the best epoch ({best['epoch']}) is missing; use a new output folder")
    by = "validation pair accuracy" if best.get("pair_accuracy") is not None else "validation MSE (no pairs)"
    log.info("keeping epoch %d of %d (best %s)", best["epoch"], trained[-1]["epoch"], by)
    return best, f"best {by}"


def _final_qnet(weights: Path, tokenizer: Any, sft_dir: str | Path, cfg: QNetTrainConfig) -> QNet:
    """The kept weights (a Trainer-saved model, or LoRA adapter merged into the SFT backbone) as a QNet
    on ``cfg.device``."""
    if cfg.lora:
        from peft import PeftModel

        base = QNet.from_sft(sft_dir, cfg.max_length, cfg.max_action_tokens, seed=cfg.seed).model
        model = PeftModel.from_pretrained(base, weights).merge_and_unload()
    else:
        from transformers import AutoModelForSequenceClassification

        with loading_weights(weights, "QNet"):
            model = AutoModelForSequenceClassification.from_pretrained(weights, dtype=torch.float32)
    model.to(resolve_device(cfg.device)).eval()
    return QNet(model, tokenizer, cfg.max_length, cfg.max_action_tokens, cfg.autocast, cfg.rank)


def _write_predictions(out: Path, qnet: QNet, val: Sequence[PackedRow], sft_dir: str | Path,
                       cfg: QNetTrainConfig) -> dict[str, Any] | None:
    """Write every held-out record's target and scores to ``val_predictions.jsonl``; returns the SFT
    log-likelihood ranker's metrics (``None`` without ``baseline``), also appended to ``metrics.jsonl``."""
    q, score = qnet_outputs(qnet, val)
    device = resolve_device(cfg.device)
    means, sums = loglik_scores(sft_dir, val, cfg.autocast, device) if cfg.baseline else (None, None)
    records = [r for row in val for r in row.records]
    write_jsonl(out / PREDICTIONS_FILE, [
        {"tree_id": r.tree_id, "group": r.group, "node_id": r.node_id, "q": r.q, "qnet_q": q[i], "qnet_score": score[i],
         **({"loglik_mean": means[i], "loglik_sum": sums[i]} if means is not None and sums is not None else {})}
        for i, r in enumerate(records)])
    if means is None or sums is None:
        return None
    metrics = loglik_ranker_metrics(val, means, sums)
    append_jsonl(out / METRICS, {"kind": "sft_loglik_ranker", **metrics})
    return metrics


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
