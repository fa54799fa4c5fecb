"""Stage 1: behaviour cloning on expert trajectories (loss on the agent's turns only), trained by TRL's
``SFTTrainer`` on sequences tokenized here.

Token layout — the ids come from :func:`qlass.policy.render.encode_conversation`, the very ids the
policy later samples from::

    [system] instruction | OK | example turns ... | task turn | Thought/Action<|im_end|>\\n | Observation ... | ...
    \\_________ prefix (kept whole, never a target) __________/  \\__ target __/             \\_ context _/

Labels are the ids of the assistant turns after the task turn, their end-of-turn token (and the
newline the template puts after it) included, so the model learns to stop; everything else is
-100. The prefix's assistant turns (``OK``, the one-shot example) are context shared by every
record, not targets.

Where the task turn is (:func:`prefix_length`): the agent loop's layout, shared with inference
(:func:`qlass.policy.render.default_keep_prefix`) — observations are ``Observation: ...`` user turns,
so the task turn is the last user turn that is not one. Data whose observations lack that marker
falls back to: the prefix ends before the first agent turn with an ``Action:`` line.

Long conversations (:func:`encode_windows`): a conversation longer than ``max_length`` tokens is cut
into windows with :func:`~qlass.policy.render.truncate_history`, newest first: each window is the
prefix plus as many of the most recent not-yet-covered turns as fit (oldest turns dropped first,
as the policy does at inference), and trains on the agent turns it newly covers that follow their
own observation: the oldest agent turn of a cut window lost its observation with the dropped turns
and is context only there (the next window trains it). So every agent turn is trained on once, in
the context the policy would see it in, and no turn is dropped; a conversation that fits is one
window.

Why ``SFTTrainer`` takes these sequences as they are: given a dataset that already holds
``input_ids`` and ``labels`` (and ``skip_prepare_dataset``), it neither re-renders nor re-masks,
and its loss is the mean next-token cross-entropy over the labelled tokens of an optimizer step
(all micro-batches and processes) — the loss this project trained with before. The trainer here
computes that loss itself (:func:`labelled_token_loss`), projecting only labelled positions through
the LM head. TRL's own ``assistant_only_loss`` cannot express the mask:
it would also train on the prefix's example turns and does not know the windows.
"""

from __future__ import annotations

import logging
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import config_hash, save_yaml, to_dict
from ..config_fields import require_config
from ..data import ACTION_LINE, load_trajectories
from ..errors import DataError, QlassError, naming_failed_saves
from ..policy.loading import SFT_RECORD, check_causal_lm_folder, load_causal_lm
from ..policy.render import default_keep_prefix, encode_conversation, truncate_history
from ..types import Message, Trajectory
from .caller_state import keeping_caller_state
from .common import (
    Snapshot,
    TrainerConfig,
    finished,
    input_snapshot,
    is_main_process,
    main_process_lock,
    prepare_resume,
    run_inputs,
)
from .configs import SFTConfig, check_report_to
from .quiet import NoModelCard, NoTelemetry, quiet, without_misleading_warnings
from .run_folders import drop_leftovers, mark_done, refuse_overwriting_run
from .schedule import WarmupWithinRun

log = logging.getLogger(__name__)
CONFIG_FILE = SFT_RECORD
Example = tuple[list[int], list[int]]
"""Input ids and labels (-100 where no loss is taken) of one training sequence."""


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


def labelled_example(tokenizer: Any, msgs: Sequence[Message], first_target: int, max_length: int) -> Example:
    """Ids of ``msgs`` with labels on its assistant turns at message index >= ``first_target`` (the
    last ``max_length`` tokens)."""
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


