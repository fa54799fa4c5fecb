"""Training on transformers' Trainer and TRL: SFT (:mod:`.sft`), DPO (:mod:`.dpo`); shared plumbing in :mod:`.common`."""
