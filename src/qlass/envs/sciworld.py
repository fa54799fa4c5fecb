"""ScienceWorld on the real simulator, stepped through the JVM directly.

The stock ``scienceworld.ScienceWorldEnv.step`` lists every valid action after each step (over 95%
of its 40–270 ms); this environment calls only what an agent needs — ``step``, ``getScore``,
``getCompleted`` — so a step costs the simulator's own ~4 ms. All instances in a process share one
JVM (:class:`SciWorldJVM`, bounded heap); each holds its own simulator object inside it, so the
explorer can keep many positioned instances cheaply.

Splits: ``train``/``seen``/``unseen`` are ScienceWorld's train/dev/test variations of all 30 task
types, loaded with the ``easy`` simplification as in ETO's setup. Task ids are
``sciworld/<task-type>/<variation>``. Reward is the current score / 100 clipped to [0, 1]; a
failed task (score < 0) ends with reward 0.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from importlib import resources
from typing import Any, Sequence

from ..errors import QlassError, require
from ..jsonl import write_text_atomic
from ..models import cache_dir
from ..types import Message, StepResult, Task
from .base import FORMAT_HINT, parse_action
from .sciworld_thoughts import expert_thought

log = logging.getLogger(__name__)

SPLITS = ("train", "seen", "unseen")
_SPLIT_METHODS = {"train": "getVariationsTrain", "seen": "getVariationsDev", "unseen": "getVariationsTest"}


def canonical_listing(text: str) -> str:
    """Sort the tab-indented object listings of an observation (nested items move with their parent).

    The simulator lists identical-looking objects in an order that changes from one load to the
    next; sorting sibling lines makes the same state always read the same, which replay-based
    branching and reproducible runs rely on. Unindented lines keep their order.
    """
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        if not lines[i].startswith("\t"):
            out.append(lines[i])
            i += 1
            continue
        j = i
        while j < len(lines) and lines[j].startswith("\t"):
            j += 1
        out.extend(_sorted_block(lines[i:j], 1))
        i = j
    return "\n".join(out)


def _split_top(text: str) -> list[str]:
    """Split at commas outside parentheses."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def _sort_inline(text: str) -> str:
    """Sort comma-separated contents in ``(containing ...)`` and after ``... is: `` up to the end."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("(containing ", i):
            depth, j = 0, i
            while j < len(text):
                depth += text[j] == "("
                depth -= text[j] == ")"
                if depth == 0:
                    break
                j += 1
            inner = text[i + len("(containing "):j]
            out.append("(containing " + ", ".join(sorted(_sort_inline(p) for p in _split_top(inner))) + ")")
            i = j + 1
        elif text.startswith(" is: ", i):
            rest = text[i + len(" is: "):]
            end = "." if rest.endswith(".") else ""
            body = rest[: len(rest) - len(end)]
            out.append(" is: " + ", ".join(sorted(_sort_inline(p) for p in _split_top(body))) + end)
            break
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _sorted_block(lines: list[str], depth: int) -> list[str]:
    """Sort the items at indentation ``depth`` of a block, each with its deeper lines."""
    items: list[list[str]] = []
    for line in lines:
        if items and line.startswith("\t" * (depth + 1)):
            items[-1].append(line)
        else:
            items.append([line])
    items = [[_sort_inline(item[0])] + item[1:] for item in items]
    rendered = [[item[0]] + _sorted_block(item[1:], depth + 1) if len(item) > 1 else item for item in items]
    return [line for item in sorted(rendered, key=lambda it: "\n".join(it)) for line in item]


class SciWorldJVM:
    """One ScienceWorld JVM hosting any number of independent simulator instances."""

    _per_process: dict[int, "SciWorldJVM"] = {}
    _lock = threading.Lock()

    def __init__(self, heap: str = "512m") -> None:
        require("scienceworld", "sciworld")
        from py4j.java_gateway import GatewayParameters, JavaGateway, launch_gateway
        from scienceworld.constants import BASEPATH, JAR_PATH

        try:
            port, proc = launch_gateway(classpath=JAR_PATH, die_on_exit=True, cwd=BASEPATH,
                                        javaopts=[f"-Xmx{heap}"], return_proc=True)
        except OSError as exc:
            raise QlassError(f"cannot start Java for ScienceWorld ({exc}); install Java 17 (scripts/setup.sh does)") from None
        self.gateway = JavaGateway(gateway_parameters=GatewayParameters(auto_field=True, port=port), java_process=proc)
        self.heap = heap

    @classmethod
    def shared(cls, heap: str = "512m") -> "SciWorldJVM":
        """The JVM of this process, started on first use."""
        with cls._lock:
            jvm = cls._per_process.get(os.getpid())
            if jvm is None:
                jvm = cls._per_process[os.getpid()] = cls(heap)
            return jvm

    def new_simulator(self) -> Any:
        """A fresh, independent simulator object inside this JVM."""
        return self.gateway.jvm.scienceworld.runtime.pythonapi.PythonInterface()

    def close(self) -> None:
        """Stop the JVM (every simulator in it becomes unusable)."""
        with self._lock:
            if self._per_process.get(os.getpid()) is self:
                del self._per_process[os.getpid()]
        self.gateway.shutdown()


def _split_index(jvm: SciWorldJVM) -> dict[str, dict[str, list[int]]]:
    """Variation ids of every task type per split, computed once and cached on disk."""
    from scienceworld.version import __version__

    path = cache_dir() / "sciworld" / f"variations-{__version__}.json"
    if path.exists():
        return json.loads(path.read_text())
    sim = jvm.new_simulator()
    index: dict[str, dict[str, list[int]]] = {s: {} for s in SPLITS}
    for name in sim.getTaskNames():
        sim.load(name, 0, "easy", False)
        for split, method in _SPLIT_METHODS.items():
            index[split][str(name)] = [int(v) for v in getattr(sim, method)()]
    write_text_atomic(path, json.dumps(index))
    return index


class ScienceWorldEnv:
    """The ScienceWorld environment (see module docstring)."""

    name = "sciworld"

    def __init__(self, step_limit: int = 30, simplification: str = "easy", heap: str = "512m",
                 jvm: SciWorldJVM | None = None) -> None:
        if step_limit < 1:
            raise QlassError(f"sciworld: step_limit must be >= 1, got {step_limit}")
        self.step_limit = step_limit
        self.simplification = simplification
        self._jvm = jvm or SciWorldJVM.shared(heap)
        self._sim = self._jvm.new_simulator()
        self._index = _split_index(self._jvm)
        self._loaded: tuple[str, int] | None = None
        self._steps = 0
        self._done = True
        self._score = 0.0

    # -- tasks -----------------------------------------------------------------------------
    def splits(self) -> dict[str, int]:
        return {s: sum(len(v) for v in self._index[s].values()) for s in SPLITS}

    def task_types(self) -> list[str]:
        return sorted(self._index["train"])

    def tasks(self, split: str, task_types: Sequence[str] | None = None) -> list[Task]:
        if split not in self._index:
            raise QlassError(f"sciworld: unknown split {split!r}; known: {', '.join(SPLITS)}")
        types = list(task_types) if task_types else self.task_types()
        unknown = [t for t in types if t not in self._index[split]]
        if unknown:
            raise QlassError(f"sciworld: unknown task type(s) {', '.join(unknown)}; known: {', '.join(self.task_types())}")
        return [Task(f"sciworld/{t}/{v}", self.name, split, t, {"task_name": t, "variation": v})
                for t in types for v in self._index[split][t]]

    def task(self, task_id: str) -> Task:
        """The task with id ``sciworld/<type>/<variation>``, whatever its split."""
        try:
            _, ttype, var = task_id.split("/")
            variation = int(var)
        except ValueError:
            raise QlassError(f"sciworld: malformed task id {task_id!r} (expected sciworld/<type>/<variation>)") from None
        for split in SPLITS:
            if variation in self._index[split].get(ttype, []):
                return Task(task_id, self.name, split, ttype, {"task_name": ttype, "variation": variation})
        raise QlassError(f"sciworld: no task {task_id!r}")

    def prompt(self) -> list[Message]:
        text = resources.files("qlass.envs.prompts").joinpath("sciworld.txt").read_text(encoding="utf-8")
        instruction, _, example = text.partition("\n=== EXAMPLE ===\n")
        msgs = [Message("user", instruction.strip()), Message("assistant", "OK")]
        turns = [t.strip() for t in example.split("\n---\n") if t.strip()]
        for i, turn in enumerate(turns):
            msgs.append(Message("user" if i % 2 == 0 else "assistant", turn))
        return msgs

    # -- episodes --------------------------------------------------------------------------
    def _load(self, task: Task, gold: bool = False) -> None:
        key = (task.meta["task_name"], int(task.meta["variation"]))
        self._sim.load(key[0], key[1], self.simplification, gold)
        self._loaded = key

    def reset(self, task: Task) -> str:
        if task.env != self.name:
            raise QlassError(f"sciworld: cannot play task {task.id!r} of env {task.env!r}")
        self._load(task)
        self._steps, self._done, self._score = 0, False, 0.0
        desc = str(self._sim.getTaskDescription())
        look = canonical_listing(str(self._sim.freeActionLook()).strip())
        return f"{desc}\n{look}"

    def step(self, output: str) -> StepResult:
        if self._loaded is None:
            raise QlassError("sciworld: step() before reset()")
        if self._done:
            return StepResult("The episode is over.", self._score, True, {"steps": self._steps, "score": self._score * 100})
        self._steps += 1
        action = parse_action(output)
        if action is None:
            observation = FORMAT_HINT
        else:
            observation = canonical_listing(str(self._sim.step(action)).strip())
        raw = float(self._sim.getScore()) * 100
        failed = raw < 0
        self._score = 0.0 if failed else min(max(raw / 100.0, 0.0), 1.0)
        self._done = failed or bool(self._sim.getCompleted()) or self._steps >= self.step_limit
        return StepResult(observation, self._score, self._done,
                          {"steps": self._steps, "score": round(raw), "action": action, "failed": failed})

    def expert(self, task: Task) -> list[str]:
        """ScienceWorld's gold action sequence, each action with a short templated thought."""
        self._load(task, gold=True)
        actions = [str(a) for a in self._sim.getGoldActionSequence()]
        self._loaded = None
        return [f"Thought: {expert_thought(a)}\nAction: {a}" for a in actions]

    def close(self) -> None:
        self._sim = None
        self._loaded = None
