"""The shared vocabulary of qlass: messages, tasks, environment steps, completions, trajectories.

Every stage speaks in these types; the file formats in :mod:`qlass.data`, :mod:`qlass.tree` and
:mod:`qlass.qdata` are their JSON forms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class Message:
    """One chat turn. ``user`` carries instructions/observations, ``assistant`` the agent's output."""

    role: Role
    content: str


History = Sequence[Message]
"""What a policy or QNet reads: the conversation so far (prompt prefix, task, earlier turns)."""


@dataclass(frozen=True)
class Task:
    """One episode to play: a stable text id such as ``sciworld/find-plant/12``."""

    id: str
    env: str
    split: str
    task_type: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class StepResult:
    """What an environment returns for one agent output."""

    observation: str
    reward: float
    done: bool
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Completion:
    """One sampled continuation with its token accounting.

    ``logprob`` is the sum of the sampled tokens' log-probabilities under the policy, when the
    backend reports it (used by likelihood ranking); ``None`` otherwise. ``logprob_tokens`` is the
    number of tokens that sum covers where it is fewer than ``completion_tokens`` (a backend that
    redrew an output counts the discarded attempts as spent); ``None``: all of them. ``truncated``
    is true when the token limit cut the output before its ``Action:`` line was complete: such an
    output is not an action and is never executed as one.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    logprob: float | None = None
    truncated: bool = False
    logprob_tokens: int | None = None


@dataclass
class Step:
    """One agent turn inside a trajectory: raw output, parsed action, the environment's answer and
    the tokens spent producing it."""

    output: str
    action: str | None
    observation: str
    reward: float
    done: bool
    prompt_tokens: int = 0
    completion_tokens: int = 0
    qnet_tokens: int = 0


@dataclass
class Trajectory:
    """A whole episode: the conversation (``messages``, prompt prefix included) plus per-step data."""

    id: str
    messages: list[Message]
    reward: float = 0.0
    success: bool = False
    task: str | None = None
    steps: list[Step] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_tokens(self) -> int:
        return sum(s.prompt_tokens for s in self.steps)

    @property
    def completion_tokens(self) -> int:
        return sum(s.completion_tokens for s in self.steps)

