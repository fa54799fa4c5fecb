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

import pytest
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
    done = subprocess.run([sys.executable, "-m", "qlass", "-v", "eval", "--model", "test_cli_errors:EastWalker",
                           "--env", "test_interrupt:LosesCtrlC", "--out", str(out)], env=env, capture_output=True,
                          text=True, timeout=120, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert "a Ctrl-C was lost in <function _Lost.__del__" in done.stderr, done.stderr[-3000:]
    assert "Exception ignored" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == 130, done.stderr[-3000:]
    assert done.stderr.rstrip().splitlines()[-1].startswith("interrupted: rerun the same command to resume")
    done_tasks = [json.loads(line)["task"] for line in (out / "records.jsonl").read_text().splitlines()]
    assert "corridor/101" not in done_tasks and len(done_tasks) < 6, done_tasks


CUT_LAST_OPTIMIZER_SAVE = """
import os, signal, sys
import torch
import torch.serialization as serialization
from qlass.cli import main
count_file, cut_at = sys.argv[-2], int(sys.argv[-1])
saves, save, write = [0], torch.save, serialization._save

class Cut:
    '''The zip writer of one torch.save, where the user presses Ctrl-C after the file's third record.'''
    def __init__(self, writer):
        self.writer, self.records = writer, 0
    def __getattr__(self, name):
        return getattr(self.writer, name)
    def write_record(self, *args):
        self.writer.write_record(*args)
        self.records += 1
        if self.records == 3:
            os.kill(os.getpid(), signal.SIGINT)

def counted(obj, f, *args, **kwargs):
    if str(f).endswith("optimizer.pt"):
        saves[0] += 1
        with open(count_file, "w") as fh:
            fh.write(str(saves[0]))
        if saves[0] == cut_at:
            serialization._save = lambda o, zip_file, *a, **k: write(o, Cut(zip_file), *a, **k)
            try:
                return save(obj, f, *args, **kwargs)
            finally:
                serialization._save = write
    return save(obj, f, *args, **kwargs)

torch.save = counted
sys.argv = ["qlass", *sys.argv[1:-2]]
main()
"""


def test_ctrl_c_while_the_last_checkpoint_is_written_leaves_a_run_that_resumes(tmp_path: Path,
                                                                                 tiny_model_dir: Path) -> None:
    """A Ctrl-C in the middle of the run's last ``optimizer.pt`` write. Before: the Trainer saved the last step's
    checkpoint twice (at the step, then at the epoch end after validation), the second time over the first's
    files and under its complete ``trainer_state.json``; the torn ``optimizer.pt`` was resumed from, and every
    rerun ended in a PytorchStreamReader traceback. Now each checkpoint is written once, trainer state last: the
    rerun resumes from the one before and ends with the weights and losses of an uninterrupted run."""
    from test_sft import write_data

    data = write_data(tmp_path / "data.json", n=7)
    cfg = tmp_path / "sft.yaml"
    cfg.write_text("epochs: 2\nbatch_size: 2\nmicro_batch: 1\nlr: 1e-3\nval_fraction: 0.15\nsave_every: 2\n"
                   "threads: 1\n")
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    def sft(out: str, *cut: str) -> subprocess.CompletedProcess:
        argv = ["-c", CUT_LAST_OPTIMIZER_SAVE] if cut else ["-m", "qlass"]
        return subprocess.run([sys.executable, *argv, "sft", "--data", str(data), "--model", str(tiny_model_dir),
                               "--config", str(cfg), "--out", str(tmp_path / out), *cut], env=env,
                              capture_output=True, text=True, timeout=300,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    count = tmp_path / "saves.txt"
    full = sft("full", str(count), "0")  # uninterrupted; counts the optimizer.pt writes
    assert full.returncode == 0, full.stderr[-3000:]
    cut = sft("cut", str(count), count.read_text())  # Ctrl-C during the last of them
    assert cut.returncode == 130, cut.stderr[-3000:]
    assert "Traceback" not in cut.stderr and cut.stderr.rstrip().splitlines()[-1].startswith("interrupted:")
    rerun = sft("cut")
    assert rerun.returncode == 0 and "Traceback" not in rerun.stderr, rerun.stderr[-3000:]

    import torch
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    def losses(out: str) -> list[tuple[int, float]]:
        lines = (tmp_path / out / "metrics.jsonl").read_text().splitlines()
        return [(m["step"], round(m["train_loss"], 5)) for m in map(json.loads, lines) if "train_loss" in m]

    assert losses("cut") == losses("full")


CUT_IMPORT = """
import importlib.abc, os, runpy, signal, sys
started_as, prefix, ready = sys.argv[1:4]
ready_module, _, ready_attr = ready.partition(":")

class CtrlCInImport(importlib.abc.MetaPathFinder):
    '''The user presses Ctrl-C at the first import of a module named PREFIX..., once READY (module:attribute,
    or -) is imported in full.'''
    sent = False
    def find_spec(self, name, path, target=None):
        done = ready == "-" or hasattr(sys.modules.get(ready_module), ready_attr)
        if done and name.startswith(prefix) and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, CtrlCInImport())
sys.argv = ["qlass", *sys.argv[4:]]
if started_as == "module":  # python -m qlass
    runpy.run_module("qlass", run_name="__main__", alter_sys=True)
else:  # the qlass script, as pip writes it
    from qlass.__main__ import main
    sys.exit(main())
"""


def _qlass_cut_in_import(started_as: str, prefix: str, ready: str, *argv: str) -> subprocess.CompletedProcess:
    """``qlass ARGV`` started as a module or as the script, with a real Ctrl-C where :data:`CUT_IMPORT` says."""
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-c", CUT_IMPORT, started_as, prefix, ready, *argv], env=env,
                          capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _only_the_interrupted_line(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 130, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == ["interrupted: rerun the same command to resume (finished records "
                                                "and the last checkpoint are kept)"], done.stderr[-3000:]


def test_ctrl_c_while_torch_is_imported_prints_only_the_interrupted_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Before: torch's exit hook, registered before its import was cut short (so before torch set up its own
    loggers), logged 'FakeTensor cache stats' and two more INFO lines after the interrupted line. The Ctrl-C
    comes once torch's fake_tensor module (with its exit hook) is imported, while the rest of torch still is.
    ``cache_slots`` is given so that eval logs nothing of its own before torch loads (the policy's options are
    checked without torch)."""
    _only_the_interrupted_line(_qlass_cut_in_import(
        "script", "torch.", "torch._subclasses.fake_tensor:dump_cache_stats", "eval", "--model", str(tiny_model_dir),
        "--env", "toy_envs:Corridor", "--policy-arg", "cache_slots=2", "--out", str(tmp_path / "eval")))


@pytest.mark.parametrize("started_as", ["module", "script"])
def test_ctrl_c_while_the_command_line_is_imported_prints_only_the_interrupted_line(started_as: str) -> None:
    """Before: the Ctrl-C came before ``main()`` handled it: Python's KeyboardInterrupt traceback, and the
    process killed by the signal. The Ctrl-C comes while the command line imports its commands' modules."""
    _only_the_interrupted_line(_qlass_cut_in_import(started_as, "qlass.commands.explore", "-", "envs"))


def test_ctrl_c_as_qlass_serve_starts_prints_only_the_interrupted_line() -> None:
    """Before: a Ctrl-C between the serving line and uvicorn taking over the signals also printed "coroutine
    'Server.serve' was never awaited" (a RuntimeWarning, three lines). The Ctrl-C comes while uvicorn imports
    its event loop's module, after it made the serving coroutine and before it ran it."""
    done = _qlass_cut_in_import("script", "uvicorn.loops", "-", "serve", "toy_envs:Corridor", "--port", "0")
    serving, *rest = done.stderr.strip().splitlines()
    assert "serving corridor" in serving, done.stderr[-3000:]
    _only_the_interrupted_line(subprocess.CompletedProcess(done.args, done.returncode, "", "\n".join(rest)))