def encode_windows(tokenizer: Any, messages: Sequence[Message], max_length: int) -> tuple[list[Example], int]:
    """Training sequences of one conversation: one if it fits in ``max_length``, else windows that
    keep the prefix and the newest uncovered turns (see the module docstring), newest first; and how
    many of them were cut from the left because even the prefix and one turn exceed ``max_length``.

    A window that had to drop older turns starts with an agent turn whose observation was dropped
    with them; that turn is context only (it is trained in the next, older window, where it is the
    newest turn after its observation), so no agent turn is trained on a conversation in which the
    task turn stands where its observation should be."""
    keep = prefix_length(messages)
    msgs = list(messages)
    end = max((i + 1 for i, m in enumerate(msgs) if m.role == "assistant" and i >= keep), default=0)
    windows: list[Example] = []
    cut = 0

    def fits(m: Sequence[Message]) -> bool:
        return len(encode_conversation(tokenizer, m, add_generation_prompt=False)[0]) <= max_length

    while end > keep:
        window = truncate_history(msgs[:end], keep, fits)
        first = end - (len(window) - keep)  # index in ``msgs`` of the window's oldest body turn
        context_only = first > keep and end - first >= 3  # its observation dropped, and a newer turn to train
        windows.append(labelled_example(tokenizer, window, keep + context_only, max_length))
        cut += not fits(window)
        end = first + 1 if context_only else first
        while end > keep and msgs[end - 1].role != "assistant":
            end -= 1
    return windows, cut


def limit_trajectories(trajectories: Sequence[Trajectory], cap: float | None, seed: int) -> list[Trajectory]:
    """Limited supervision: ``cap`` trajectories (``cap >= 1``; 1.0 is one, not all) or that fraction of them
    (``0 < cap < 1``, rounded, at least one), drawn with ``seed`` round-robin over task types: spread evenly,
    not in proportion, so a type with fewer than an even share keeps all of its trajectories and the larger
    types give up more (10 of type a and 90 of b, cap 50: 10 a and 40 b); kept in file order. ``None``: all.
    A trajectory's type is its ``task_type`` (expert exports record it); for a file without one, the middle
    part of an ``env/type/index`` task id (ScienceWorld's)."""
    n = len(trajectories)
    if cap is None or n == 0:
        return list(trajectories)
    keep = max(1, min(n, round(cap * n) if cap < 1 else int(cap)))
    groups: dict[str, list[int]] = {}
    for i, traj in enumerate(trajectories):
        groups.setdefault(trajectory_type(traj), []).append(i)
    rng = random.Random(seed)
    queues = [rng.sample(members, len(members)) for _, members in sorted(groups.items())]
    picked: list[int] = []
    while len(picked) < keep:
        for queue in queues:
            if queue and len(picked) < keep:
                picked.append(queue.pop())
    return [trajectories[i] for i in sorted(picked)]


def trajectory_type(traj: Trajectory) -> str:
    """The task type :func:`limit_trajectories` spreads over: the record's ``task_type``, else the middle
    part of an ``env/type/index`` task id, else one type for all."""
    recorded = traj.meta.get("task_type")
    if isinstance(recorded, str) and recorded:
        return recorded
    parts = (traj.task or traj.id).split("/")
    return parts[-2] if len(parts) >= 3 else ""


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
    cut = 0
    for i in indices:
        windows, n_cut = encode_windows(tokenizer, trajectories[i].messages, max_length)
        if not windows:
            empty.append(trajectories[i].id)
        examples.extend(windows)
        cut += n_cut
    if empty:
        raise QlassError(f"{data}: no agent turn after the task turn in record(s) {', '.join(map(repr, empty[:5]))}"
                         + (f" and {len(empty) - 5} more" if len(empty) > 5 else ""))
    if cut:
        log.warning("%s: %d of %d training sequences are longer than max_length (%d tokens) even with only the "
                    "instructions, the task and one turn, so their oldest tokens were cut (raise max_length)",
                    data, cut, len(examples), max_length)
    return examples



def _labelled(example: Example) -> int:
    return sum(1 for x in example[1][1:] if x != -100)


def _dataset(examples: Sequence[Example]) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [e[0] for e in examples], "labels": [e[1] for e in examples]})


