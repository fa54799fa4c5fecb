"""What :meth:`qlass.qnet.QNet.load` takes and reads before it loads a model: its parameters
(:func:`qnet_load_options`), the folder (:func:`check_qnet_folder`) and its ``qnet.json`` (:func:`read_qnet_meta`,
:func:`qnet_calibrated`). None of these imports torch up front, so a command that checks them first reports a
misspelt option, a missing folder or a damaged ``qnet.json`` in a fraction of a second."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import QlassError
from .file_checks import require_model_folder
from .jsonl import read_json_object

META_FILE = "qnet.json"
"""The QNet folder's input settings (max_length, max_action_tokens, rank, autocast...), beside the model."""


def qnet_load_options(path: str | Path, dtype: str = "float32", autocast: bool | None = None,
                      threads: int | None = None, max_length: int | None = None, device: str = "auto",
                      cache_slots: int = 0) -> None:
    """The parameters of :meth:`~qlass.qnet.QNet.load` (documented there), readable without importing torch.
    A test keeps them equal to the method's."""


def read_qnet_meta(path: str | Path) -> dict[str, Any]:
    """The ``qnet.json`` of QNet folder ``path`` (empty when it has none); a damaged one is a
    :class:`~qlass.errors.DataError` naming it."""
    meta = Path(path) / META_FILE
    return read_json_object(meta) if meta.exists() else {}


def check_qnet_folder(path: str | Path) -> None:
    """Raise :class:`QlassError` unless ``path`` holds a model of one output (a QNet), without loading its
    weights: a command checks it before it makes its output folder. A folder without ``config.json`` is refused
    before transformers (and torch) are imported to read the number of outputs."""
    path = Path(path)
    require_model_folder(path, f"{path}: not a QNet folder (no config.json)")
    from transformers import AutoConfig

    labels = AutoConfig.from_pretrained(path).num_labels
    if labels != 1:
        raise QlassError(f"{path}: not a QNet folder (a QNet has exactly one output; this model has "
                         f"num_labels={labels}: an SFT or other model folder?)")


def qnet_calibrated(path: str | Path) -> bool:
    """Whether the QNet folder's values estimate outcomes (``qnet.json``'s ``calibrated``, true unless
    recorded false: a head-only fit has no offset, so its values rank but sit beside no reward)."""
    return read_qnet_meta(path).get("calibrated", True) is not False
