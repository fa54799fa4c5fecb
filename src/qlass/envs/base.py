"""The environment protocol every stage drives, action parsing, and the registry of environments.

An environment plays one task at a time: ``reset(task)`` gives the first observation (task text
included), ``step(output)`` takes the model's *raw* output, parses its ``Action:`` line and returns
a :class:`~qlass.types.StepResult`. Output with no parsable action is answered with
:data:`FORMAT_HINT`, counts as a step and never raises. Same task + same actions must give the
same observations (branching restores states by replay).

Environments are registered by short name (``sciworld``, ``alfworld``, ``webshop``); a user's own
class is reached as ``package.module:Class``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import numbers
import re
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

from ..errors import QlassError, interrupted_during, raised_in_user_code
from ..imports import load_object
from ..interrupt import raise_if_interrupted
from ..jsonl import is_text
from ..types import Message, StepResult, Task

log = logging.getLogger(__name__)

REWARD_SLACK = 1e-9
"""How far outside [0, 1] a reward may stray by rounding (a sum of float parts) and still be taken (clamped
into [0, 1] by :func:`env_step`; readers of older records allow it too)."""
ACTION_RE = re.compile(r"^[^\S\n]*Action:[^\S\n]*(.*?)\s*$", re.MULTILINE)
"""An ``Action:`` line; the action is the rest of that line (the spaces around ``Action:`` never reach
into a neighbouring line, so an ``Action:`` with nothing after it is no action)."""
TASK_INDEX = re.compile(r"0|[1-9][0-9]{0,17}", re.ASCII)
"""A number as a task id spells it: ASCII digits, no leading zero, at most 18 of them."""
FORMAT_HINT = (
    "Invalid format: no action found. Reply with one thought line and one action line, exactly:\n"
    "Thought: <your reasoning>\nAction: <one action>"
)


def task_index(text: str) -> int | None:
    """The number ``text`` is, spelt as a task id spells it (``12``), else None: ``012``, ``1_0``, `` 1``, ``²``
    and other digits spell a number :func:`int` reads, and would play a task under an id of its own."""
    return int(text) if TASK_INDEX.fullmatch(text) else None


def parse_action(output: str) -> str | None:
    """The action of a ``Thought: ...\\nAction: ...`` output (the first non-empty ``Action:`` line)."""
    for m in ACTION_RE.finditer(output):
        if m.group(1):
            return m.group(1)
    return None


@runtime_checkable
class Env(Protocol):
    """A text environment (see module docstring for the contract)."""

    name: str

    def splits(self) -> dict[str, int]:
        """Split names and their number of tasks."""

    def tasks(self, split: str, task_types: Sequence[str] | None = None) -> list[Task]:
        """The tasks of ``split``, optionally only those of the given task types, in stable order."""

    def prompt(self) -> list[Message]:
        """The fixed conversation prefix: instruction and one-shot example, before the task."""

    def reset(self, task: Task) -> str:
        """Start ``task``; returns the first observation, including the task description."""

    def step(self, output: str) -> StepResult:
        """Apply the model's raw output; reward in [0, 1]."""

    def expert(self, task: Task) -> list[str]:
        """Expert outputs (``Thought: ...\\nAction: ...``) that solve ``task``; empty if none."""

    def close(self) -> None:
        """Release resources (simulators, JVMs, sockets)."""


def env_label(env: Env) -> str:
    """``module:Class`` of ``env``, as its errors name it."""
    cls = type(env)
    return f"{cls.__module__}:{cls.__qualname__}"


def _failed(env: Env, call: str, exc: Exception) -> QlassError:
    """The error for an exception an environment's own code raised (its class, the call, where)."""
    return raised_in_user_code(f"environment {env_label(env)}: {call}", exc)


