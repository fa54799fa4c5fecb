"""Stage 1: behaviour cloning on expert trajectories (loss on the agent's turns only).

Token layout — the ids come from :func:`qlass.policy.render.encode_conversation`, the very ids the
policy later samples from::

    [system] instruction | OK | example turns ... | task turn | Thought/Action<|im_end|>\\n | Observation ... | ...
    \\_________ prefix (kept whole, never a target) __________/  \\__ target __/             \\_ context _/

Labels are the ids of the assistant turns after the task turn, their end-of-turn token (and the
newline the template puts after it) included, so the model learns to stop; everything else is
-100. The prefix's assistant turns (``OK``, the one-shot example) are context shared by every
record, not targets.

Where the task turn is (:func:`prefix_length`): the agent loop's layout, shared with inference
(:func:`qlass.policy.hf.default_keep_prefix`) — observations are ``Observation: ...`` user turns,
so the task turn is the last user turn that is not one. Data whose observations lack that marker
falls back to: the prefix ends before the first agent turn with an ``Action:`` line.

Long conversations (:func:`encode_windows`): a conversation longer than ``max_length`` tokens is cut
into windows with :func:`~qlass.policy.render.truncate_history`, newest first: each window is the
prefix plus as many of the most recent not-yet-covered turns as fit (oldest turns dropped first,
as the policy does at inference), and trains on the agent turns it newly covers. So every agent
turn is trained on once, and no turn is dropped; a conversation that fits is one window.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from .config import build, check_recorded, config_hash, load_yaml, option, save_yaml, to_dict
from .data import ACTION_LINE, load_trajectories
from .errors import DataError, QlassError
from .locking import writes_to
from .models import resolve_device
from .policy.hf import default_keep_prefix, load_causal_lm
from .policy.render import encode_conversation, truncate_history
from .qnet_train import file_digest
from .train_utils import (
    CHECKPOINT,
    TrainerConfig,
    epoch_batches,
    latest_checkpoint,
    load_checkpoint,
    load_trainable,
    log_metrics,
    optimizer_and_schedule,
    pad,
    plan,
    progress_bar,
    rewind_metrics,
    save_checkpoint,
    steps_from,
)
from .types import Message, Trajectory

log = logging.getLogger(__name__)
DONE_MARK = ".qlass-complete"
CONFIG_FILE = "sft_config.yaml"
MADE_FROM = ("data", "data_sha256", "base_model")
"""What ``sft_config.yaml`` records beside the SFTConfig options: the data (path, SHA-256) and the base model."""
Example = tuple[list[int], list[int]]
"""Input ids and labels (-100 where no loss is taken) of one training sequence."""


@dataclass(frozen=True)
class SFTConfig(TrainerConfig):
    """SFT settings; defaults are the paper's (Table 5), CPU runs override them in YAML."""

    epochs: int = option(3, "passes over the training data")
    lr: float = option(1e-5, "peak learning rate")
    batch_size: int = option(64, "effective batch size (sequences per optimizer step)")
    micro_batch: int = option(2, "sequences per forward pass; batch_size/micro_batch passes are accumulated")
    max_length: int = option(4096, "longest sequence in tokens; longer conversations are windowed, oldest turns dropped first")
    val_fraction: float = option(0.1, "fraction of trajectories held out for the validation loss")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass: about half the peak "
                                          "memory (SmolLM2, 2 x 2048 tokens: 6.4 -> 3.3 GB) for more compute",
                                          runtime=True)
    max_trajectories: float | None = option(None, "limited supervision (paper Table 3): train on at most this many "
                                                  "trajectories (a whole number >= 1) or this fraction of them "
                                                  "(0 < x < 1): a seeded subset spread evenly over task types",
                                                  added=True)
    seed: int = option(0, "seed for the split, batch order and initialisation")

    def __post_init__(self) -> None:
        super().__post_init__()
        cap = self.max_trajectories
        if cap is not None and not (0 < cap < 1 or (cap >= 1 and float(cap).is_integer())):
            raise ValueError(f"max_trajectories must be a whole number >= 1 or a fraction in (0, 1), got {cap}")
        for name in ("epochs", "batch_size", "micro_batch", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def prefix_length(messages: Sequence[Message]) -> int:
    """Number of messages up to and including the task turn (see the module docstring)."""
    if any(m.role == "user" and m.content.startswith("Observation:") for m in messages):
        return default_keep_prefix(messages)
    for i, m in enumerate(messages):
        if m.role == "assistant" and ACTION_LINE.search(m.content):
            return i
    return len(messages)


def _assistant_runs(mask: Sequence[bool]) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of assistant tokens, in order."""
    runs, start = [], None
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _window_example(tokenizer: Any, msgs: Sequence[Message], first_target: int, max_length: int) -> Example:
    """Ids of ``msgs`` with labels on its assistant turns at message index >= ``first_target``."""
    ids, mask = encode_conversation(tokenizer, msgs, add_generation_prompt=False)
    assistant = [i for i, m in enumerate(msgs) if m.role == "assistant"]
    runs = _assistant_runs(mask)
    if len(runs) != len(assistant):
        raise QlassError(f"chat template of {getattr(tokenizer, 'name_or_path', 'the tokenizer')} merges "
                         "assistant turns; cannot build the loss mask")
    labels = [-100] * len(ids)
    for msg_index, (a, b) in zip(assistant, runs):
        if msg_index >= first_target:
            labels[a:b] = ids[a:b]
    return ids[-max_length:], labels[-max_length:]


def encode_windows(tokenizer: Any, messages: Sequence[Message], max_length: int) -> list[Example]:
    """Training sequences of one conversation: one if it fits in ``max_length``, else windows that
    keep the prefix and the newest uncovered turns (see the module docstring), newest first."""
    keep = prefix_length(messages)
    msgs = list(messages)
    end = max((i + 1 for i, m in enumerate(msgs) if m.role == "assistant" and i >= keep), default=0)
    windows: list[Example] = []

    def fits(m: Sequence[Message]) -> bool:
        return len(encode_conversation(tokenizer, m, add_generation_prompt=False)[0]) <= max_length

    while end > keep:
        window = truncate_history(msgs[:end], keep, fits)
        first = end - (len(window) - keep)  # index in ``msgs`` of the window's oldest body turn
        windows.append(_window_example(tokenizer, window, keep, max_length))
        end = first
        while end > keep and msgs[end - 1].role != "assistant":
            end -= 1
    return windows


def _keeps_logits_subset(model: Any) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (then only labelled positions are projected)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def token_loss(model: Any, batch: Sequence[Example], pad_id: int, autocast: bool) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the labelled tokens of a padded micro-batch, and their count.

    Only positions whose next token is labelled go through the LM head (``logits_to_keep``), which
    saves the vocabulary projection for the context tokens.
    """
    device = next(model.parameters()).device
    ids = pad([b[0] for b in batch], pad_id).to(device)
    labels = pad([b[1] for b in batch], -100).to(device)
    attn = pad([[1] * len(b[0]) for b in batch], 0).to(device)
    targets = labels[:, 1:]
    keep = torch.cat([targets != -100, torch.zeros(len(batch), 1, dtype=torch.bool, device=device)], dim=1)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        if _keeps_logits_subset(model):
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False, logits_to_keep=keep).logits
        else:
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[keep]
    logits = logits.reshape(-1, logits.shape[-1]).float()
    gold = targets[targets != -100]
    return torch.nn.functional.cross_entropy(logits, gold, reduction="sum"), int(gold.numel())


