"""A Ctrl-C that an environment's code swallows still stops the run. Python raises the interrupt wherever
the main thread is; in a finalizer or weakref callback (py4j frees its Java objects in one, under
ScienceWorld) it is printed as "Exception ignored" and lost. ``LosesCtrlC`` reproduces that for real: a
real SIGINT to the process, handled inside a real finalizer. ``python -m qlass`` is a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from toy_envs import Corridor

from qlass.types import StepResult, Task

TESTS = Path(__file__).resolve().parent


class _Lost:
    """An object whose finalizer gets the Ctrl-C: the ``KeyboardInterrupt`` is raised inside ``__del__``."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10_000):  # Python runs the signal's handler at one of these bytecodes, here
            pass


class LosesCtrlC(Corridor):
    """The corridor, where the user presses Ctrl-C during the first step of task ``corridor/101`` and the
    environment's own code swallows the interrupt."""

    def reset(self, task: Task) -> str:
        self._task = task.id
        return super().reset(task)

    def step(self, output: str) -> StepResult:
        if self._task == "corridor/101" and self._steps == 0:
            _Lost()  # freed at once: its finalizer runs here
        return super().step(output)


def test_a_ctrl_c_swallowed_in_an_environments_finalizer_stops_the_run(tmp_path: Path) -> None:
    """Before: the interrupt was lost (Python printed "Exception ignored" and its traceback), the evaluation
    went on through all 6 tasks and exited 0. Now it stops, exit 130 and one line; ``-v`` logs the lost one."""
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = tmp_path / "eval"
    done = subprocess.run([sys.executable, "-m", "qlass", "-v", "eval", "--model", "test_cli_errors:EastWalker", "--env",
                           "test_interrupt:LosesCtrlC", "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=120, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert "a Ctrl-C was lost in <function _Lost.__del__" in done.stderr, done.stderr[-3000:]
    assert "Exception ignored" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == 130, done.stderr[-3000:]
    assert done.stderr.rstrip().splitlines()[-1].startswith("interrupted: rerun the same command to resume")
    done_tasks = [json.loads(line)["task"] for line in (out / "records.jsonl").read_text().splitlines()]
    assert "corridor/101" not in done_tasks and len(done_tasks) < 6, done_tasks
