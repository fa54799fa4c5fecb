"""Output folders of the trainers (``sft``, ``dpo``, ``train-qnet``, ``train-qnet-head``) and of the commands
that put trained agents in subfolders (``rft``, ``self-train``, ``eto``): what each refuses to write into, and how
a finished run is marked and its checkpoints dropped."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from ..errors import QlassError
from ..jsonl import write_text_atomic
from .common import DONE_MARK, checkpoint_dirs

RUN_FILES = {"sft_config.yaml": "sft", "dpo_config.yaml": "dpo", "qnet_config.yaml": "qnet",
             "features.settings.json": "qnet-head"}
"""The file each trainer writes into its output folder before anything else, and the trainer it names."""
RUN_DATA = {"records.jsonl": "an evaluation run", "trees.jsonl": "exploration trees"}
"""The files of the commands whose output folders hold data, not a model, and what they are."""
RUN_NAMES = {"sft": "an SFT run (qlass sft)", "dpo": "a DPO run (qlass dpo)", "qnet": "a QNet run (qlass train-qnet)",
             "qnet-head": "a head-only QNet (qlass train-qnet-head)"}


def refuse_overwriting_run(out: Path, model_dir: str | Path, kind: str) -> None:
    """Raise :class:`QlassError` when the output folder ``out`` of a ``kind`` trainer (a key of
    :data:`RUN_NAMES`) would overwrite what it holds: the model the run starts from, another trainer's
    run (its settings file or finished mark), an evaluation or exploration trees, or a model folder no
    trainer run made (``config.json`` without this trainer's settings file)."""
    model = Path(model_dir)
    if out.exists() and model.exists() and out.samefile(model):
        raise QlassError(f"{out}: is also the model this run starts from (--model); training would overwrite it "
                         "(give another output folder)")
    if not out.is_dir():
        return
    this = RUN_NAMES[kind].split(" ", 1)[1]
    for name, other in RUN_FILES.items():
        if other != kind and (out / name).exists():
            raise QlassError(f"{out}: holds {RUN_NAMES[other]} ({name}), which this {this} would overwrite or mix "
                             "with; use a new output folder")
    data = next((name for name in RUN_DATA if (out / name).exists()), None)
    if data is not None:
        raise QlassError(f"{out}: holds {RUN_DATA[data]} ({data}); this {this} would write its model among its files: "
                         "use a new output folder")
    if model.exists() and out.resolve() in model.resolve().parents:
        raise QlassError(f"{out}: holds the model this run starts from ({model}); training would delete or "
                         "overwrite it (give another output folder)")
    mark = (out / DONE_MARK).read_text().split() if (out / DONE_MARK).is_file() else []
    if (out / DONE_MARK).exists() and not mark:
        raise QlassError(f"{out}: holds an empty {DONE_MARK}, which no qlass run wrote; use a new output folder")
    if mark and mark[0] != kind:
        made_by = RUN_NAMES.get(mark[0], f"a finished {mark[0]!r} run")
        raise QlassError(f"{out}: holds {made_by} ({DONE_MARK}); use a new output folder")
    own = next(name for name, other in RUN_FILES.items() if other == kind)
    if (out / "config.json").exists() and not (out / own).exists():
        raise QlassError(f"{out}: holds a model (config.json) that no {this} made ({own} is missing); training "
                         "would overwrite it (give another output folder)")
    steps = checkpoint_dirs(out)
    others = sorted(p.name for p in out.glob("checkpoint-*") if p.is_dir() and p not in steps)
    if others:  # transformers' checkpoint rotation deletes every checkpoint-* folder
        raise QlassError(f"{out}: holds {others[0]}, which the Trainer's checkpoint rotation would delete; move it "
                         "or give another output folder")
    if steps and not (out / own).exists():
        raise QlassError(f"{out}: holds checkpoints ({steps[0].name}) that no {this} made ({own} is missing); "
                         "training would delete or resume them (give another output folder)")


def refuse_foreign_folder(out: Path, command: str) -> None:
    """Raise :class:`QlassError` when ``out``, the output folder of ``command`` (``rft``, ``self-train``,
    ``eto``: each writes its agents into subfolders), holds what another command wrote at its top: a model
    (``config.json``), a trainer's run, an evaluation (``records.jsonl``) or exploration trees."""
    if not out.is_dir():
        return
    found = {**{name: RUN_NAMES[kind] for name, kind in RUN_FILES.items()}, DONE_MARK: "a finished training run",
             "config.json": "a model", **RUN_DATA}
    name = next((name for name in found if (out / name).exists()), None)
    if name is not None:
        raise QlassError(f"{out}: holds {found[name]} ({name}); qlass {command} writes its data and agents into "
                         "its output folder and would mix them with it: use a new output folder")


def remove_checkpoints(out: Path) -> None:
    """Drop the ``checkpoint-N`` folders and the Trainer's leftovers once the final model is saved."""
    for ckpt in checkpoint_dirs(out):
        shutil.rmtree(ckpt, ignore_errors=True)
    (out / "training_args.bin").unlink(missing_ok=True)


def mark_done(out: Path, mark: str, leftovers: Sequence[str] = ()) -> None:
    """Mark the run in ``out`` finished (``DONE_MARK`` holding ``mark``), then drop its checkpoints and the
    folders named in ``leftovers``: the other way round, a kill while they were removed (gigabytes of optimizer
    state) left a run with neither, which a rerun trained again from step 0. A rerun of a finished run drops
    what such a kill left (:func:`drop_leftovers`)."""
    write_text_atomic(out / DONE_MARK, mark + "\n")
    drop_leftovers(out, leftovers)


def drop_leftovers(out: Path, leftovers: Sequence[str] = ()) -> None:
    """:func:`remove_checkpoints`, and the folders named in ``leftovers``."""
    remove_checkpoints(out)
    for folder in leftovers:
        shutil.rmtree(out / folder, ignore_errors=True)