def _call(env: Env, call: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, an environment's own code: an exception from it (an ``OSError`` too, which is not one of
    qlass's file errors) is a :class:`QlassError` naming the environment, ``call`` and where it was raised.
    A Ctrl-C that the environment's code swallowed (py4j's finalizers) stops the run here."""
    try:
        result = fn()
    except QlassError:
        raise
    except Exception as exc:
        if interrupted_during(exc):
            raise KeyboardInterrupt from exc
        raise _failed(env, call, exc) from exc
    raise_if_interrupted()
    return result


def _check_text(env: Env, call: str, what: str, text: str) -> None:
    """Refuse ``text`` (of type str) holding a lone surrogate: UTF-8 cannot hold it, so no record or
    tokenizer could take it."""
    if not is_text(text):
        raise QlassError(f"environment {env_label(env)}: {call} returned {what} that is not valid Unicode "
                         "(it holds a lone surrogate, e.g. a '\\ud800' JSON escape)")


def env_splits(env: Env) -> dict[str, int]:
    """``env.splits()``, checked: split names (strings) and their task counts (whole numbers >= 0)."""
    splits = _call(env, "splits()", env.splits)
    if not isinstance(splits, Mapping):
        raise QlassError(f"environment {env_label(env)}: splits() returned a {type(splits).__name__}, not a "
                         "dict of split names to task counts")
    for name, count in splits.items():
        if not isinstance(name, str) or isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise QlassError(f"environment {env_label(env)}: splits() gives {name!r}: {count!r}; each split must be "
                             "a name (string) with its number of tasks (a whole number >= 0)")
    return dict(splits)


PROMPT_ROLES = ("system", "user", "assistant")


def env_prompt(env: Env) -> list[Message]:
    """``env.prompt()``, checked: a list of :class:`~qlass.types.Message` with a role of
    :data:`PROMPT_ROLES` and text."""
    prompt = _call(env, "prompt()", env.prompt)
    if not isinstance(prompt, (list, tuple)):
        raise QlassError(f"environment {env_label(env)}: prompt() returned a {type(prompt).__name__}, not a list "
                         "of Message")
    for i, message in enumerate(prompt):
        if not (isinstance(message, Message) and isinstance(message.role, str) and isinstance(message.content, str)):
            raise QlassError(f"environment {env_label(env)}: prompt()[{i}] is {message!r:.80}, not a Message with "
                             "a string role and content")
        if message.role not in PROMPT_ROLES:  # a record could not be written, after the episode was played
            raise QlassError(f"environment {env_label(env)}: prompt()[{i}] has role {message.role!r}; a message's "
                             f"role is one of {', '.join(PROMPT_ROLES)}")
        _check_text(env, "prompt()", f"message {i}", message.content)
    return list(prompt)


def env_expert(env: Env, task: Task) -> list[str]:
    """``env.expert(task)``, checked: a list of output strings (``Thought: ...\\nAction: ...``)."""
    outputs = _call(env, f"expert({task.id!r})", lambda: env.expert(task))
    if not isinstance(outputs, (list, tuple)):
        raise QlassError(f"environment {env_label(env)}: expert({task.id!r}) returned a {type(outputs).__name__}, "
                         "not a list of outputs (strings)")
    for i, output in enumerate(outputs):
        if not isinstance(output, str):
            raise QlassError(f"environment {env_label(env)}: expert({task.id!r})[{i}] is {output!r:.80}, not an "
                             "output string")
        _check_text(env, f"expert({task.id!r})", f"output {i}", output)
    return list(outputs)


def env_task(env: Env, task_id: str) -> Task:
    """``env.task(task_id)`` (an optional method: the task of that id; an unknown id is its own
    :class:`QlassError`), checked: a :class:`~qlass.types.Task` with that id."""
    task = _call(env, f"task({task_id!r})", lambda: env.task(task_id))  # type: ignore[attr-defined]
    if not isinstance(task, Task) or task.id != task_id:
        raise QlassError(f"environment {env_label(env)}: task({task_id!r}) returned {task!r:.80}, not the Task of "
                         "that id")
    return task


def env_close(env: Env) -> None:
    """``env.close()``, best effort: a failure is logged as a warning (closing must never lose the
    work a command has done)."""
    try:
        env.close()
    except Exception as exc:  # noqa: BLE001 - any failure of a user's cleanup
        log.warning("%s", raised_in_user_code(f"environment {env_label(env)}: close()", exc))
        log.debug("close() failed", exc_info=True)


def env_tasks(env: Env, split: str, task_types: Sequence[str] | None = None) -> list[Task]:
    """``env.tasks(split, task_types)``, checked: a list of :class:`~qlass.types.Task` with distinct
    string ids, or a :class:`QlassError` naming the environment and what it returned. With
    ``task_types`` (None or empty: all), only tasks of those types are returned, even from an
    environment that ignores the argument (with a warning)."""
    if isinstance(task_types, str):  # "find-plant" matched every type that is a substring of it
        raise TypeError(f"task_types must be a list of task types, got the string {task_types!r} (give "
                        f"[{task_types!r}])")
    tasks = _call(env, f"tasks({split!r})", lambda: env.tasks(split, task_types))
    if not isinstance(tasks, (list, tuple)):
        raise QlassError(f"environment {env_label(env)}: tasks({split!r}) returned a {type(tasks).__name__}, "
                         "not a list of Task")
    seen: set[str] = set()
    for i, task in enumerate(tasks):
        if not isinstance(task, Task) or not isinstance(task.id, str):
            raise QlassError(f"environment {env_label(env)}: tasks({split!r})[{i}] is {task!r}, not a Task with "
                             "a string id")
        if task.id in seen:
            raise QlassError(f"environment {env_label(env)}: tasks({split!r}) lists task {task.id!r} twice")
        if task.split != split:  # its records would be filed under another split than the run's settings name
            raise QlassError(f"environment {env_label(env)}: tasks({split!r})[{i}] ({task.id!r}) is of split "
                             f"{task.split!r}, not {split!r}")
        seen.add(task.id)
    if not task_types:  # None or empty: every type, as the environments read it (was: none, and a garbled warning)
        return list(tasks)
    kept = [t for t in tasks if t.task_type in task_types]
    if len(kept) < len(tasks):  # an environment that ignores the argument: its other tasks must not creep in
        others = sorted({str(t.task_type) for t in tasks if t.task_type not in task_types})
        log.warning("environment %s: tasks(%r) gave %d task(s) of other types than %s (%s); they are left out",
                    env_label(env), split, len(tasks) - len(kept), ", ".join(task_types), ", ".join(others[:5]))
    return kept


def env_reset(env: Env, task: Task) -> str:
    """``env.reset(task)``, checked: the first observation (a string), or a :class:`QlassError` naming
    the environment, the task and what went wrong."""
    observation = _call(env, f"reset({task.id!r})", lambda: env.reset(task))
    if not isinstance(observation, str):
        raise QlassError(f"environment {env_label(env)}: reset({task.id!r}) returned a "
                         f"{type(observation).__name__}, not the first observation as a string")
    _check_text(env, f"reset({task.id!r})", "an observation", observation)
    return observation


def env_step(env: Env, output: str) -> StepResult:
    """``env.step(output)``, checked: a :class:`~qlass.types.StepResult` whose observation is a string,
    reward a number in [0, 1] (one within :data:`REWARD_SLACK` of it is clamped into it), done true or
    false and info a dict; else a :class:`QlassError` naming the environment and the field."""
    result = _call(env, "step()", lambda: env.step(output))
    label = env_label(env)
    if not isinstance(result, StepResult):
        raise QlassError(f"environment {label}: step() returned a {type(result).__name__}, not a StepResult")
    reward, done = result.reward, result.done
    if not isinstance(result.observation, str):
        raise QlassError(f"environment {label}: step() returned an observation of type "
                         f"{type(result.observation).__name__}, not a string")
    _check_text(env, "step()", "an observation", result.observation)
    if isinstance(reward, bool) or not isinstance(reward, numbers.Real) or not math.isfinite(reward):
        raise QlassError(f"environment {label}: step() returned reward {reward!r}; it must be a finite number")
    if not -REWARD_SLACK <= reward <= 1 + REWARD_SLACK:
        raise QlassError(f"environment {label}: step() returned reward {reward!r}; rewards are scores in [0, 1] "
                         "(scale a raw score, e.g. ScienceWorld's 0-100, into it)")
    if not isinstance(done, bool) and done not in (0, 1):
        raise QlassError(f"environment {label}: step() returned done {done!r}; it must be true or false")
    if not isinstance(result.info, dict):
        raise QlassError(f"environment {label}: step() returned info of type {type(result.info).__name__}, "
                         "not a dict")
    if not 0.0 <= reward <= 1.0:  # a sum of float parts just outside [0, 1]: every record holds a score in it
        result = dataclasses.replace(result, reward=min(1.0, max(0.0, float(reward))))
    return result


EnvFactory = Callable[..., Env]
ENV_MEMBERS = ("splits", "tasks", "prompt", "reset", "step", "expert", "close")
"""The methods anything :func:`make_env` builds must have (besides a ``name``) to be taken for an
environment: the contract of docs/environments.md."""
_BUILTIN: dict[str, tuple[str, str]] = {
    "sciworld": ("qlass.envs.sciworld", "ScienceWorldEnv"),
    "alfworld": ("qlass.envs.alfworld", "AlfWorldEnv"),
    "webshop": ("qlass.envs.webshop", "WebShopEnv"),
}


def _checked(factory: EnvFactory, spec: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    from ..config import check_call_options

    return check_call_options(factory, dict(kwargs), f"environment {spec!r}")


class EnvRegistry:
    """Names → environment factories; built-ins are imported lazily so missing extras only matter
    when used."""

    def __init__(self) -> None:
        self._factories: dict[str, EnvFactory] = {}

    def register(self, name: str, factory: EnvFactory) -> None:
        self._factories[name] = factory

    def names(self) -> list[str]:
        return sorted(set(_BUILTIN) | set(self._factories))

    def factory(self, spec: str) -> EnvFactory:
        """The factory ``spec`` names (a registered or built-in name, or ``package.module:Class``)."""
        if not isinstance(spec, str):  # was: "argument of type 'NoneType' is not iterable"
            raise QlassError(f"an environment is named by a string (a registered name or package.module:Class), "
                             f"got {spec!r} ({type(spec).__name__})")
        if spec in self._factories:
            return self._factories[spec]
        if spec in _BUILTIN:
            return load_object(":".join(_BUILTIN[spec]), "environment")
        if ":" in spec:
            factory = load_object(spec, "environment")
            if not callable(factory):
                raise QlassError(f"environment {spec!r} is a {type(factory).__name__}, not a class or function "
                                 "that builds an environment")
            return factory
        raise QlassError(f"unknown environment {spec!r}; known: {', '.join(self.names())} "
                         "or 'package.module:Class'")

    def check(self, spec: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """``kwargs`` checked against the signature of ``spec``'s factory (names, required ones,
        annotated types), without building the environment; a mistyped option is a clear error."""
        return _checked(self.factory(spec), spec, kwargs)

    def make(self, spec: str, **kwargs: Any) -> Env:
        """Build ``spec`` with constructor options ``kwargs``, checked first (:meth:`check`)."""
        factory = self.factory(spec)
        options = _checked(factory, spec, kwargs)
        try:
            env = factory(**options)
        except QlassError:
            raise
        except Exception as exc:  # the environment's own constructor failed (a missing simulator, data ...)
            raise raised_in_user_code(f"environment {spec!r}: building it", exc) from exc
        lacking = [m for m in ENV_MEMBERS if not callable(getattr(env, m, None))]
        if lacking:
            raise QlassError(f"environment {spec!r} built a {type(env).__name__}, not an environment "
                             f"(it lacks the method(s) {', '.join(lacking)}; see docs/environments.md)")
        name = _call(env, "reading its name", lambda: getattr(env, "name", None))
        if not isinstance(name, str) or not name:
            raise QlassError(f"environment {spec!r} built a {type(env).__name__} whose name is {name!r}; it needs "
                             "a `name` attribute, a short string such as 'corridor'")
        return env


_REGISTRY = EnvRegistry()


def check_splits(env: Env, splits: Sequence[str], spec: str) -> None:
    """Raise :class:`QlassError` naming the first of ``splits`` that ``env`` (made from ``spec``) lacks,
    with the splits it has (an environment may hand any name its default tasks)."""
    known = env_splits(env)
    unknown = [split for split in splits if split not in known]
    if unknown:
        raise QlassError(f"{spec}: no split {unknown[0]!r}; its splits: {', '.join(known)}")


def register_env(name: str, factory: EnvFactory) -> None:
    """Make ``factory`` available as ``make_env(name)`` and ``--env name``."""
    _REGISTRY.register(name, factory)


def registered_envs() -> list[str]:
    """Names of all known environments."""
    return _REGISTRY.names()


def make_env(spec: str, **kwargs: Any) -> Env:
    """Build an environment by registered name or ``package.module:Class``."""
    return _REGISTRY.make(spec, **kwargs)


def env_maker(spec: str, **kwargs: Any) -> Callable[[], Env]:
    """``make_env(spec, **kwargs)`` as a factory to send to workers: a name given to :func:`register_env` travels
    with its factory, since a worker process starts with none registered ("unknown environment")."""
    factory = _REGISTRY._factories.get(spec) if isinstance(spec, str) else None  # registered in this process
    return (functools.partial(make_env, spec, **kwargs) if factory is None
            else functools.partial(_make_registered, spec, factory, kwargs))


def _make_registered(spec: str, factory: EnvFactory, kwargs: dict[str, Any]) -> Env:
    _REGISTRY.register(spec, factory)  # in a worker process, what the caller had registered
    return make_env(spec, **kwargs)


def check_env_options(spec: str, kwargs: Mapping[str, Any]) -> None:
    """Raise :class:`QlassError` if environment ``spec`` is unknown or does not take ``kwargs``
    (as :func:`make_env` would), without building it."""
    _REGISTRY.check(spec, kwargs)


def check_tasks(tasks: Any, where: str) -> None:
    """Raise ``TypeError`` naming ``where`` unless ``tasks`` is a sequence of :class:`~qlass.types.Task` (one task id
    or task given bare was "'str' object has no attribute 'id'" from inside the run)."""
    odd = tasks if isinstance(tasks, (str, Task)) or not isinstance(tasks, (list, tuple)) else next(
        (t for t in tasks if not isinstance(t, Task)), None)
    if odd is not None:
        raise TypeError(f"{where}: argument 'tasks' must be a list of qlass.types.Task (env.tasks(split) gives them), "
                        f"got {'an item ' if odd is not tasks else ''}{odd!r:.80} ({type(odd).__name__})")


def check_env_factory(make_env: Any, where: str) -> None:
    """Raise ``TypeError`` naming ``where`` when ``make_env`` cannot make environments: an environment itself or
    its name handed where a factory belongs (was "'Corridor' object is not callable" from the first episode)."""
    if not callable(make_env):
        raise TypeError(f"{where}: argument 'make_env' must be a callable returning a new environment (its class, "
                        f"or lambda: make_env(name)), got a {type(make_env).__name__}")
