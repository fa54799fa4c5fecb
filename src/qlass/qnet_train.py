"""Stage 3: train the QNet on Q data (MSE on the Q targets), validated by sibling ranking.

Q data (``qdata.jsonl``, written by exploration) holds one record per (history, action)::

    {"schema_version": 1, "tree_id": str, "task": str, "node_id": int, "parent_id": int,
     "group": str, "depth": int, "messages": [{"role", "content"}, ...], "action": str, "q": float}

Training packs the records of each tree into token rows, one per path (:mod:`qlass.qnet_pack`): a
record's input (the policy's prompt, then the action, exactly what inference scores) is a prefix of
its descendants' inputs, so one causal forward over a path gives every value on it
(:meth:`qlass.qnet.QNet.values_at`), with gradients. An optimizer step covers at least
``batch_size`` records (whole rows); the loss is the mean squared error over them.

Validation holds out whole trees (seeded; no tree in both splits). Per epoch it reports MSE,
pairwise ranking accuracy among siblings with different targets (prediction ties count half) and
Spearman's rank correlation. At the end the SFT policy's own log-likelihood of each action (summed
token log-probabilities given the same history) is scored as a ranker on the same split, the
baseline the QNet must beat.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import build, config_differences, config_hash, load_yaml, option, save_yaml, to_dict
from .errors import QlassError
from .models import resolve_device
from .qnet import QNet, backbone_of, sequence_hidden
from .qnet_data import QRecord, make_groups, ranking_metrics, read_qdata, split_by_tree
from .qnet_pack import PackedRow, pack_records, step_batches
from .train_utils import (
    TrainerConfig,
    load_checkpoint,
    log_metrics,
    optimizer_and_schedule,
    progress_bar,
    rewind_metrics,
    save_checkpoint,
)

log = logging.getLogger(__name__)
DONE_MARK = ".qlass-complete"
RESULT_FILE = "qnet_result.json"
CONFIG_FILE = "qnet_config.yaml"


@dataclass(frozen=True)
class QNetTrainConfig(TrainerConfig):
    """QNet training settings; defaults follow the paper's reference code, CPU runs override them.
    With ``lora`` the value head is trained in full beside the adapters."""

    epochs: int = option(2, "passes over the training records")
    lr: float = option(2e-5, "peak learning rate")
    head_lr: float | None = option(None, "peak learning rate of the fresh value head (None: lr); an Adam step "
                                   "moves the value by up to head_lr x the hidden state's L1 norm (~750 for "
                                   "SmolLM2), so keep it small")
    batch_size: int = option(64, "records per optimizer step, at least (whole packed paths; paper: 64)")
    max_length: int = option(4096, "longest input in tokens (history + action); oldest turns dropped first")
    max_action_tokens: int = option(256, "tokens reserved for the candidate action (longer ones keep their end)")
    val_fraction: float = option(0.1, "fraction of trees held out for validation")
    eval_before: bool = option(True, "also validate the untrained QNet (epoch 0)")
    baseline: bool = option(True, "rank the validation siblings by the SFT policy's log-likelihood too")
    seed: int = option(0, "seed for the split, batching and head initialisation")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.lr <= 0 or (self.head_lr is not None and self.head_lr <= 0):
            raise ValueError(f"lr and head_lr must be > 0, got {self.lr} and {self.head_lr}")


def pack(qnet: QNet, records: Sequence[QRecord]) -> list[PackedRow]:
    """``records`` packed into token rows with the QNet's (= the policy's) input encoding."""
    return pack_records(qnet.encode_history, qnet.encode_action, records)


def predict(score_row: Callable[[PackedRow], torch.Tensor], rows: Sequence[PackedRow]) -> list[float]:
    """Scores of every record of ``rows`` (row order, then record order), without gradients."""
    out: list[float] = []
    with torch.no_grad():
        for row in rows:
            out += [float(v) for v in score_row(row)]
    return out


def _metrics(rows: Sequence[PackedRow], preds: Sequence[float]) -> dict[str, Any]:
    records = [r for row in rows for r in row.records]
    return ranking_metrics([(r.tree_id, r.group) for r in records], [r.q for r in records], preds)


def validate(qnet: QNet, rows: Sequence[PackedRow]) -> dict[str, Any]:
    """MSE, sibling ranking accuracy and Spearman of the QNet on the records of ``rows``."""
    was_training = qnet.model.training
    qnet.model.eval()
    preds = predict(lambda row: qnet.values_at(row.ids, row.ends), rows)
    qnet.model.train(was_training)
    targets = [t for row in rows for t in row.targets]
    metrics = _metrics(rows, preds)
    metrics["mse"] = sum((p - t) ** 2 for p, t in zip(preds, targets, strict=True)) / max(len(targets), 1)
    return metrics


def loglik_ranker_metrics(sft_dir: str | Path, rows: Sequence[PackedRow], autocast: bool = False,
                          device: str = "cpu") -> dict[str, Any]:
    """Sibling ranking by the SFT policy's summed log-probability of each action given its history."""
    from .policy.hf import load_causal_lm

    lm, _ = load_causal_lm(sft_dir)
    lm.to(device)
    backbone = backbone_of(lm)
    head = lm.get_output_embeddings()

    def score(row: PackedRow) -> torch.Tensor:
        hidden = sequence_hidden(backbone, row.ids, autocast)
        ids = torch.tensor(row.ids, dtype=torch.long, device=hidden.device)
        sums = []
        for end, n in zip(row.ends, row.action_lengths, strict=True):
            # the action is ids[end-n+1 : end+1]; token p is predicted from the hidden state at p-1
            logp = torch.log_softmax(head(hidden[end - n:end].to(head.weight.dtype)).float(), dim=-1)
            sums.append(logp[torch.arange(n), ids[end - n + 1:end + 1]].sum().cpu())
        return torch.stack(sums)

    return _metrics(rows, predict(score, rows))


