"""Stage 3's training itself, once :mod:`.qnet` has checked the run's options, folder and Q data without
torch: the records packed into rows with the QNet's encoding, transformers' ``Trainer``
(:mod:`.qnet_trainer`), the kept epoch's weights saved as the QNet, and the held-out records scored
beside the SFT policy's log-likelihood ranker.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

from ..config import save_yaml, to_dict
from ..errors import QlassError
from ..jsonl import append_jsonl, write_jsonl
from ..models import resolve_device
from ..policy.loading import loading_weights
from ..qnet import QNet
from ..qnet_data import QRecord
from ..qnet_loss import state_targets
from ..qnet_pack import PackedRow, pack_records
from ..qnet_validate import loglik_ranker_metrics, loglik_scores, qnet_outputs
from .common import METRICS, Snapshot, effective_precision, is_main_process, prepare_resume, world_size
from .configs import QNetTrainConfig
from .qnet import BEST_DIR, CONFIG_FILE, PREDICTIONS_FILE, RESULT_FILE, SNAPSHOT_DIRS, TRAINED_DIR, sft_inputs
from .qnet_trainer import (
    BEST_MARK,
    EpochEnds,
    QNetTrainer,
    StepShares,
    epoch_records,
    schedule,
    selection_key,
    single,
    validation_items,
)
from .quiet import quiet, without_misleading_warnings
from .run_folders import mark_done
from .trainer_parts import MetricsLog, training_arguments

log = logging.getLogger(__name__)


def pack(qnet: QNet, records: Sequence[QRecord]) -> list[PackedRow]:
    """``records`` packed into token rows with the QNet's (= the policy's) input encoding."""
    return pack_records(qnet.encode_history, qnet.encode_action, records)


def lora_model(model: Any, cfg: QNetTrainConfig) -> Any:
    """LoRA adapters on the backbone's linear layers, initialised from ``cfg.seed`` (a resumed run's first
    process makes the same ones); PEFT trains the value head in full beside them (``modules_to_save``, so
    checkpoints and the adapter keep it)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)  # train_qnet gives the caller its generator back (keeping_caller_state)
    return get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                            target_modules="all-linear", task_type="SEQ_CLS"))


def fit(source: Snapshot, sft_dir: str | Path, out: Path, cfg: QNetTrainConfig, held: list[str] | None,
        train_records: list[QRecord], val_records: list[QRecord]) -> dict[str, Any]:
    """Train the QNet on the checked records and save it to ``out`` (see :func:`.qnet.train_qnet`); the kept
    epoch's validation result."""
    qdata = source.name
    # one micro-batch per process per optimizer step (see .qnet_trainer); also sets the threads, checks the device
    arguments = training_arguments(cfg, out, epochs=1, lr=cfg.lr, micro_batch=1, batch_size=1, seed=cfg.seed,
                                   evaluate=False, gradient_checkpointing=cfg.gradient_checkpointing)
    qnet = QNet.from_sft(sft_dir, cfg.max_length, cfg.max_action_tokens, cfg.autocast, cfg.seed, rank=cfg.rank)
    train, val = pack(qnet, train_records), pack(qnet, val_records)
    shares, ends = schedule(train, cfg, world_size())
    out.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        save_yaml(out / CONFIG_FILE, {**to_dict(cfg), "qdata": qdata, "qdata_sha256": source.digest,
                                      **sft_inputs(sft_dir), "precision": effective_precision(cfg),
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
        model=lora_model(qnet.model, cfg) if cfg.lora else qnet.model, args=args,
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
