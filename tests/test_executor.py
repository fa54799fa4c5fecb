"""Executors: in-process, process pool and Ray give the same exploration trees for the same seeds."""

from __future__ import annotations

import functools
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from setup_parts import installed
from test_explore import Rooms, ScriptedPolicy, small_cfg

from qlass.errors import QlassError
from qlass.executor import LocalExecutor, ProcessExecutor, RayExecutor, make_executor
from qlass.explore import explore_tasks
from qlass.jsonl import read_jsonl

TESTS = Path(__file__).parent


class Multiplier:
    """A worker with state built once per worker (``setup`` count visible in the results)."""

    def __init__(self, factor: int) -> None:
        self.factor = factor

    def __call__(self) -> Multiplier:
        self.pid = os.getpid()
        return self

    def run(self, item: int) -> tuple[int, int]:
        if item < 0:
            raise ValueError(f"negative item {item}")
        return item * self.factor, self.pid


def make_worker(factor: int):
    return Multiplier(factor)().run


class Batcher:
    """A streaming worker: holds up to ``width`` items, finishes them newest first, records what it took."""

    def __init__(self, width: int) -> None:
        self.width = width

    def stream(self, items):
        held: list[tuple[int, int]] = []
        for position, item in enumerate(items):
            held.append((position, item))
            if len(held) == self.width:
                yield from ((p, (10 * i, os.getpid())) for p, i in reversed(held))
                held = []
        yield from ((p, (10 * i, os.getpid())) for p, i in reversed(held))


def make_batcher(width: int) -> Batcher:
    return Batcher(width)


def sleepy_worker(pid_dir: str):
    """A worker that announces its pid, then sleeps ``item`` seconds per item."""
    Path(pid_dir, str(os.getpid())).touch()

    def work(item: float) -> float:
        time.sleep(item)
        return item
    return work


def big_result_worker(pid_dir: str):
    """A worker that announces its pid per item, then answers item 0 at once and any other item after a
    second with a 2 MB result (more than a pipe holds: the write waits for the reader)."""
    def work(item: int) -> str:
        Path(pid_dir, f"item{item}").write_text(str(os.getpid()))
        if item == 0:
            return "small"
        time.sleep(1)
        return "x" * 2_000_000
    return work


def failing_worker():
    """Item 0 fails after half a second; the others take a minute."""
    def work(item: int) -> int:
        if item == 0:
            time.sleep(0.5)
            raise QlassError("task 0: broken env")
        time.sleep(60)
        return item
    return work


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie left for the reaper counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def trees_by_id(path: Path) -> dict[str, dict]:
    return {r["tree_id"]: r for r in read_jsonl(path)}


def run_backend(executor, tmp_path: Path, name: str) -> dict[str, dict]:
    env = Rooms()
    tasks = env.tasks("train")
    out = tmp_path / f"{name}.jsonl"
    explore_tasks(Rooms, tasks, ScriptedPolicy, small_cfg(), out, seed=11, executor=executor, progress=False)
    return trees_by_id(out)


def test_local_executor_in_order() -> None:
    out = list(LocalExecutor().run(functools.partial(make_worker, 3), [1, 2, 5]))
    assert [(i, r[0]) for i, r in out] == [(0, 3), (1, 6), (2, 15)]
    assert list(LocalExecutor().run(functools.partial(make_worker, 3), [])) == []


def test_streaming_workers_take_items_lazily_and_results_keep_their_index() -> None:
    local = list(LocalExecutor().run(functools.partial(make_batcher, 3), [1, 2, 3, 4, 5]))
    assert [i for i, _ in local] == [2, 1, 0, 4, 3]  # as the worker finishes them
    assert all(r[0] == 10 * (i + 1) for i, r in local)
    pooled = list(ProcessExecutor(workers=2).run(functools.partial(make_batcher, 2), list(range(9))))
    assert sorted(i for i, _ in pooled) == list(range(9))  # every item once, none twice
    assert all(r[0] == 10 * i for i, r in pooled)


