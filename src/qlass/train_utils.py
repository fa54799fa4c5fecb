"""Pieces shared by the SFT and QNet trainers: batching, optimizer + schedule, checkpoints, progress.

Checkpoints hold the trainable weights (safetensors), the optimizer and scheduler state, the step
and the config hash; they are written to a temporary folder and renamed, so a crash never leaves a
half-written checkpoint. A run resumes from its checkpoint only if the config hash matches.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .errors import QlassError
from .jsonl import append_jsonl

log = logging.getLogger(__name__)

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
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(out_dir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any,
                    step: int, cfg_hash: str) -> None:
    """Atomically write the training state after ``step`` optimizer steps."""
    from safetensors.torch import save_file

    final = out_dir / CHECKPOINT
    tmp = out_dir / (CHECKPOINT + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "config_hash": cfg_hash}))
    old = out_dir / (CHECKPOINT + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out_dir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any,
                    cfg_hash: str) -> int:
    """Restore the state saved in ``out_dir``; returns the step to continue from (0 if none)."""
    from safetensors.torch import load_file

    ckpt = out_dir / CHECKPOINT
    if not (ckpt / "state.json").exists():
        return 0
    state = json.loads((ckpt / "state.json").read_text())
    if state["config_hash"] != cfg_hash:
        raise QlassError(f"{ckpt}: checkpoint was made with a different config; use a new output folder "
                         "or delete the checkpoint to start over")
    weights = load_file(str(ckpt / "trainable.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    extra = torch.load(ckpt / "optimizer.pt", weights_only=False)
    opt.load_state_dict(extra["optimizer"])
    sched.load_state_dict(extra["scheduler"])
    log.info("resuming from %s at step %d", ckpt, state["step"])
    return int(state["step"])


def progress_bar(description: str) -> Progress:
    """The progress display used by the trainers (step counter, loss, time left)."""
    return Progress(TextColumn(f"[bold]{description}[/]"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TimeRemainingColumn())


def log_metrics(out_dir: Path, record: dict[str, Any]) -> None:
    """Append one metrics record to ``out_dir/metrics.jsonl``."""
    append_jsonl(out_dir / "metrics.jsonl", record)


def steps_from(batches: list[list[int]], accumulation: int, skip_steps: int) -> Iterator[list[list[int]]]:
    """Group an epoch's micro-batches into optimizer steps, skipping the first ``skip_steps``."""
    for k, start in enumerate(range(0, len(batches), accumulation)):
        if k >= skip_steps:
            yield batches[start:start + accumulation]
