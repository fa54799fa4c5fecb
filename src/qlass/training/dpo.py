"""DPO on preference pairs of trajectories, trained by TRL's ``DPOTrainer`` (the building block of the
ETO baseline: a successful and a failed trajectory of one task).

A pair file is a JSON list or JSON Lines of records::

    {"id": "...", "chosen": {trajectory record}, "rejected": {trajectory record}}

where each side is a record of the project's conversation format (:mod:`qlass.data`). Both sides
must start from the same prompt (the messages up to the task turn, :func:`qlass.training.sft.prefix_length`),
hold at least one agent turn after it and differ; when both carry a ``reward``, the chosen one's may
not be lower. Every problem is reported with the file, the record and the field before training.

The log-probabilities DPO compares are summed over the agent turns after the task turn only (end of
turn included), as SFT trains on them: the observations are context, not the policy's output. The
pairs are tokenized here (:func:`qlass.policy.render.encode_conversation`, what the policy reads) and
handed to the trainer with those masks; the reference model is the starting model (for LoRA, the
model with the adapters off).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import config_hash, save_yaml, to_dict
from ..config_fields import require_config
from ..data import ValidationReport, load_placed_records, record_problems, record_to_trajectory
from ..errors import DataError, naming_failed_saves
from ..policy.loading import check_causal_lm_folder, load_causal_lm
from ..types import Message, Trajectory
from .caller_state import keeping_caller_state
from .common import Snapshot, finished, input_snapshot, is_main_process, main_process_lock, prepare_resume, run_inputs
from .configs import DPOConfig, check_report_to
from .quiet import NoModelCard, NoTelemetry, quiet, without_misleading_warnings
from .run_folders import drop_leftovers, mark_done, refuse_overwriting_run
from .schedule import WarmupWithinRun
from .sft import labelled_example, lora_config, prefix_length, save_merged

log = logging.getLogger(__name__)
CONFIG_FILE = "dpo_config.yaml"
SIDES = ("chosen", "rejected")


@dataclass(frozen=True)
class PreferencePair:
    """Two trajectories of one prompt, the chosen one preferred."""

    id: str
    chosen: Trajectory
    rejected: Trajectory


def pair_problems(rec: Any) -> list[str]:
    """Problems of one pair record, each naming the field; empty when the pair is valid training data."""
    if not isinstance(rec, dict):
        return [f"expected a JSON object with 'id', 'chosen' and 'rejected', got {type(rec).__name__}"]
    problems = []
    if isinstance(rec.get("id"), bool) or not isinstance(rec.get("id"), (str, int)) or rec.get("id") == "":
        problems.append("field 'id': missing or not a non-empty string")
    unknown = sorted(set(rec) - {"id", *SIDES})
    if unknown:
        problems.append(f"unknown field(s) {', '.join(map(repr, unknown))} (a pair has 'id', 'chosen', 'rejected')")
    for side in SIDES:
        if side not in rec:
            problems.append(f"field {side!r}: missing")
            continue
        side_rec = rec[side]
        if isinstance(side_rec, dict) and "id" not in side_rec:  # a side needs no id of its own
            side_rec = {**side_rec, "id": f"{rec.get('id')}/{side}"}
        # a rejected side is a failure to move away from: an agent turn without an Action: line is one
        problems += [f"field {side!r}: {p}" for p in record_problems(side_rec, actions=side != "rejected")]
    if problems:
        return problems
    sides = [record_to_trajectory({"id": f"{rec['id']}/{s}", **rec[s]}) for s in SIDES]
    keeps = [prefix_length(t.messages) for t in sides]
    for side, traj, keep in zip(SIDES, sides, keeps):
        if not any(m.role == "assistant" for m in traj.messages[keep:]):
            problems.append(f"field {side!r}: no agent turn after the task turn")
    if sides[0].messages[:keeps[0]] != sides[1].messages[:keeps[1]]:
        problems.append("fields 'chosen' and 'rejected': the prompts (instruction and task turns) differ")
    elif _scored(sides[0].messages) == _scored(sides[1].messages):
        problems.append("fields 'chosen' and 'rejected': the same conversation up to the last agent turn (what "
                        "DPO scores; a last observation is not scored)")
    if "reward" in rec["chosen"] and "reward" in rec["rejected"] and sides[0].reward < sides[1].reward:
        problems.append(f"field 'chosen.reward': {sides[0].reward} is below the rejected one's {sides[1].reward}")
    return problems


def _scored(messages: Sequence[Message]) -> list[Message]:
    """``messages`` up to their last agent turn: what a pair's side is scored on."""
    last = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=-1)
    return list(messages[:last + 1])