def evaluate_loss(model: Any, examples: Sequence[Example], pad_id: int, micro_batch: int, autocast: bool) -> float:
    """Mean per-token loss on ``examples`` (no gradients; the model is left in training mode)."""
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    with torch.no_grad():
        for i in range(0, len(order), micro_batch):
            loss, n = token_loss(model, [examples[j] for j in order[i:i + micro_batch]], pad_id, autocast)
            total, count = total + float(loss), count + n
    model.train()
    return total / max(count, 1)


def limit_trajectories(trajectories: Sequence[Trajectory], cap: float | None, seed: int) -> list[Trajectory]:
    """Limited supervision: ``cap`` trajectories (``cap >= 1``) or that fraction of them (``0 < cap < 1``,
    rounded, at least one), drawn with ``seed`` round-robin over task types (the middle part of a
    ``env/type/index`` task id) so every type keeps its share; kept in file order. ``None``: all."""
    n = len(trajectories)
    if cap is None or n == 0:
        return list(trajectories)
    keep = max(1, min(n, round(cap * n) if cap < 1 else int(cap)))
    groups: dict[str, list[int]] = {}
    for i, traj in enumerate(trajectories):
        parts = (traj.task or traj.id).split("/")
        groups.setdefault(parts[-2] if len(parts) >= 3 else "", []).append(i)
    rng = random.Random(seed)
    queues = [rng.sample(members, len(members)) for _, members in sorted(groups.items())]
    picked: list[int] = []
    while len(picked) < keep:
        for queue in queues:
            if queue and len(picked) < keep:
                picked.append(queue.pop())
    return [trajectories[i] for i in sorted(picked)]


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded train/validation split of ``n`` trajectories (at least one stays in training)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = min(round(n * val_fraction), n - 1)
    return sorted(order[n_val:]), sorted(order[:n_val])


