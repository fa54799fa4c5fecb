"""Stage 1: behaviour cloning on expert trajectories (loss on the agent's turns only).

Token layout (from :func:`qlass.policy.render.encode_conversation`, the same ids the policy later
samples from)::

    <system/instruction/one-shot example ...><task turn> | <assistant: Thought/Action><|im_end|>\\n
    <user: Observation ...> | <assistant ...><|im_end|>\\n ...

Labels are the token ids inside assistant turns that come after the task turn (end-of-turn token
included, so the model learns to stop); everything else is -100. The one-shot example's turns are
context, not targets. Conversations longer than ``max_length`` lose their oldest (action,
observation) pairs after the task turn; the newest turns are always kept.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .config import config_hash, option, save_yaml, to_dict
from .data import load_trajectories
from .errors import QlassError
from .policy.hf import default_keep_prefix, load_causal_lm
from .policy.render import encode_conversation, truncate_history
from .train_utils import (
    epoch_batches, load_checkpoint, log_metrics, optimizer_and_schedule, pad, plan, progress_bar,
    save_checkpoint, steps_from,
)
from .types import Message

log = logging.getLogger(__name__)
DONE_MARK = ".qlass-complete"


@dataclass(frozen=True)
class SFTConfig:
    """SFT settings; defaults are the paper's (Table 5), CPU runs override them in YAML."""

    epochs: int = option(3, "passes over the training data")
    lr: float = option(1e-5, "peak learning rate")
    batch_size: int = option(64, "effective batch size (sequences per optimizer step)")
    micro_batch: int = option(2, "sequences per forward pass; batch_size/micro_batch steps are accumulated")
    warmup_ratio: float = option(0.03, "fraction of steps with linear warmup")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_length: int = option(4096, "longest sequence in tokens; older turns are dropped first")
    max_steps: int | None = option(None, "stop after this many optimizer steps (None: all epochs)")
    lora: bool = option(False, "train LoRA adapters (merged into the weights on save) instead of all weights")
    lora_r: int = option(16, "LoRA rank")
    lora_alpha: int = option(32, "LoRA alpha")
    lora_dropout: float = option(0.05, "LoRA dropout")
    autocast: bool = option(False, "bf16 autocast on CPU (fast on AVX512-BF16/AMX machines)")
    threads: int | None = option(None, "torch CPU threads (None: torch's default)")
    val_fraction: float = option(0.1, "fraction of trajectories held out for validation loss")
    grad_clip: float = option(1.0, "gradient norm clip (0: off)")
    save_every: int = option(50, "checkpoint every N optimizer steps (and at each epoch end)")
    seed: int = option(0, "seed for the split, batching and initialisation")

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.micro_batch < 1:
            raise ValueError("epochs, batch_size and micro_batch must be >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


def encode_example(tokenizer: Any, messages: Sequence[Message], max_length: int) -> tuple[list[int], list[int]]:
    """Input ids and labels (-100 outside the agent's turns after the task turn) of a conversation."""
    keep = default_keep_prefix(messages)
    msgs = list(messages)
    ids, mask = encode_conversation(tokenizer, msgs, add_generation_prompt=False)
    if len(ids) > max_length:
        fits = lambda m: len(encode_conversation(tokenizer, m, False)[0]) <= max_length  # noqa: E731
        msgs = truncate_history(msgs, keep, fits)
        ids, mask = encode_conversation(tokenizer, msgs, add_generation_prompt=False)
    head = len(encode_conversation(tokenizer, msgs[:keep], add_generation_prompt=False)[0])
    labels = [t if m and i >= head else -100 for i, (t, m) in enumerate(zip(ids, mask))]
    return ids[-max_length:], labels[-max_length:]


def _token_loss(model: Any, batch: list[tuple[list[int], list[int]]], pad_id: int, autocast: bool) -> tuple[torch.Tensor, int]:
    """Summed next-token loss over labelled tokens of a micro-batch, and their count."""
    ids = pad([b[0] for b in batch], pad_id)
    labels = pad([b[1] for b in batch], -100)
    attn = pad([[1] * len(b[0]) for b in batch], 0)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids, attention_mask=attn).logits
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1)
    loss = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
    return loss, int((shift_labels != -100).sum())


