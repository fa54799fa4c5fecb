"""What :meth:`qlass.qnet.QNet.load` takes and reads before it loads a model, without importing torch: its
parameters (:func:`qnet_load_options`) and the folder's ``qnet.json`` (:func:`read_qnet_meta`). A command
that loads a QNet after other work checks these first, so a misspelt option or a damaged ``qnet.json`` is
reported in a fraction of a second."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