def load_pairs(path: str | Path) -> list[PreferencePair]:
    """Read a pair file; :class:`~qlass.errors.DataError` listing every invalid record (file, line of JSON
    Lines or index in a JSON list, field)."""
    p = Path(path)
    raw = load_placed_records(p)
    report = ValidationReport(path=str(p), records=len(raw))
    pairs, seen = [], {}
    for place, rec in raw:
        problems = pair_problems(rec)
        rid = str(rec["id"]) if isinstance(rec, dict) and "id" in rec else None
        if rid is not None and rid in seen:
            problems.append(f"field 'id': duplicate of {seen[rid]}")
        elif rid is not None:
            seen[rid] = place
        if problems:
            label = place + (f" (id {rid!r})" if rid is not None else "")
            report.errors += [f"{p}, {label}: {msg}" for msg in problems]
            report.invalid_records += 1
        else:
            pairs.append(PreferencePair(rid, *(record_to_trajectory({"id": f"{rid}/{s}", **rec[s]}) for s in SIDES)))
    report.raise_if_bad()
    if not pairs:
        raise DataError(str(p), "no preference pairs")
    return pairs


def encode_pair(tokenizer: Any, pair: PreferencePair) -> dict[str, list[int]]:
    """The pair as the trainer's columns: the shared prompt ids, each side's completion ids and its
    mask (1 on the agent turns after the task turn)."""
    sides = []
    for traj in (pair.chosen, pair.rejected):
        keep = prefix_length(traj.messages)
        end = max(i + 1 for i, m in enumerate(traj.messages) if m.role == "assistant")
        ids, labels = labelled_example(tokenizer, traj.messages[:end], keep, 1 << 30)
        sides.append((ids, [int(x != -100) for x in labels]))
    (a, mask_a), (b, mask_b) = sides
    shared = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    start = min(shared, mask_a.index(1), mask_b.index(1))
    return {"prompt_ids": a[:start], "chosen_ids": a[start:], "chosen_mask": mask_a[start:],
            "rejected_ids": b[start:], "rejected_mask": mask_b[start:]}


def pair_length(row: dict[str, list[int]]) -> int:
    """Tokens of the longer side of an encoded pair (:func:`encode_pair`), prompt included: what
    ``max_length`` bounds."""
    return len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))


def _encode_all(tokenizer: Any, pairs: Sequence[PreferencePair], max_length: int, path: str | Path) -> list[dict]:
    rows, too_long = [], []
    for pair in pairs:
        row = encode_pair(tokenizer, pair)
        longest = pair_length(row)
        if longest > max_length:
            too_long.append(f"{path}, pair {pair.id!r}: {longest} tokens > max_length {max_length}")
        rows.append(row)
    if too_long:
        report = ValidationReport(path=str(path), records=len(pairs), errors=too_long, invalid_records=len(too_long))
        report.raise_if_bad()
    return rows


def _trainer_class() -> type:
    """``DPOTrainer`` on pairs tokenized here, its completion mask limited to the agent turns."""
    import torch
    from trl import DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.utils import pad

    class AgentTurnCollator(DataCollatorForPreference):
        def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
            out = super().torch_call(examples)
            masks = [[0] * len(e["prompt_ids"]) + e[f"{side}_mask"] for side in SIDES for e in examples]
            out["completion_mask"] = pad([torch.tensor(m, dtype=torch.long) for m in masks], padding_value=0,
                                         padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of)
            return out

    class PairDPOTrainer(NoModelCard, NoTelemetry, WarmupWithinRun, DPOTrainer):
        def _prepare_dataset(self, dataset: Any, *_: Any, **__: Any) -> Any:
            return dataset  # tokenized by encode_pair

    return PairDPOTrainer, AgentTurnCollator


