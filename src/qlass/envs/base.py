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

import math
import numbers
import re
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

from ..errors import QlassError, raised_in_user_code
from ..imports import load_object
from ..types import Message, StepResult, Task

ACTION_RE = re.compile(r"^\s*Action:\s*(.*?)\s*$", re.MULTILINE)
FORMAT_HINT = (
    "Invalid format: no action found. Reply with one thought line and one action line, exactly:\n"
    "Thought: <your reasoning>\nAction: <one action>"
)


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


def env_tasks(env: Env, split: str, task_types: Sequence[str] | None = None) -> list[Task]:
    """``env.tasks(split, task_types)``, checked: a list of :class:`~qlass.types.Task` with distinct
    string ids, or a :class:`QlassError` naming the environment and what it returned."""
    try:
        tasks = env.tasks(split, task_types)
    except QlassError:
        raise
    except Exception as exc:
        raise _failed(env, f"tasks({split!r})", exc) from exc
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
        seen.add(task.id)
    return list(tasks)


def env_reset(env: Env, task: Task) -> str:
    """``env.reset(task)``, checked: the first observation (a string), or a :class:`QlassError` naming
    the environment, the task and what went wrong."""
    try:
        observation = env.reset(task)
    except QlassError:
        raise
    except Exception as exc:
        raise _failed(env, f"reset({task.id!r})", exc) from exc
    if not isinstance(observation, str):
        raise QlassError(f"environment {env_label(env)}: reset({task.id!r}) returned a "
                         f"{type(observation).__name__}, not the first observation as a string")
    return observation


def env_step(env: Env, output: str) -> StepResult:
    """``env.step(output)``, checked: a :class:`~qlass.types.StepResult` whose observation is a string,
    reward a finite number, done true or false and info a dict; else a :class:`QlassError` naming the
    environment and the field."""
    try:
        result = env.step(output)
    except QlassError:
        raise
    except Exception as exc:
        raise _failed(env, "step()", exc) from exc
    label = env_label(env)
    if not isinstance(result, StepResult):
        raise QlassError(f"environment {label}: step() returned a {type(result).__name__}, not a StepResult")
    reward, done = result.reward, result.done
    if not isinstance(result.observation, str):
        raise QlassError(f"environment {label}: step() returned an observation of type "
                         f"{type(result.observation).__name__}, not a string")
    if isinstance(reward, bool) or not isinstance(reward, numbers.Real) or not math.isfinite(reward):
        raise QlassError(f"environment {label}: step() returned reward {reward!r}; it must be a finite number")
    if not isinstance(done, bool) and done not in (0, 1):
        raise QlassError(f"environment {label}: step() returned done {done!r}; it must be true or false")
    if not isinstance(result.info, dict):
        raise QlassError(f"environment {label}: step() returned info of type {type(result.info).__name__}, "
                         "not a dict")
    return result


EnvFactory = Callable[..., Env]
ENV_MEMBERS = ("tasks", "reset", "step")
"""What anything :func:`make_env` builds must have, at least, to be taken for an environment."""
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
        lacking = [m for m in ENV_MEMBERS if not hasattr(env, m)]
        if lacking:
            raise QlassError(f"environment {spec!r} built a {type(env).__name__}, not an environment "
                             f"(it lacks {', '.join(lacking)})")
        return env


_REGISTRY = EnvRegistry()


def check_splits(env: Env, splits: Sequence[str], spec: str) -> None:
    """Raise :class:`QlassError` naming the first of ``splits`` that ``env`` (made from ``spec``) lacks,
    with the splits it has (an environment may hand any name its default tasks)."""
    known = env.splits()
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


def check_env_options(spec: str, kwargs: Mapping[str, Any]) -> None:
    """Raise :class:`QlassError` if environment ``spec`` is unknown or does not take ``kwargs``
    (as :func:`make_env` would), without building it."""
    _REGISTRY.check(spec, kwargs)