def test_process_pool_spreads_work_and_reports_failures() -> None:
    out = dict(ProcessExecutor(workers=2).run(functools.partial(make_worker, 2), list(range(8))))
    assert {i: r[0] for i, r in out.items()} == {i: 2 * i for i in range(8)}
    assert os.getpid() not in {r[1] for r in out.values()}
    with pytest.raises(QlassError, match="(?s)failed on item 2:.*negative item -1"):
        list(ProcessExecutor(workers=2).run(functools.partial(make_worker, 2), [1, 2, -1]))


def test_workers_die_with_their_parent_even_mid_item(tmp_path: Path) -> None:
    """``qlass run`` killed while its workers are inside long items must not leave them running."""
    pids = tmp_path / "pids"
    pids.mkdir()
    code = (f"import functools, sys\nsys.path.insert(0, {str(TESTS)!r})\n"
            "from qlass.executor import ProcessExecutor\nfrom test_executor import sleepy_worker\n"
            f"list(ProcessExecutor(2).run(functools.partial(sleepy_worker, {str(pids)!r}), [300, 300]))\n")
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 120
        while len(list(pids.iterdir())) < 2 and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.2)
        workers = [int(p.name) for p in pids.iterdir()]
        assert len(workers) == 2 and all(_running(w) for w in workers)
        time.sleep(1.0)  # both are now inside their 300-second items
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 15
    while any(_running(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_running(w) for w in workers)


def _script(code: str, hung: str) -> subprocess.CompletedProcess:
    """``code`` run by a Python of its own, which must end within 120 s (else the test fails saying ``hung``)
    with exit code 0."""
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(hung)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_a_run_stopped_early_exits_though_items_are_left_in_its_queue() -> None:
    """A run stopped early (a worker's error, Ctrl-C, a worker killed) with more items queued than a pipe holds
    (64 KiB) never exited: the queue's feeder thread stayed blocked writing items no worker would take, and the
    interpreter waited for it at exit (``qlass eval --backend process`` hung after Ctrl-C, for good)."""
    code = (f"import functools, sys\nsys.path.insert(0, {str(TESTS)!r})\n"
            "from qlass.errors import QlassError\nfrom qlass.executor import ProcessExecutor\n"
            "from test_executor import make_worker\n"
            "try:\n    list(ProcessExecutor(1).run(functools.partial(make_worker, 2), [-1] + [10 ** 3000] * 300))\n"
            "except QlassError as exc:\n    print('stopped:', str(exc).splitlines()[0])\n")
    done = _script(code, "the process did not exit within 120 s of its run stopping")
    assert "stopped: a worker process failed on item 0:" in done.stdout


def test_a_worker_killed_while_answering_is_an_error_not_a_hang(tmp_path: Path) -> None:
    """A worker killed (the OOM killer, kill -9) in the middle of writing a result larger than a pipe holds
    left the rest of it unread in the shared result queue: the run waited for it for ever."""
    code = (f"import functools, os, signal, sys, time\nsys.path.insert(0, {str(TESTS)!r})\n"
            "from pathlib import Path\nfrom qlass.errors import QlassError\n"
            "from qlass.executor import ProcessExecutor\nfrom test_executor import big_result_worker\n"
            f"pids = Path({str(tmp_path)!r})\n"
            "it = ProcessExecutor(2).run(functools.partial(big_result_worker, str(pids)), [0, 1, 2])\n"
            "print('first', next(it)[0], flush=True)\n"
            "while not (pids / 'item1').exists(): time.sleep(0.05)\n"
            "time.sleep(2.5)  # its worker is now writing its answer, which no one reads yet\n"
            "os.kill(int((pids / 'item1').read_text()), signal.SIGKILL)\n"
            "try:\n    print('then', [i for i, _ in it])\n"
            "except QlassError as exc:\n    print('stopped:', exc)\n")
    done = _script(code, "the run did not end within 120 s of a worker's death")
    assert "first 0" in done.stdout and "stopped: a worker process exited (exit code -9)" in done.stdout, done.stdout


def test_a_workers_error_stops_the_others_at_once() -> None:
    """The error of one worker was raised only after waiting 5 s for each other worker, one after another,
    while they went on with their items (16 workers: over a minute)."""
    start = time.monotonic()
    with pytest.raises(QlassError, match="failed on item 0: task 0: broken env"):
        list(ProcessExecutor(workers=4).run(failing_worker, list(range(8))))
    assert time.monotonic() - start < 15  # it waited 5 s for each other worker in turn: 15 s and more


def test_unknown_backend_is_an_error() -> None:
    with pytest.raises(QlassError, match="unknown executor backend 'spark'"):
        make_executor("spark")


def test_process_pool_gives_the_same_trees_as_local(tmp_path: Path) -> None:
    local = run_backend(LocalExecutor(), tmp_path, "local")
    pooled = run_backend(ProcessExecutor(workers=2), tmp_path, "process")
    assert pooled == local and len(local) == 6


def test_worker_exception_stops_the_run_in_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A worker's qlass error (here: the environment cannot load a task) stops the run with its one line; the
    worker's traceback (about 30 lines before the message, printed with it) goes to the debug log (qlass -v). Any
    other exception keeps its traceback in the error (test_process_pool_spreads_work_and_reports_failures)."""
    tasks = Rooms().tasks("train")
    broken = functools.partial(Rooms, broken_task="rooms/3")
    out = tmp_path / "t.jsonl"
    with caplog.at_level(logging.DEBUG, logger="qlass.executor"):
        with pytest.raises(QlassError) as err:
            explore_tasks(broken, tasks, ScriptedPolicy, small_cfg(), out, seed=1,
                          executor=ProcessExecutor(workers=1), progress=False)
    assert re.fullmatch(r"a worker process failed with items \[0, 1, 2, 3\] taken: environment test_explore:Rooms: "
                        r"reset\('rooms/3'\) raised RuntimeError: cannot load rooms/3 \(at \S+test_explore\.py:\d+\)",
                        str(err.value)), str(err.value)
    assert "Traceback (most recent call last)" in caplog.text and "cannot load rooms/3" in caplog.text
    assert [r["tree_id"] for r in read_jsonl(out)] == ["rooms/0", "rooms/1", "rooms/2"]


@pytest.mark.slow
def test_a_ray_workers_qlass_error_stops_the_run_in_one_line(tmp_path: Path) -> None:
    """As for the process pool: Ray's error text carried the worker's traceback before the qlass line."""
    installed("ray")  # the ray extra
    ray_exec = RayExecutor(workers=1, num_cpus=1, runtime_env={"env_vars": {"PYTHONPATH": str(TESTS)}})
    with pytest.raises(QlassError) as err:
        explore_tasks(functools.partial(Rooms, broken_task="rooms/1"), Rooms().tasks("train"), ScriptedPolicy,
                      small_cfg(), tmp_path / "t.jsonl", seed=1, executor=ray_exec, progress=False)
    assert re.fullmatch(r"a Ray worker failed: environment test_explore:Rooms: reset\('rooms/1'\) raised "
                        r"RuntimeError: cannot load rooms/1 \(at \S+test_explore\.py:\d+\)", str(err.value)), \
        str(err.value)


@pytest.mark.slow
def test_ray_local_cluster_gives_the_same_trees_as_local(tmp_path: Path) -> None:
    installed("ray")  # the ray extra
    local = run_backend(LocalExecutor(), tmp_path, "local")
    ray_exec = RayExecutor(workers=2, num_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": str(TESTS)}})
    assert run_backend(ray_exec, tmp_path, "ray") == local
    streamed = dict(ray_exec.run(functools.partial(make_batcher, 2), list(range(7))))
    assert {i: r[0] for i, r in streamed.items()} == {i: 10 * i for i in range(7)}