def _trainer_class() -> type:
    """``SFTTrainer`` drawing length-grouped micro-batches in a seeded per-epoch order, whose loss projects
    only the labelled positions through the LM head (:func:`labelled_token_loss`)."""
    from trl import SFTTrainer

    from .trainer_parts import LengthGroupedSampler, set_sampler_epoch

    class WindowSFTTrainer(NoModelCard, NoTelemetry, WarmupWithinRun, SFTTrainer):
        def _get_train_sampler(self, train_dataset: Any = None) -> LengthGroupedSampler:
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            return LengthGroupedSampler([len(ids) for ids in dataset["input_ids"]],
                                        self.args.per_device_train_batch_size, self.args.seed)

        def get_resumed_dataloader(self, dataloader: Any, num_batches: int) -> Any:
            # under 2+ processes the epoch resumed mid-way drew epoch 0's order (the Trainer's set_epoch does not
            # reach the sampler there), so a resumed run trained on other batches than an uninterrupted one
            set_sampler_epoch(dataloader, int(self.state.epoch or 0))
            return super().get_resumed_dataloader(dataloader, num_batches)

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            loss, outputs, stats = labelled_token_loss(model, inputs, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # DDP averages the gradients; the count is global
            # the metrics SFTTrainer logs (its ``log`` averages ``_metrics`` over the logging interval)
            mode = "train" if model.training else "eval"
            n, entropy, correct = (self.accelerator.gather_for_metrics(x).sum() for x in stats)
            self._metrics[mode]["entropy"].append((entropy / n).item() if n > 0 else 0.0)
            self._metrics[mode]["mean_token_accuracy"].append((correct / n).item() if n > 0 else 0.0)
            if mode == "train":
                mask = inputs["attention_mask"]
                self._total_train_tokens += self.accelerator.gather_for_metrics(mask.sum()).sum().item()
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return (loss, outputs) if return_outputs else loss

    return WindowSFTTrainer


def labelled_token_loss(model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> tuple[Any, Any, tuple]:
    """Next-token cross-entropy over the labelled tokens of a padded micro-batch, summed and divided by
    ``num_items_in_batch`` (the labelled tokens of the whole optimizer step; this micro-batch's when
    ``None``); the model's output; and (labelled tokens, summed entropy, top-1 hits) for the logs.

    Only positions whose next token is labelled go through the LM head (transformers' boolean
    ``logits_to_keep``), so the vocabulary projection is skipped for the context — 85% of the tokens
    of the reference SFT data. TRL's fused LM head would score every position on a device
    without Triton (CPU), and compute entropy and top-1 inside its tiled kernel, backward included.
    """
    import torch

    labels = inputs["labels"]
    targets = labels[:, 1:]
    labelled = targets != -100
    keep = torch.nn.functional.pad(labelled, (0, 1))  # position t predicts token t + 1; the last predicts none
    outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False, logits_to_keep=keep)
    logits = outputs.logits.float()
    gold = targets[labelled]
    total = torch.nn.functional.cross_entropy(logits, gold, reduction="sum")
    count = gold.numel() if num_items_in_batch is None else num_items_in_batch
    with torch.no_grad():
        log_p = torch.log_softmax(logits, dim=-1)
        entropy = -(log_p.exp() * log_p).sum()
        correct = (logits.argmax(dim=-1) == gold).sum()
    return total / torch.as_tensor(count).clamp(min=1), outputs, (labelled.sum(), entropy, correct)


def lora_config(cfg: TrainerConfig) -> Any:
    """PEFT's LoRA settings for a causal LM from the trainer options (adapters on every linear layer)."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")


def save_merged(trainer: Any, model_dir: str | Path, tokenizer: Any, out: Path, lora: bool) -> None:
    """Save the trained model as a plain HF causal-LM folder at ``out`` (LoRA adapters merged into
    the base weights). Every process calls it (the Trainer gathers sharded weights); the main one writes."""
    if not lora:
        trainer.save_model(str(out))
        return
    adapter = out / "adapter"
    trainer.save_model(str(adapter))
    if is_main_process():
        from peft import PeftModel

        base, _ = load_causal_lm(model_dir)
        PeftModel.from_pretrained(base, adapter).merge_and_unload().save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        shutil.rmtree(adapter)


def train_sft(data: str | Path, model_dir: str | Path, out_dir: str | Path, cfg: SFTConfig) -> Path:
    """Fine-tune the causal LM at ``model_dir`` on the trajectories in ``data``; returns ``out_dir``.

    ``out_dir`` receives a plain HF causal-LM folder (safetensors, tokenizer, chat template),
    ``metrics.jsonl`` (per step: train loss, lr, grad norm; per epoch: validation loss, with the
    untrained model's at step 0) and ``sft_config.yaml`` (the options, the data's path and SHA-256,
    the base model). An interrupted run resumes from its last ``checkpoint-N`` (every ``save_every``
    steps and at each epoch end) and ends with the same weights; resuming or rerunning a finished run
    with other options, data or base model is refused, naming them. Runs as it is and under
    ``accelerate launch`` (``batch_size`` is then split over the processes).
    """
    require_config(cfg, SFTConfig, "train_sft")
    out = Path(out_dir)
    refuse_overwriting_run(out, model_dir, "sft")
    check_report_to(cfg.report_to)
    with main_process_lock(out), naming_failed_saves(out), input_snapshot(data) as source:
        return _train_sft(source, model_dir, out, cfg)


def _train_sft(source: Snapshot, model_dir: str | Path, out: Path, cfg: SFTConfig) -> Path:
    """The run's checks, which import neither torch nor transformers (a mistake is reported at once), then the
    training, which leaves the caller's generators and threads as they were."""
    data = source.name
    made_from = run_inputs(source, model_dir, cfg)
    if finished(out, cfg, made_from, CONFIG_FILE, "sft"):
        if is_main_process():
            drop_leftovers(out)  # what a kill after the mark left
        return out
    trajectories = load_trajectories(source.path)
    if not trajectories:
        raise DataError(str(data), "no trajectories: no training examples")
    if cfg.max_trajectories is not None:
        total = len(trajectories)
        trajectories = limit_trajectories(trajectories, cfg.max_trajectories, cfg.seed)
        log.info("limited supervision: %d of %d trajectories (max_trajectories=%g)", len(trajectories), total,
                 cfg.max_trajectories)
    check_causal_lm_folder(model_dir)
    with keeping_caller_state():
        _fit(trajectories, data, model_dir, out, cfg, made_from)
    return out


def _fit(trajectories: Sequence[Trajectory], data: str, model_dir: str | Path, out: Path, cfg: SFTConfig,
         made_from: dict[str, Any]) -> None:
    """Train on the checked trajectories and save the model to ``out`` (torch and transformers load here)."""
    from trl import SFTConfig as TRLConfig

    from .trainer_parts import MetricsLog, SaveAtEpochEnd, training_arguments

    model, tokenizer = load_causal_lm(model_dir)
    train_idx, val_idx = split_indices(len(trajectories), cfg.val_fraction, cfg.seed)
    train = _encode_all(tokenizer, trajectories, train_idx, cfg.max_length, data)
    val = sorted(_encode_all(tokenizer, trajectories, val_idx, cfg.max_length, data), key=lambda e: len(e[0]))
    if not train:
        raise DataError(str(data), f"no training examples ({len(trajectories)} trajectories, {len(train_idx)} "
                                   f"left for training with val_fraction={cfg.val_fraction})")
    labelled = sum(_labelled(e) for e in train)
    if not labelled:  # the loss would be 0 at every step and the base model saved as a finished run
        raise DataError(str(data), f"no agent-turn token to train on within max_length={cfg.max_length} "
                                   f"({len(train)} sequences); raise max_length")
    out.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        save_yaml(out / CONFIG_FILE, {**to_dict(cfg), **made_from})
    resume = prepare_resume(out)
    log.info("SFT: %d train / %d val trajectories (%d / %d sequences, %d labelled train tokens)",
             len(train_idx), len(val_idx), len(train), len(val), labelled)
    args = TRLConfig(**training_arguments(cfg, out, epochs=cfg.epochs, lr=cfg.lr, micro_batch=cfg.micro_batch,
                                          batch_size=cfg.batch_size, seed=cfg.seed, evaluate=bool(val),
                                          gradient_checkpointing=cfg.gradient_checkpointing),
                     eval_on_start=bool(val) and resume is None, max_length=cfg.max_length,
                     dataset_kwargs={"skip_prepare_dataset": True})
    trainer = quiet(_trainer_class()(model=model, args=args, train_dataset=_dataset(train),
                               eval_dataset=_dataset(val) if val else None, processing_class=tokenizer,
                               peft_config=lora_config(cfg) if cfg.lora else None,
                               callbacks=[MetricsLog(out), SaveAtEpochEnd()]))
    with without_misleading_warnings(trainer):
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    save_merged(trainer, model_dir, tokenizer, out, cfg.lora)
    if is_main_process():
        mark_done(out, f"sft {config_hash(cfg)}")
    trainer.accelerator.wait_for_everyone()
