"""What the trainers share about a run's inputs and folder, without importing torch or transformers (so that
a mistake in a trainer's data or options is reported before they load); what they hand to transformers'
``Trainer`` is in :mod:`.trainer_parts`.

- :class:`~.configs.TrainerConfig` (in :mod:`.configs`, beside each trainer's own options): the
  options every trainer has, mapped onto ``TrainingArguments`` by :func:`.trainer_parts.training_arguments`.
- :func:`input_snapshot` and :func:`run_inputs`: the data as read (its digest) and what else a run is made
  from; :func:`finished` hands back a finished run of the same settings and refuses one of others.
- Checkpoints are the ``Trainer``'s own ``checkpoint-N`` folders (weights, optimizer, scheduler, RNG
  states, trainer state) every ``save_every`` steps and at each epoch end, the last one kept.
  ``trainer_state.json`` is written last, so :func:`last_checkpoint` takes the newest folder that
  has it (a process killed while writing leaves an incomplete one, which is removed), passing over one
  whose trainer state a full disk cut short for the one before it.
- :func:`rewind_metrics` drops the ``metrics.jsonl`` records of steps redone after a resume.

Under ``accelerate launch`` every process runs the same function; only the main one (``RANK`` 0)
takes the writer lock and writes files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..config import config_hash, to_dict
from ..errors import DataError, QlassError
from ..jsonl import is_count, read_jsonl, read_once, write_jsonl
from ..locking import refuse_input_being_written, writer_lock
from ..precision import use_autocast
from ..recorded import check_recorded, model_files
from .configs import TrainerConfig

log = logging.getLogger(__name__)
METRICS = "metrics.jsonl"
DONE_MARK = ".qlass-complete"
STATE = "trainer_state.json"


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


def on_cpu(cfg: TrainerConfig) -> bool:
    """Whether a run of ``cfg`` trains on the CPU (asked for, or no CUDA GPU visible)."""
    if cfg.device == "cpu":
        return True
    import torch

    return not torch.cuda.is_available()


def effective_precision(cfg: TrainerConfig) -> str:
    """What a run of ``cfg`` computes in on this machine: ``bf16`` (autocast) or ``fp32`` (no autocast
    asked for, or a CPU without native bf16 or where it is slower, :mod:`qlass.precision`). Recorded with
    the run, so that resuming it where it would compute in the other is refused instead of mixing the two.
    Without autocast (the default) it is answered without importing torch."""
    if not cfg.autocast:
        return "fp32"
    return "bf16" if use_autocast(True, "cpu" if on_cpu(cfg) else "cuda") else "fp32"


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


