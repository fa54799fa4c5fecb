"""Run many independent work items (one per task) in-process, in a process pool, or on Ray.

Every backend has one interface, :meth:`Executor.run`: ``setup`` is a picklable callable that is
called once per worker and returns the worker — a callable ``worker(item) -> result``, optionally
with a ``close()`` method — so expensive state (a model, a simulator) is built once per worker, not
once per item. A worker that can work on several items at once also has ``stream(items)``: it takes
items from the iterator only when it can start them and yields ``(position, result)`` as each
finishes (``position`` counts the items it took); every backend then feeds it items lazily, so a
worker pulls more work whenever one of its items ends and no item is given to two workers.
``run`` yields ``(index, result)`` as items finish: in order for the local backend with a plain
worker, in completion order otherwise. Results must not depend on which worker computed them (pass
the seeds inside the items); then every backend gives the same results.

- :class:`LocalExecutor`: this process, no pickling (objects such as a loaded policy can be used).
- :class:`ProcessExecutor`: ``workers`` spawned processes pulling items from a queue; a worker that
  raises stops the run (a :class:`QlassError` with its one line, the traceback logged at debug level; any
  other exception with its traceback, as on Ray); workers exit as soon as their parent dies, even mid-item.
- :class:`RayExecutor`: ``workers`` Ray actors (one CPU each by default) on a local or existing
  cluster (``address``); needs the ``ray`` extra. A streaming worker gets an equal share of the
  items up front (every ``workers``-th item) and streams its results back as they finish.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

from .errors import QlassError, require

log = logging.getLogger(__name__)
Worker = Callable[[Any], Any]
Setup = Callable[[], Worker]
BACKENDS = ("local", "process", "ray")


class Executor(Protocol):
    """Runs ``setup()``-made workers over items (see module docstring)."""

    def run(self, setup: Setup, items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        """Yield ``(index, worker(items[index]))`` for every item as it finishes."""


def _close(worker: Any) -> None:
    close = getattr(worker, "close", None)
    if callable(close):
        close()


def _results(worker: Any, items: Iterable[Any]) -> Iterator[tuple[int, Any]]:
    """``(position, result)`` for ``items``: through the worker's ``stream`` when it has one (items
    taken lazily), else one item after another."""
    stream = getattr(worker, "stream", None)
    if callable(stream):
        yield from stream(iter(items))
    else:
        for i, item in enumerate(items):
            yield i, worker(item)


def runs_here(executor: Executor | None) -> bool:
    """Whether ``executor``'s workers run on this machine (in-process or local processes; a Ray
    cluster's may run elsewhere, on other hardware)."""
    return executor is None or isinstance(executor, (LocalExecutor, ProcessExecutor))


