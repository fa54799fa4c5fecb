"""Inference methods with a scripted policy and a scripted QNet on a two-door environment.

The environment is a legitimate user-defined Env: behind door A the task is won (reward 1), behind
door B it is lost (reward 0). The scripted QNet prefers door B, so any method that peeked at the
environment's reward would pick A — which is how these tests prove the reward is not consulted.
"""

from __future__ import annotations

from typing import Sequence

import pytest

from qlass.envs.base import parse_action
from qlass.search import (
    BestOfNConfig, QlassConfig, SearchContext, argmax, best_of_n, make_method_config, qlass_search,
    unique_candidates,
)
from qlass.errors import QlassError
from qlass.types import Completion, History, Message, StepResult, Task


class TwoDoors:
    name = "two-doors"

    def __init__(self) -> None:
        self.steps = 0
        self.resets = 0

    def splits(self) -> dict[str, int]:
        return {"seen": 1}

    def tasks(self, split: str, task_types: Sequence[str] | None = None) -> list[Task]:
        return [Task("two-doors/0", self.name, split)]

    def prompt(self) -> list[Message]:
        return [Message("user", "Open the right door."), Message("assistant", "OK")]

    def reset(self, task: Task) -> str:
        self.resets += 1
        return "You see door a and door b."

    def step(self, output: str) -> StepResult:
        self.steps += 1
        action = parse_action(output)
        if action == "open door a":
            return StepResult("You win.", 1.0, True)
        if action == "open door b":
            return StepResult("You lose.", 0.0, True)
        return StepResult("Nothing happens.", 0.0, False)

    def expert(self, task: Task) -> list[str]:
        return ["Thought: a.\nAction: open door a"]

    def close(self) -> None:
        pass


class ScriptedPolicy:
    """Returns the same candidate list (cycled) for every history; counts calls."""

    def __init__(self, outputs: list[str]) -> None:
        self.outputs = outputs
        self.calls = 0

    def sample(self, histories, n=1, temperature=0.0, max_new_tokens=128, seed=None):
        self.calls += 1
        return [[Completion(self.outputs[i % len(self.outputs)], 10, 5, logprob=-float(i + 1))
                 for i in range(n)] for _ in histories]


class ScriptedQNet:
    """Scores outputs by a fixed table; reports its token use like the real QNet."""

    def __init__(self, table: dict[str, float]) -> None:
        self.table = table
        self.last_tokens = 0
        self.calls: list[list[str]] = []

    def score(self, history: History, candidates: Sequence[str]) -> list[float]:
        self.calls.append(list(candidates))
        self.last_tokens = 7 * len(candidates)
        return [self.table.get(parse_action(c) or "", 0.0) for c in candidates]


A = "Thought: try a.\nAction: open door a"
B = "Thought: try b.\nAction: open door b"
TASK = Task("two-doors/0", "two-doors", "seen")


def test_qlass_executes_qnet_argmax_not_the_reward() -> None:
    env = TwoDoors()
    qnet = ScriptedQNet({"open door a": 0.1, "open door b": 0.9})
    ctx = SearchContext(env=env, policy=ScriptedPolicy([A, B]), qnet=qnet, make_env=TwoDoors)
    traj = qlass_search(TASK, ctx, QlassConfig(m=2))
    assert traj.steps[0].action == "open door b"
    assert traj.reward == 0.0
    assert qnet.calls == [[A, B]]
    assert traj.steps[0].qnet_tokens == 14
    assert traj.steps[0].completion_tokens == 10  # both candidates were paid for
    assert env.steps == 1 and traj.meta["env_steps"] == 1
    assert traj.meta["oracle"] is False
    assert traj.meta["decisions"] == [{"step": 0, "actions": ["open door a", "open door b"],
                                       "values": [0.1, 0.9], "chosen": 1}]


def test_oracle_terminal_uses_the_reward_and_is_labelled() -> None:
    qnet = ScriptedQNet({"open door a": 0.1, "open door b": 0.9})
    ctx = SearchContext(env=TwoDoors(), policy=ScriptedPolicy([A, B]), qnet=qnet, make_env=TwoDoors)
    traj = qlass_search(TASK, ctx, QlassConfig(m=2, oracle_terminal=True))
    assert traj.steps[0].action == "open door a"
    assert traj.reward == 1.0
    assert traj.meta["oracle"] is True
    assert traj.meta["env_steps"] == 3  # two probe steps + the real one
    assert traj.meta["decisions"][0]["values"] == [1.0, 0.0]  # the true rewards decided


def test_duplicate_candidates_are_merged_and_ties_go_to_the_first() -> None:
    same = [Completion("Thought: x\nAction: Open  Door A", 1, 1), Completion("Thought: y\nAction: open door a", 1, 1),
            Completion(B, 1, 1)]
    assert unique_candidates(same) == [0, 2]
    assert argmax([0.5, 0.5, 0.2]) == 0
    qnet = ScriptedQNet({})
    ctx = SearchContext(env=TwoDoors(), policy=ScriptedPolicy([A, A, B]), qnet=qnet)
    traj = qlass_search(TASK, ctx, QlassConfig(m=3))
    assert qnet.calls == [[A, B]]
    assert traj.steps[0].action == "open door a"


