"""The whole pipeline on an environment defined only in the tests (``toy_envs.Corridor``):
expert export, SFT of a tiny model, exploration, Q data, QNet, and every inference method."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import yaml
from toy_envs import Corridor

from qlass.envs.base import env_reset, env_step, env_tasks, make_env
from qlass.errors import QlassError
from qlass.jsonl import read_jsonl
from qlass.tree import read_qdata, read_trees
from qlass.types import StepResult, Task

TESTS = Path(__file__).parent


@pytest.mark.slow
def test_pipeline_on_a_user_environment(tiny_model_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    config = {
        "run_dir": str(run_dir),
        "model": str(tiny_model_dir),
        "env": "toy_envs:Corridor",
        "env_args": {"step_limit": 4},
        "expert": {"per_task": 4},
        "sft": {"epochs": 1, "lr": 1.0e-3, "batch_size": 2, "micro_batch": 2, "val_fraction": 0.0},
        "explore": {"limit": 2, "skip": 2, "max_new_tokens": 6, "max_depth": 2, "max_nodes": 12},
        "qnet": {"epochs": 1, "batch_size": 2, "val_fraction": 0.5, "max_length": 512, "max_action_tokens": 32},
        "eval": {"limit": 2, "max_steps": 3,
                 "methods": ["greedy:max_new_tokens=6", "best-of-n:n=2,max_new_tokens=6", "qlass:m=2,max_new_tokens=6"]},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-m", "qlass", "run", str(path)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| corridor | seen | qlass(m=2) | 2 |" in result.stdout
    assert (run_dir / "sft" / "model.safetensors").exists()
    trees = read_trees(run_dir / "trees.jsonl")
    assert len(trees) == 2
    for tree in trees:  # the expert graft gives every tree a winning leaf
        kids = tree.children()
        assert any(n.reward == 1.0 and n.done and not kids[n.id] for n in tree.nodes)
    assert read_qdata(run_dir / "qdata.jsonl")
    assert (run_dir / "qnet" / "config.json").exists()
    rows = json.loads((run_dir / "eval" / "results.json").read_text())["rows"]
    assert {r["method"] for r in rows} >= {"greedy", "best-of-n(n=2,qnet)", "qlass(m=2)"}
    searched = [r for r in map(json.loads, (run_dir / "eval" / "records.jsonl").read_text().splitlines())
                if r["method"] == "qlass(m=2)"]
    assert searched and all(r["qnet_choices"] == len(r["trajectory"]["decisions"]) for r in searched)
    again = subprocess.run([sys.executable, "-m", "qlass", "run", str(path)], env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "complete; nothing to do" in again.stderr
    # the same SFT checkpoint reused by another run folder: stage 1 is skipped, exploration runs
    reuse = {**config, "run_dir": str(tmp_path / "reuse"), "sft_model": str(run_dir / "sft")}
    path.write_text(yaml.safe_dump(reuse))
    done = subprocess.run([sys.executable, "-m", "qlass", "run", str(path), "--stop-after", "explore"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stopped after stage explore" in done.stdout
    assert not (tmp_path / "reuse" / "sft").exists() and not (tmp_path / "reuse" / "expert.json").exists()
    assert [t.to_dict() for t in read_trees(tmp_path / "reuse" / "trees.jsonl")] == [t.to_dict() for t in trees]
    assert "section(s) expert, sft ignored" in done.stderr
    # the reference code's shortcut, asked for on the command line, is labelled wherever it shows
    oracle = subprocess.run([sys.executable, "-m", "qlass", "eval", "--model", str(run_dir / "sft"), "--qnet",
                             str(run_dir / "qnet"), "--env", "toy_envs:Corridor", "--env-arg", "step_limit=4",
                             "--method", "qlass:m=2,max_new_tokens=6", "--oracle-terminal", "--limit", "1",
                             "--max-steps", "3", "--out", str(tmp_path / "oracle")], env=env, capture_output=True, text=True)
    assert oracle.returncode == 0, oracle.stderr[-3000:]
    assert "| corridor | seen | qlass(m=2)[oracle] | 1 |" in oracle.stdout
    (rec,) = read_jsonl(tmp_path / "oracle" / "records.jsonl")
    assert rec["oracle"] is True and rec["config"]["oracle_terminal"] is True


class _Broken(Corridor):
    """Corridor whose ``step``/``reset``/``tasks`` answer ``answer`` (an exception is raised)."""

    def __init__(self, method: str, answer: object) -> None:
        super().__init__()
        self.method, self.answer = method, answer

    def _answer(self, real: object) -> object:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer(real) if callable(self.answer) else self.answer

    def tasks(self, split: str, task_types: Sequence[str] | None = None) -> list[Task]:
        real = super().tasks(split, task_types)
        return self._answer(real) if self.method == "tasks" else real  # type: ignore[return-value]

    def reset(self, task: Task) -> str:
        real = super().reset(task)
        return self._answer(real) if self.method == "reset" else real  # type: ignore[return-value]

    def step(self, output: str) -> StepResult:
        real = super().step(output)
        return self._answer(real) if self.method == "step" else real  # type: ignore[return-value]


@pytest.mark.parametrize("method,answer,message", [
    ("step", lambda r: (r.observation, r.reward, r.done), "step() returned a tuple, not a StepResult"),
    ("step", lambda r: StepResult(7, r.reward, r.done), "step() returned an observation of type int, not a string"),
    ("step", lambda r: StepResult(r.observation, "0.5", r.done), "step() returned reward '0.5'; it must be a finite number"),
    ("step", lambda r: StepResult(r.observation, float("nan"), r.done), "step() returned reward nan"),
    ("step", lambda r: StepResult(r.observation, True, r.done), "step() returned reward True"),
    ("step", lambda r: StepResult(r.observation, r.reward, None), "step() returned done None; it must be true or false"),
    ("step", lambda r: StepResult(r.observation, r.reward, r.done, ["x"]), "step() returned info of type list, not a dict"),
    ("step", RuntimeError("simulator crashed"), "step() raised RuntimeError: simulator crashed (at "),
    ("reset", None, "reset('corridor/0') returned a NoneType, not the first observation as a string"),
    ("reset", KeyError("room"), "reset('corridor/0') raised KeyError: 'room'"),
    ("tasks", "corridor/0", "tasks('train') returned a str, not a list of Task"),
    ("tasks", ["corridor/0"], "tasks('train')[0] is 'corridor/0', not a Task"),
    ("tasks", lambda real: real + real[:1], "tasks('train') lists task 'corridor/0' twice"),
])
def test_what_a_user_environment_returns_is_checked(method: str, answer: object, message: str) -> None:
    env = _Broken(method, answer)
    with pytest.raises(QlassError) as err:
        [task] = env_tasks(env, "train")[:1]
        env_reset(env, task)
        env_step(env, "Action: go east")
    assert f"environment test_byo_env:_Broken: {message}" in str(err.value)


def test_numbers_of_other_types_are_taken_as_rewards_and_done() -> None:
    class NumpyLike(Corridor):
        def step(self, output: str) -> StepResult:
            real = super().step(output)
            return StepResult(real.observation, np.float32(real.reward), np.bool_(real.done))

    env = NumpyLike()
    env_reset(env, env_tasks(env, "train")[0])
    result = env_step(env, "Action: go east")
    assert float(result.reward) == 1.0 and bool(result.done)


def test_a_user_environment_error_is_a_message_from_the_cli(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-m", "qlass", "explore", "--model", "test_cli_errors:EastWalker",
                             "--env", "test_byo_env:CrashingCorridor", "--limit", "1", "--out",
                             str(tmp_path / "t.jsonl")], env=env, capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "environment test_byo_env:CrashingCorridor: step() raised RuntimeError: simulator crashed (at " in result.stderr
    assert "test_byo_env.py:" in result.stderr


class CrashingCorridor(Corridor):
    def step(self, output: str) -> StepResult:
        raise RuntimeError("simulator crashed")


@pytest.mark.parametrize("source,message", [
    ("class Env:\n    def f(:\n", "cannot load environment 'mod_{n}:Env': {path}:2: invalid syntax"),
    ("raise RuntimeError('no licence')\n", "cannot load environment 'mod_{n}:Env': importing mod_{n} raised "
                                          "RuntimeError: no licence (at {path}:1)"),
    ("class Env:\n    def __init__(self):\n        raise OSError('simulator missing')\n",
     "environment 'mod_{n}:Env': building it raised OSError: simulator missing (at {path}:3)"),
])
def test_a_user_environment_that_fails_to_load_or_build_is_named(source: str, message: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    n = abs(hash(source)) % 10**6  # a fresh module name per case
    path = tmp_path / f"mod_{n}.py"
    path.write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(QlassError) as err:
        make_env(f"mod_{n}:Env")
    assert message.format(n=n, path=path) in str(err.value)


def test_eval_plays_a_users_policy_class(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-m", "qlass", "eval", "--model", "test_cli_errors:EastWalker", "--env",
                             "toy_envs:Corridor", "--limit", "2", "--method", "greedy", "--out", str(tmp_path / "e")],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    records = read_jsonl(tmp_path / "e" / "records.jsonl")
    assert [(r["task"], r["trajectory"]["reward"]) for r in records] == [("corridor/100", 1.0), ("corridor/101", 1.0)]
    assert yaml.safe_load((tmp_path / "e" / "config.yaml").read_text())["model"] == "test_cli_errors:EastWalker"