def train_dpo(pairs: str | Path, model_dir: str | Path, out_dir: str | Path, cfg: DPOConfig) -> Path:
    """Train the causal LM at ``model_dir`` with DPO on the preference pairs in ``pairs``; returns ``out_dir``.

    ``out_dir`` receives a plain HF causal-LM folder, ``metrics.jsonl`` (per step the DPO loss and
    TRL's reward metrics; per epoch the held-out ones: ``val_loss``, ``rewards/accuracies``,
    ``rewards/margins``...) and ``dpo_config.yaml``. Resumes from its last ``checkpoint-N``; a finished
    folder is handed back for the same settings and data, refused otherwise. Runs as it is and under
    ``accelerate launch``.
    """
    require_config(cfg, DPOConfig, "train_dpo")
    out = Path(out_dir)
    refuse_overwriting_run(out, model_dir, "dpo")
    check_report_to(cfg.report_to)
    with main_process_lock(out), naming_failed_saves(out), input_snapshot(pairs) as source:
        return _train_dpo(source, model_dir, out, cfg)


def _train_dpo(source: Snapshot, model_dir: str | Path, out: Path, cfg: DPOConfig) -> Path:
    """The run's checks, which import neither torch nor transformers (a mistake is reported at once), then the
    training, which leaves the caller's generators and threads as they were."""
    path = source.name
    made_from = run_inputs(source, model_dir, cfg)
    if finished(out, cfg, made_from, CONFIG_FILE, "dpo"):
        if is_main_process():
            drop_leftovers(out)  # what a kill after the mark left
        return out
    pairs = load_pairs(source.path)
    check_causal_lm_folder(model_dir)
    with keeping_caller_state():
        _fit(pairs, path, model_dir, out, cfg, made_from)
    return out


def _fit(pairs: Sequence[PreferencePair], path: str, model_dir: str | Path, out: Path, cfg: DPOConfig,
         made_from: dict[str, Any]) -> None:
    """Train on the checked pairs and save the model to ``out`` (torch and transformers load here)."""
    from datasets import Dataset
    from trl import DPOConfig as TRLConfig

    from .trainer_parts import MetricsLog, SaveAtEpochEnd, training_arguments

    model, tokenizer = load_causal_lm(model_dir)
    rows = _encode_all(tokenizer, pairs, cfg.max_length, path)
    order = list(range(len(rows)))
    random.Random(cfg.seed).shuffle(order)
    n_val = min(round(len(rows) * cfg.val_fraction), len(rows) - 1)
    train = [rows[i] for i in sorted(order[n_val:])]
    val = [rows[i] for i in sorted(order[:n_val])]
    out.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        save_yaml(out / CONFIG_FILE, {**to_dict(cfg), **made_from})
    resume = prepare_resume(out)
    log.info("DPO: %d train / %d held-out pairs", len(train), len(val))
    args = TRLConfig(**training_arguments(cfg, out, epochs=cfg.epochs, lr=cfg.lr, micro_batch=cfg.micro_batch,
                                          batch_size=cfg.batch_size, seed=cfg.seed, evaluate=bool(val),
                                          gradient_checkpointing=cfg.gradient_checkpointing),
                     eval_on_start=bool(val) and resume is None, beta=cfg.beta, max_length=None,
                     remove_unused_columns=False)
    trainer_cls, collator_cls = _trainer_class()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = quiet(trainer_cls(model=model, args=args, data_collator=collator_cls(pad_token_id=pad_id),
                                train_dataset=Dataset.from_list(train),
                                eval_dataset=Dataset.from_list(val) if val else None, processing_class=tokenizer,
                                peft_config=lora_config(cfg) if cfg.lora else None,
                                callbacks=[MetricsLog(out), SaveAtEpochEnd()]))
    with without_misleading_warnings(trainer):
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    save_merged(trainer, model_dir, tokenizer, out, cfg.lora)
    if is_main_process():
        mark_done(out, f"dpo {config_hash(cfg)}")
    trainer.accelerator.wait_for_everyone()
