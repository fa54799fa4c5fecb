"""What the trainers share on top of transformers' ``Trainer`` (TRL's trainers are ``Trainer`` subclasses).

- :class:`~.configs.TrainerConfig` (in :mod:`.configs`, beside each trainer's own options): the
  options every trainer has, mapped onto ``TrainingArguments`` by :func:`training_arguments`
  (``batch_size`` is the global batch: sequences per optimizer step over all processes, so a run
  takes the same steps on one CPU and under ``accelerate launch``).
- Checkpoints are the ``Trainer``'s own ``checkpoint-N`` folders (weights, optimizer, scheduler, RNG
  states, trainer state) every ``save_every`` steps and at each epoch end, the last one kept.
  ``trainer_state.json`` is written last, so :func:`last_checkpoint` takes the newest folder that
  has it (a process killed while writing leaves an incomplete one, which is removed), passing over one
  whose trainer state a full disk cut short for the one before it.
- :class:`MetricsLog` appends what the ``Trainer`` logs to ``metrics.jsonl`` (``train_loss``,
  ``val_loss``...); :func:`rewind_metrics` drops records of steps redone after a resume.
- :class:`LengthGroupedSampler`: micro-batches of similar lengths in a seeded order that depends only
  on (seed, epoch), so a resumed run sees the batches of an uninterrupted one.

Under ``accelerate launch`` every process runs the same function; only the main one (``RANK`` 0)
takes the writer lock and writes files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ..config import config_hash, to_dict
from ..errors import DataError, QlassError
from ..jsonl import append_jsonl, is_count, read_jsonl, read_once, write_jsonl
from ..locking import refuse_input_being_written, writer_lock
from ..precision import use_autocast
from ..recorded import check_recorded, model_files
from .configs import TrainerConfig

log = logging.getLogger(__name__)
METRICS = "metrics.jsonl"
DONE_MARK = ".qlass-complete"
RENAME = {"loss": "train_loss", "learning_rate": "lr", "eval_loss": "val_loss"}
"""Trainer log names → ``metrics.jsonl`` names."""
STATE = "trainer_state.json"
DIVERGED = ("train_loss", "grad_norm", "train_mse", "val_loss")
"""Logged values that, once NaN or infinite, mean the run has diverged (:class:`MetricsLog` stops it)."""


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Snapshot:
    """A training input as read: ``path`` to read it from, ``name`` as the user gave it, ``digest`` the
    SHA-256 of its bytes (None for a path that does not exist: its reader names the problem)."""

    path: Path
    name: str
    digest: str | None


@contextlib.contextmanager
def input_snapshot(path: str | Path) -> Iterator[Snapshot]:
    """The training input ``path`` with the digest of the bytes it is read from: a regular file as it
    is; a pipe (``<(zcat data.gz)``), which can be read once only, copied to a temporary file first, so
    that its digest is recorded and a resume with other data is refused as for a file. A problem in
    the copy is reported under ``path``. A file another qlass process is still writing is refused."""
    refuse_input_being_written(path, "training on it")
    with read_once(path) as readable:
        if readable == Path(path):  # a regular file, or none (its reader names that)
            yield Snapshot(readable, str(path), file_digest(readable) if readable.is_file() else None)
            return
        try:  # a pipe's copy: its problems are named under ``path``
            yield Snapshot(readable, str(path), file_digest(readable))
        except DataError as exc:
            if exc.path != str(readable):
                raise
            raise DataError(str(path), exc.problem.replace(str(readable), str(path)), exc.index, exc.record_id,
                            exc.line) from None


def run_inputs(source: Snapshot, model_dir: str | Path, cfg: TrainerConfig) -> dict[str, Any]:
    """What a trainer's run is made from, as its config file records it beside the options: the data (its
    path and digest; no digest for a missing file, which its reader names), the base model (its path and
    :func:`~qlass.recorded.model_files`, so that another model saved at the same path is refused) and the
    precision it computes in."""
    made_from: dict[str, Any] = {"data": source.name, "base_model": str(model_dir),
                                 "precision": effective_precision(cfg)}
    if Path(model_dir).is_dir():
        made_from["base_model_files"] = model_files(model_dir)
    if source.digest is not None:
        made_from["data_sha256"] = source.digest
    return made_from


def finished(out: Path, cfg: Any, made_from: dict[str, Any], config_file: str, kind: str) -> bool:
    """Whether ``out`` holds this finished run (``DONE_MARK`` reading ``kind`` and the config hash).
    A finished run, or one with a checkpoint, made with other settings (runtime ones aside), other data
    (by digest; the path may change) or another base model than ``made_from`` is refused, naming them;
    so is resuming a checkpoint where it would compute in another precision (a finished run is handed
    back wherever it was made); what an older ``config_file`` lacks (a digest, options added since)
    counts as unchanged."""
    done = (out / DONE_MARK).exists()
    if done or last_checkpoint(out) is not None:
        runtime = [f.name for f in fields(cfg) if f.metadata.get("runtime")]
        ignore = ["data", *runtime, *(["precision"] if done else [])]
        check_recorded(out / config_file, {**to_dict(cfg), **made_from}, str(out), ignore, "use a new output folder")
    if not done:
        return False
    made_with = (out / DONE_MARK).read_text().split()
    if len(made_with) > 1 and made_with[1] != config_hash(cfg):
        raise QlassError(f"{out}: holds a finished {kind.upper()} run made with other settings; use a new output "
                         "folder")
    log.info("%s is complete; nothing to do", out)
    return True


def world_size() -> int:
    """Processes of this run (``WORLD_SIZE`` set by ``accelerate launch``/torchrun; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Whether this process writes the run's files (global rank 0)."""
    return os.environ.get("RANK", "0") == "0"


def main_process_lock(out: Path) -> AbstractContextManager[None]:
    """The writer lock of ``out`` for the main process (the others run under it)."""
    return writer_lock(out, folder=True) if is_main_process() else nullcontext()


def accumulation(batch_size: int, micro_batch: int) -> int:
    """Micro-batches each process accumulates per optimizer step for a global ``batch_size``."""
    return max(1, math.ceil(batch_size / (micro_batch * world_size())))


def _on_cpu(cfg: TrainerConfig) -> bool:
    return cfg.device == "cpu" or not torch.cuda.is_available()


def effective_precision(cfg: TrainerConfig) -> str:
    """What a run of ``cfg`` computes in on this machine: ``bf16`` (autocast) or ``fp32`` (no autocast
    asked for, or a CPU without native bf16, :mod:`qlass.precision`). Recorded with the run, so that
    resuming it where it would compute in the other is refused instead of mixing the two."""
    return "bf16" if use_autocast(cfg.autocast, "cpu" if _on_cpu(cfg) else "cuda") else "fp32"


def training_arguments(cfg: TrainerConfig, out: Path, *, epochs: int, lr: float, micro_batch: int, batch_size: int,
                       seed: int, evaluate: bool, gradient_checkpointing: bool = False) -> dict[str, Any]:
    """``TrainingArguments`` keywords for ``cfg`` (TRL's configs take them too)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if is_main_process():  # a launch meant to start several (accelerate's --cpu starts one) shows here
        log.info("training on %d process%s", world_size(), "es" if world_size() > 1 else "")
    use_cpu = _on_cpu(cfg)
    return {
        "output_dir": str(out), "num_train_epochs": epochs, "max_steps": cfg.max_steps or -1,
        "learning_rate": lr, "lr_scheduler_type": "cosine", "warmup_steps": cfg.warmup_ratio,
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


def last_checkpoint(out: Path) -> Path | None:
    """The newest complete ``checkpoint-N`` in ``out`` (``out`` itself when it is one), else ``None``. A newer
    one whose trainer state cannot be read (its save cut short, e.g. by a full disk: the Trainer removes the
    previous checkpoint only after saving the next) is passed over for an older readable one; when none is
    readable, the newest is returned (and :func:`checkpoint_step` names its damage)."""
    if (out / STATE).exists():
        return out
    found = sorted((p for p in checkpoint_dirs(out) if (p / STATE).exists()), key=_number, reverse=True)
    return next((p for p in found if _readable_step(p)), found[0] if found else None)


def _number(ckpt: Path) -> int:
    return int(ckpt.name.split("-", 1)[1])


def _readable_step(ckpt: Path) -> bool:
    try:
        checkpoint_step(ckpt)
    except DataError:
        return False
    return True


def checkpoint_step(ckpt: Path) -> int:
    """The optimizer step a checkpoint was saved after; a damaged ``trainer_state.json`` is a DataError naming it."""
    path = ckpt / STATE
    try:
        step = json.loads(path.read_text(encoding="utf-8")).get("global_step")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, RecursionError):
        step = None
    if not is_count(step):
        raise DataError(str(path), f"not a trainer state with a 'global_step' (an integer >= 0), got {step!r}; the "
                                   "checkpoint is damaged (delete the folder to use the one before it)")
    return step


def prepare_resume(out: Path) -> Path | None:
    """The checkpoint to resume from (``None``: a fresh run). The main process removes incomplete
    checkpoints, forgets metrics logged after the checkpoint, or all of them on a fresh start."""
    if (out / "checkpoint" / "state.json").exists():
        raise QlassError(f"{out}: holds a checkpoint of an older qlass (checkpoint/); finish the run with that "
                         "version or delete the folder to start over")
    ckpt = last_checkpoint(out)
    if is_main_process():
        for partial in checkpoint_dirs(out):
            passed_over = ckpt is not None and ckpt != out and _number(partial) > _number(ckpt)
            if passed_over and (partial / STATE).exists():
                log.warning("%s: its trainer state cannot be read (a save cut short, e.g. by a full disk); "
                            "removed, resuming from %s", partial, ckpt.name)
            if passed_over or not (partial / STATE).exists():
                shutil.rmtree(partial, ignore_errors=True)
        if ckpt is None:
            (out / METRICS).unlink(missing_ok=True)
        else:
            rewind_metrics(out, checkpoint_step(ckpt))
            log.info("resuming from %s", ckpt)
    return ckpt


def checkpoint_dirs(out: Path) -> list[Path]:
    """The Trainer's ``checkpoint-<step>`` folders in ``out`` (not a user's ``checkpoint-best``)."""
    return [p for p in out.glob("checkpoint-*") if p.name.split("-", 1)[1].isdigit() and p.is_dir()]


def rewind_metrics(out_dir: Path, step: int) -> None:
    """Drop records of steps after ``step`` from ``out_dir/metrics.jsonl`` (they are redone on resume), and the
    end-of-run records (``kind``: the summary, the QNet's SFT ranker), which the resumed run writes again: a run
    killed after them kept two of each. Other records without a ``step`` field are kept.
    """
    path = out_dir / METRICS
    records = read_jsonl(path, repair_tail=True)
    kept = [r for r in records if "kind" not in r and (not isinstance(r.get("step"), int) or r["step"] <= step)]
    if len(kept) != len(records):
        log.info("%s: dropping %d record(s) after step %d", path, len(records) - len(kept), step)
        write_jsonl(path, kept)


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
