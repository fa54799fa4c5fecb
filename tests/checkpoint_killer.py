"""A trainer run that kills itself (SIGKILL) right after it saves checkpoint ``step`` (or, with ``before``,
just before it would save it), for the resume tests of the three trainers (SFT, DPO, QNet):
``python -c script(...) DATA MODEL OUT STEP OPTIONS``."""

from __future__ import annotations

_SCRIPT = """
import os, sys
from transformers import Trainer
from {module} import {config}, {train}
original = Trainer._save_checkpoint
def save_then_die(self, model, trial):
    if {before} and self.state.global_step == int(sys.argv[4]):
        os.kill(os.getpid(), 9)  # SIGKILL: no cleanup, no flush
    original(self, model, trial)
    if self.state.global_step == int(sys.argv[4]):
        os.kill(os.getpid(), 9)
Trainer._save_checkpoint = save_then_die
{train}(sys.argv[1], sys.argv[2], sys.argv[3], {config}(**eval(sys.argv[5])))
"""


def script(module: str, config: str, train: str, before: bool = False) -> str:
    """The ``python -c`` source that runs ``module.train(DATA, MODEL, OUT, config(**OPTIONS))`` and dies
    after saving checkpoint STEP (``before``: as it starts to save it, so no checkpoint is left)."""
    return _SCRIPT.format(module=module, config=config, train=train, before=before)