def test_single_distinct_candidate_skips_the_qnet() -> None:
    qnet = ScriptedQNet({})
    ctx = SearchContext(env=TwoDoors(), policy=ScriptedPolicy([A]), qnet=qnet)
    traj = qlass_search(TASK, ctx, QlassConfig(m=2))
    assert qnet.calls == [] and traj.reward == 1.0
    assert traj.meta["decisions"] == []


def test_best_of_n_selects_by_qnet_without_reward_and_reports_oracle_separately() -> None:
    qnet = ScriptedQNet({"open door a": 0.2, "open door b": 0.8})
    policy = ScriptedPolicy([A, B])

    class Alternating(ScriptedPolicy):
        def sample(self, histories, n=1, temperature=0.0, max_new_tokens=128, seed=None):
            self.calls += 1
            out = self.outputs[(self.calls - 1) % len(self.outputs)]
            return [[Completion(out, 10, 5, logprob=-1.0 if out == A else -9.0)] for _ in histories]

    policy = Alternating([A, B])
    env = TwoDoors()
    traj = best_of_n(TASK, SearchContext(env=env, policy=policy, qnet=qnet), BestOfNConfig(n=2))
    assert traj.meta["selected"] == 1 and traj.reward == 0.0
    assert traj.meta["oracle_pass_at_n"] == 1.0
    assert traj.meta["completion_tokens"] == 10 and env.resets == 2
    policy = Alternating([A, B])
    traj = best_of_n(TASK, SearchContext(env=TwoDoors(), policy=policy), BestOfNConfig(n=2, select="likelihood"))
    assert traj.meta["selected"] == 0 and traj.reward == 1.0


class ThreeSteps(TwoDoors):
    """Doors open only on the third try, so episodes last a few steps."""

    def __init__(self) -> None:
        super().__init__()
        self.tries = 0

    def step(self, output: str) -> StepResult:
        self.tries += 1
        if self.tries % 3:
            return StepResult("The door is stuck.", 0.0, False)
        return super().step(output)


def test_best_of_n_plays_its_trajectories_side_by_side_on_the_env_pool() -> None:
    """With an env pool, every step samples all unfinished trajectories in one policy call; each
    trajectory keeps its own environment; a short pool plays in waves."""

    class Recording(ScriptedPolicy):
        def __init__(self) -> None:
            super().__init__([A])
            self.batches: list[int] = []
            self.seeds: list[int] = []

        def sample(self, histories, n=1, temperature=0.0, max_new_tokens=128, seed=None):
            self.batches.append(len(histories))
            self.seeds.append(seed)
            return [[Completion(A if len(h) % 4 else B, 10, 5, logprob=-1.0)] for h in histories]

    envs = [ThreeSteps() for _ in range(4)]
    policy = Recording()
    ctx = SearchContext(env=envs[0], policy=policy, qnet=ScriptedQNet({"open door a": 0.3}), seed=5,
                        env_pool=lambda k: envs[:k])
    traj = best_of_n(TASK, ctx, BestOfNConfig(n=4, max_steps=3))
    assert policy.batches == [4, 4, 4]  # three steps, four trajectories each time
    assert [e.resets for e in envs] == [1, 1, 1, 1] and [e.tries for e in envs] == [3, 3, 3, 3]
    assert len({s for call in policy.seeds for s in call}) == 12  # one stream per trajectory and step
    assert traj.meta["env_steps"] == 12 and len(traj.meta["candidates"]) == 4
    again = Recording()
    waves = [ThreeSteps() for _ in range(3)]
    ctx = SearchContext(env=waves[0], policy=again, qnet=ScriptedQNet({}), seed=5, env_pool=lambda k: waves[:k])
    traj = best_of_n(TASK, ctx, BestOfNConfig(n=5, max_steps=3))
    assert again.batches == [3, 3, 3, 2, 2, 2] and len(traj.meta["candidates"]) == 5
    assert [e.resets for e in waves] == [2, 2, 1]
    # trajectory k's step t draws from the same stream whatever the size of the pool
    four = {(k, t): policy.seeds[t][k] for t in range(3) for k in range(4)}
    three = {(k, t): again.seeds[t][k] for t in range(3) for k in range(3)}
    three |= {(3 + k, t): again.seeds[3 + t][k] for t in range(3) for k in range(2)}
    assert all(three[key] == seed for key, seed in four.items())


def test_method_configs_are_validated() -> None:
    assert make_method_config("qlass", {"m": 4}).m == 4
    with pytest.raises(QlassError, match="unknown option"):
        make_method_config("qlass", {"n": 4})
    with pytest.raises(QlassError, match="m must be"):
        make_method_config("qlass", {"m": 0})
    with pytest.raises(QlassError, match=r"method 'qlass': option 'm' expects int, got 2.5"):
        make_method_config("qlass", {"m": 2.5})
    with pytest.raises(QlassError, match="unknown method"):
        make_method_config("beam", {})
    with pytest.raises(QlassError, match="needs a QNet"):
        qlass_search(TASK, SearchContext(env=TwoDoors(), policy=ScriptedPolicy([A, B])), QlassConfig(m=2))
