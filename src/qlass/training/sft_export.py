"""``qlass sft-export``: the latest checkpoint of an SFT run in training as a plain HF model folder,
e.g. to evaluate the run before it ends."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import DataError, QlassError
from ..locking import writer_lock
from ..policy.loading import load_causal_lm
from .common import checkpoint_step, last_checkpoint

ADAPTER = "adapter_config.json"
"""What a LoRA run's checkpoint holds in place of full weights' config (peft's file)."""
EXPORT_RECORD = "sft_checkpoint.json"
"""What :func:`export_checkpoint` writes beside the exported model: the run and the step."""


def export_checkpoint(run_dir: str | Path, model_dir: str | Path, dest: str | Path) -> int:
    """Write the latest checkpoint of the SFT run in ``run_dir`` (or a ``checkpoint-N`` folder) as a
    plain HF causal-LM folder at ``dest``, e.g. to evaluate a run before it ends; ``model_dir`` is the
    run's base model (needed for a LoRA run). Returns the checkpoint's step."""
    run = Path(run_dir)
    ckpt = last_checkpoint(run)
    if ckpt is None:
        raise QlassError(f"{run}: no SFT checkpoint here")
    dest = Path(dest).resolve()  # '.' has no name to put a temporary folder beside; a link names its target
    _check_export_dest(dest, ckpt.parent if ckpt == run else run, Path(model_dir))
    step = checkpoint_step(ckpt)  # before the model loads: a damaged trainer state is named at once
    with writer_lock(dest, folder=True, beside=True):  # two exports to one dest would share its .tmp folder
        if (ckpt / ADAPTER).exists():
            _check_adapter(ckpt / ADAPTER)
            from peft import PeftModel

            base, tokenizer = load_causal_lm(model_dir)
            model = PeftModel.from_pretrained(base, ckpt).merge_and_unload()
        else:
            model, tokenizer = load_causal_lm(ckpt)
        tmp = dest.with_name(f".{dest.name}.tmp")  # a killed export leaves no half-written model at dest
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / EXPORT_RECORD).write_text(json.dumps({"run": str(run.resolve()), "step": step}) + "\n")
        old = dest.with_name(f".{dest.name}.old")  # the earlier export, set aside whole before it is removed
        shutil.rmtree(old, ignore_errors=True)
        if dest.exists():
            dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    return step


def _check_adapter(path: Path) -> None:
    """A LoRA checkpoint's adapter config that peft cannot read is a DataError naming it (was peft's
    ``KeyError: 'peft_type'`` or a JSON traceback, after the base model had loaded)."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        config = None
    if not isinstance(config, dict) or not isinstance(config.get("peft_type"), str):
        raise DataError(str(path), "not a LoRA adapter config (a JSON object with a 'peft_type'); the checkpoint is "
                                   "damaged (delete the folder to use the one before it)")


def _check_export_dest(dest: Path, run: Path, model_dir: Path) -> None:
    """Refuse an export destination that would overwrite what it should not: the run folder or a folder
    inside it, the base model, or any folder that is neither empty nor an earlier export."""
    if dest == run.resolve() or run.resolve() in dest.parents:  # dest is resolved
        raise QlassError(f"{dest}: is inside the SFT run {run} (its checkpoints would be overwritten or mixed); "
                         "export to a folder outside it")
    if dest.exists() and model_dir.exists() and dest.samefile(model_dir):
        raise QlassError(f"{dest}: is the run's base model (--model); exporting would overwrite it")
    if dest.exists() and not dest.is_dir():
        raise QlassError(f"{dest}: is a file, not a folder to export the model to")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / EXPORT_RECORD).exists():
        raise QlassError(f"{dest}: holds other files and no {EXPORT_RECORD} (not an earlier export); export to a "
                         "new or empty folder")
