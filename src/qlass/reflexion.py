"""The Reflexion baseline (Shinn et al., 2023): verbal self-reflection between trials of one task.

    trial 1: play the task ─► failed? ─► the policy reflects on its trial (a few sentences)
    trial 2: play again from reset, the reflections so far added to the task ─► ... up to ``trials``

Unlike every other method here, Reflexion plays a task *several times* and reads the environment's
success signal between trials (not within one): a trial whose reward reaches ``success`` ends the
episode, else a reflection is asked for. Its table row is therefore labelled with its trial count,
``reflexion(trials=3)``, and its record counts the tokens and environment steps of every trial and
every reflection, so budget comparisons see what it spent. The recorded trajectory is the last
trial's (the one that succeeded, or the last attempt); ``meta["trials"]`` keeps each trial's reward,
steps, tokens and the reflection that followed it.

Reflections are the policy's own text for the conversation of the failed trial followed by
:data:`REFLECT_PROMPT`; the last ``memory`` of them are appended to the task turn of the next trial
under :data:`MEMORY_HEADER` (Reflexion keeps up to three). Any policy backend works; a small SFT
model trained only to act writes poor reflections, which is part of what the baseline measures.
Step ``t`` of trial ``k`` draws from ``stable_seed(ctx.seed, "reflexion", k) + t`` and the reflection
after trial ``k`` from ``stable_seed(ctx.seed, "reflexion-note", k)``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .agent import EpisodeConfig, SearchContext, finish, play, start_messages
from .config import option
from .config_fields import check_field_types
from .errors import QlassError
from .lockstep import Episode, Sample
from .seeding import stable_seed
from .types import Message, Step, Task, Trajectory

REFLECT_PROMPT = ("You did not complete the task. In two or three sentences, explain what went wrong and "
                  "what you will do differently in your next attempt at the same task.")
MEMORY_HEADER = "Reflections on your earlier attempts at this task:"


MAX_TRIALS = 100
"""Most attempts per task: a larger value is a typo that would replay a failing task until stopped."""


@dataclass(frozen=True)
class ReflexionConfig:
    """Up to ``trials`` attempts at a task, a self-reflection after each failed one."""

    trials: int = option(3, "attempts per task (1: the plain agent; at most 100)")
    success: float = option(1.0, "a trial whose final reward is at least this ends the episode (0 to 1, 0 excluded)")
    memory: int = option(3, "most recent reflections shown to a trial")
    temperature: float = option(0.0, "sampling temperature of the actions")
    max_steps: int = option(30, "step limit per trial")
    max_new_tokens: int = option(128, "token limit per agent turn")
    reflection_tokens: int = option(128, "token limit of a reflection")

    def __post_init__(self) -> None:
        check_field_types(self)
        EpisodeConfig(self.max_steps, self.temperature, self.max_new_tokens)
        if self.trials < 1 or self.memory < 1 or self.reflection_tokens < 1:
            raise ValueError("trials, memory and reflection_tokens must be >= 1")
        if self.trials > MAX_TRIALS:
            raise ValueError(f"trials must be <= {MAX_TRIALS}, got {self.trials}")
        if not 0.0 < self.success <= 1.0:
            raise ValueError(f"success must be in (0, 1] (rewards are in [0, 1]), got {self.success}")

    def label(self) -> str:
        """``reflexion(trials=3)``, with every other option that changes the play named when not at its
        default: ``reflexion(trials=3,memory=1,temperature=0.7)``."""
        extra = [f"{f.name}={getattr(self, f.name):g}" for f in fields(self)
                 if f.name in ("success", "memory", "temperature") and getattr(self, f.name) != f.default]
        return f"reflexion({','.join([f'trials={self.trials}', *extra])})"


def with_memory(messages: list[Message], reflections: list[str], memory: int) -> list[Message]:
    """``messages`` (a trial's opening) with the last ``memory`` (>= 1) reflections appended to its task turn."""
    if isinstance(memory, bool) or not isinstance(memory, int) or memory < 1:  # 0 kept them all ([-0:])
        raise QlassError(f"with_memory: memory must be a whole number >= 1, got {memory!r}")
    if not reflections:
        return messages
    if not messages:
        raise QlassError("with_memory: no messages, so no task turn to append the reflections to")
    notes = "\n".join(f"- {r}" for r in reflections[-memory:])
    return messages[:-1] + [Message("user", f"{messages[-1].content}\n\n{MEMORY_HEADER}\n{notes}")]


def reflexion_episode(task: Task, ctx: SearchContext, cfg: ReflexionConfig) -> Episode[Trajectory]:
    """Play ``task`` up to ``cfg.trials`` times with reflections between failed trials (see the module)."""
    ep = EpisodeConfig(cfg.max_steps, cfg.temperature, cfg.max_new_tokens)
    reflections: list[str] = []
    trials: list[dict[str, Any]] = []
    totals = {"prompt_tokens": 0, "completion_tokens": 0, "env_steps": 0}
    while True:
        k = len(trials)
        messages = with_memory(start_messages(ctx.env, task), reflections, cfg.memory)
        steps: list[Step] = []
        yield from play(ctx.env, messages, steps, ep, seed=stable_seed(ctx.seed, "reflexion", k))
        traj = finish(task, messages, steps)
        trial = {"reward": traj.reward, "success": traj.reward >= cfg.success, "env_steps": len(steps),
                 "prompt_tokens": traj.prompt_tokens, "completion_tokens": traj.completion_tokens}
        totals["prompt_tokens"] += traj.prompt_tokens
        totals["completion_tokens"] += traj.completion_tokens
        totals["env_steps"] += len(steps)
        trials.append(trial)
        if trial["success"] or len(trials) == cfg.trials:
            break
        (outs,) = yield Sample([messages + [Message("user", REFLECT_PROMPT)]], 1, 0.0, cfg.reflection_tokens,
                               [stable_seed(ctx.seed, "reflexion-note", k)])
        note = outs[0]
        reflections.append(" ".join(note.text.split()))
        trial.update(reflection=reflections[-1], reflection_prompt_tokens=note.prompt_tokens,
                     reflection_completion_tokens=note.completion_tokens)
        totals["prompt_tokens"] += note.prompt_tokens
        totals["completion_tokens"] += note.completion_tokens
    traj.meta.update(trials=trials, **totals)
    return traj
