"""Pieces of the QNet trainer's own loop: optimizer + schedule, checkpoints, progress.

Checkpoints hold the trainable weights (safetensors), the optimizer and scheduler state, the RNG
states (torch, Python) and the step and config hash. They are written to a temporary folder and
swapped in by renames, so a killed process leaves either the previous or the new checkpoint, never
a half-written one. A run resumes only from a checkpoint made with the same config hash. (SFT and
DPO run on transformers' Trainer, see :mod:`qlass.training`.)
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .errors import QlassError
from .jsonl import append_jsonl

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint"


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
