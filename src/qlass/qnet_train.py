"""Stage 3: train the QNet on Q data, validated by sibling ranking.

Q data (``qdata.jsonl``, written by exploration) holds one record per (history, action)::

    {"schema_version": 1, "tree_id": str, "task": str, "node_id": int, "parent_id": int,
     "group": str, "depth": int, "messages": [{"role", "content"}, ...], "action": str, "q": float}

Training packs the records of each tree into token rows, one per path (:mod:`qlass.qnet_pack`): a
record's input (the policy's prompt, then the action, exactly what inference scores) is a prefix of
its descendants' inputs, so one causal forward over a path gives every value on it
(:meth:`qlass.qnet.QNet.values_at`), with gradients. An optimizer step covers at least
``batch_size`` records from at least ``min_trees_per_step`` trees (whole rows; with a pairwise loss,
all rows through a sibling group with contrast together); the loss (:mod:`qlass.qnet_loss`: a
regression chosen by ``rank`` plus ``pair_weight`` × a Bradley–Terry term over sibling pairs) is
averaged per record, whatever the rows' lengths.

Validation holds out whole trees (seeded; no tree in both splits; or given trees, for
:mod:`qlass.qnet_cv`). Per epoch it reports MSE of Q, pairwise ranking accuracy (by the inference
score) among siblings with different targets (prediction ties count half) and Spearman's rank
correlation of Q. ``select_best`` keeps the epoch with the best pair accuracy. At the end the SFT
policy's own log-likelihood of each action given the same history is scored as a ranker on the same
split, per token (the ranker reported) and summed (length-biased: a longer thought loses), the
baseline the QNet must beat; ``val_predictions.jsonl`` keeps every held-out record's scores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import build, config_differences, config_hash, load_yaml, option, save_yaml, to_dict
from .errors import QlassError
from .jsonl import read_jsonl, write_jsonl
from .locking import writes_to
from .models import resolve_device
from .qnet import RANKS, QNet
from .qnet_data import QRecord, make_groups, read_qdata, split_by_tree
from .qnet_loss import contrast_groups, group_key, state_targets, step_backward
from .qnet_pack import PackedRow, batch_units, pack_records, step_batches
from .qnet_validate import loglik_ranker_metrics, loglik_scores, qnet_outputs, validate
from .train_utils import (
    latest_checkpoint,
    load_checkpoint,
    load_trainable,
    log_metrics,
    optimizer_and_schedule,
    progress_bar,
    save_checkpoint,
    trainable_state,
)
from .training.common import TrainerConfig, rewind_metrics

log = logging.getLogger(__name__)
DONE_MARK = ".qlass-complete"
RESULT_FILE = "qnet_result.json"
CONFIG_FILE = "qnet_config.yaml"
PREDICTIONS_FILE = "val_predictions.jsonl"
BEST_DIR = "best_epoch"
LEGACY = {"min_trees_per_step": 1}
"""How QNets finished before an option existed were trained, where that differs from its default."""


@dataclass(frozen=True)
class QNetTrainConfig(TrainerConfig):
    """QNet training settings; defaults follow the paper's reference code, CPU runs override them.
    With ``lora`` the value head is trained in full beside the adapters."""

    epochs: int = option(2, "passes over the training records")
    lr: float = option(2e-5, "peak learning rate")
    head_lr: float | None = option(None, "peak learning rate of the fresh value head (None: lr); an Adam step "
                                   "moves the value by up to head_lr x the hidden state's L1 norm (~750 for "
                                   "SmolLM2), so keep it small")
    batch_size: int = option(64, "records per optimizer step, at least: whole packed paths (with pair_weight > 0, "
                             "all paths through a sibling group with contrast, so its pairs meet) are added until "
                             "the step holds batch_size records from min_trees_per_step trees, so a step may hold "
                             "more; the loss is the mean over its records (paper: 64 records)")
    min_trees_per_step: int = option(4, "distinct trees an optimizer step draws records from, at least (capped at "
                                     "the number of training trees), so no step pulls toward one tree's outcome")
    rank: str = option("q", "q: regress the value at the action's last token (Q) on q, rank by Q; advantage: also "
                       "regress the value at the history's last token (V) on the state's value (its sibling "
                       "group's mean q), rank by Q - V; dueling: regress Q - V on q minus that mean and V on the "
                       "mean, so lone records teach the ranking score nothing (see qlass.qnet_loss)")
    pair_weight: float = option(0.0, "weight of a Bradley-Terry loss over sibling pairs with different targets "
                                "(mean over the step's pairs), added to the regression; 0: off")
    select_best: bool = option(False, "keep the epoch with the best validation sibling-pair accuracy (ties: lower "
                               "MSE; no pairs: lowest MSE) instead of the last one")
    max_length: int = option(4096, "longest input in tokens (history + action); oldest turns dropped first")
    max_action_tokens: int = option(256, "tokens reserved for the candidate action (longer ones keep their end)")
    val_fraction: float = option(0.1, "fraction of trees held out for validation (cross-validation ignores it)")
    eval_before: bool = option(True, "also validate the untrained QNet (epoch 0)")
    baseline: bool = option(True, "rank the validation siblings by the SFT policy's log-likelihood too")
    seed: int = option(0, "seed for the split, batching and head initialisation")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.epochs < 1 or self.batch_size < 1 or self.min_trees_per_step < 1:
            raise ValueError("epochs, batch_size and min_trees_per_step must be >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.lr <= 0 or (self.head_lr is not None and self.head_lr <= 0):
            raise ValueError(f"lr and head_lr must be > 0, got {self.lr} and {self.head_lr}")
        if self.rank not in RANKS:
            raise ValueError(f"rank must be one of {', '.join(RANKS)}, got {self.rank!r}")
        if self.pair_weight < 0:
            raise ValueError(f"pair_weight must be >= 0, got {self.pair_weight}")


def pack(qnet: QNet, records: Sequence[QRecord]) -> list[PackedRow]:
    """``records`` packed into token rows with the QNet's (= the policy's) input encoding."""
    return pack_records(qnet.encode_history, qnet.encode_action, records)


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


def _check_run(out: Path, cfg: QNetTrainConfig, qdata: str | Path, held_out: list[str] | None,
               sft_dir: str | Path, finished: bool) -> None:
    """Refuse to hand back a finished QNet, or to resume one in training, made with other settings,
    other Q data, another SFT model or other held-out trees than asked for. (Folders made before the
    Q data's digest or the SFT model was recorded are checked on what they record; options they
    predate count as :data:`LEGACY`.)"""
    path = out / CONFIG_FILE
    if not path.exists():
        return
    held = "a finished QNet" if finished else "a QNet in training"
    saved = load_yaml(path)
    digest = saved.pop("qdata_sha256", None)
    trees = saved.pop("held_out_trees", None)
    saved.pop("qdata", None)
    sft_model = saved.pop("sft_model", None)
    try:
        before = build(QNetTrainConfig, {**LEGACY, **saved}, str(path))
    except QlassError:
        raise QlassError(f"{out}: holds {held} whose settings ({path}) this qlass cannot read; "
                         "use a new output folder") from None
    changed = config_differences(before, cfg)
    if trees != held_out:
        changed.append("held-out trees")
    if sft_model is not None and sft_model != str(sft_dir):
        changed.append(f"sft_model: {sft_model!r} → {str(sft_dir)!r}")
    if changed:
        raise QlassError(f"{out}: holds {held} trained with other settings ({', '.join(changed)}); "
                         "use a new output folder")
    if digest is not None and digest != file_digest(qdata):
        raise QlassError(f"{out}: holds {held} trained on other Q data than {qdata}; use a new output folder")


def _split(records: list[QRecord], cfg: QNetTrainConfig, held_out: list[str] | None,
           source: str) -> tuple[list[QRecord], list[QRecord]]:
    if held_out is None:
        return split_by_tree(records, cfg.val_fraction, cfg.seed)
    missing = sorted(set(held_out) - {r.tree_id for r in records})
    if missing:
        raise QlassError(f"{source}: held-out tree(s) {', '.join(missing[:3])} not in the Q data")
    held = set(held_out)
    return [r for r in records if r.tree_id not in held], [r for r in records if r.tree_id in held]


@writes_to("out_dir", folder=True)
def train_qnet(qdata: str | Path, sft_dir: str | Path, out_dir: str | Path, cfg: QNetTrainConfig,
               held_out: Collection[str] | None = None) -> dict[str, Any]:
    """Train a QNet from the SFT model at ``sft_dir`` on ``qdata``; returns the kept epoch's validation
    result. ``held_out`` names the validation trees (default: a seeded ``val_fraction`` of them).

    ``out_dir`` receives the QNet (an ``AutoModelForSequenceClassification`` folder, safetensors),
    ``metrics.jsonl``, ``qnet_config.yaml``, ``qnet_result.json`` and ``val_predictions.jsonl``. An
    interrupted run resumes from its checkpoint; a finished one returns its saved result.
    """
    out = Path(out_dir)
    held = sorted(held_out) if held_out is not None else None
    if (out / DONE_MARK).exists():
        _check_run(out, cfg, qdata, held, sft_dir, finished=True)
        log.info("%s is complete; nothing to do", out)
        return json.loads((out / RESULT_FILE).read_text())
    if latest_checkpoint(out) is not None:
        _check_run(out, cfg, qdata, held, sft_dir, finished=False)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    records = read_qdata(qdata)
    make_groups(records, str(qdata))  # siblings must share their history (else the ranking keys lie)
    train_records, val_records = _split(records, cfg, held, str(qdata))
    if cfg.select_best and not val_records:
        raise QlassError("select_best needs validation trees (val_fraction > 0)")
    qnet = QNet.from_sft(sft_dir, cfg.max_length, cfg.max_action_tokens, cfg.autocast, cfg.seed, rank=cfg.rank)
    device = resolve_device(cfg.device)
    qnet.model.to(device)
    train, val = pack(qnet, train_records), pack(qnet, val_records)
    peft_model = _apply_lora(qnet, cfg) if cfg.lora else None
    qnet.model.train()
    contrast = contrast_groups(train_records) if cfg.pair_weight > 0 else set()
    units = batch_units(train, lambda r: group_key(r) in contrast)
    unit_counts = [sum(len(train[i].records) for i in u) for u in units]
    unit_trees = [train[u[0]].records[0].tree_id for u in units]
    epoch_steps = [[[i for u in step for i in units[u]] for step in
                    step_batches(unit_counts, cfg.batch_size, cfg.seed, e, unit_trees, cfg.min_trees_per_step)]
                   for e in range(cfg.epochs)]
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
                                  "sft_model": str(sft_dir), **({"held_out_trees": held} if held is not None else {})})
    val_trees = hashlib.sha256(json.dumps(sorted({r.tree_id for r in val_records})).encode()).hexdigest()[:8]
    chash = config_hash(cfg) + f"-packed-{len(train_records)}-{len(val_records)}-{len(train)}-{val_trees}"
    step = load_checkpoint(out, qnet.model, opt, sched, chash)
    if step == 0:  # metrics and snapshot of a run that died before its first checkpoint are redone
        (out / "metrics.jsonl").unlink(missing_ok=True)
        shutil.rmtree(out / BEST_DIR, ignore_errors=True)
    rewind_metrics(out, step)
    baselines = state_targets(train_records)
    log.info("QNet (rank %s, pair weight %g): %d train records (%d trees) packed in %d rows of %d tokens, %d "
             "validation records (%d trees) in %d rows; %d optimizer steps", cfg.rank, cfg.pair_weight,
             len(train_records), len({r.tree_id for r in train_records}), len(train),
             sum(len(row.ids) for row in train), len(val_records), len({r.tree_id for r in val_records}), len(val),
             total_steps)
    if step == 0 and val and cfg.eval_before:
        _log_epoch(out, 0, step, validate(qnet, val), None)
    log_every = max(1, total_steps // 20)
    epoch_start = 0
    with progress_bar("qnet") as progress:
        bar = progress.add_task("", total=total_steps, completed=step, loss=float("nan"))
        for epoch, batches in enumerate(epoch_steps):
            epoch_end = epoch_start + len(batches)
            if step >= epoch_end or step >= total_steps:  # done (and validated) before an interruption
                epoch_start = epoch_end
                continue
            # a resumed epoch's train_mse covers its steps before the interruption too
            epoch_mse, epoch_n = _epoch_so_far(out, epoch) if step > epoch_start else (0.0, 0)
            for batch in batches[step - epoch_start:]:
                if step >= total_steps:
                    break
                started = time.perf_counter()
                stats = step_backward(qnet, [train[i] for i in batch], baselines, cfg.pair_weight)
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                epoch_mse, epoch_n = epoch_mse + stats.mse_sum, epoch_n + stats.records
                progress.update(bar, advance=1, loss=stats.loss)
                log_metrics(out, {"kind": "qnet_train", "step": step, "epoch": epoch, "train_loss": stats.loss,
                                  "train_mse": stats.mse_sum / stats.records, "mse_sum": stats.mse_sum,
                                  "pairs": stats.pairs,
                                  "pair_loss": stats.pair_loss, "lr": sched.get_last_lr()[0],
                                  "records": stats.records, "trees": len({train[i].records[0].tree_id for i in batch}),
                                  "tokens": sum(len(train[i].ids) for i in batch),
                                  "seconds": round(time.perf_counter() - started, 3)})
                if step % log_every == 0:
                    log.info("step %d/%d: train loss %.4f, mse %.4f", step, total_steps, stats.loss,
                             stats.mse_sum / stats.records)
                if step % cfg.save_every == 0 and step < min(epoch_end, total_steps):  # epoch ends: after validation
                    save_checkpoint(out, qnet.model, opt, sched, step, chash)
            epoch_start = epoch_end
            if val:
                metrics = validate(qnet, val)
                if cfg.select_best and _improves(metrics, _epoch_records(out)):
                    _save_best(out, qnet.model, epoch + 1, step)
                _log_epoch(out, epoch + 1, step, metrics, epoch_mse / epoch_n if epoch_n else None)
            save_checkpoint(out, qnet.model, opt, sched, step, chash)
    kept, kept_by = _kept_epoch(out, qnet.model, cfg.select_best)
    if peft_model is not None:
        qnet.model = peft_model.merge_and_unload()
    qnet.model.eval()
    result: dict[str, Any] = {"train_records": len(train_records), "val_records": len(val_records),
                              "qnet": kept, "kept_epoch": kept.get("epoch"), "kept_by": kept_by}
    if val:
        result["sft_loglik"] = _write_predictions(out, qnet, val, sft_dir, cfg, device)
    qnet.model.to("cpu")
    qnet.save(out, extra={"trained_on": str(qdata), "sft_model": str(sft_dir), "validation": result})
    (out / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(out / "checkpoint", ignore_errors=True)
    shutil.rmtree(out / BEST_DIR, ignore_errors=True)
    (out / DONE_MARK).write_text("qnet\n")
    return result


def _write_predictions(out: Path, qnet: QNet, val: Sequence[PackedRow], sft_dir: str | Path,
                       cfg: QNetTrainConfig, device: str) -> dict[str, Any] | None:
    """Write every held-out record's target and scores to ``val_predictions.jsonl``; returns the SFT
    log-likelihood ranker's metrics (``None`` without ``baseline``)."""
    q, score = qnet_outputs(qnet, val)
    means, sums = loglik_scores(sft_dir, val, cfg.autocast, device) if cfg.baseline else (None, None)
    records = [r for row in val for r in row.records]
    write_jsonl(out / PREDICTIONS_FILE, [
        {"tree_id": r.tree_id, "group": r.group, "node_id": r.node_id, "q": r.q, "qnet_q": q[i], "qnet_score": score[i],
         **({"loglik_mean": means[i], "loglik_sum": sums[i]} if means is not None and sums is not None else {})}
        for i, r in enumerate(records)])
    if means is None or sums is None:
        return None
    metrics = loglik_ranker_metrics(val, means, sums)
    log_metrics(out, {"kind": "sft_loglik_ranker", **metrics})
    return metrics


