"""Pieces shared by the SFT and QNet trainers: batching, optimizer + schedule, checkpoints, progress.

A trainer built from these pieces has this shape (see :func:`qlass.sft.train_sft`)::

    sched_plan = plan(n_train, batch_size, micro_batch, epochs, max_steps)
    opt, sched = optimizer_and_schedule(params, lr, weight_decay, warmup_ratio, sched_plan.total_steps)
    step = load_checkpoint(out, model, opt, sched, cfg_hash)      # 0 on a fresh run
    rewind_metrics(out, step)                                      # forget steps redone after a crash
    for epoch in range(step // sched_plan.steps_per_epoch, epochs):
        batches = epoch_batches(lengths, micro_batch, seed, epoch)  # same order on every run
        for micro_batches in steps_from(batches, sched_plan.accumulation, step - epoch * per_epoch):
            ...  # forward/backward each micro-batch, opt.step(), sched.step(), step += 1
            log_metrics(out, {"step": step, ...}); save_checkpoint(...) every K steps
        save_checkpoint(...)                                       # and at each epoch end

Checkpoints hold the trainable weights (safetensors), the optimizer and scheduler state, the RNG
states (torch, Python) and the step and config hash. They are written to a temporary folder and
swapped in by renames, so a killed process leaves either the previous or the new checkpoint, never
a half-written one. A run resumes only from a checkpoint made with the same config hash. Since
batch order is a pure function of (seed, epoch) and the RNG states are restored, a resumed run
takes the same steps as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .config import option
from .errors import QlassError
from .jsonl import append_jsonl, read_jsonl, write_jsonl

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainerConfig:
    """Settings every trainer shares (SFT and QNet configs extend it with their own)."""

    warmup_ratio: float = option(0.03, "fraction of steps with linear warmup (then cosine decay to 0)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_steps: int | None = option(None, "stop after this many optimizer steps (None: all epochs)")
    lora: bool = option(False, "train LoRA adapters (merged into the weights on save) instead of all weights")
    lora_r: int = option(16, "LoRA rank")
    lora_alpha: int = option(32, "LoRA alpha")
    lora_dropout: float = option(0.05, "LoRA dropout")
    autocast: bool = option(False, "bf16 autocast (on CPU 1.6-2.2x faster on AVX512-BF16/AMX machines; GPUs)")
    device: str = option("auto", "torch device: auto (a CUDA GPU when visible, else cpu), cpu, cuda, cuda:N",
                         runtime=True)
    threads: int | None = option(None, "torch CPU threads (None: torch's default)", runtime=True)
    grad_clip: float = option(1.0, "gradient norm clip (0: off)")
    save_every: int = option(50, "checkpoint every N optimizer steps (and at each epoch end)")

    def __post_init__(self) -> None:
        if self.save_every < 1 or self.lora_r < 1:
            raise ValueError(f"save_every and lora_r must be >= 1, got {self.save_every} and {self.lora_r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or null, got {self.max_steps}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")

CHECKPOINT = "checkpoint"


@dataclass(frozen=True)
class Schedule:
    """How many optimizer steps a run takes, and how micro-batches group into them."""

    steps_per_epoch: int
    accumulation: int
    total_steps: int


def plan(n_examples: int, batch_size: int, micro_batch: int, epochs: int, max_steps: int | None) -> Schedule:
    """Optimizer steps for ``epochs`` passes at effective ``batch_size`` (capped by ``max_steps``)."""
    if n_examples == 0:
        raise QlassError("no training examples")
    accumulation = max(1, math.ceil(batch_size / micro_batch))
    per_epoch = max(1, math.ceil(n_examples / (accumulation * micro_batch)))
    total = per_epoch * epochs if max_steps is None else min(per_epoch * epochs, max_steps)
    return Schedule(per_epoch, accumulation, total)


def epoch_batches(lengths: Sequence[int], micro_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """Length-grouped micro-batches in a seeded, per-epoch shuffled order."""
    rng = random.Random(seed * 1000 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = micro_batch * 16
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[i:i + micro_batch] for i in range(0, len(chunk), micro_batch)]
    rng.shuffle(batches)
    return batches


def pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """Right-pad integer rows into a tensor."""
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def optimizer_and_schedule(params: Sequence[torch.nn.Parameter], lr: float, weight_decay: float,
                           warmup_ratio: float, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW with a cosine schedule and linear warmup."""
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(warmup_ratio * total_steps), total_steps)
    return opt, sched


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters (all of them for a full fine-tune, the adapters for LoRA)."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(out_dir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any,
                    step: int, cfg_hash: str) -> None:
    """Atomically write the training state after ``step`` optimizer steps."""
    from safetensors.torch import save_file

    final = out_dir / CHECKPOINT
    tmp = out_dir / (CHECKPOINT + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    rng = {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
    if torch.cuda.is_available():  # dropout on a GPU draws from the CUDA generators
        rng["cuda_rng"] = torch.cuda.get_rng_state_all()
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), **rng}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "config_hash": cfg_hash}))
    old = out_dir / (CHECKPOINT + ".old")
    if final.exists():  # else ``old`` may be the only complete checkpoint: keep it until ``final`` is in place
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The complete checkpoint in ``out_dir`` (or ``out_dir`` itself if it is one), else ``None``."""
    # ``.old`` is the complete one when a process died between the two renames of save_checkpoint
    for ckpt in (out_dir, out_dir / CHECKPOINT, out_dir / (CHECKPOINT + ".old")):
        if (ckpt / "state.json").exists() and (ckpt / "trainable.safetensors").exists():
            return ckpt
    return None


def load_trainable(ckpt: Path, model: torch.nn.Module) -> int:
    """Copy a checkpoint's trainable weights into ``model``; returns the checkpoint's step."""
    from safetensors.torch import load_file

    weights = load_file(str(ckpt / "trainable.safetensors"))
    params = dict(model.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise QlassError(f"{ckpt}: weights {', '.join(unknown[:3])} are not in the model; was it made from another "
                         "base model or with other LoRA settings?")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    return int(json.loads((ckpt / "state.json").read_text())["step"])


def load_checkpoint(out_dir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any,
                    cfg_hash: str) -> int:
    """Restore the state saved in ``out_dir``; returns the step to continue from (0 if none)."""
    ckpt = latest_checkpoint(out_dir)
    if ckpt is None:
        return 0
    state = json.loads((ckpt / "state.json").read_text())
    if state["config_hash"] != cfg_hash:
        raise QlassError(f"{ckpt}: checkpoint was made with a different config; use a new output folder "
                         "or delete the checkpoint to start over")
    step = load_trainable(ckpt, model)
    extra = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=False)
    opt.load_state_dict(extra["optimizer"])
    sched.load_state_dict(extra["scheduler"])
    if "torch_rng" in extra:
        torch.set_rng_state(extra["torch_rng"])
        random.setstate(extra["python_rng"])
    if "cuda_rng" in extra and torch.cuda.is_available() and len(extra["cuda_rng"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(extra["cuda_rng"])
    log.info("resuming from %s at step %d", ckpt, step)
    return step


def progress_bar(description: str) -> Progress:
    """The progress display used by the trainers (step counter, loss, time left)."""
    return Progress(TextColumn(f"[bold]{description}[/]"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TimeRemainingColumn())


def log_metrics(out_dir: Path, record: dict[str, Any]) -> None:
    """Append one metrics record to ``out_dir/metrics.jsonl``."""
    append_jsonl(out_dir / "metrics.jsonl", record)


def rewind_metrics(out_dir: Path, step: int) -> None:
    """Drop records of steps after ``step`` from ``out_dir/metrics.jsonl`` (they are redone on resume).

    Records without a ``step`` field are kept.
    """
    path = out_dir / "metrics.jsonl"
    records = read_jsonl(path, repair_tail=True)
    kept = [r for r in records if not isinstance(r.get("step"), int) or r["step"] <= step]
    if len(kept) != len(records):
        log.info("%s: dropping %d record(s) after step %d", path, len(records) - len(kept), step)
        write_jsonl(path, kept)


def steps_from(batches: list[list[int]], accumulation: int, skip_steps: int) -> Iterator[list[list[int]]]:
    """Group an epoch's micro-batches into optimizer steps, skipping the first ``skip_steps``."""
    for k, start in enumerate(range(0, len(batches), accumulation)):
        if k >= skip_steps:
            yield batches[start:start + accumulation]