class LocalExecutor:
    """Items in this process: one after another, in order (a streaming worker: as it finishes them)."""

    def run(self, setup: Setup, items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        if not items:
            return
        worker = setup()
        try:
            yield from _results(worker, items)
        finally:
            _close(worker)


def _exit_with_parent(parent: int) -> None:
    """A pool process's watchdog thread: end the process as soon as its parent is gone, even in the
    middle of an item (whose result nobody could receive); its own children, such as a simulator's
    JVM, see their pipes close."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _failure(exc: BaseException) -> tuple[str | None, str]:
    """What a worker reports of its exception: the message of a :class:`QlassError` (a problem qlass has
    already put in words, such as an environment that cannot load a task; else None) and the traceback."""
    return (str(exc) if isinstance(exc, QlassError) else None), traceback.format_exc()


def _worker_error(what: str, message: str | None, trace: str) -> QlassError:
    """The error that stops a run whose worker failed: ``what`` with the qlass ``message`` (the worker's
    traceback logged at debug level: ``qlass -v``), or with the whole traceback for any other exception."""
    if message is None:
        return QlassError(f"{what}:\n{trace}")
    log.debug("%s:\n%s", what, trace)
    return QlassError(f"{what}: {message}")


def _ray_error(exc: Exception) -> QlassError:
    """:func:`_worker_error` for a Ray error (a task's, whose ``cause`` is the worker's exception, or the
    cluster's, such as a killed actor)."""
    cause = getattr(exc, "cause", None)
    return _worker_error("a Ray worker failed", str(cause) if isinstance(cause, QlassError) else None, str(exc))


def _process_main(setup: Setup, tasks: Any, results: Any, parent: int) -> None:
    """A pool process: build the worker, then take items until the sentinel, sending each result (or the
    error) down its own pipe ``results``; dies with its parent."""
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True, name="qlass-parent-watch").start()
    try:
        worker = setup()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent with the traceback
        results.send(("error", "setting up a worker", _failure(exc)))
        return
    taken: list[int] = []  # queue index of each item this process took, by position

    def pull() -> Iterator[Any]:
        while (job := tasks.get()) is not None:
            taken.append(job[0])
            yield job[1]

    try:
        for position, value in _results(worker, pull()):
            results.send(("ok", taken[position], value))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent with the traceback
        streaming = callable(getattr(worker, "stream", None))
        where = f"with items {taken} taken" if streaming else f"on item {taken[-1] if taken else '?'}"
        results.send(("error", where, _failure(exc)))
    finally:
        _close(worker)


class ProcessExecutor:
    """``workers`` processes (``spawn``: safe with threads, JVMs and torch). Each sends its results down
    a pipe of its own, so a worker killed mid-answer (the OOM killer, ``kill -9``) is an error naming its
    exit code, not a read that never ends on a half-written message in a shared queue."""

    def __init__(self, workers: int = 2, start_method: str = "spawn") -> None:
        if workers < 1:
            raise QlassError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self.ctx = mp.get_context(start_method)

    def run(self, setup: Setup, items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        if not items:
            return
        tasks = self.ctx.Queue()
        pipes: dict[Any, Any] = {}  # the reading end of each worker's pipe: its process
        for _ in range(min(self.workers, len(items))):
            receive, send = self.ctx.Pipe(duplex=False)
            proc = self.ctx.Process(target=_process_main, args=(setup, tasks, send, os.getpid()), daemon=True)
            proc.start()
            send.close()  # the worker holds the writing end: its death ends the pipe here
            pipes[receive] = proc
        procs = list(pipes.values())
        for job in enumerate(items):
            tasks.put(job)
        for _ in procs:
            tasks.put(None)
        pending = len(items)
        try:
            while pending:
                for conn in mp.connection.wait(list(pipes)):
                    try:
                        status, index, value = conn.recv()
                    except (EOFError, OSError):  # the worker is gone: after its last result, or died mid-item
                        # (OSError: "got end of file during message", killed while writing one)
                        proc = pipes.pop(conn)
                        proc.join(timeout=5)
                        if proc.exitcode != 0 or not pipes:
                            raise QlassError(f"a worker process exited (exit code {proc.exitcode}) with {pending} "
                                             "item(s) unfinished") from None
                        continue
                    if status == "error":
                        message, trace = value
                        raise _worker_error(f"a worker process failed {index}", message, trace)
                    pending -= 1
                    yield index, value
        finally:
            # items no worker took (a worker's error, Ctrl-C) stay queued: without this, the queue's feeder thread,
            # blocked writing them into a full pipe, kept this process from ever exiting
            tasks.cancel_join_thread()
            deadline = time.monotonic() + (5 if not pending else 0)  # failed or stopped: no wait for the others
            for p in procs:
                p.join(timeout=max(0.0, deadline - time.monotonic()))
            for p in procs:
                if p.is_alive():
                    p.terminate()
                    p.join()
            for conn in pipes:
                conn.close()


class _RayWorker:
    """The actor body: one worker per actor."""

    def __init__(self, setup: Setup) -> None:
        self.worker = setup()

    def run(self, index: int, item: Any) -> tuple[int, Any]:
        return index, self.worker(item)

    def streams(self) -> bool:
        return callable(getattr(self.worker, "stream", None))

    def stream(self, jobs: list[tuple[int, Any]]) -> Iterator[tuple[int, Any]]:
        """The worker's ``stream`` over ``jobs`` (``(index, item)`` pairs), as ``(index, result)``."""
        for position, value in self.worker.stream(item for _, item in jobs):
            yield jobs[position][0], value

    def close(self) -> None:
        _close(self.worker)


def _stop_on_sigterm() -> list[int] | None:
    """After ``ray.init``: SIGTERM stops the run with ``SystemExit(143)`` in the main thread, so that the run's
    ``finally`` kills the actors and shuts Ray down. Under Ray's own handlers the driver aborted (exit code 134,
    after a C++ stack banner) and the local cluster's dashboard and runtime-env agents were left running. The
    list the handler notes the signal in (a Ray call it interrupts turns ``SystemExit(143)`` into
    ``SystemExit(1)``), or None off the main thread, where no handler can be set."""
    if threading.current_thread() is not threading.main_thread():
        return None
    received: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        received.append(signum)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    return received


class RayExecutor:
    """``workers`` Ray actors; starts a local Ray instance unless one is running or ``address`` is
    given. ``runtime_env`` is passed to ``ray.init`` (e.g. ``{"env_vars": {"PYTHONPATH": ...}}``
    so workers import the same user modules as the driver)."""

    def __init__(self, workers: int = 2, address: str | None = None, num_cpus: int | None = None,
                 cpus_per_worker: float = 1.0, runtime_env: dict[str, Any] | None = None) -> None:
        if workers < 1:
            raise QlassError(f"workers must be >= 1, got {workers}")
        self.workers, self.address, self.num_cpus = workers, address, num_cpus
        self.cpus_per_worker, self.runtime_env = cpus_per_worker, runtime_env

    def run(self, setup: Setup, items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        if not items:
            return
        ray = require("ray", "ray")
        started = not ray.is_initialized()
        before = signal.getsignal(signal.SIGTERM)
        if started:
            ray.init(address=self.address, num_cpus=self.num_cpus, runtime_env=self.runtime_env,
                     include_dashboard=False, logging_level=logging.WARNING)
        terminated = _stop_on_sigterm() if started else None
        actor_cls = ray.remote(num_cpus=self.cpus_per_worker)(_RayWorker)
        actors = [actor_cls.remote(setup) for _ in range(min(self.workers, len(items)))]
        finished = False
        try:
            if ray.get(actors[0].streams.remote()):
                yield from self._streamed(ray, actors, items)
                finished = True
                return
            todo = list(enumerate(items))[::-1]
            running: dict[Any, Any] = {}
            for actor in actors:
                if todo:
                    running[actor.run.remote(*todo.pop())] = actor
            while running:
                (ref,), _ = ray.wait(list(running), num_returns=1)
                actor = running.pop(ref)
                try:
                    index, value = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    raise _ray_error(exc) from None
                if todo:
                    running[actor.run.remote(*todo.pop())] = actor
                yield index, value
            finished = True
        finally:
            # idle actors close their workers; after Ctrl-C or an error they are still inside items, and a close
            # queued behind those ran only when they ended: the run took 30 s to stop. Killed, their processes
            # (and children, such as a simulator) end at once
            if finished:
                ray.wait([a.close.remote() for a in actors], num_returns=len(actors), timeout=30)
            for actor in actors:
                ray.kill(actor)
            if started:
                ray.shutdown()
            if terminated is not None:
                if before is not None:
                    signal.signal(signal.SIGTERM, before)
                if terminated and isinstance(sys.exc_info()[1], SystemExit):
                    raise SystemExit(128 + terminated[0]) from None

    @staticmethod
    def _streamed(ray: Any, actors: list[Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        """Streaming workers: actor ``a`` gets every ``len(actors)``-th item from the ``a``-th on and
        sends each result back as soon as it is ready."""
        jobs = list(enumerate(items))
        pending = [actor.stream.options(num_returns="streaming").remote(jobs[a::len(actors)])
                   for a, actor in enumerate(actors)]
        while pending:
            ready, _ = ray.wait(pending, num_returns=1)
            for gen in ready:
                try:
                    index, value = ray.get(next(gen))
                except StopIteration:
                    pending.remove(gen)
                    continue
                except ray.exceptions.RayError as exc:
                    raise _ray_error(exc) from None
                yield index, value


def make_executor(backend: str = "local", workers: int = 2, **options: Any) -> Executor:
    """An executor by name: ``local``, ``process`` or ``ray`` (``options`` go to its constructor)."""
    if backend == "local":
        if options:
            raise QlassError(f"the local backend takes no options, got {sorted(options)}")
        return LocalExecutor()
    if backend == "process":
        return ProcessExecutor(workers, **options)
    if backend == "ray":
        return RayExecutor(workers, **options)
    raise QlassError(f"unknown executor backend {backend!r}; known: {', '.join(BACKENDS)}")
