"""The environment instances one ``qlass serve`` holds (:class:`EnvPool`), and the checked calls
through which both protocols (:mod:`qlass.serve`, :mod:`qlass.serve_agentgym`) drive them.

Instance ids are random integers below 2**53 that a restarted server does not reissue; an instance
unused for ``idle_timeout`` seconds is closed. What an environment returns goes through the checks of
:mod:`qlass.envs.base`: what they refuse, and an exception from its own code, is an :class:`EnvFault`
(the operator's bug, answered 500); a request the server refuses is a :class:`ServeError`.
"""

import json
import logging
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, TypeVar

from .envs.base import Env, env_close, env_expert, env_prompt, env_splits, env_step, env_task, env_tasks, make_env
from .errors import QlassError
from .jsonl import is_text, with_replacement_characters
from .types import Task

log = logging.getLogger(__name__)

T = TypeVar("T")
IDLE_TIMEOUT = 1800.0
"""Default seconds an instance may sit unused before it is closed (its client is taken for dead)."""
ID_SPACE = 1 << 53
"""Instance ids are integers below this (exact in any JSON reader, JavaScript's included)."""
KEPT_ANSWERS = 4096
"""How many answers of the meta environment (task lists, expert trajectories ...) a pool keeps."""


class ServeError(Exception):
    """A request the server refuses: HTTP ``status`` with ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class EnvFault(Exception):
    """The served environment broke its contract: it returned something the checks of
    :mod:`qlass.envs.base` refuse, or its own code raised (``raised``: the exception's text may hold
    paths or secrets, so it stays in the log). The operator's bug, not the client's: answered 500."""

    def __init__(self, error: QlassError, raised: bool | None = None) -> None:
        super().__init__(str(error))
        self.error, self.raised = error, error.__cause__ is not None if raised is None else raised


def env_call(call: Callable[[], T]) -> T:
    """``call()``, one of the checked environment calls of :mod:`qlass.envs.base` (``env_step`` ...):
    what those checks refuse, and an exception from the environment's own code, become an
    :class:`EnvFault`; a :class:`QlassError` the environment raises itself (a refusal) passes unchanged."""
    try:
        return call()
    except QlassError as exc:
        if _raised_by_checks(exc):
            raise EnvFault(exc) from exc
        raise


def _raised_by_checks(exc: BaseException) -> bool:
    """Whether ``exc`` was raised in :mod:`qlass.envs.base` (not in the environment's own code)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_globals.get("__name__") == env_step.__module__


def fault_message(path: str, fault: EnvFault) -> str:
    """Log ``fault`` (on the request to ``path``) and say what the answer tells the client."""
    if fault.raised:
        ref = uuid.uuid4().hex[:8]
        log.error("environment error %s on %s: %s", ref, path, fault.error, exc_info=fault.error)
        return f"environment error on {path} (see the server log, reference {ref})"
    log.error("environment fault on %s: %s", path, fault.error)
    return f"environment fault on {path} (a bug of the served environment): {fault.error}"


def refuse_non_text(value: str | None, name: str) -> None:
    """Refuse (400) a request field holding a lone surrogate (a JSON ``\\ud800`` escape): UTF-8 cannot
    carry it, so it must not reach the environment (whose answer could then not be sent)."""
    if value is not None and not is_text(value):
        raise ServeError(400, f"{name!r} is not valid Unicode: it holds a lone surrogate (e.g. a '\\ud800' "
                              "escape), which UTF-8 cannot carry")


@dataclass
class _Instance:
    env: Env
    lock: threading.Lock = field(default_factory=threading.Lock)
    task: Task | None = None
    observation: str = ""
    done: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # what a protocol keeps per episode
    last_used: float = field(default_factory=time.monotonic)
    closed: bool = False  # no longer in the pool: whoever holds ``lock`` closes the environment


def task_dict(task: Task) -> dict[str, Any]:
    """The JSON form of a task, as ``/tasks`` and ``/reset`` answer it."""
    return json_safe(asdict(task))


def json_safe(value: Any) -> Any:
    """``value`` with anything JSON cannot hold turned into strings, and lone surrogates (which UTF-8
    cannot carry) replaced by U+FFFD, so that an answer holding it can always be sent."""
    text = json.dumps(value, default=str, ensure_ascii=False)
    return json.loads(text if is_text(text) else with_replacement_characters(text))


class EnvPool:
    """The environment instances of one server, by id, plus one instance that answers task lists,
    prompts and expert trajectories. Those answers are kept (whole splits' task lists, the prompt, and
    the last :data:`KEPT_ANSWERS` expert trajectories and task look-ups; environments are
    deterministic): the meta instance serves one call at a time, and a slow ``expert()`` must not hold
    every ``/tasks`` and ``/prompt`` behind it.

    Ids are drawn at random below 2**53 (an odd multiplier and an offset, both random per pool, map the
    count of instances created so far onto them): a pool never issues one twice, and a restarted server
    almost surely issues none of the ids its clients still hold, so a stale id is answered 404 instead
    of driving a new client's episode. An instance unused for over ``idle_timeout`` seconds (0: never)
    is closed, its client taken for dead."""

    def __init__(self, env_spec: str, env_args: dict[str, Any] | None = None, max_instances: int = 64,
                 idle_timeout: float = IDLE_TIMEOUT) -> None:
        if isinstance(max_instances, bool) or not isinstance(max_instances, int) or max_instances < 1:
            raise QlassError(f"serve: max_instances must be a whole number >= 1, got {max_instances!r}")
        if not isinstance(idle_timeout, (int, float)) or isinstance(idle_timeout, bool) or not idle_timeout >= 0:
            raise QlassError(f"serve: idle_timeout must be >= 0 seconds (0: never), got {idle_timeout}")
        self.env_spec, self.env_args, self.max_instances = env_spec, dict(env_args or {}), max_instances
        self.idle_timeout = idle_timeout
        self.meta = make_env(env_spec, **self.env_args)
        self.name = self.meta.name
        self._meta_lock = threading.Lock()
        self._lock = threading.Lock()
        self._instances: dict[int, _Instance] = {}
        self._id_step, self._id_offset = 2 * secrets.randbelow(ID_SPACE // 2) + 1, secrets.randbelow(ID_SPACE)
        self._created = 0
        self._pending = 0
        self._shut = False
        self._all_tasks: list[Task] | None = None
        self._answers: OrderedDict[tuple[str, ...], Any] = OrderedDict()

    # -- instances -------------------------------------------------------------------------
    def create(self) -> int:
        """Build a new instance; its id. A build that fails is the served environment's fault (its text
        stays in the log); one that ends after :meth:`shutdown` began is closed at once (answered 503)."""
        self.reap()
        with self._lock:
            if self._shut:
                raise ServeError(503, "the server is stopping")
            if len(self._instances) + self._pending >= self.max_instances:
                raise ServeError(429, f"too many open environments ({self.max_instances}); close some with /close "
                                      "(see GET /instances; unused ones are closed after the idle timeout, "
                                      f"{self.idle_timeout:g} s)")
            self._pending += 1  # counted against the limit while it is being built
        try:
            env = make_env(self.env_spec, **self.env_args)
        except QlassError as exc:  # it was built once at start-up with the same arguments
            raise EnvFault(exc, raised=True) from exc
        else:
            with self._lock:
                stopping = self._shut
                if not stopping:
                    env_id = (self._id_offset + self._id_step * self._created) % ID_SPACE
                    self._created += 1
                    self._instances[env_id] = _Instance(env)
            if stopping:  # shutdown() has closed the others already
                env_close(env)
                raise ServeError(503, "the server is stopping")
        finally:
            with self._lock:
                self._pending -= 1
        return env_id

    def get(self, env_id: int) -> _Instance:
        """Instance ``env_id`` (for a read that needs no lock), marked as used now."""
        with self._lock:
            inst = self._find(env_id)
            inst.last_used = time.monotonic()
        return inst

    def _find(self, env_id: int) -> _Instance:
        """Instance ``env_id``; the caller holds ``self._lock``."""
        inst = self._instances.get(env_id)
        if inst is None:
            raise ServeError(404, f"unknown environment id {env_id} (closed, unused for over the server's "
                                  "idle timeout, or from before a restart; create one with POST /create)")
        return inst

    @contextmanager
    def use(self, env_id: int) -> Iterator[_Instance]:
        """Instance ``env_id`` held for one request: a request for an instance that is busy with another
        is refused at once (409), so that it holds no server thread waiting (one client's flood of
        requests would stall every other client)."""
        with self._lock:
            inst = self._find(env_id)
            if not inst.lock.acquire(blocking=False):
                raise ServeError(409, f"environment {env_id} is busy with another request; send one at a time")
        try:
            yield inst
        finally:
            with self._lock:
                inst.last_used, closing = time.monotonic(), inst.closed
                if not closing:
                    inst.lock.release()
            if closing:  # closed while this request used it
                self._close_held(inst)

    def close(self, env_id: int) -> None:
        with self._lock:
            inst = self._instances.pop(env_id, None)
            if inst is None:
                raise ServeError(404, f"unknown environment id {env_id}")
            inst.closed, free = True, inst.lock.acquire(blocking=False)
        if free:  # else the request using it closes it when done
            self._close_held(inst)

    @staticmethod
    def _close_held(inst: _Instance) -> None:
        try:
            env_close(inst.env)
        finally:
            inst.lock.release()

    def reap(self) -> None:
        """Close the instances unused for over ``idle_timeout`` seconds (none busy), logging each."""
        if not self.idle_timeout:
            return
        now, idle = time.monotonic(), []
        with self._lock:
            for env_id, inst in list(self._instances.items()):
                if now - inst.last_used > self.idle_timeout and inst.lock.acquire(blocking=False):
                    del self._instances[env_id]
                    inst.closed = True
                    idle.append((env_id, inst))
        for env_id, inst in idle:
            log.warning("closed environment %d (task %s): unused for %.0f s, over the idle timeout of %g s (its "
                        "client is gone?)", env_id, inst.task.id if inst.task else "none", now - inst.last_used,
                        self.idle_timeout)
            self._close_held(inst)

    def instances(self) -> list[dict[str, Any]]:
        """The open instances: id, task id (None before the first reset), seconds unused, busy or not."""
        now = time.monotonic()
        with self._lock:
            return [{"id": env_id, "task": inst.task.id if inst.task else None, "busy": inst.lock.locked(),
                     "idle_s": round(now - inst.last_used, 1)} for env_id, inst in self._instances.items()]

    def count(self) -> int:
        with self._lock:
            return len(self._instances)

    def shutdown(self) -> None:
        """Close every instance (one still busy: when its request ends) and the meta environment; once."""
        with self._lock:
            ids, done, self._shut = list(self._instances), self._shut, True
        if done:
            return
        for env_id in ids:
            try:
                self.close(env_id)
            except ServeError:  # closed meanwhile
                pass
        with self._meta_lock:
            env_close(self.meta)

    # -- tasks -----------------------------------------------------------------------------
    def _kept(self, key: tuple[str, ...], call: Callable[[Env], T]) -> T:
        """``call(self.meta)`` (one call at a time), its answer kept under ``key`` for later requests."""
        with self._lock:
            if key in self._answers:
                self._answers.move_to_end(key)
                return self._answers[key]
        with self._meta_lock:
            with self._lock:  # answered while this request waited
                if key in self._answers:
                    return self._answers[key]
            answer = call(self.meta)
        with self._lock:
            self._answers[key] = answer
            if len(self._answers) > KEPT_ANSWERS:
                self._answers.popitem(last=False)
        return answer

    def splits(self) -> dict[str, int]:
        return dict(self._kept(("splits",), lambda meta: env_call(lambda: env_splits(meta))))

    def tasks(self, split: str, task_types: list[str] | None = None) -> list[Task]:
        if task_types:  # not kept: a client could ask for any number of combinations of types
            with self._meta_lock:
                return env_call(lambda: env_tasks(self.meta, split, task_types))
        return list(self._kept(("tasks", split), lambda meta: env_call(lambda: env_tasks(meta, split, None))))

    def all_tasks(self) -> list[Task]:
        """Every task, splits in the order ``splits()`` lists them (what integer indices address)."""
        if self._all_tasks is None:
            self._all_tasks = [t for split in self.splits() for t in self.tasks(split)]
        return self._all_tasks

    def task(self, task_id: str) -> Task:
        if callable(getattr(self.meta, "task", None)):
            try:
                return self._kept(("task", task_id), lambda meta: env_call(lambda: env_task(meta, task_id)))
            except QlassError as exc:
                raise ServeError(404, str(exc)) from None
        for task in self.all_tasks():
            if task.id == task_id:
                return task
        raise ServeError(404, f"unknown task {task_id!r}")

    def task_at(self, index: int) -> Task:
        tasks = self.all_tasks()
        if not 0 <= index < len(tasks):
            raise ServeError(404, f"task index {index} out of range 0..{len(tasks) - 1}")
        return tasks[index]

    def prompt(self) -> list[dict[str, str]]:
        messages = self._kept(("prompt",), lambda meta: env_call(lambda: env_prompt(meta)))
        return [{"role": m.role, "content": m.content} for m in messages]

    def expert(self, task: Task) -> list[str]:
        return list(self._kept(("expert", task.id), lambda meta: env_call(lambda: env_expert(meta, task))))
