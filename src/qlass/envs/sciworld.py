"""ScienceWorld on the real simulator, stepped through the JVM directly.

The stock ``scienceworld.ScienceWorldEnv.step`` lists every valid action after each step (over 95%
of its 40–270 ms); this environment calls only what an agent needs — ``step``, ``getScore``,
``getCompleted`` — so a step costs the simulator's own few milliseconds. All instances in a process
share one JVM (:class:`SciWorldJVM`, bounded heap); each holds its own simulator object inside it,
so the explorer can keep many positioned instances cheaply.

Determinism (replay-based branching depends on it): the stock simulator is not reproducible — it
iterates hash sets keyed by identity hash codes (object listings, disambiguation menus, the order
processes touch objects, and so temperatures, circuits, plants and gold paths, change from one load
to the next); its animals move with the JVM-wide unseeded ``scala.util.Random``; and it numbers
objects from one JVM-wide counter that every load resets, while comparing objects by that number
(so an instance stepping after another one's load creates objects equal to its own live ones).
So simulator objects hash by their object id (a patched class, see :mod:`.sciworld_hash`; with
only a JRE, constant identity hash codes instead, at about 2x the cost), the shared random generator is re-seeded
from the task id and step index before every step, and each instance keeps its own value of the
object counter. The same task and actions then give the same observations and rewards, whatever
else ran in the JVM before or in between.

Splits: ``train``/``seen``/``unseen`` are ScienceWorld's train/dev/test variations of all 30 task
types, loaded with the ``easy`` simplification as in ETO's setup. Task ids are
``sciworld/<task-type>/<variation>``. Reward is the current score / 100 clipped to [0, 1]; a
failed task (score < 0) ends with reward 0.
"""

from __future__ import annotations

import json
import os
import re
import threading
import zlib
from collections.abc import Sequence
from typing import Any, ClassVar

from ..errors import QlassError, require
from ..jsonl import with_replacement_characters, write_text_atomic
from ..models import cache_dir
from ..types import Message, StepResult, Task
from .base import FORMAT_HINT, parse_action, task_index
from .prompt_file import load_prompt
from .sciworld_hash import launch_settings
from .sciworld_thoughts import expert_thought

SPLITS = ("train", "seen", "unseen")
_SPLIT_METHODS = {"train": "getVariationsTrain", "seen": "getVariationsDev", "unseen": "getVariationsTest"}
_META_COMMANDS = {"help", "objects", "task"}
_UNKNOWN_ACTION = ("Unknown action.  Type 'help' for a list of actions, and 'objects' for a list of possible object "
                   "referents.")


def _check_heap(heap: object) -> None:
    """Refuse a ``heap`` that is no Java heap size (else Java exits at once and py4j says only
    "invalid literal for int() with base 10: b''")."""
    if not isinstance(heap, str) or not re.fullmatch(r"[1-9][0-9]*[kKmMgGtT]?", heap):
        raise QlassError(f"sciworld: heap must be a Java heap size such as 512m or 2g, got {heap!r}")