def _row_loss(qnet: QNet, row: PackedRow) -> torch.Tensor:
    values = qnet.values_at(row.ids, row.ends)
    return ((values - torch.tensor(row.targets, device=values.device)) ** 2).sum()


def _apply_lora(qnet: QNet, cfg: QNetTrainConfig) -> Any:
    """Wrap the backbone's linear layers with LoRA adapters (in place); the head trains fully."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(qnet.model, LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules="all-linear", exclude_modules=["score"]))
    qnet.model.score.weight.requires_grad_(True)
    return peft_model


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_finished(out: Path, cfg: QNetTrainConfig, qdata: str | Path) -> None:
    """Refuse to hand back a finished QNet made with other settings or other Q data than asked for.
    (Folders finished before the Q data's digest was recorded are checked on settings only.)"""
    path = out / CONFIG_FILE
    if not path.exists():
        return
    saved = load_yaml(path)
    digest = saved.pop("qdata_sha256", None)
    saved.pop("qdata", None)
    saved.pop("sft_model", None)
    try:
        before = build(QNetTrainConfig, saved, str(path))
    except QlassError:
        raise QlassError(f"{out}: holds a finished QNet whose settings ({path}) this qlass cannot read; "
                         "use a new output folder") from None
    changed = config_differences(before, cfg)
    if changed:
        raise QlassError(f"{out}: holds a finished QNet trained with other settings ({', '.join(changed)}); "
                         "use a new output folder")
    if digest is not None and digest != file_digest(qdata):
        raise QlassError(f"{out}: holds a finished QNet trained on other Q data than {qdata}; use a new output folder")


def train_qnet(qdata: str | Path, sft_dir: str | Path, out_dir: str | Path, cfg: QNetTrainConfig) -> dict[str, Any]:
    """Train a QNet from the SFT model at ``sft_dir`` on ``qdata``; returns the final validation result.

    ``out_dir`` receives the QNet (an ``AutoModelForSequenceClassification`` folder, safetensors),
    ``metrics.jsonl``, ``qnet_config.yaml`` and ``qnet_result.json``. An interrupted run resumes from
    its checkpoint; a finished one returns its saved result.
    """
    out = Path(out_dir)
    if (out / DONE_MARK).exists():
        _check_finished(out, cfg, qdata)
        log.info("%s is complete; nothing to do", out)
        return json.loads((out / RESULT_FILE).read_text())
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    records = read_qdata(qdata)
    make_groups(records, str(qdata))  # siblings must share their history (else the ranking keys lie)
    train_records, val_records = split_by_tree(records, cfg.val_fraction, cfg.seed)
    qnet = QNet.from_sft(sft_dir, cfg.max_length, cfg.max_action_tokens, cfg.autocast, cfg.seed)
    device = resolve_device(cfg.device)
    qnet.model.to(device)
    train, val = pack(qnet, train_records), pack(qnet, val_records)
    peft_model = _apply_lora(qnet, cfg) if cfg.lora else None
    qnet.model.train()
    counts = [len(row.records) for row in train]
    epoch_steps = [step_batches(counts, cfg.batch_size, cfg.seed, e) for e in range(cfg.epochs)]
    total_steps = sum(map(len, epoch_steps))
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    params = [p for p in qnet.model.parameters() if p.requires_grad]
    head = [p for p in qnet.model.score.parameters() if p.requires_grad]
    param_groups = [{"params": [p for p in params if all(p is not h for h in head)]},
                    {"params": head, "lr": cfg.head_lr or cfg.lr}]
    opt, sched = optimizer_and_schedule(param_groups, cfg.lr, cfg.weight_decay, cfg.warmup_ratio, total_steps)
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(out / CONFIG_FILE, {**to_dict(cfg), "qdata": str(qdata), "qdata_sha256": file_digest(qdata),
                                  "sft_model": str(sft_dir)})
    chash = config_hash(cfg) + f"-packed-{len(train_records)}-{len(val_records)}-{len(train)}"
    step = load_checkpoint(out, qnet.model, opt, sched, chash)
    if step == 0:  # metrics of a run that died before its first checkpoint are redone
        (out / "metrics.jsonl").unlink(missing_ok=True)
    rewind_metrics(out, step)
    log.info("QNet: %d train records (%d trees) packed in %d rows of %d tokens, %d validation records (%d trees) "
             "in %d rows; %d optimizer steps", len(train_records), len({r.tree_id for r in train_records}),
             len(train), sum(len(row.ids) for row in train), len(val_records),
             len({r.tree_id for r in val_records}), len(val), total_steps)
    history: list[dict[str, Any]] = []
    if step == 0 and val and cfg.eval_before:
        history.append(_log_epoch(out, 0, step, validate(qnet, val), None))
    log_every = max(1, total_steps // 20)
    epoch_start = 0
    with progress_bar("qnet") as progress:
        bar = progress.add_task("", total=total_steps, completed=step, loss=float("nan"))
        for epoch, batches in enumerate(epoch_steps):
            epoch_end = epoch_start + len(batches)
            if step >= epoch_end or step >= total_steps:  # done (and validated) before an interruption
                epoch_start = epoch_end
                continue
            epoch_loss, epoch_n = 0.0, 0
            for batch in batches[step - epoch_start:]:
                if step >= total_steps:
                    break
                started = time.perf_counter()
                n_records = sum(counts[i] for i in batch)
                total = 0.0
                for i in batch:
                    loss = _row_loss(qnet, train[i])
                    (loss / n_records).backward()
                    total += float(loss.detach())
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                epoch_loss, epoch_n = epoch_loss + total, epoch_n + n_records
                progress.update(bar, advance=1, loss=total / n_records)
                log_metrics(out, {"kind": "qnet_train", "step": step, "epoch": epoch, "train_mse": total / n_records,
                                  "lr": sched.get_last_lr()[0], "records": n_records,
                                  "tokens": sum(len(train[i].ids) for i in batch),
                                  "seconds": round(time.perf_counter() - started, 3)})
                if step % log_every == 0:
                    log.info("step %d/%d: train mse %.4f", step, total_steps, total / n_records)
                if step % cfg.save_every == 0 and step < total_steps:
                    save_checkpoint(out, qnet.model, opt, sched, step, chash)
            epoch_start = epoch_end
            train_mse = epoch_loss / epoch_n if epoch_n else None
            if val:
                history.append(_log_epoch(out, epoch + 1, step, validate(qnet, val), train_mse))
            save_checkpoint(out, qnet.model, opt, sched, step, chash)
    if peft_model is not None:
        qnet.model = peft_model.merge_and_unload()
    qnet.model.eval()
    result: dict[str, Any] = {"train_records": len(train_records), "val_records": len(val_records),
                              "qnet": _final_metrics(out, history)}
    if cfg.baseline and val:
        result["sft_loglik"] = loglik_ranker_metrics(sft_dir, val, cfg.autocast, device)
        log_metrics(out, {"kind": "sft_loglik_ranker", **result["sft_loglik"]})
    qnet.model.to("cpu")
    qnet.save(out, extra={"trained_on": str(qdata), "sft_model": str(sft_dir), "validation": result})
    (out / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(out / "checkpoint", ignore_errors=True)
    (out / DONE_MARK).write_text("qnet\n")
    return result


def _log_epoch(out: Path, epoch: int, step: int, metrics: dict[str, Any], train_mse: float | None) -> dict[str, Any]:
    record = {"kind": "qnet_val", "epoch": epoch, "step": step, "train_mse": train_mse, **metrics}
    log.info("epoch %d: val mse %.4f, sibling pair accuracy %s over %d pairs, spearman %s", epoch,
             metrics["mse"], _fmt(metrics["pair_accuracy"]), metrics["pairs"], _fmt(metrics["spearman"]))
    log_metrics(out, record)
    return record


def _final_metrics(out: Path, history: list[dict[str, Any]]) -> dict[str, Any]:
    """The last epoch's validation record (read back from ``metrics.jsonl`` after a resume)."""
    if history:
        return history[-1]
    from .jsonl import read_jsonl

    epochs = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("kind") == "qnet_val"]
    return epochs[-1] if epochs else {}


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def summary_lines(result: dict[str, Any]) -> list[str]:
    """Human-readable lines comparing the QNet with the SFT log-likelihood ranker."""
    lines = []
    q = result.get("qnet") or {}
    if q:
        lines.append(f"QNet (epoch {q.get('epoch')}): sibling pair accuracy {_fmt(q.get('pair_accuracy'))} "
                     f"over {q.get('pairs')} pairs, spearman {_fmt(q.get('spearman'))}, mse {_fmt(q.get('mse'))}")
    b = result.get("sft_loglik")
    if b:
        lines.append(f"SFT log-likelihood ranker: sibling pair accuracy {_fmt(b.get('pair_accuracy'))} "
                     f"over {b.get('pairs')} pairs, spearman {_fmt(b.get('spearman'))}")
    return lines