def _encode_all(tokenizer: Any, trajectories: Sequence[Any], indices: Sequence[int], max_length: int,
                data: str | Path) -> list[Example]:
    examples: list[Example] = []
    empty = []
    for i in indices:
        windows = encode_windows(tokenizer, trajectories[i].messages, max_length)
        if not windows:
            empty.append(trajectories[i].id)
        examples.extend(windows)
    if empty:
        raise QlassError(f"{data}: no agent turn after the task turn in record(s) {', '.join(map(repr, empty[:5]))}"
                         + (f" and {len(empty) - 5} more" if len(empty) > 5 else ""))
    return examples


def _labelled(example: Example) -> int:
    return sum(1 for x in example[1][1:] if x != -100)


def _build_model(model_dir: str | Path, cfg: SFTConfig) -> tuple[Any, Any]:
    """The model to train (seeded; LoRA-wrapped when asked) and its tokenizer."""
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_causal_lm(model_dir)
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    return model, tokenizer


def _save_model(model: Any, tokenizer: Any, dest: Path, lora: bool) -> None:
    """Save a plain HF causal-LM folder (LoRA adapters merged into the weights)."""
    if lora:
        model = model.merge_and_unload()
    model.eval()
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)


def export_checkpoint(run_dir: str | Path, model_dir: str | Path, dest: str | Path) -> int:
    """Write the latest checkpoint of the SFT run in ``run_dir`` (or a checkpoint folder holding its
    ``sft_config.yaml``) as a plain HF causal-LM folder at ``dest``, e.g. to evaluate a run before
    it ends; ``model_dir`` is the run's base model. Returns the checkpoint's step."""
    run = Path(run_dir)
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise QlassError(f"{run}: no SFT checkpoint here")
    cfg_file = next((p for p in (run / CONFIG_FILE, ckpt / CONFIG_FILE) if p.exists()), None)
    if cfg_file is None:
        raise QlassError(f"{run}: no {CONFIG_FILE} beside the checkpoint")
    cfg = build(SFTConfig, {k: v for k, v in load_yaml(cfg_file).items() if k not in MADE_FROM}, str(cfg_file))
    model, tokenizer = _build_model(model_dir, cfg)
    step = load_trainable(ckpt, model)
    dest = Path(dest)
    _save_model(model, tokenizer, dest, cfg.lora)
    (dest / "sft_checkpoint.json").write_text(json.dumps({"run": str(run.resolve()), "step": step}) + "\n")
    return step


def _check_run(out: Path, cfg: SFTConfig, made_from: dict[str, Any]) -> None:
    """Refuse to resume or hand back the run in ``out`` when its ``sft_config.yaml`` records other
    settings, data (by digest; the path may change) or base model, naming them. What an older file
    lacks (the data's digest, the base model, options added since) counts as unchanged."""
    runtime = [f.name for f in fields(cfg) if f.metadata.get("runtime")]
    check_recorded(out / CONFIG_FILE, {**to_dict(cfg), **made_from}, str(out), ["data", *runtime],
                   "use a new output folder")


