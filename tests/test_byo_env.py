"""The whole pipeline on an environment defined only in the tests (``toy_envs.Corridor``):
expert export, SFT of a tiny model, exploration, Q data, QNet, and every inference method."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import yaml
from toy_envs import Corridor

from qlass.agent import start_messages
from qlass.envs.base import check_splits, env_reset, env_step, env_tasks, make_env
from qlass.errors import QlassError
from qlass.expert import export_expert, verify_expert
from qlass.jsonl import read_jsonl
from qlass.qdata import read_qdata
from qlass.tree import read_trees
from qlass.types import Message, StepResult, Task

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
        "eval": {"limit": 2, "max_steps": 3, "concurrency": 5,
                 "methods": ["greedy:max_new_tokens=6", "best-of-n:n=2,max_new_tokens=6",
                             "qlass:m=2,max_new_tokens=6"]},
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
    # each stage sizes the policy's cache for its own conversations (evaluation took exploration's: 8 trees x 4)
    slots = {name: yaml.safe_load((run_dir / name).read_text())["policy"]["cache_slots"]
             for name in ("trees.config.yaml", "eval/config.yaml")}
    assert slots == {"trees.config.yaml": 32, "eval/config.yaml": 5 * 2}  # best-of-n keeps n=2 histories live
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
                             "--max-steps", "3", "--out", str(tmp_path / "oracle")],
                            env=env, capture_output=True, text=True)
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
    ("step", lambda r: StepResult(r.observation, "0.5", r.done),
     "step() returned reward '0.5'; it must be a finite number"),
    ("step", lambda r: StepResult(r.observation, float("nan"), r.done), "step() returned reward nan"),
    ("step", lambda r: StepResult(r.observation, True, r.done), "step() returned reward True"),
    ("step", lambda r: StepResult(r.observation, r.reward, None),
     "step() returned done None; it must be true or false"),
    ("step", lambda r: StepResult(r.observation, 7.0, r.done),
     "step() returned reward 7.0; rewards are scores in [0, 1]"),
    ("step", lambda r: StepResult(r.observation, -3.0, r.done), "step() returned reward -3.0; rewards are scores in"),
    ("step", lambda r: StepResult("room \ud800", r.reward, r.done), "step() returned an observation that is not valid "
                                                                     "Unicode (it holds a lone surrogate"),
    ("reset", "Task: \udc00", "reset('corridor/0') returned an observation that is not valid Unicode"),
    ("step", lambda r: StepResult(r.observation, r.reward, r.done, ["x"]),
     "step() returned info of type list, not a dict"),
    ("step", RuntimeError("simulator crashed"), "step() raised RuntimeError: simulator crashed (at "),
    ("reset", None, "reset('corridor/0') returned a NoneType, not the first observation as a string"),
    ("reset", KeyError("room"), "reset('corridor/0') raised KeyError: 'room'"),
    ("tasks", "corridor/0", "tasks('train') returned a str, not a list of Task"),
    ("tasks", ["corridor/0"], "tasks('train')[0] is 'corridor/0', not a Task"),
    ("tasks", lambda real: real + real[:1], "tasks('train') lists task 'corridor/0' twice"),
    ("tasks", lambda real: [replace(t, split="seen") for t in real],
     "tasks('train')[0] ('corridor/0') is of split 'seen', not 'train'"),
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
    assert ("environment test_byo_env:CrashingCorridor: step() raised RuntimeError: simulator crashed (at "
            in result.stderr)
    assert "test_byo_env.py:" in result.stderr


class Odd(Corridor):
    """Corridor whose ``prompt``/``splits``/``expert``/``close`` answer ``answer`` (an exception is raised)."""

    def __init__(self, method: str = "", answer: object = None) -> None:
        super().__init__()
        self.method, self.answer = method, answer

    def _answer(self, method: str, real: object) -> object:
        if method != self.method:
            return real
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    def splits(self) -> dict[str, int]:
        return self._answer("splits", super().splits())  # type: ignore[return-value]

    def prompt(self) -> list[Message]:
        return self._answer("prompt", super().prompt())  # type: ignore[return-value]

    def expert(self, task: Task) -> list[str]:
        return self._answer("expert", super().expert(task))  # type: ignore[return-value]

    def close(self) -> None:
        self._answer("close", None)


@pytest.mark.parametrize("method,answer,message", [
    ("prompt", "Walk east.", "prompt() returned a str, not a list of Message"),
    ("prompt", [{"role": "user", "content": "Walk"}], "prompt()[0] is {'role': 'user', 'content': 'Walk'}, not a "
                                                        "Message"),
    ("prompt", [Message("user", "Walk \ud800")], "prompt() returned message 0 that is not valid Unicode"),
    ("prompt", [Message("robot", "Walk east.")], "prompt()[0] has role 'robot'; a message's role is one of system, "
                                                 "user, assistant"),
    ("prompt", FileNotFoundError("prompts/corridor.txt"),
     "prompt() raised FileNotFoundError: prompts/corridor.txt (at "),
    ("splits", None, "splits() returned a NoneType, not a dict of split names to task counts"),
    ("splits", {"train": "6"}, "splits() gives 'train': '6'; each split must be a name"),
    ("splits", RuntimeError("cannot list splits"), "splits() raised RuntimeError: cannot list splits"),
    ("expert", "Thought: go\nAction: go east", "expert('corridor/0') returned a str, not a list of outputs"),
    ("expert", [1, 2], "expert('corridor/0')[0] is 1, not an output string"),
    ("expert", KeyError("no walkthrough"), "expert('corridor/0') raised KeyError: 'no walkthrough'"),
])
def test_the_rest_of_a_user_environment_is_checked_too(method: str, answer: object, message: str) -> None:
    """prompt, splits and expert were called bare: tracebacks, an OSError printed as if qlass's own file error
    (``error: prompts/corridor.txt``), and an expert string replayed letter by letter."""
    env = Odd(method, answer)
    with pytest.raises(QlassError) as err:
        check_splits(env, ["train"], "test_byo_env:Odd")
        task = env_tasks(env, "train")[0]
        start_messages(env, task)
        verify_expert(env, task)
    assert f"environment test_byo_env:Odd: {message}" in str(err.value)


class Nameless(Corridor):
    name = None  # type: ignore[assignment]


class NoExpert:
    name = "no-expert"

    def __init__(self) -> None:
        self.inner = Corridor()
        self.splits, self.tasks, self.prompt = self.inner.splits, self.inner.tasks, self.inner.prompt
        self.reset, self.step = self.inner.reset, self.inner.step


def test_make_env_needs_the_whole_contract() -> None:
    with pytest.raises(QlassError, match=r"built a NoExpert, not an environment \(it lacks the method\(s\) expert, "
                                         r"close; see docs/environments.md\)"):
        make_env("test_byo_env:NoExpert")
    with pytest.raises(QlassError, match="built a Nameless whose name is None; it needs a `name` attribute"):
        make_env("test_byo_env:Nameless")


def test_a_failing_close_is_a_warning_and_the_export_is_kept(tmp_path: Path) -> None:
    """A close() that raised escaped the command's ``finally``: the finished export was never written."""
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = tmp_path / "expert.json"
    result = subprocess.run([sys.executable, "-m", "qlass", "data", "expert", "--env", "test_byo_env:CloseFails",
                             "--split", "train", "--out", str(out)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(json.loads(out.read_text())) == 6
    assert "environment test_byo_env:CloseFails: close() raised OSError: socket already closed" in result.stderr
    prompt = subprocess.run([sys.executable, "-m", "qlass", "eval", "--model", "test_cli_errors:EastWalker", "--env",
                             "test_byo_env:PromptMissing", "--limit", "1", "--out", str(tmp_path / "e")], env=env,
                            capture_output=True, text=True)
    assert prompt.returncode == 2 and "Traceback" not in prompt.stderr, prompt.stderr
    assert ("error: environment test_byo_env:PromptMissing: prompt() raised FileNotFoundError: prompts/corridor.txt"
            in prompt.stderr)


class CloseFails(Corridor):
    def close(self) -> None:
        raise OSError("socket already closed")


class PromptMissing(Corridor):
    def prompt(self) -> list[Message]:
        raise FileNotFoundError("prompts/corridor.txt")


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


class TypesIgnored(Corridor):
    """Its tasks() ignores ``task_types``: every task, of two types."""

    def tasks(self, split: str, task_types: Sequence[str] | None = None) -> list[Task]:
        return [Task(f"c/{split}/{i}", self.name, split, "walk" if i % 2 else "run", {"length": 1}) for i in range(4)]


def test_task_types_are_kept_even_when_the_environment_ignores_them(caplog) -> None:
    """``--task-types`` relied on the environment: one that ignores the argument gave every task, and
    a run asked for one type played all of them."""
    import logging

    with caplog.at_level(logging.WARNING):
        kept = env_tasks(TypesIgnored(), "train", ["walk"])
    assert [t.id for t in kept] == ["c/train/1", "c/train/3"]
    assert "gave 2 task(s) of other types than walk (run); they are left out" in caplog.text
    assert len(env_tasks(TypesIgnored(), "train")) == 4  # no types asked: every task


@pytest.mark.parametrize("options,message", [
    ({"max_steps": 0}, "max_steps must be a whole number >= 1"),  # excluded every task as "too long"
    ({"max_steps": float("nan")}, "max_steps"),  # no limit at all
    ({"per_task_type": -1}, "per_task_type must be a whole number >= 1"),  # kept nothing
    ({"per_task_type": True}, "per_task_type"),  # counted as 1
    ({"per_task_type": "2"}, "per_task_type"),
])
def test_export_expert_refuses_limits_below_one(options: dict, message: str) -> None:
    env = Corridor()
    with pytest.raises(QlassError, match=message):
        export_expert(env, env.tasks("train"), **options)


def test_export_expert_names_tasks_that_are_not_tasks() -> None:
    with pytest.raises(TypeError, match="export_expert: argument 'tasks' must be a list of qlass.types.Task"):
        export_expert(Corridor(), "corridor/0")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="an item 'corridor/0' \\(str\\)"):
        export_expert(Corridor(), ["corridor/0"])  # type: ignore[list-item]


@pytest.mark.parametrize("spec", [None, 3, Path("toy_envs:Corridor")])
def test_make_env_names_a_spec_that_is_not_a_string(spec: object) -> None:
    """Was: TypeError "argument of type 'NoneType' is not iterable" from the registry's lookup."""
    with pytest.raises(QlassError, match="an environment is named by a string"):
        make_env(spec)  # type: ignore[arg-type]


def test_load_policy_takes_a_model_folder_as_a_path_and_names_other_types(tiny_model_dir: Path) -> None:
    """Was: TypeError "expected string or bytes-like object, got 'PosixPath'" from a regular expression."""
    from qlass.policy import load_policy

    policy = load_policy(tiny_model_dir, threads=1)
    assert policy.sample([[Message("user", "hi")]], max_new_tokens=2)[0][0].completion_tokens
    for spec in (None, 3):
        with pytest.raises(QlassError, match="a policy is a model folder"):
            load_policy(spec)  # type: ignore[arg-type]


class ManglesCtrlC(Corridor):
    """Its step turns a Ctrl-C into another error, as py4j (ScienceWorld's bridge to its JVM) does."""

    def step(self, output: str) -> StepResult:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise AttributeError("'GatewayConnection' object has no attribute 'shutdown_socket'") from None


def test_a_ctrl_c_that_an_environment_turns_into_another_error_stops_the_command() -> None:
    """Not 'error: environment ...: step() raised AttributeError' with exit 2: the user pressed Ctrl-C."""
    env = ManglesCtrlC()
    env_reset(env, env_tasks(env, "train")[0])
    with pytest.raises(KeyboardInterrupt):
        env_step(env, "Action: go east")


class ManglingPolicy:
    """A user's policy class whose library turns a Ctrl-C into another error."""

    def sample(self, histories: Sequence[Sequence[Message]], n: int = 1, temperature: float = 0.0,
               max_new_tokens: int = 128, seed: object = None) -> list:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise ConnectionError("connection reset while reading the answer") from None


def test_a_ctrl_c_that_a_users_policy_turns_into_another_error_stops_the_command() -> None:
    from qlass.policy import load_policy

    policy = load_policy("test_byo_env:ManglingPolicy")
    with pytest.raises(KeyboardInterrupt):
        policy.sample([[Message("user", "hi")]])


def test_an_environment_module_in_the_working_folder_gets_a_hint_from_the_qlass_command(tmp_path: Path) -> None:
    """environments.md's example run from the package's folder: the qlass command (unlike python -m qlass) does
    not search the working folder, and the error said only "No module named 'myenvs'"."""
    (tmp_path / "myenvs.py").write_text("from toy_envs import Corridor\n")
    qlass = Path(sys.executable).with_name("qlass")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    cmd = ["data", "expert", "--env", "myenvs:Corridor", "--out", "x.jsonl"]
    done = subprocess.run([str(qlass), *cmd], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "No module named 'myenvs' (myenvs is in the working folder, which the qlass " \
        "command does not search: run it with PYTHONPATH=. or as python -m qlass)" in done.stderr, done.stderr
    done = subprocess.run([sys.executable, "-m", "qlass", *cmd, "--per-task", "1"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0 and "working folder" not in done.stderr, done.stderr
