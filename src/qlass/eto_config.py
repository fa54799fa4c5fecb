"""The ETO baseline's options (:class:`ETOConfig`), apart from :mod:`qlass.eto`, which imports the DPO
trainer: ``qlass eto`` and a pipeline's ``eto`` section check them — and report a mistake — without
loading torch first."""

from __future__ import annotations

from dataclasses import dataclass

from .config import build, check_minimums, option, to_dict
from .config_fields import check_field_types
from .eval_worker import MethodRun
from .rollouts import TASK_SOURCES
from .search import GreedyConfig, SampleConfig
from .training.configs import DPOConfig

MAX_ITERATIONS = 100
"""Most explore-train rounds: each fine-tunes a model, so a larger value is a typo, not a setting."""


@dataclass(frozen=True)
class ETOConfig:
    """How the ETO baseline explores, pairs and iterates."""

    iterations: int = option(1, "explore-train rounds, each exploring with the previous round's agent (ETO's "
                                "script: 3); may grow on a rerun")
    temperature: float = option(0.0, "exploration temperature (0: greedy, as ETO plays the training tasks; > 0: "
                                     "one sampled episode per task)")
    max_steps: int | None = option(None, "step limit per explored episode (None: the method's 30; in qlass run: "
                                         "eval.max_steps when set)")
    max_new_tokens: int = option(128, "token limit per agent turn")
    min_reward: float = option(1.0, "an explored episode with final reward below this is a failure (1.0: any "
                                    "episode short of full success)")
    rejected_extra_turns: int | None = option(None, "cut a failure to the expert's number of agent turns plus "
                                                    "this many (ETO's code: 5); None: keep the whole failure")
    later_dpo: dict = option({}, "DPO options for rounds 2 and later, on top of the DPO settings (ETO's script: "
                                 "{beta: 0.5, lr: 5.0e-7})")
    split: str = option("train", "split the explored tasks come from")
    tasks: str = option("expert", "which tasks of split are explored: 'expert' (those with a trajectory in the "
                                  "expert data, as ETO explores them: every failure can be paired) or 'split' "
                                  "(all of the split's)")
    limit: int | None = option(None, "at most this many tasks (round-robin over task types; None: all)")

    def __post_init__(self) -> None:
        check_field_types(self)
        check_minimums(self, iterations=1, max_steps=1, limit=1, rejected_extra_turns=0)
        if self.iterations > MAX_ITERATIONS:
            raise ValueError(f"iterations must be <= {MAX_ITERATIONS}, got {self.iterations}")
        if self.tasks not in TASK_SOURCES:
            raise ValueError(f"tasks must be one of {', '.join(TASK_SOURCES)}, got {self.tasks!r}")
        if not 0.0 <= self.min_reward <= 1.0:
            raise ValueError(f"min_reward must be in [0, 1], got {self.min_reward}")
        self.explore_run()  # temperature, max_new_tokens checked as the episode checks them

    def explore_run(self) -> MethodRun:
        """The evaluation method every round explores with: greedy at temperature 0, else sample."""
        steps = {} if self.max_steps is None else {"max_steps": self.max_steps}
        if self.temperature == 0.0:
            return MethodRun("greedy", GreedyConfig(max_new_tokens=self.max_new_tokens, **steps))
        return MethodRun("sample", SampleConfig(temperature=self.temperature, max_new_tokens=self.max_new_tokens,
                                                **steps))

    def dpo_for(self, dpo: DPOConfig, round_: int) -> DPOConfig:
        """The DPO settings of round ``round_`` (``later_dpo`` applied from round 2 on)."""
        if round_ == 1 or not self.later_dpo:
            return dpo
        return build(DPOConfig, {**to_dict(dpo), **self.later_dpo}, "later_dpo")
