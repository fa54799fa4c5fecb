"""The episode loop shared by evaluation, exploration and inference: policy + env → trajectory.

Conversation layout (what SFT trains on and what every policy reads)::

    env.prompt()                      instruction + one-shot example (fixed prefix)
    user:      <first observation>    task description + initial observation (env.reset)
    assistant: Thought: ...\\nAction: ...
    user:      Observation: <text>    (observation_message)
    ...

``StepResult.reward`` is the task's current score in [0, 1]; a trajectory's reward is the score at
its last step, and it succeeded when that score is 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from .envs.base import Env, parse_action
from .policy.base import Policy
from .types import Completion, History, Message, Step, Task, Trajectory

SUCCESS_THRESHOLD = 1.0 - 1e-9


@dataclass(frozen=True)
class EpisodeConfig:
    """How one episode is played."""

    max_steps: int = 30
    temperature: float = 0.0
    max_new_tokens: int = 128

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


Chooser = Callable[[History, list[Completion]], int]
"""Picks which of a step's candidate completions to execute (index); used by guided search."""


def observation_message(observation: str) -> Message:
    """The user turn that reports an environment observation to the agent."""
    return Message("user", f"Observation: {observation}")


def start_messages(env: Env, task: Task) -> list[Message]:
    """Reset ``env`` on ``task`` and return the opening conversation (prefix + first observation)."""
    first = env.reset(task)
    return list(env.prompt()) + [Message("user", first)]


def apply_output(env: Env, messages: list[Message], steps: list[Step], completion: Completion,
                 qnet_tokens: int = 0) -> Step:
    """Execute one agent output in ``env``, appending the turn to ``messages`` and ``steps``."""
    result = env.step(completion.text)
    step = Step(
        output=completion.text,
        action=parse_action(completion.text),
        observation=result.observation,
        reward=float(result.reward),
        done=bool(result.done),
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        qnet_tokens=qnet_tokens,
    )
    messages.append(Message("assistant", completion.text))
    messages.append(observation_message(result.observation))
    steps.append(step)
    return step


def episode_running(steps: Sequence[Step], max_steps: int) -> bool:
    """Whether an episode goes on: under ``max_steps`` steps and its last step did not end it."""
    return len(steps) < max_steps and not (steps and steps[-1].done)


def continue_episode(
    env: Env,
    policy: Policy,
    messages: list[Message],
    steps: list[Step],
    cfg: EpisodeConfig,
    seed: int | None = None,
) -> None:
    """Play from the env's current state until done or ``cfg.max_steps``; extends the lists in place.

    Each step's sampling seed is ``seed + step index`` so a rollout is reproducible.
    """
    while episode_running(steps, cfg.max_steps):
        step_seed = None if seed is None else seed + len(steps)
        completion = policy.sample([messages], 1, cfg.temperature, cfg.max_new_tokens, seed=step_seed)[0][0]
        apply_output(env, messages, steps, completion)


def finish(task: Task, messages: list[Message], steps: Sequence[Step], **meta: object) -> Trajectory:
    """Wrap a played episode as a :class:`Trajectory` (reward = last score)."""
    reward = steps[-1].reward if steps else 0.0
    return Trajectory(
        id=task.id,
        messages=list(messages),
        reward=reward,
        success=reward >= SUCCESS_THRESHOLD,
        task=task.id,
        steps=list(steps),
        meta=dict(meta),
    )


def run_episode(env: Env, policy: Policy, task: Task, cfg: EpisodeConfig, seed: int | None = None) -> Trajectory:
    """Play ``task`` from reset with ``policy`` and return the trajectory."""
    messages = start_messages(env, task)
    steps: list[Step] = []
    continue_episode(env, policy, messages, steps, cfg, seed=seed)
    return finish(task, messages, steps)
