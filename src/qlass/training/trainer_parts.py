"""The parts of a trainer run handed to transformers' ``Trainer`` (TRL's trainers are ``Trainer`` subclasses):
its arguments (:func:`training_arguments`), the callbacks that log and checkpoint (:class:`MetricsLog`,
:class:`SaveAtEpochEnd`) and the length-grouped sampler (:class:`LengthGroupedSampler`). They import torch
and transformers; :mod:`.common`, which reads a run's inputs and folders, does not, so a trainer finds a
mistake in its options or data before it loads them.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ..errors import QlassError
from ..jsonl import append_jsonl, read_jsonl
from .common import METRICS, effective_precision, is_main_process, on_cpu, world_size
from .configs import SCHEDULERS, TrainerConfig

log = logging.getLogger(__name__)
RENAME = {"loss": "train_loss", "learning_rate": "lr", "eval_loss": "val_loss"}
"""Trainer log names → ``metrics.jsonl`` names."""
DIVERGED = ("train_loss", "grad_norm", "train_mse", "val_loss")
"""Logged values that, once NaN or infinite, mean the run has diverged (:class:`MetricsLog` stops it)."""


def accumulation(batch_size: int, micro_batch: int) -> int:
    """Micro-batches each process accumulates per optimizer step for a global ``batch_size``."""
    return max(1, math.ceil(batch_size / (micro_batch * world_size())))


def training_arguments(cfg: TrainerConfig, out: Path, *, epochs: int, lr: float, micro_batch: int, batch_size: int,
                       seed: int, evaluate: bool, gradient_checkpointing: bool = False) -> dict[str, Any]:
    """``TrainingArguments`` keywords for ``cfg`` (TRL's configs take them too)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if is_main_process():  # a launch meant to start several (accelerate's --cpu starts one) shows here
        log.info("training on %d process%s", world_size(), "es" if world_size() > 1 else "")
    use_cpu = on_cpu(cfg)
    return {
        "output_dir": str(out), "num_train_epochs": epochs, "max_steps": cfg.max_steps or -1,
        "learning_rate": lr, "lr_scheduler_type": SCHEDULERS[cfg.scheduler], "warmup_steps": cfg.warmup_ratio,
        "weight_decay": cfg.weight_decay, "max_grad_norm": cfg.grad_clip,
        "per_device_train_batch_size": micro_batch, "per_device_eval_batch_size": micro_batch,
        "gradient_accumulation_steps": accumulation(batch_size, micro_batch),
        "bf16": effective_precision(cfg) == "bf16", "use_cpu": use_cpu, "seed": seed, "data_seed": seed,
        "activation_checkpointing": gradient_checkpointing,
        "activation_checkpointing_kwargs": {"use_reentrant": False} if gradient_checkpointing else None,
        "eval_strategy": "epoch" if evaluate else "no", "save_strategy": "steps", "save_steps": cfg.save_every,
        "save_total_limit": 1, "logging_steps": 1, "logging_nan_inf_filter": False,
        "report_to": [s.strip() for s in cfg.report_to.split(",")],
        "disable_tqdm": True, "dataloader_num_workers": 0, "dataloader_pin_memory": torch.cuda.is_available(),
    }


