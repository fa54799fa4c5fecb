"""Stopping a run on the Ray backend (real local Ray cluster, real signals) while its actors are inside long
items: it ends within seconds with the usual exit code, and none of the processes it started are left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from setup_parts import installed
from test_executor import _running

TESTS = Path(__file__).parent
# Ctrl-C as a terminal gives it: a shell runs a background job (`cmd &`, e.g. a CI script started so) with SIGINT
# ignored, the test process and the driver inherit that, and the driver would never see the signal
RUN = ("import faulthandler, functools, signal, sys\nfaulthandler.register(signal.SIGUSR1)\n"
       "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
       "sys.path.insert(0, {tests!r})\n"
       "from qlass.executor import RayExecutor\nfrom test_ray_stop import item_marking_worker\n"
       "ray_exec = RayExecutor(2, num_cpus=2, runtime_env={{'env_vars': {{'PYTHONPATH': {tests!r}}}}})\n"
       "list(ray_exec.run(functools.partial(item_marking_worker, {pids!r}), [300, 300]))\n")


def item_marking_worker(pid_dir: str):
    """A worker that sleeps ``item`` seconds per item, first marking in ``pid_dir`` that its process started one."""
    def work(item: float) -> float:
        Path(pid_dir, str(os.getpid())).touch()
        time.sleep(item)
        return item
    return work


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (Ray's GCS, raylet, agents and workers under the driver)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def stop_mid_run(tmp_path: Path, sig: signal.Signals) -> tuple[int, float, str, set[int]]:
    """Start a 2-actor Ray run of two 300-second items, send ``sig`` once both are inside them; the exit
    code, seconds from the signal to the exit, stderr, and the processes the run had started."""
    installed("ray")  # the ray extra
    pids, err = tmp_path / "pids", tmp_path / "stderr"
    pids.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with err.open("w") as stderr:
        driver = subprocess.Popen([sys.executable, "-c", RUN.format(tests=str(TESTS), pids=str(pids))],
                                  stderr=stderr, env=env)
    try:
        deadline = time.monotonic() + 120
        while len(list(pids.iterdir())) < 2 and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.2)
        assert len(list(pids.iterdir())) == 2, err.read_text()[-3000:]
        time.sleep(1.0)  # both actors are now inside their 300-second items
        family = _descendants(driver.pid)
        driver.send_signal(sig)
        start = time.monotonic()
        try:
            code = driver.wait(timeout=90)
        except subprocess.TimeoutExpired:  # where the driver hangs (its stack, written by faulthandler)
            driver.send_signal(signal.SIGUSR1)
            time.sleep(2)
            pytest.fail(f"the run did not stop within 90 s of {sig.name}:\n{err.read_text()[-6000:]}")
        took = time.monotonic() - start
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    deadline = time.monotonic() + 10
    while any(_running(p) for p in family) and time.monotonic() < deadline:
        time.sleep(0.2)
    return code, took, err.read_text(), {p for p in family if _running(p)}


def test_ctrl_c_stops_a_ray_run_at_once(tmp_path: Path) -> None:
    """Ctrl-C took 30 s to take effect: the actors' ``close`` calls were queued behind the items they were
    still running, and the driver waited for them up to its 30-second limit before killing them."""
    code, took, stderr, left = stop_mid_run(tmp_path, signal.SIGINT)
    assert code != 0 and "KeyboardInterrupt" in stderr
    assert took < 15, f"the run took {took:.0f} s to stop after Ctrl-C"
    assert not left, f"processes left running: {sorted(left)}"


def test_sigterm_stops_a_ray_run_and_its_local_cluster(tmp_path: Path) -> None:
    """SIGTERM (a scheduler ending the job) went to Ray's own handlers: the driver aborted with a C++ stack
    banner and exit code 134, and the local cluster's dashboard and runtime-env agents were left running."""
    code, took, stderr, left = stop_mid_run(tmp_path, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, stderr[-3000:]
    assert "SIGTERM received" not in stderr
    assert took < 15, f"the run took {took:.0f} s to stop after SIGTERM"
    assert not left, f"processes left running: {sorted(left)}"
