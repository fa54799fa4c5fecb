"""The Reflexion baseline: trials from reset, a reflection after each failed one shown to the next,
every trial's tokens counted, the budget curve per trial count; end to end through ``qlass eval``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_search import TASK, TwoDoors

from qlass.agent import SearchContext
from qlass.errors import QlassError
from qlass.reflexion import MEMORY_HEADER, REFLECT_PROMPT, ReflexionConfig
from qlass.report import budget_points
from qlass.search import METHODS, make_method_config, method_label
from qlass.types import Completion

TESTS = Path(__file__).parent
A = "Thought: try a.\nAction: open door a"
B = "Thought: try b.\nAction: open door b"


class Learner:
    """Opens door b until its task turn carries a reflection, then door a; reflects when asked."""

    def __init__(self) -> None:
        self.prompts: list[list[str]] = []

    def sample(self, histories, n=1, temperature=0.0, max_new_tokens=128, seed=None):
        out = []
        for h in histories:
            self.prompts.append([m.content for m in h])
            if h[-1].content == REFLECT_PROMPT:
                out.append([Completion(f"Door b\nlost   (attempt {len(self.prompts)}).", 30, 7)])
            else:
                task_turn = h[2].content
                out.append([Completion(A if MEMORY_HEADER in task_turn else B, 20, 5)])
        return out


def test_a_failed_trial_is_reflected_on_and_the_next_trial_sees_it() -> None:
    env, policy = TwoDoors(), Learner()
    cfg = ReflexionConfig(trials=3, max_steps=4)
    traj = METHODS["reflexion"].run(TASK, SearchContext(env=env, policy=policy, seed=5), cfg)
    assert traj.reward == 1.0 and env.resets == 2  # trial 2 won: no third trial
    trials = traj.meta["trials"]
    assert [t["reward"] for t in trials] == [0.0, 1.0] and [t["success"] for t in trials] == [False, True]
    assert trials[0]["reflection"] == "Door b lost (attempt 2)."  # whitespace folded, one line
    assert "reflection" not in trials[1]
    # the reflection request is the failed trial's conversation, then the prompt
    assert policy.prompts[1][-1] == REFLECT_PROMPT and policy.prompts[1][-3] == B
    # trial 2's task turn ends with the memory; its other turns are the environment's own
    assert policy.prompts[2][2].endswith(f"{MEMORY_HEADER}\n- Door b lost (attempt 2).")
    assert policy.prompts[2][:2] == policy.prompts[0][:2]
    # every token is counted: 2 acting turns (20/5 each) and one reflection (30/7)
    assert (traj.meta["prompt_tokens"], traj.meta["completion_tokens"], traj.meta["env_steps"]) == (70, 17, 2)
    # the recorded trajectory is the last trial
    assert [m.content for m in traj.messages][-2:] == [A, "Observation: You win."]


def test_trials_stop_at_the_limit_and_memory_keeps_the_latest() -> None:
    class Stubborn(Learner):
        def sample(self, histories, n=1, temperature=0.0, max_new_tokens=128, seed=None):
            outs = super().sample(histories, n, temperature, max_new_tokens, seed)
            return [[Completion(B, 20, 5)] if o[0].text == A else o for o in outs]

    env, policy = TwoDoors(), Stubborn()
    traj = METHODS["reflexion"].run(TASK, SearchContext(env=env, policy=policy, seed=0),
                                    ReflexionConfig(trials=3, memory=1, max_steps=4))
    assert traj.reward == 0.0 and len(traj.meta["trials"]) == 3 and env.resets == 3
    assert "reflection" in traj.meta["trials"][1] and "reflection" not in traj.meta["trials"][2]
    last_task_turn = policy.prompts[-1][2]
    assert last_task_turn.count("\n- ") == 1 and "attempt 4" in last_task_turn  # memory=1: the latest only


def test_config_and_label() -> None:
    cfg = make_method_config("reflexion", {"trials": 2})
    assert method_label("reflexion", cfg) == "reflexion(trials=2)"
    other = make_method_config("reflexion", {"trials": 2, "memory": 1, "temperature": 0.7, "max_steps": 9})
    assert method_label("reflexion", other) == "reflexion(trials=2,memory=1,temperature=0.7)"
    for bad, said in (({"trials": 0}, "trials, memory and reflection_tokens must be >= 1"),
                      ({"memory": 0}, "trials, memory and reflection_tokens must be >= 1"),
                      ({"reflection_tokens": 0}, "trials, memory and reflection_tokens must be >= 1"),
                      ({"temperature": -1.0}, "temperature must be >= 0, got -1.0"),
                      # no reward in [0, 1] reaches 1.5 (a solved task was replayed); any reaches 0 or -2
                      ({"success": 1.5}, r"success must be in \(0, 1\] \(rewards are in \[0, 1\]\), got 1.5"),
                      ({"success": 0.0}, r"success must be in \(0, 1\]"),
                      ({"success": -2.0}, r"success must be in \(0, 1\]")):
        with pytest.raises(QlassError, match=f"method 'reflexion': {said}"):
            make_method_config("reflexion", bad)


def record(trials: list[tuple[float, int, int]]) -> dict:
    return {"env": "toy", "split": "seen", "method": "reflexion(trials=3)", "method_name": "reflexion",
            "config": {"trials": 3}, "oracle": False,
            "trials": [{"reward": r, "completion_tokens": c, "reflection_completion_tokens": n} for r, c, n in trials]}


def test_budget_curve_reads_every_trial_count_from_one_run() -> None:
    recs = [record([(0.0, 10, 4), (1.0, 12, 0)]), record([(0.5, 8, 3), (0.5, 9, 3), (0.25, 7, 0)])]
    points = [(p["budget_param"], p["completion_tokens"], p["avg_reward"]) for p in budget_points(recs)]
    # T'=1: first trials only; T'=2: + reflection 1 + trial 2; T'=3: the first record stopped at 2 trials
    assert points == [(1, 9.0, 0.25), (2, (26 + 20) / 2, 0.75), (3, (26 + 30) / 2, 0.625)]


@pytest.mark.slow
def test_eval_cli_with_a_real_model_records_every_trial(tiny_model_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "qlass", "eval", "--model", str(tiny_model_dir), "--env", "toy_envs:Corridor",
           "--split", "seen", "--limit", "2", "--method", "reflexion:trials=2,max_steps=3,max_new_tokens=6,"
           "reflection_tokens=5", "--env-arg", "step_limit=3", "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    recs = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(r["method"] == "reflexion(trials=2)" for r in recs)
    for r in recs:
        trials = r["trials"]
        assert 1 <= len(trials) <= 2
        spent = sum(t["completion_tokens"] + t.get("reflection_completion_tokens", 0) for t in trials)
        assert r["completion_tokens"] == spent
        assert r["env_steps"] == sum(t["env_steps"] for t in trials)
        assert (len(trials) == 2) == (trials[0]["reward"] < 1.0)
    summary = json.loads((out / "results.json").read_text())
    assert [row["method"] for row in summary["rows"]] == ["reflexion(trials=2)"]
