"""ALFWorld's text games on the real engine: TextWorld's PDDL environment with ALFWorld's wrappers.

Each game is a ``game.tw-pddl`` file (PDDL domain + problem + text grammar + expert walkthrough)
played by ``textworld.envs.PddlEnv`` behind ``AlfredDemangler`` (readable object names such as
``desk 1``) and ``AlfredInfos``, as ``alfworld`` 0.4.2 does in its text-only setting.

Splits: ``train`` (``json_2.1.1/train``, 3,553 games), ``seen`` (``valid_seen``, 140) and
``unseen`` (``valid_unseen``, 134); the games of ALFWorld's ``valid_train`` folder (AgentGym's test games)
can be played and listed by that name too, but are not a split. Task ids are
``alfworld/<split>/<task folder>/<trial folder>``;
the task type is the first part of the task folder name (``pick_and_place_simple``, ...). Where the
games come from: see :mod:`qlass.envs.alfworld_data`.

Episodes: the first observation is the room description and the ``Your task is to: ...`` line.
Reward is 1.0 once the goal holds, else 0; the episode ends on a win or after ``step_limit``
steps (40 by default, the paper's inference setting). An action the engine does not know is
answered with the engine's own ``Nothing happens.``. Actions are compared after collapsing
whitespace, lower-casing and dropping a final period; ``put X in/on Y`` (the grammar of ALFWorld
0.3, used by ETO's trajectories) is accepted as the 0.4 grammar's ``move X to Y``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import QlassError, require
from ..types import Message, StepResult, Task
from .alfworld_data import SPLIT_FOLDERS, resolve_data_dir
from .alfworld_engine import AlfredEngine
from .base import FORMAT_HINT, parse_action
from .prompt_file import load_prompt

SPLITS = tuple(SPLIT_FOLDERS)
PLAYABLE_FOLDERS = {**SPLIT_FOLDERS, "valid_train": "valid_train"}
"""Folders whose games can be played by task id: the splits, and ``valid_train`` (AgentGym's test games)."""
GAME_FILE = "game.tw-pddl"
EPISODE_OVER = "The episode is over."
_PUT_RE = re.compile(r"^put (.+?) (?:in/on|in|on) (.+)$")


def normalize_action(action: str) -> str:
    """The command sent to the engine: whitespace collapsed, lower case, no final period, and
    ``put X in/on Y`` rewritten to ``move X to Y``."""
    text = " ".join(action.split()).lower().rstrip(".").rstrip()
    m = _PUT_RE.match(text)
    return f"move {m.group(1)} to {m.group(2)}" if m else text


def expert_thought(action: str) -> str:
    """A short templated thought for one walkthrough action."""
    text = _thought_text(action)
    return text[:1].upper() + text[1:]


def _thought_text(action: str) -> str:
    words = action.split(" ")
    verb = words[0]
    rest = action[len(verb):].strip()
    if action.startswith("go to "):
        return f"I should go to {action[6:]} next."
    for sep, template in ((" from ", "I will pick up {a} from {b}."), (" with ", "I will {v} {a} with {b}."),
                          (" to ", "Now I put {a} in/on {b}.")):
        if sep in rest and verb in {"take", "heat", "cool", "clean", "move"}:
            a, _, b = rest.partition(sep)
            return template.format(v=verb, a=a, b=b)
    simple = {"open": f"{rest} is closed; I will open it.", "close": f"I will close {rest}.",
              "use": f"I will turn on {rest} to see better.", "examine": f"Let me examine {rest} closely.",
              "look": "I will look around to see where I am.", "inventory": "I will check what I am carrying."}
    return simple.get(verb, f"Next I will {action}.")


def _first_observation(feedback: str) -> str:
    """The intro without TextWorld's ``-= Welcome ... =-`` banner, paragraphs joined by newlines."""
    parts = [p.strip() for p in feedback.split("\n\n") if p.strip()]
    if parts and parts[0].startswith("-="):
        parts = parts[1:]
    return "\n".join(parts)


class AlfWorldEnv:
    """The ALFWorld environment (see module docstring).

    Args:
        data_dir: an ALFWorld data folder (containing ``json_2.1.1/``); default ``$ALFWORLD_DATA``,
            else the project's shared tarballs extracted into the cache.
        step_limit: steps after which an episode ends (40 by default).
    """

    name = "alfworld"

    def __init__(self, data_dir: str | os.PathLike | None = None, step_limit: int = 40) -> None:
        if step_limit < 1:
            raise QlassError(f"alfworld: step_limit must be >= 1, got {step_limit}")
        self.root = resolve_data_dir(data_dir)  # before importing alfworld, which sets ALFWORLD_DATA
        require("textworld", "alfworld")
        require("alfworld.agents.environment.alfred_tw_env", "alfworld")
        self.step_limit = step_limit
        self._index: dict[str, list[tuple[str, str]]] = {}
        self._engine: Any = None
        self._game: Path | None = None
        self._task: Task | None = None
        self._steps = 0
        self._done = True
        self._won = False

    # -- tasks -----------------------------------------------------------------------------
    def _games(self, split: str) -> list[tuple[str, str]]:
        """(task folder, trial folder) of every game of ``split``, sorted."""
        if split not in PLAYABLE_FOLDERS:
            raise QlassError(f"alfworld: unknown split {split!r}; known: {', '.join(SPLITS)}")
        if split not in self._index:
            folder = self.root / PLAYABLE_FOLDERS[split]
            if not folder.is_dir():
                raise QlassError(f"alfworld: split {split!r} needs the folder {folder}, which does not exist")
            self._index[split] = sorted(
                (task.name, trial.name)
                for task in folder.iterdir() if task.is_dir()
                for trial in task.iterdir() if (trial / GAME_FILE).is_file())
        return self._index[split]

    def splits(self) -> dict[str, int]:
        return {s: len(self._games(s)) for s in SPLITS if (self.root / SPLIT_FOLDERS[s]).is_dir()}

    def task_types(self, split: str = "train") -> list[str]:
        """The task types present in ``split``."""
        return sorted({folder.split("-")[0] for folder, _ in self._games(split)})

    def _make_task(self, split: str, folder: str, trial: str) -> Task:
        return Task(f"alfworld/{split}/{folder}/{trial}", self.name, split, folder.split("-")[0],
                    {"task_folder": folder, "trial": trial})

    def tasks(self, split: str, task_types: Sequence[str] | None = None) -> list[Task]:
        games = self._games(split)
        if task_types:
            known = {folder.split("-")[0] for folder, _ in games}
            unknown = [t for t in task_types if t not in known]
            if unknown:
                raise QlassError(f"alfworld: unknown task type(s) {', '.join(unknown)}; known: "
                                 f"{', '.join(sorted(known))}")
            wanted = set(task_types)
            games = [g for g in games if g[0].split("-")[0] in wanted]
        return [self._make_task(split, folder, trial) for folder, trial in games]

    def task(self, task_id: str) -> Task:
        """The task with id ``alfworld/<split>/<task folder>/<trial folder>``."""
        parts = task_id.split("/")
        if len(parts) != 4 or parts[0] != self.name or parts[1] not in PLAYABLE_FOLDERS:
            raise QlassError(f"alfworld: malformed task id {task_id!r} "
                             "(expected alfworld/<train|seen|unseen>/<task folder>/<trial folder>)")
        if (parts[2], parts[3]) not in set(self._games(parts[1])):
            raise QlassError(f"alfworld: no task {task_id!r} in {self.root}")
        return self._make_task(*parts[1:])

    def prompt(self) -> list[Message]:
        return load_prompt("alfworld")

    # -- episodes --------------------------------------------------------------------------
    def _game_file(self, task: Task) -> Path:
        if task.env != self.name:
            raise QlassError(f"alfworld: cannot play task {task.id!r} of env {task.env!r}")
        parts = task.id.split("/")
        if len(parts) != 4 or parts[1] not in PLAYABLE_FOLDERS:
            raise QlassError(f"alfworld: malformed task id {task.id!r}")
        path = self.root / PLAYABLE_FOLDERS[parts[1]] / parts[2] / parts[3] / GAME_FILE
        if not path.is_file():
            raise QlassError(f"alfworld: task {task.id!r} has no game file at {path}")
        return path

    def _load(self, path: Path) -> None:
        """Load ``path`` into the engine (built on first use; reused across games)."""
        if self._engine is None:
            self._engine = AlfredEngine()
        try:
            self._engine.load(path)
        except (OSError, ValueError, KeyError) as exc:
            self._game = None
            raise QlassError(f"alfworld: cannot load game {path}: {exc}") from None
        self._game = path

    def reset(self, task: Task) -> str:
        self._task = None  # a failed reset leaves no episode to step on in (was: the previous one)
        path = self._game_file(task)
        if path != self._game:
            self._load(path)
        intro = self._engine.reset()
        self._task, self._steps, self._done, self._won = task, 0, False, False
        return _first_observation(intro)

    def step(self, output: str) -> StepResult:
        if self._task is None:
            raise QlassError("alfworld: step() before reset()")
        reward = 1.0 if self._won else 0.0
        if self._done:
            return StepResult(EPISODE_OVER, reward, True, {"steps": self._steps, "won": self._won})
        self._steps += 1
        action = parse_action(output)
        if action is None:
            observation = FORMAT_HINT
        else:
            observation = self._engine.step(normalize_action(action)).strip()
            self._won = self._engine.won
        self._done = self._won or self._steps >= self.step_limit
        return StepResult(observation, 1.0 if self._won else 0.0, self._done,
                          {"steps": self._steps, "action": action, "won": self._won})

    def admissible_commands(self) -> list[str]:
        """The commands the engine accepts in the current state, sorted (ALFWorld's ``admissible_commands``)."""
        if self._task is None:
            raise QlassError("alfworld: admissible_commands() before reset()")
        return self._engine.commands()

    def walkthrough(self, task: Task) -> list[str]:
        """The game file's expert action list (empty if it has none)."""
        path = self._game_file(task)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise QlassError(f"alfworld: cannot read {path}: {exc}") from None
        actions = data.get("walkthrough") or []
        if not isinstance(actions, list) or not all(isinstance(a, str) for a in actions):
            raise QlassError(f"alfworld: {path}: field 'walkthrough' is not a list of strings")
        return actions

    def expert(self, task: Task) -> list[str]:
        """The game's walkthrough, each action with a short templated thought."""
        return [f"Thought: {expert_thought(a)}\nAction: {a}" for a in self.walkthrough(task)]

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
        self._engine, self._game, self._task = None, None, None
