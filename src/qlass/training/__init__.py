"""Training on transformers' Trainer and TRL: SFT (:mod:`.sft`), DPO (:mod:`.dpo`), the QNet (:mod:`.qnet`); shared
plumbing in :mod:`.common`."""