class SciWorldJVM:
    """One ScienceWorld JVM hosting any number of independent simulator instances.

    Simulators share JVM-wide state (the random generator, the object-id counter): hold ``lock``
    around :meth:`enter` and the load or step that follows it.
    """

    _per_process: ClassVar[dict[int, SciWorldJVM]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, heap: str = "512m") -> None:
        _check_heap(heap)
        require("scienceworld", "sciworld")
        from py4j.java_gateway import GatewayParameters, JavaGateway, launch_gateway
        from scienceworld.constants import BASEPATH, JAR_PATH

        classpath, options = launch_settings(JAR_PATH)
        try:
            # its own process group: a terminal's Ctrl-C reaches qlass, which stops cleanly and closes the
            # simulators, not the JVM under them; die_on_exit still ends it when this process ends
            port, proc = launch_gateway(classpath=classpath, die_on_exit=True, cwd=BASEPATH,
                                        javaopts=[f"-Xmx{heap}", *options], return_proc=True,
                                        create_new_process_group=True)
        except OSError as exc:
            raise QlassError(f"cannot start Java for ScienceWorld ({exc}); "
                             "install Java 17 (scripts/setup.sh does)") from None
        self.gateway = JavaGateway(gateway_parameters=GatewayParameters(auto_field=True, port=port), java_process=proc)
        self.heap = heap
        self.lock = threading.RLock()
        jvm = self.gateway.jvm
        if options:
            if jvm.java.lang.System.identityHashCode(jvm.java.lang.Object()) != 1:
                self.gateway.shutdown()
                raise QlassError("this Java ignores -XX:hashCode=2, so ScienceWorld would not replay "
                                 "deterministically; use OpenJDK (HotSpot) 17, as scripts/setup.sh installs")
        else:
            source = jvm.java.lang.Class.forName("scienceworld.struct.EnvObject").getProtectionDomain()
            if not classpath.startswith(str(source.getCodeSource().getLocation().getPath()).rstrip("/")):
                self.gateway.shutdown()
                raise QlassError("the JVM did not load the patched ScienceWorld EnvObject class, so ScienceWorld "
                                 "would not replay deterministically")
        self._random = getattr(getattr(jvm.scala.util, "Random$"), "MODULE$")
        self._ids = jvm.util.UniqueIdentifier
        self._owner: int | None = None  # id() of the instance whose object counter is live
        self._counters: dict[int, int] = {}

    @classmethod
    def shared(cls, heap: str = "512m") -> SciWorldJVM:
        """The JVM of this process, started on first use."""
        with cls._lock:
            jvm = cls._per_process.get(os.getpid())
            if jvm is None:
                jvm = cls._per_process[os.getpid()] = cls(heap)
            return jvm

    def new_simulator(self) -> Any:
        """A fresh, independent simulator object inside this JVM."""
        return self.gateway.jvm.scienceworld.runtime.pythonapi.PythonInterface()

    def enter(self, owner: object, seed: str | None = None) -> None:
        """Give ``owner`` the JVM-wide state before it loads or steps (call holding ``lock``):
        its own object-id counter, and the random generator seeded from ``seed`` if given."""
        key = id(owner)
        if self._owner != key:
            if self._owner is not None:
                self._counters[self._owner] = int(self._ids.count())
            if key in self._counters:
                getattr(self._ids, "count_$eq")(self._counters[key])
            self._owner = key
        if seed is not None:
            self._random.setSeed(zlib.crc32(seed.encode("utf-8")))

    def leave(self, owner: object) -> None:
        """Forget ``owner``'s saved state (it was closed)."""
        self._counters.pop(id(owner), None)
        if self._owner == id(owner):
            self._owner = None

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
    with jvm.lock:  # loading reseeds the shared generator and resets the object counter
        jvm.enter(sim)
        for name in sim.getTaskNames():
            sim.load(name, 0, "easy", False)
            for split, method in _SPLIT_METHODS.items():
                index[split][str(name)] = [int(v) for v in getattr(sim, method)()]
        jvm.leave(sim)
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
        _check_heap(heap)  # also where this process's JVM is already running (and heap is not used)
        self._jvm = jvm or SciWorldJVM.shared(heap)
        self._sim = self._jvm.new_simulator()
        # the simulator takes an unknown label and plays on: each observation its error, each episode failed
        known = ["easy", *str(self._sim.getPossibleSimplifications()).split(", ")]
        if not isinstance(simplification, str) or any(p not in known for p in simplification.split(",") if p):
            raise QlassError(f"sciworld: unknown simplification {simplification!r}; known: {', '.join(known)} "
                             "(several joined by commas, or '' for none)")
        self._index = _split_index(self._jvm)
        self._agent: Any = None
        self._task_id: str | None = None
        self.description = ""  # the current episode's task description (the first line(s) reset returns)
        self._steps, self._done, self._score, self._raw, self._completed = 0, True, 0.0, 0, False

    # -- tasks -----------------------------------------------------------------------------
    def splits(self) -> dict[str, int]:
        return {s: sum(len(v) for v in self._index[s].values()) for s in SPLITS}

    def task_types(self) -> list[str]:
        return sorted(self._index["train"])

    def tasks(self, split: str, task_types: Sequence[str] | None = None) -> list[Task]:
        if split not in self._index:
            raise QlassError(f"sciworld: unknown split {split!r}; known: {', '.join(SPLITS)}")
        types = list(dict.fromkeys(task_types)) if task_types else self.task_types()  # a type given twice: once
        unknown = [t for t in types if t not in self._index[split]]
        if unknown:
            raise QlassError(f"sciworld: unknown task type(s) {', '.join(unknown)}; known: "
                             f"{', '.join(self.task_types())}")
        return [Task(f"sciworld/{t}/{v}", self.name, split, t, {"task_name": t, "variation": v})
                for t in types for v in self._index[split][t]]

    def task(self, task_id: str) -> Task:
        """The task with id ``sciworld/<type>/<variation>``, whatever its split."""
        parts = task_id.split("/")
        # only the ids tasks() gives: 'sciworld/boil/1_0', '/ 1' or '/١' played a variation under an id of its own
        variation = task_index(parts[2]) if len(parts) == 3 and parts[0] == self.name else None
        if variation is None:
            raise QlassError(f"sciworld: malformed task id {task_id!r} (expected sciworld/<type>/<variation>)")
        ttype = parts[1]
        for split in SPLITS:
            if variation in self._index[split].get(ttype, []):
                return Task(task_id, self.name, split, ttype, {"task_name": ttype, "variation": variation})
        raise QlassError(f"sciworld: no task {task_id!r}")

    def prompt(self) -> list[Message]:
        return load_prompt("sciworld")

    # -- episodes --------------------------------------------------------------------------
    def _load(self, task: Task, gold: bool = False) -> None:
        if task.env != self.name:
            raise QlassError(f"sciworld: cannot play task {task.id!r} of env {task.env!r}")
        meta = self.task(task.id).meta  # a known task (was a KeyError, or a Java exception, for a made-up Task)
        if self._sim is None:  # closed: a new simulator, as the other environments start afresh after close()
            self._sim = self._jvm.new_simulator()
        with self._jvm.lock:  # loading seeds the generator and resets the object counter itself
            self._jvm.enter(self)
            error = self._sim.load(meta["task_name"], meta["variation"], self.simplification, gold)
        if error:
            raise QlassError(f"sciworld: cannot load {task.id!r}: {error}")
        self._task_id = task.id
        self._agent = self._sim.agentInterface().get()

    def reset(self, task: Task) -> str:
        self._task_id = None  # a failed reset leaves no episode to step on in (was: the previous one)
        self._load(task)
        self._steps, self._done, self._score, self._raw = 0, False, 0.0, 0
        self.description = desc = str(self._sim.getTaskDescription())
        look = str(self._sim.freeActionLook()).strip()
        return f"{desc}\n{look}"

    def _simulate(self, action: str) -> str:
        """One simulator step; updates ``_raw`` (score 0–100, −100 on failure) and ``_completed``.

        Calls the simulator's agent interface directly: the stock wrapper's ``step`` also renders a
        look, the inventory and every possible referent on each step for its own logging.
        """
        if action.strip().lower() in _META_COMMANDS:  # answered by the wrapper, no time passes
            return str(self._sim.step(action)).strip()
        with self._jvm.lock:
            self._jvm.enter(self, seed=f"{self._task_id}:{self._steps}")
            result = self._agent.step(action)
        self._raw = round(float(result._2()) * 100)
        self._completed = bool(result._3())
        return str(result._1()).strip() or _UNKNOWN_ACTION

    def step(self, output: str) -> StepResult:
        if self._task_id is None:
            raise QlassError("sciworld: step() before reset()")
        if self._done:
            return StepResult("The episode is over.", self._score, True, {"steps": self._steps, "score": self._raw})
        self._steps += 1
        self._completed = False
        action = parse_action(output)
        # a lone surrogate (a JSON \ud800 escape) cannot cross to Java: it is the unknown character it stands for
        observation = FORMAT_HINT if action is None else self._simulate(with_replacement_characters(action))
        failed = self._raw < 0
        self._score = 0.0 if failed else min(max(self._raw / 100.0, 0.0), 1.0)
        self._done = failed or self._completed or self._steps >= self.step_limit
        return StepResult(observation, self._score, self._done,
                          {"steps": self._steps, "score": self._raw, "action": action, "failed": failed})

    def valid_actions(self) -> list[str]:
        """The actions ScienceWorld accepts in the current state (its valid action-object
        combinations, sorted, without repeats), e.g. every ``focus on OBJ`` for the objects in view."""
        if self._task_id is None:
            raise QlassError("sciworld: valid_actions() before reset()")
        with self._jvm.lock:
            self._jvm.enter(self)
            actions = [str(a) for a in self._sim.getValidActionObjectCombinations()]
        return sorted(set(actions))

    def expert(self, task: Task) -> list[str]:
        """ScienceWorld's gold action sequence, each action with a short templated thought. It loads ``task`` into
        this instance's simulator, so an episode under way ends: the next step needs a ``reset()``."""
        self._load(task, gold=True)
        actions = [str(a) for a in self._sim.getGoldActionSequence()]
        self._task_id, self._agent = None, None
        return [f"Thought: {expert_thought(a)}\nAction: {a}" for a in actions]

    def close(self) -> None:
        """Drop this instance's simulator; the shared JVM and other instances stay up."""
        with self._jvm.lock:
            self._jvm.leave(self)
        self._sim = self._agent = None
        self._task_id = None