class MetricsLog(TrainerCallback):
    """Appends the Trainer's logs to ``metrics.jsonl`` (main process): per step ``train_loss``, ``lr``,
    ``grad_norm``; per evaluation ``val_loss`` and the trainer's other ``eval_*`` metrics (``val_*``, or
    without the prefix for names with a ``/``); the end-of-training summary with ``kind: summary``."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        record: dict[str, Any] = {"step": state.global_step, "epoch": round(float(state.epoch or 0), 4)}
        summary = "train_runtime" in logs
        if summary:
            record["kind"] = "summary"
        for key, value in logs.items():
            if key == "epoch":
                continue
            name = "mean_train_loss" if summary and key == "train_loss" else RENAME.get(key, key)
            if name.startswith("eval_") and not name.endswith(("_runtime", "_per_second")):
                name = name[len("eval_"):]
                name = name if "/" in name else f"val_{name}"
            record[name] = value
        if summary:  # the Trainer's mean covers this session's steps: a resumed run's, only those after its checkpoint
            losses = [r["train_loss"] for r in read_jsonl(self.out / METRICS) if "kind" not in r
                      and isinstance(r.get("train_loss"), (int, float))]
            if losses:
                record["mean_train_loss"] = sum(losses) / len(losses)
        # a NaN or infinite value (a diverging run) is written as null: JSON has no NaN, and the readers refuse it
        append_jsonl(self.out / METRICS, {k: None if isinstance(v, float) and not math.isfinite(v) else v
                                          for k, v in record.items()})
        broken = [k for k in DIVERGED if isinstance(record.get(k), float) and not math.isfinite(record[k])]
        if broken:
            values = ", ".join(f"{k} {record[k]}" for k in broken)
            raise QlassError(f"{self.out}: training diverged at step {state.global_step} ({values}; see {METRICS}): "
                             "no usable weights will come of it; lower lr, or check the targets' scale")
        if "val_loss" in record:
            log.info("step %d: validation loss %.4f", state.global_step, record["val_loss"])
        elif "train_loss" in record and state.global_step % max(1, state.max_steps // 20) == 0:
            log.info("step %d/%d: train loss %.4f", state.global_step, state.max_steps, record["train_loss"])


class SaveAtEpochEnd(TrainerCallback):
    """Checkpoint at each epoch end too (after its validation), besides every ``save_steps``. The step that
    ends an epoch (or the run) is checkpointed once, at the epoch end: saved at the step too, the second save
    rewrote the first's files in place under its complete ``trainer_state.json``, so a Ctrl-C or kill during
    it left a checkpoint that looked complete and could not be resumed from (a torn ``optimizer.pt``)."""

    def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> Any:
        if control.should_training_stop or float(state.epoch or 0).is_integer():
            control.should_save = False  # the epoch end, which follows at once, saves it
        return control

    def on_epoch_end(self, args: Any, state: Any, control: Any, **_: Any) -> Any:
        control.should_save = True
        return control


def length_grouped_order(lengths: Sequence[int], micro_batch: int, seed: int, epoch: int) -> list[int]:
    """All indices in a seeded per-epoch order where each run of ``micro_batch`` consecutive indices
    (a micro-batch) holds sequences of similar length: shuffled, sorted by length within windows of
    16 micro-batches, cut into micro-batches that are shuffled again (the one short one last)."""
    rng = random.Random(seed * 1000 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = micro_batch * 16
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[i:i + micro_batch] for i in range(0, len(chunk), micro_batch)]
    short = [b for b in batches if len(b) < micro_batch]
    full = [b for b in batches if len(b) == micro_batch]
    rng.shuffle(full)
    return [i for b in full + short for i in b]


class LengthGroupedSampler(torch.utils.data.Sampler[int]):
    """:func:`length_grouped_order` as a sampler (the Trainer calls ``set_epoch``)."""

    def __init__(self, lengths: Sequence[int], micro_batch: int, seed: int) -> None:
        self.lengths, self.micro_batch, self.seed, self.epoch = list(lengths), micro_batch, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        return iter(length_grouped_order(self.lengths, self.micro_batch, self.seed, self.epoch))


def set_sampler_epoch(loader: Any, epoch: int) -> None:
    """Set the epoch of the :class:`LengthGroupedSampler` under ``loader``, however deep accelerate wrapped it:
    the ``set_epoch`` of the Trainer and accelerate does not reach it through a ``SkipBatchSampler`` (a resumed
    epoch) over a ``BatchSamplerShard`` (two or more processes)."""
    node = loader
    while node is not None and not isinstance(node, LengthGroupedSampler):
        inner = getattr(node, "batch_sampler", None)
        node = inner if inner is not None else getattr(node, "sampler", None)
    if node is not None:
        node.set_epoch(epoch)
