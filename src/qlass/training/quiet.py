"""What the trainers leave out of their output: the callbacks that print every log to stdout, TRL's model card
and usage report, and two transformers warnings that read as damage where there is none."""

from __future__ import annotations

import ast
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

_MISSING_KEYS = "There were missing keys in the checkpoint model loaded: "


class _NotMisleading(logging.Filter):
    """Drops two warnings of transformers' that read as damage where there is none: a resumed checkpoint
    "missing" the output weights tied to the input embeddings (the checkpoint holds those, and loading them
    restores both), and checkpoint times too close to order by (it orders them by step, as qlass does)."""

    def __init__(self, tied: set[str]) -> None:
        super().__init__()
        self.tied = tied

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("mtime may not be reliable"):
            return False
        if not message.startswith(_MISSING_KEYS):
            return True
        try:
            missing = set(ast.literal_eval(message[len(_MISSING_KEYS):].rstrip(".")))
        except (ValueError, SyntaxError, TypeError):
            return True
        return not (missing and missing <= self.tied)


def tied_parameter_names(model: Any) -> set[str]:
    """The names of ``model``'s parameters that share their tensor with one named before them (tied weights,
    such as ``lm_head.weight`` with tied embeddings)."""
    first: dict[int, str] = {}
    tied = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied.add(name)
        first.setdefault(id(param), name)
    return tied


@contextlib.contextmanager
def without_misleading_warnings(trainer: Any) -> Iterator[None]:
    """Run ``trainer`` (its ``train()``) without the warnings :class:`_NotMisleading` drops."""
    loggers = [logging.getLogger(name) for name in ("transformers.trainer", "transformers.trainer_utils")]
    dropped = _NotMisleading(tied_parameter_names(trainer.model))
    for logger in loggers:
        logger.addFilter(dropped)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(dropped)


class NoModelCard:
    """Mixin for a TRL trainer (listed before it): no ``README.md`` model card in the run folder. TRL writes one
    at every checkpoint, naming no base model ("a fine-tuned version of [None]"); the folder's files are
    formats.md's."""

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        return None


class NoTelemetry:
    """Mixin for a TRL trainer (listed before it): no usage report to huggingface.co. TRL's trainers send one
    when they are made (the model's architecture, the device, the world size) unless ``HF_HUB_DISABLE_TELEMETRY``
    is set; qlass runs on machines that reach no hub and sends nothing anywhere."""

    def _send_telemetry(self) -> None:
        return None


def quiet(trainer: Any) -> Any:
    """``trainer`` without the callbacks that print every log to stdout (:class:`~.trainer_parts.MetricsLog` logs)."""
    from transformers import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer
