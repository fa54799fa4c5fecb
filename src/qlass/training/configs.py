"""The trainers' options (SFT, DPO, QNet, head-only QNet) as plain dataclasses, and the check of their
``report_to``, apart from the trainers themselves, so a command or pipeline checks a config — and reports a
mistake in it — without importing torch or transformers first (seconds saved on every error).
:mod:`.common`, :mod:`.sft`, :mod:`.dpo`, :mod:`.qnet` and :mod:`qlass.qnet_head` use these."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import option
from ..config_fields import check_field_types
from ..errors import QlassError

RANKS = ("q", "advantage", "dueling")
"""What a QNet ranks candidates by (see :mod:`qlass.qnet_loss`)."""


SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
"""A trainer's ``scheduler`` option and the transformers schedule it names (each after ``warmup_ratio``)."""
TRAINER_DEVICES = ("auto", "cpu", "cuda")
"""The devices a Trainer-based run takes (accelerate places the processes of a multi-GPU run)."""


@dataclass(frozen=True)
class TrainerConfig:
    """Settings every trainer shares (SFT, DPO and QNet configs extend it with their own)."""

    warmup_ratio: float = option(0.03, "fraction of steps with linear warmup from 0 (then the scheduler's "
                                 "schedule); a one-step run has none")
    scheduler: str = option("cosine", "learning rate after the warmup: cosine (decays to 0), linear (to 0) or "
                            "constant (ETO's script: constant after warmup_ratio 0.1)", added=True)
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_steps: int | None = option(None, "stop after this many optimizer steps (None: all epochs)")
    lora: bool = option(False, "train LoRA adapters (merged into the weights on save) instead of all weights")
    lora_r: int = option(16, "LoRA rank")
    lora_alpha: int = option(32, "LoRA alpha")
    lora_dropout: float = option(0.05, "LoRA dropout")
    autocast: bool = option(False, "bf16 mixed precision (GPUs; on CPU 1.6-2.2x faster with native bf16, fp32 on CPUs "
                                   "without it or where it is slower; $QLASS_CPU_BF16=on|off overrides)")
    device: str = option("auto", "torch device: auto (a CUDA GPU when visible, else cpu), cpu or cuda (pick GPUs with "
                         "CUDA_VISIBLE_DEVICES; accelerate launch places the processes of a multi-GPU run)",
                         runtime=True)
    threads: int | None = option(None, "torch CPU threads (None: torch's default)", runtime=True)
    grad_clip: float = option(1.0, "gradient norm clip (0: off)")
    save_every: int = option(50, "checkpoint every N optimizer steps (and at each epoch end)")
    report_to: str = option("none", "where the Trainer also reports metrics: none, tensorboard, wandb, all, or a "
                            "comma-separated list (metrics.jsonl is always written)", runtime=True)

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.save_every < 1 or self.lora_r < 1:
            raise ValueError(f"save_every and lora_r must be >= 1, got {self.save_every} and {self.lora_r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or null, got {self.max_steps}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.device not in TRAINER_DEVICES:
            raise ValueError(f"device must be one of {', '.join(TRAINER_DEVICES)}, got {self.device!r} (pick GPUs "
                             "with CUDA_VISIBLE_DEVICES or accelerate launch)")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or null, got {self.threads}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError(f"grad_clip and weight_decay must be >= 0, got {self.grad_clip} and {self.weight_decay}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")


def _check_sequence_options(cfg: SFTConfig | DPOConfig) -> None:
    """The checks SFT and DPO share: sizes of at least 1 and a held-out fraction in [0, 1)."""
    for name in ("epochs", "batch_size", "micro_batch", "max_length"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")


@dataclass(frozen=True)
class SFTConfig(TrainerConfig):
    """SFT settings; defaults are the paper's (Table 5), CPU runs override them in YAML."""

    epochs: int = option(3, "passes over the training data")
    lr: float = option(1e-5, "peak learning rate")
    batch_size: int = option(64, "effective batch size (sequences per optimizer step, over all processes)")
    micro_batch: int = option(2, "sequences per forward pass (per process); the passes of a batch_size are accumulated")
    max_length: int = option(4096, "longest sequence in tokens; longer conversations are windowed, oldest turns "
                                   "dropped first")
    val_fraction: float = option(0.1, "fraction of trajectories held out for the validation loss")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass: about half the peak "
                                          "memory (SmolLM2, 2 x 2048 tokens: 6.4 -> 3.3 GB) for more compute",
                                          runtime=True)
    max_trajectories: float | None = option(
        None, "limited supervision (paper Table 3): train on at most this many trajectories (a whole number >= 1; "
              "1 or 1.0 is one) or this fraction of them (0 < x < 1): a seeded subset spread evenly, not in "
              "proportion, over task types", added=True)
    seed: int = option(0, "seed for the split, batch order and initialisation")

    def __post_init__(self) -> None:
        super().__post_init__()
        cap = self.max_trajectories
        if cap is not None and not (0 < cap < 1 or (cap >= 1 and float(cap).is_integer())):
            raise ValueError(f"max_trajectories must be a whole number >= 1 or a fraction in (0, 1), got {cap}")
        _check_sequence_options(self)
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class DPOConfig(TrainerConfig):
    """DPO settings (TRL's sigmoid loss)."""

    epochs: int = option(3, "passes over the training pairs")
    lr: float = option(1e-6, "peak learning rate")
    beta: float = option(0.1, "DPO beta: the strength of the pull toward the reference (starting) model")
    batch_size: int = option(32, "pairs per optimizer step, over all processes")
    micro_batch: int = option(1, "pairs per forward pass per process (each pair is two sequences)")
    max_length: int = option(4096, "longest side of a pair in tokens; a longer pair is an error naming it")
    val_fraction: float = option(0.1, "fraction of pairs held out; evaluation reports the DPO loss, reward "
                                      "accuracy and margin")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass (less memory, more "
                                          "compute)", runtime=True)
    seed: int = option(0, "seed for the split, batch order and initialisation")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_sequence_options(self)
        if self.lr <= 0 or self.beta <= 0:
            raise ValueError(f"lr and beta must be > 0, got {self.lr} and {self.beta}")


@dataclass(frozen=True)
class QNetTrainConfig(TrainerConfig):
    """QNet training settings; defaults follow the paper's reference code, CPU runs override them.
    With ``lora`` the value head is trained in full beside the adapters."""

    epochs: int = option(2, "passes over the training records")
    lr: float = option(2e-5, "peak learning rate")
    head_lr: float | None = option(None, "peak learning rate of the fresh value head (None: lr); an Adam step "
                                   "moves the value by up to head_lr x the hidden state's L1 norm (~750 for "
                                   "SmolLM2), so keep it small")
    batch_size: int = option(64, "records per optimizer step, at least: whole packed paths (with pair_weight > 0, "
                             "all paths through a sibling group with contrast, so its pairs meet) are added until "
                             "the step holds batch_size records from min_trees_per_step trees, so a step may hold "
                             "more; the loss is the mean over its records (paper: 64 records)")
    min_trees_per_step: int = option(4, "distinct trees an optimizer step draws records from, at least (capped at "
                                     "the number of training trees), so no step pulls toward one tree's outcome")
    rank: str = option("q", "q: regress the value at the action's last token (Q) on q, rank by Q; advantage: also "
                       "regress the value at the history's last token (V) on the state's value (its sibling "
                       "group's mean q), rank by Q - V; dueling: regress Q - V on q minus that mean and V on the "
                       "mean, so lone records teach the ranking score nothing (see qlass.qnet_loss)")
    pair_weight: float = option(0.0, "weight of a Bradley-Terry loss over sibling pairs with different targets "
                                "(mean over the step's pairs), added to the regression; 0: off")
    select_best: bool = option(False, "keep the epoch with the best validation sibling-pair accuracy (ties: lower "
                               "MSE; no pairs: lowest MSE) instead of the last one")
    max_length: int = option(4096, "longest input in tokens (history + action); oldest turns dropped first")
    max_action_tokens: int = option(256, "tokens reserved for the candidate action (longer ones keep their end)")
    val_fraction: float = option(0.1, "fraction of trees held out for validation (cross-validation ignores it)")
    eval_before: bool = option(True, "also validate the untrained QNet (epoch 0)")
    baseline: bool = option(True, "rank the validation siblings by the SFT policy's log-likelihood too")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass (less memory for long "
                                          "rows, more compute)", runtime=True)
    seed: int = option(0, "seed for the split, batching and head initialisation")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.epochs < 1 or self.batch_size < 1 or self.min_trees_per_step < 1:
            raise ValueError("epochs, batch_size and min_trees_per_step must be >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.lr <= 0 or (self.head_lr is not None and self.head_lr <= 0):
            raise ValueError(f"lr and head_lr must be > 0, got {self.lr} and {self.head_lr}")
        if self.rank not in RANKS:
            raise ValueError(f"rank must be one of {', '.join(RANKS)}, got {self.rank!r}")
        if self.pair_weight < 0:
            raise ValueError(f"pair_weight must be >= 0, got {self.pair_weight}")
        if not 1 <= self.max_action_tokens < self.max_length:
            raise ValueError(f"max_action_tokens must be >= 1 and below max_length, got {self.max_action_tokens} "
                             f"and {self.max_length}")


@dataclass(frozen=True)
class QNetHeadConfig:
    """Options of ``qlass train-qnet-head``."""

    l2: list[float] = option([0.1, 1.0, 10.0, 100.0, 1000.0], "ridge strengths tried (the best by "
                             "cross-validated pair accuracy is kept)")
    contrast: list[bool] = option([True, False], "fit on sibling contrasts (true), on the plain records (false), "
                                  "or try both")
    folds: int = option(5, "folds of the cross-validation by tree that picks l2 and contrast")
    max_length: int = option(2048, "longest input in tokens (history + action); oldest turns dropped first")
    max_action_tokens: int = option(96, "tokens reserved for the candidate action")
    autocast: bool = option(True, "compute features under bf16 autocast (the saved QNet scores so too)")
    cache_slots: int = option(8, "histories whose caches are kept while computing features")
    threads: int | None = option(None, "torch threads (None: torch's default)")
    seed: int = option(0, "seed of the fold split and the bootstrap")

    def __post_init__(self) -> None:
        check_field_types(self)
        object.__setattr__(self, "l2", [float(x) for x in self.l2])  # frozen: set once, then checked
        object.__setattr__(self, "contrast", [bool(x) for x in self.contrast])
        if not self.l2 or min(self.l2) <= 0:
            raise QlassError(f"qnet-head: l2 needs positive strengths, got {list(self.l2)}")
        if not self.contrast:
            raise QlassError("qnet-head: contrast needs at least one of true, false")
        if self.folds < 2:
            raise QlassError(f"qnet-head: folds must be >= 2, got {self.folds}")
        if self.max_action_tokens < 1 or self.max_length <= self.max_action_tokens:
            raise QlassError("qnet-head: need 1 <= max_action_tokens < max_length")
        if self.cache_slots < 0:
            raise QlassError(f"qnet-head: cache_slots must be >= 0, got {self.cache_slots}")
        if self.threads is not None and self.threads < 1:
            raise QlassError(f"qnet-head: threads must be >= 1 or null, got {self.threads}")
        if self.seed < 0:
            raise QlassError(f"qnet-head: seed must be >= 0, got {self.seed}")


def check_report_to(report_to: str) -> None:
    """Raise :class:`QlassError` unless ``report_to`` is ``none``, ``all`` or a comma-separated list of
    reporting integrations this transformers knows and finds installed (else transformers refuses it only
    once the model has loaded, with a traceback). ``none`` and ``all`` are answered without importing it."""
    names = [name.strip() for name in report_to.split(",")]
    if names in (["none"], ["all"]):
        return
    for name in names:  # answered before transformers (and torch with it) is imported
        if name in ("none", "all"):
            raise QlassError(f"report_to: {name!r} stands alone, not in a list ({report_to!r})")
        if not name:
            raise QlassError(f"report_to: an empty name in {report_to!r}")
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    for name in names:
        if name not in INTEGRATION_TO_CALLBACK:
            raise QlassError(f"report_to: unknown integration {name!r}; this transformers knows "
                             f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))} (or none, all)")
    for name in names:
        if name not in get_available_reporting_integrations():
            raise QlassError(f"report_to: {name!r} is not installed (pip install the package it reports to)")
