"""The episode loop shared by evaluation, exploration and inference: policy + env → trajectory.

Conversation layout (what SFT trains on and what every policy reads)::

    env.prompt()                      instruction + one-shot example (fixed prefix)
    user:      <first observation>    task description + initial observation (env.reset)
    assistant: Thought: ...\\nAction: ...
    user:      Observation: <text>    (observation_message)
    ...

``StepResult.reward`` is the task's current score in [0, 1]; a trajectory's reward is the score at
its last step, and it succeeded when that score is 1.

An output cut off by the token limit (``Completion.truncated``) is never executed as an action: the
environment receives the text before its unfinished ``Action:`` line and answers as it does any
output without an action (its format hint), so the step counts and the episode goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .config_fields import require_config
from .envs.base import ACTION_RE, Env, env_prompt, env_reset, env_step, parse_action
from .lockstep import Sample, run_one
from .policy.base import Policy
from .types import Completion, History, Message, Step, Task, Trajectory

SUCCESS_THRESHOLD = 1.0 - 1e-9
MAX_SAMPLES = 256
"""Most samples one setting may ask for: candidates per step, trajectories per task, rollouts per
branch or candidate. A larger value is a typo that would stall a run in one enormous policy call."""


def check_sample_counts(**counts: int) -> None:
    """Raise ``ValueError`` for a count above :data:`MAX_SAMPLES` (``m=1000`` → names ``m``)."""
    for name, value in counts.items():
        if value > MAX_SAMPLES:
            raise ValueError(f"{name} must be <= {MAX_SAMPLES}, got {value}")


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


class ValueModel(Protocol):
    """What Q-guided search needs from a QNet: one value per candidate output for a history.

    Optional: ``score_batch(items)`` scores many ``(history, candidates)`` at once; the tokens a call read
    are recorded as QNet tokens when the model sets ``last_item_tokens`` (per item, after ``score_batch``)
    or ``last_tokens`` (after ``score``), as :class:`~qlass.qnet.QNet` does. A model that sets neither is
    recorded as reading 0 tokens, so the report's QNet-token columns do not count it."""

    def score(self, history: History, candidates: Sequence[str]) -> list[float]:
        """Values of ``candidates`` (raw agent outputs) after ``history``."""


@dataclass
class SearchContext:
    """Everything an inference method may use. ``make_env`` builds an auxiliary env (only the oracle
    needs it); ``env_pool(k)`` gives ``k`` environments to play side by side (``env`` first; the
    caller owns and closes them)."""

    env: Env
    policy: Policy
    qnet: ValueModel | None = None
    make_env: Callable[[], Env] | None = None
    seed: int = 0
    env_pool: Callable[[int], list[Env]] | None = None


def observation_message(observation: str) -> Message:
    """The user turn that reports an environment observation to the agent."""
    return Message("user", f"Observation: {observation}")


def start_messages(env: Env, task: Task) -> list[Message]:
    """Reset ``env`` on ``task`` and return the opening conversation (prefix + first observation)."""
    first = env_reset(env, task)
    return env_prompt(env) + [Message("user", first)]


def executed_text(completion: Completion) -> str:
    """What the environment receives for ``completion``: its text, or for a truncated one the text
    before its unfinished ``Action:`` line, the first at the start of a line (no action, so the env
    answers with its format hint)."""
    if not completion.truncated:
        return completion.text
    unfinished = ACTION_RE.search(completion.text)  # the first Action: line, as parse_action reads them
    return completion.text[:unfinished.start() if unfinished else None].rstrip()


def apply_output(env: Env, messages: list[Message], steps: list[Step], completion: Completion,
                 qnet_tokens: int = 0) -> Step:
    """Execute one agent output in ``env`` (see :func:`executed_text`), appending the turn to
    ``messages`` (the output as the agent wrote it) and ``steps``."""
    sent = executed_text(completion)
    result = env_step(env, sent)
    step = Step(
        output=completion.text,
        action=parse_action(sent),
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


def play(env: Env, messages: list[Message], steps: list[Step], cfg: EpisodeConfig,
         seed: int | None = None) -> Generator[Sample, Any, None]:
    """The episode loop as a lockstep generator (:mod:`qlass.lockstep`): from the env's current state
    until done or ``cfg.max_steps``, one :class:`~qlass.lockstep.Sample` per step; extends the lists
    in place. Step ``t`` is seeded ``seed + t`` (unseeded when ``seed`` is None)."""
    while episode_running(steps, cfg.max_steps):
        seeds = None if seed is None else [seed + len(steps)]
        (outs,) = yield Sample([messages], 1, cfg.temperature, cfg.max_new_tokens, seeds)
        apply_output(env, messages, steps, outs[0])


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
    run_one(play(env, messages, steps, cfg, seed), policy)


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
    require_config(cfg, EpisodeConfig, "run_episode")
    messages = start_messages(env, task)
    steps: list[Step] = []
    continue_episode(env, policy, messages, steps, cfg, seed=seed)
    return finish(task, messages, steps)