def evaluate_loss(model: Any, examples: Sequence[tuple[list[int], list[int]]], pad_id: int, micro_batch: int,
                  autocast: bool) -> float:
    """Mean per-token loss on ``examples``."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), micro_batch):
            loss, n = _token_loss(model, list(examples[i:i + micro_batch]), pad_id, autocast)
            total, count = total + float(loss), count + n
    model.train()
    return total / max(count, 1)


def split_examples(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded train/validation split of ``n`` trajectories (at least one in training)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = min(int(round(n * val_fraction)), n - 1)
    return sorted(order[n_val:]), sorted(order[:n_val])


def train_sft(data: str | Path, model_dir: str | Path, out_dir: str | Path, cfg: SFTConfig) -> Path:
    """Fine-tune the causal LM at ``model_dir`` on the trajectories in ``data``; returns ``out_dir``.

    ``out_dir`` receives a plain HF causal-LM folder (safetensors, tokenizer, chat template),
    ``metrics.jsonl`` and ``sft_config.yaml``. An interrupted run resumes from its checkpoint.
    """
    out = Path(out_dir)
    if (out / DONE_MARK).exists():
        log.info("%s is complete; nothing to do", out)
        return out
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    trajectories = load_trajectories(data)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_causal_lm(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = [encode_example(tokenizer, t.messages, cfg.max_length) for t in trajectories]
    empty = [t.id for t, (_, lab) in zip(trajectories, examples) if all(x == -100 for x in lab)]
    if empty:
        raise QlassError(f"{data}: no agent turn after the task turn in record(s) {', '.join(empty[:5])}")
    train_idx, val_idx = split_examples(len(examples), cfg.val_fraction, cfg.seed)
    train, val = [examples[i] for i in train_idx], [examples[i] for i in val_idx]
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    sched_plan = plan(len(train), cfg.batch_size, cfg.micro_batch, cfg.epochs, cfg.max_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = optimizer_and_schedule(params, cfg.lr, cfg.weight_decay, cfg.warmup_ratio, sched_plan.total_steps)
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(out / "sft_config.yaml", to_dict(cfg))
    chash = config_hash(cfg) + f"-{len(train)}-{len(val)}"
    step = load_checkpoint(out, model, opt, sched, chash)
    lengths = [len(e[0]) for e in train]
    log.info("SFT: %d train / %d val trajectories, %d optimizer steps (accumulation %d)",
             len(train), len(val), sched_plan.total_steps, sched_plan.accumulation)
    with progress_bar("sft") as progress:
        bar = progress.add_task("", total=sched_plan.total_steps, completed=step, loss=float("nan"))
        for epoch in range(step // sched_plan.steps_per_epoch, math.ceil(sched_plan.total_steps / sched_plan.steps_per_epoch)):
            batches = epoch_batches(lengths, cfg.micro_batch, cfg.seed, epoch)
            skip = step - epoch * sched_plan.steps_per_epoch
            for micro_batches in steps_from(batches, sched_plan.accumulation, skip):
                if step >= sched_plan.total_steps:
                    break
                n_tokens = sum(sum(1 for x in train[i][1][1:] if x != -100) for mb in micro_batches for i in mb)
                total = 0.0
                for mb in micro_batches:
                    loss, _ = _token_loss(model, [train[i] for i in mb], pad_id, cfg.autocast)
                    (loss / max(n_tokens, 1)).backward()
                    total += float(loss.detach())
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                train_loss = total / max(n_tokens, 1)
                progress.update(bar, advance=1, loss=train_loss)
                log_metrics(out, {"step": step, "epoch": epoch, "train_loss": train_loss, "lr": sched.get_last_lr()[0]})
                if step % cfg.save_every == 0:
                    save_checkpoint(out, model, opt, sched, step, chash)
            if val:
                val_loss = evaluate_loss(model, val, pad_id, cfg.micro_batch, cfg.autocast)
                log.info("epoch %d: validation loss %.4f", epoch + 1, val_loss)
                log_metrics(out, {"step": step, "epoch": epoch + 1, "val_loss": val_loss})
            save_checkpoint(out, model, opt, sched, step, chash)
    if cfg.lora:
        model = model.merge_and_unload()
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    shutil.rmtree(out / "checkpoint", ignore_errors=True)
    (out / DONE_MARK).write_text("sft\n")
    return out
