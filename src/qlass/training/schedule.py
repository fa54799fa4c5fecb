"""The learning-rate schedule of every trainer: transformers' linear warmup, then the config's
``scheduler`` (cosine decay by default; linear decay, or constant as ETO's script runs DPO).

Its warmup starts at learning rate 0, and ``warmup_ratio`` rounds up to at least one step: a run of
a single optimizer step would take it at 0 and never change the weights (a one-step ``--max-steps``
smoke test, or a fold of ``train-qnet --folds`` on little data). :class:`WarmupWithinRun` gives such
a run no warmup; every longer run keeps transformers' schedule unchanged.
"""

from __future__ import annotations

from typing import Any


class WarmupWithinRun:
    """Mixin for a ``Trainer`` subclass (listed before it): a warmup as long as the run is dropped."""

    args: Any
    lr_scheduler: Any

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        if self.lr_scheduler is None and self.args.get_warmup_steps(num_training_steps) >= num_training_steps:
            self.args.warmup_steps = 0
        return super().create_scheduler(num_training_steps, optimizer)  # type: ignore[misc]