@writes_to("out_dir", folder=True)
def train_sft(data: str | Path, model_dir: str | Path, out_dir: str | Path, cfg: SFTConfig) -> Path:
    """Fine-tune the causal LM at ``model_dir`` on the trajectories in ``data``; returns ``out_dir``.

    ``out_dir`` receives a plain HF causal-LM folder (safetensors, tokenizer, chat template),
    ``metrics.jsonl`` (per step: train loss, lr, tokens/s; per epoch: validation loss, with the
    untrained model's at step 0) and ``sft_config.yaml`` (the options, the data's path and SHA-256,
    the base model). An interrupted run resumes from its last checkpoint (every ``save_every`` steps
    and at each epoch end) and ends with the same weights; resuming or rerunning a finished run with
    other options, data or base model is refused, naming them.
    """
    out = Path(out_dir)
    run_id = config_hash(cfg)
    made_from = {"data": str(data), "base_model": str(model_dir)}
    if Path(data).is_file():  # else load_trajectories names the problem
        made_from["data_sha256"] = file_digest(data)
    if (out / DONE_MARK).exists() or latest_checkpoint(out) is not None:
        _check_run(out, cfg, made_from)
    if (out / DONE_MARK).exists():
        made_with = (out / DONE_MARK).read_text().split()
        if len(made_with) > 1 and made_with[1] != run_id:
            raise QlassError(f"{out}: holds a finished SFT run made with other settings; use a new output folder")
        log.info("%s is complete; nothing to do", out)
        return out
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    trajectories = load_trajectories(data)
    if not trajectories:
        raise DataError(str(data), "no trajectories: no training examples")
    if cfg.max_trajectories is not None:
        total = len(trajectories)
        trajectories = limit_trajectories(trajectories, cfg.max_trajectories, cfg.seed)
        log.info("limited supervision: %d of %d trajectories (max_trajectories=%s)", len(trajectories), total,
                 cfg.max_trajectories)
    model, tokenizer = _build_model(model_dir, cfg)
    model.to(resolve_device(cfg.device))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora:
            model.enable_input_require_grads()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_idx, val_idx = split_indices(len(trajectories), cfg.val_fraction, cfg.seed)
    train = _encode_all(tokenizer, trajectories, train_idx, cfg.max_length, data)
    val = _encode_all(tokenizer, trajectories, val_idx, cfg.max_length, data)
    model.train()
    if not train:
        raise DataError(str(data), f"no training examples ({len(trajectories)} trajectories, {len(train_idx)} "
                                   f"left for training with val_fraction={cfg.val_fraction})")
    sched_plan = plan(len(train), cfg.batch_size, cfg.micro_batch, cfg.epochs, cfg.max_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = optimizer_and_schedule(params, cfg.lr, cfg.weight_decay, cfg.warmup_ratio, sched_plan.total_steps)
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(out / CONFIG_FILE, {**to_dict(cfg), **made_from})
    chash = f"{run_id}-{len(train)}-{len(val)}"
    step = load_checkpoint(out, model, opt, sched, chash)
    if step == 0:  # metrics of a run that died before its first checkpoint are redone (step-0 validation too)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    rewind_metrics(out, step)
    lengths = [len(e[0]) for e in train]
    log.info("SFT: %d train / %d val trajectories (%d / %d sequences, %d labelled train tokens), "
             "%d optimizer steps of %d x %d sequences", len(train_idx), len(val_idx), len(train), len(val),
             sum(map(_labelled, train)), sched_plan.total_steps, sched_plan.accumulation, cfg.micro_batch)
    if step == 0 and val:
        val_loss = evaluate_loss(model, val, pad_id, cfg.micro_batch, cfg.autocast)
        log.info("validation loss before training: %.4f", val_loss)
        log_metrics(out, {"step": 0, "epoch": 0, "val_loss": val_loss})
    per_epoch = sched_plan.steps_per_epoch
    log_every = max(1, sched_plan.total_steps // 20)
    with progress_bar("sft") as progress:
        bar = progress.add_task("", total=sched_plan.total_steps, completed=step, loss=float("nan"))
        for epoch in range(step // per_epoch, math.ceil(sched_plan.total_steps / per_epoch)):
            batches = epoch_batches(lengths, cfg.micro_batch, cfg.seed, epoch)
            stepped = False
            for micro_batches in steps_from(batches, sched_plan.accumulation, step - epoch * per_epoch):
                if step >= sched_plan.total_steps:
                    break
                started = time.perf_counter()
                n_tokens = sum(_labelled(train[i]) for mb in micro_batches for i in mb)
                total = 0.0
                for mb in micro_batches:
                    loss, _ = token_loss(model, [train[i] for i in mb], pad_id, cfg.autocast)
                    (loss / max(n_tokens, 1)).backward()
                    total += float(loss.detach())
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                stepped = True
                seconds = time.perf_counter() - started
                train_loss = total / max(n_tokens, 1)
                progress.update(bar, advance=1, loss=train_loss)
                n_seq = sum(len(mb) for mb in micro_batches)
                log_metrics(out, {"step": step, "epoch": epoch, "train_loss": train_loss, "lr": sched.get_last_lr()[0],
                                  "sequences": n_seq, "seconds": round(seconds, 3),
                                  "tokens_per_s": round(sum(len(train[i][0]) for mb in micro_batches for i in mb) / seconds, 1)})
                if step % log_every == 0:
                    log.info("step %d/%d: train loss %.4f", step, sched_plan.total_steps, train_loss)
                epoch_ends = step == sched_plan.total_steps or step % per_epoch == 0
                if step % cfg.save_every == 0 and not epoch_ends:  # epoch ends are saved after validation
                    save_checkpoint(out, model, opt, sched, step, chash)
            if not stepped:  # resumed after the last step, before the model was saved
                continue
            if val:
                val_loss = evaluate_loss(model, val, pad_id, cfg.micro_batch, cfg.autocast)
                log.info("epoch %d: validation loss %.4f", epoch + 1, val_loss)
                log_metrics(out, {"step": step, "epoch": epoch + 1, "val_loss": val_loss})
            save_checkpoint(out, model, opt, sched, step, chash)
    _save_model(model, tokenizer, out, cfg.lora)
    for leftover in (CHECKPOINT, CHECKPOINT + ".old", CHECKPOINT + ".tmp"):
        shutil.rmtree(out / leftover, ignore_errors=True)
    (out / DONE_MARK).write_text(f"sft {run_id}\n")
    return out