def _selection_key(metrics: dict[str, Any]) -> tuple[float, float]:
    acc = metrics.get("pair_accuracy")
    return (-1.0 if acc is None else acc, -metrics["mse"])


def _epoch_records(out: Path) -> list[dict[str, Any]]:
    """Validation records of trained epochs (1, 2, ...) in ``metrics.jsonl``."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in read_jsonl(path) if r.get("kind") == "qnet_val" and r["epoch"] >= 1]


def _epoch_so_far(out: Path, epoch: int) -> tuple[float, int]:
    """The squared-error sum and record count of ``epoch``'s steps already in ``metrics.jsonl`` (rewound
    to the checkpoint), summed in step order as the uninterrupted run sums them."""
    total, count = 0.0, 0
    for r in read_jsonl(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []:
        if r.get("kind") == "qnet_train" and r.get("epoch") == epoch:
            total += r["mse_sum"] if "mse_sum" in r else r["train_mse"] * r["records"]
            count += r["records"]
    return total, count


def _improves(metrics: dict[str, Any], earlier: list[dict[str, Any]]) -> bool:
    return all(_selection_key(metrics) > _selection_key(r) for r in earlier)


def _save_best(out: Path, model: torch.nn.Module, epoch: int, step: int) -> None:
    """Snapshot the trainable weights as the best epoch so far (atomically replacing the previous)."""
    from safetensors.torch import save_file

    tmp = out / (BEST_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "epoch": epoch}))
    shutil.rmtree(out / BEST_DIR, ignore_errors=True)
    tmp.rename(out / BEST_DIR)


def _kept_epoch(out: Path, model: torch.nn.Module, select_best: bool) -> tuple[dict[str, Any], str]:
    """The validation record of the epoch whose weights are kept, and why; with ``select_best`` the
    best epoch's snapshot is loaded into ``model``."""
    epochs = _epoch_records(out)
    if not epochs:
        return {}, "last epoch"
    if not select_best:
        return epochs[-1], "last epoch"
    best = max(epochs, key=_selection_key)  # the earliest of equals
    snapshot = out / BEST_DIR
    saved = json.loads((snapshot / "state.json").read_text())["epoch"] if (snapshot / "state.json").exists() else None
    if saved != best["epoch"]:
        raise QlassError(f"{out}: the snapshot of the best epoch ({best['epoch']}) is missing; use a new output folder")
    if best is not epochs[-1]:
        load_trainable(snapshot, model)
    by = "validation pair accuracy" if best.get("pair_accuracy") is not None else "validation MSE (no pairs)"
    log.info("keeping epoch %d of %d (best %s)", best["epoch"], epochs[-1]["epoch"], by)
    return best, f"best {by}"


def _log_epoch(out: Path, epoch: int, step: int, metrics: dict[str, Any], train_mse: float | None) -> None:
    record = {"kind": "qnet_val", "epoch": epoch, "step": step, "train_mse": train_mse, **metrics}
    log.info("epoch %d: val mse %.4f, sibling pair accuracy %s over %d pairs, spearman %s", epoch,
             metrics["mse"], _fmt(metrics["pair_accuracy"]), metrics["pairs"], _fmt(metrics["spearman"]))
    log_metrics(out, record)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def summary_lines(result: dict[str, Any]) -> list[str]:
    """Human-readable lines comparing the QNet with the SFT log-likelihood ranker."""
    lines = []
    q = result.get("qnet") or {}
    if q:
        lines.append(f"QNet (epoch {q.get('epoch')}, {result.get('kept_by', 'last epoch')}): sibling pair accuracy "
                     f"{_fmt(q.get('pair_accuracy'))} over {q.get('pairs')} pairs, spearman {_fmt(q.get('spearman'))}, "
                     f"mse {_fmt(q.get('mse'))}")
    b = result.get("sft_loglik")
    if b:
        s = b.get("sum") or {}
        lines.append(f"SFT log-likelihood ranker (per token): sibling pair accuracy {_fmt(b.get('pair_accuracy'))} "
                     f"over {b.get('pairs')} pairs, spearman {_fmt(b.get('spearman'))}; summed: "
                     f"{_fmt(s.get('pair_accuracy'))}")
    return lines
