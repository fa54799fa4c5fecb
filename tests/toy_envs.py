"""Small user-defined environments for tests (as a user would write them: the Env protocol only).

``Corridor``: walk east to the goal room. Task ``corridor/<n>`` needs ``n`` moves; reward is the
fraction of the way covered, 1.0 at the goal. Loadable from the CLI as ``--env toy_envs:Corridor``
with ``tests/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

from typing import Sequence

from qlass.envs.base import FORMAT_HINT, parse_action
from qlass.types import Message, StepResult, Task


class Corridor:
    name = "corridor"

    def __init__(self, step_limit: int = 12, tasks_per_split: int = 6) -> None:
        self.step_limit = step_limit
        self.tasks_per_split = tasks_per_split
        self._goal = 0
        self._pos = 0
        self._steps = 0

    def splits(self) -> dict[str, int]:
        return {"train": self.tasks_per_split, "seen": self.tasks_per_split}

    def tasks(self, split: str, task_types: Sequence[str] | None = None) -> list[Task]:
        offset = 0 if split == "train" else 100
        return [Task(f"corridor/{offset + i}", self.name, split, "walk", {"length": 1 + i % 3})
                for i in range(self.tasks_per_split)]

    def prompt(self) -> list[Message]:
        return [Message("user", "Walk to the goal. Actions: go east, go west, look.\n"
                                "Answer as:\nThought: ...\nAction: ..."),
                Message("assistant", "OK")]

    def reset(self, task: Task) -> str:
        self._goal = int(task.meta.get("length", 1))
        self._pos = 0
        self._steps = 0
        return f"Task: reach the goal {self._goal} rooms east. You are in room 0."

    def step(self, output: str) -> StepResult:
        self._steps += 1
        action = parse_action(output)
        if action is None:
            obs = FORMAT_HINT
        elif action == "go east":
            self._pos += 1
            obs = f"You are in room {self._pos}."
        elif action == "go west":
            self._pos = max(0, self._pos - 1)
            obs = f"You are in room {self._pos}."
        elif action == "look":
            obs = f"You are in room {self._pos}. The goal is room {self._goal}."
        else:
            obs = "Nothing happens."
        reward = min(self._pos, self._goal) / self._goal
        done = self._pos >= self._goal or self._steps >= self.step_limit
        return StepResult(obs, reward, done, {"steps": self._steps})

    def expert(self, task: Task) -> list[str]:
        n = int(task.meta.get("length", 1))
        return ["Thought: The goal is further east.\nAction: go east" for _ in range(n)]

    def close(self) -> None:
        pass
