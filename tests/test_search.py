"""Inference methods with a scripted policy and a scripted QNet on a two-door environment.

The environment is a legitimate user-defined Env: behind door A the task is won (reward 1), behind
door B it is lost (reward 0). The scripted QNet prefers door B, so any method that peeked at the
environment's reward would pick A — which is how these tests prove the reward is not consulted.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from qlass.envs.base import parse_action
from qlass.errors import QlassError
from qlass.search import (
    BestOfNConfig,
    QlassConfig,
    SearchContext,
    argmax,
    best_of_n,
    make_method_config,
    qlass_search,
    unique_candidates,
)
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


def test_oracle_terminal_puts_rewards_beside_q_not_beside_an_advantage() -> None:
    class AdvantageQNet(ScriptedQNet):  # answers as QNet.score_batch does for rank=advantage: Q - V, or Q
        rank, v = "advantage", 0.95

        def score_batch(self, items, value=False):
            self.last_item_tokens = [7 * len(c) for _, c in items]
            return [[q - (0.0 if value else self.v) for q in self.score(h, c)] for h, c in items]

    # door b loses (reward 0) and ends the episode; "wait" (Q 0.9, below V) goes on: beside its Q - V = -0.05
    # the losing door's true 0 would win; beside its Q the oracle compares like with like
    class Doors(TwoDoors):
        def step(self, output: str) -> StepResult:
            return StepResult("You wait.", 0.0, False) if parse_action(output) == "wait" else super().step(output)

    wait = "Thought: wait.\nAction: wait"
    qnet = AdvantageQNet({"wait": 0.9, "open door b": 0.2})
    ctx = SearchContext(env=Doors(), policy=ScriptedPolicy([B, wait]), qnet=qnet, make_env=Doors)
    traj = qlass_search(TASK, ctx, QlassConfig(m=2, oracle_terminal=True, max_steps=1))
    assert traj.meta["decisions"][0]["values"] == [0.0, 0.9] and traj.steps[0].action == "wait"
    plain = qlass_search(TASK, SearchContext(env=Doors(), policy=ScriptedPolicy([B, wait]), qnet=qnet),
                         QlassConfig(m=2, max_steps=1))  # without the oracle: the ranking score, Q - V
    assert plain.meta["decisions"][0]["values"] == pytest.approx([0.2 - 0.95, 0.9 - 0.95])


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


def test_best_of_n_beta_adds_the_likelihood_to_the_qnet_value_as_qlass_does() -> None:
    """best-of-n picked by the QNet's value alone, qlass by value + beta * likelihood, so the two compared
    search and selector together; ``beta`` gives best-of-n qlass's selector. Its label names it, its draws are
    those of the plain method (same sampling label), and it needs log-probabilities."""
    from qlass.search import method_label, sampling_label

    class Alternating(ScriptedPolicy):
        def sample(self, histories, n=1, temperature=0.0, max_new_tokens=128, seed=None):
            self.calls += 1
            out = self.outputs[(self.calls - 1) % len(self.outputs)]
            return [[Completion(out, 10, 5, logprob=-1.0 if out == A else -9.0)] for _ in histories]

    qnet = ScriptedQNet({"open door a": 0.2, "open door b": 0.5})  # the QNet prefers b (reward 0), the likelihood a
    picks = {}
    for beta in (0.0, 0.01, 1.0):
        traj = best_of_n(TASK, SearchContext(env=TwoDoors(), policy=Alternating([A, B]), qnet=qnet),
                         BestOfNConfig(n=2, beta=beta))
        picks[beta] = traj.meta["selected"]
        assert [c["score"] for c in traj.meta["candidates"]] == pytest.approx([0.2 - beta * 0.2, 0.5 - beta * 1.8])
    assert picks == {0.0: 1, 0.01: 1, 1.0: 0}
    cfg = BestOfNConfig(n=4, beta=1.0)
    assert method_label("best-of-n", cfg) == "best-of-n(n=4,qnet,beta=1)"
    assert sampling_label("best-of-n", cfg) == sampling_label("best-of-n", BestOfNConfig(n=4)) == "best-of-n(n=4,qnet)"
    with pytest.raises(ValueError, match="beta weighs the QNet's value; select=likelihood uses none"):
        BestOfNConfig(select="likelihood", beta=1.0)

    class NoLogprobs(ScriptedPolicy):
        def sample(self, histories, n=1, temperature=0.0, max_new_tokens=128, seed=None):
            return [[Completion(A, 10, 5)] for _ in histories]

    env = ThreeSteps()
    with pytest.raises(QlassError, match="best-of-n: beta=0.5 reads the policy's log-probabilities"):
        best_of_n(TASK, SearchContext(env=env, policy=NoLogprobs([A]), qnet=qnet), BestOfNConfig(n=2, beta=0.5))
    assert env.steps == 0


def test_best_of_n_anchor_plays_trajectory_0_greedily_and_the_others_as_before() -> None:
    """qlass:anchor=greedy has the greedy action among its candidates, best-of-n had no greedy trajectory among
    its N; ``anchor=greedy`` plays trajectory 0 at temperature 0, the others from the same seeds as before."""
    from qlass.search import method_label, sampling_label

    class Recording(ScriptedPolicy):
        def __init__(self, outputs):
            super().__init__(outputs)
            self.requests: list[tuple[float, list[int]]] = []

        def sample(self, histories, n=1, temperature=0.0, max_new_tokens=128, seed=None):
            self.requests.append((temperature, list(seed) if isinstance(seed, list) else [seed]))
            return [[Completion(B if temperature == 0.0 else A, 10, 5, logprob=-1.0)] for _ in histories]

    qnet = ScriptedQNet({"open door a": 0.2, "open door b": 0.5})
    runs = {}
    for anchor in ("none", "greedy"):
        policy = Recording([A])
        traj = best_of_n(TASK, SearchContext(env=TwoDoors(), policy=policy, qnet=qnet),
                         BestOfNConfig(n=3, anchor=anchor))
        runs[anchor] = (policy.requests, traj)
    (plain, plain_traj), (anchored, anchored_traj) = runs["none"], runs["greedy"]
    assert [t for t, _ in plain] == [0.7] * 3 and [t for t, _ in anchored] == [0.0, 0.7, 0.7]  # one at a time
    assert plain[1:] == anchored[1:]  # trajectories 1 and 2 from the same seeds
    assert [c["reward"] for c in plain_traj.meta["candidates"]] == [1.0, 1.0, 1.0]  # all sampled: door a
    assert [c["reward"] for c in anchored_traj.meta["candidates"]] == [0.0, 1.0, 1.0]  # 0 greedy: door b
    assert anchored_traj.meta["selected"] == 0  # the QNet prefers b
    cfg = BestOfNConfig(n=4, anchor="greedy", beta=1.0)
    assert method_label("best-of-n", cfg) == "best-of-n(n=4,qnet,anchor=greedy,beta=1)"
    assert sampling_label("best-of-n", cfg) == "best-of-n(n=4,qnet)"  # in an evaluation, the same base seed
    with pytest.raises(ValueError, match="anchor must be none or greedy, got 'first'"):
        BestOfNConfig(anchor="first")


def test_best_of_n_likelihood_averages_over_the_tokens_each_logprob_covers() -> None:
    """A server's answer may spend more tokens than its logprob sums over (a redrawn output, a stop string left
    out: ``logprob_tokens``). Best-of-n divided by every completion token, as qlass's ``mean_logprob`` does
    not: A (-6 over its own 3 of 12 tokens, mean -2) beat B (-3 over 3, mean -1)."""

    class Redrawn(ScriptedPolicy):
        def sample(self, histories, n=1, temperature=0.0, max_new_tokens=128, seed=None):
            self.calls += 1
            out = Completion(A, 10, 12, logprob=-6.0, logprob_tokens=3) if self.calls == 1 else \
                Completion(B, 10, 3, logprob=-3.0)
            return [[out] for _ in histories]

    traj = best_of_n(TASK, SearchContext(env=TwoDoors(), policy=Redrawn([A, B])),
                     BestOfNConfig(n=2, select="likelihood"))
    assert [c["score"] for c in traj.meta["candidates"]] == [-2.0, -1.0] and traj.meta["selected"] == 1
    assert traj.meta["completion_tokens"] == 15  # the budget still counts every token spent


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


class Recording(ScriptedPolicy):
    """Answers by temperature (``greedy`` at 0, ``sampled`` cycled otherwise) and records each call."""

    def __init__(self, greedy: list[Completion], sampled: list[Completion]) -> None:
        super().__init__([])
        self.greedy, self.sampled = greedy, sampled
        self.requests: list[tuple[int, float, list, list]] = []  # n, temperature, seeds, histories

    def sample(self, histories, n=1, temperature=0.0, max_new_tokens=128, seed=None):
        self.requests.append((n, temperature, list(seed), [list(h) for h in histories]))
        pool = self.greedy if temperature == 0 else self.sampled
        return [[pool[j % len(pool)] for j in range(n)] for _ in histories]


NOTHING = Completion("Thought: wait.\nAction: wait", 10, 5, logprob=-1.0)
ca, cb = Completion(A, 10, 5, logprob=-1.0), Completion(B, 10, 5, logprob=-2.0)


def test_qlass_step_seeds_are_hashed_not_consecutive() -> None:
    """B1: step t+1 was seeded step t's seed + 1, so a backend giving candidate j the stream seed + j
    (an OpenAI-compatible server may) reused M-1 streams of the previous step. Step seeds are now
    hashed from the episode seed and the step: no two steps of an episode lie within M of each other."""
    policy = Recording([NOTHING], [NOTHING])
    qlass_search(TASK, SearchContext(env=TwoDoors(), policy=policy, qnet=ScriptedQNet({}), seed=3),
                 QlassConfig(m=4, max_steps=8))
    seeds = [req[2][0] for req in policy.requests]
    assert len(seeds) == 8
    assert all(abs(a - b) >= 4 for i, a in enumerate(seeds) for b in seeds[i + 1:])
    other = Recording([NOTHING], [NOTHING])
    qlass_search(TASK, SearchContext(env=TwoDoors(), policy=other, qnet=ScriptedQNet({}), seed=4),
                 QlassConfig(m=4, max_steps=8))
    assert not {req[2][0] for req in other.requests} & set(seeds)


def test_truncated_output_is_executed_as_an_invalid_action() -> None:
    """An output cut off by the token limit never reaches the env as an action: the env gets the text
    before its unfinished Action line and answers with its format hint; the record keeps the output."""
    from toy_envs import Corridor

    from qlass.agent import apply_output, start_messages
    from qlass.envs.base import FORMAT_HINT

    env = Corridor()
    task = env.tasks("seen")[1]
    messages = start_messages(env, task)
    steps: list = []
    cut = Completion("Thought: east.\nAction: go east", 10, 8, truncated=True)
    step = apply_output(env, messages, steps, cut)
    assert step.action is None and step.observation == FORMAT_HINT and step.reward == 0.0
    assert step.output == cut.text and messages[-2] == Message("assistant", cut.text)
    step = apply_output(env, messages, steps, Completion(cut.text, 10, 8))
    assert step.action == "go east" and step.reward > 0  # the same text, complete, moves


def test_qlass_drops_truncated_candidates_while_a_complete_one_remains() -> None:
    qnet = ScriptedQNet({"open door a": 0.1, "open door b": 0.9})
    cut_b = Completion(B, 10, 5, logprob=-2.0, truncated=True)
    traj = qlass_search(TASK, SearchContext(env=TwoDoors(), policy=Recording([ca], [cut_b, ca]), qnet=qnet),
                        QlassConfig(m=2))
    assert traj.steps[0].action == "open door a" and qnet.calls == []  # B was preferred but cut off
    assert traj.steps[0].completion_tokens == 10  # both were paid for
    cut_a = Completion(A, 10, 5, logprob=-1.0, truncated=True)
    traj = qlass_search(TASK, SearchContext(env=TwoDoors(), policy=Recording([ca], [cut_b, cut_a]), qnet=qnet),
                        QlassConfig(m=2, max_steps=1))
    assert traj.steps[0].output == B and traj.steps[0].action is None and not traj.steps[0].done
    assert traj.steps[0].observation == "Nothing happens." and qnet.calls == []


def test_greedy_anchor_makes_candidate_zero_the_greedy_action() -> None:
    policy = Recording([ca], [cb])
    qnet = ScriptedQNet({"open door a": 0.5, "open door b": 0.4})
    traj = qlass_search(TASK, SearchContext(env=TwoDoors(), policy=policy, qnet=qnet, seed=1),
                        QlassConfig(m=3, anchor="greedy"))
    assert [(n, t) for n, t, _, _ in policy.requests] == [(1, 0.0), (2, 0.7)]
    assert qnet.calls == [[A, B]] and traj.steps[0].action == "open door a"  # QNet agrees with greedy
    assert traj.steps[0].completion_tokens == 15 and traj.steps[0].prompt_tokens == 20  # two requests
    qnet = ScriptedQNet({"open door a": 0.1, "open door b": 0.9})
    traj = qlass_search(TASK, SearchContext(env=TwoDoors(), policy=Recording([ca], [cb]), qnet=qnet),
                        QlassConfig(m=2, anchor="greedy"))
    assert traj.steps[0].action == "open door b"  # departs from greedy where the QNet prefers another
    alone = Recording([ca], [cb])
    traj = qlass_search(TASK, SearchContext(env=TwoDoors(), policy=alone), QlassConfig(m=1, anchor="greedy"))
    assert traj.steps[0].action == "open door a" and [t for _, t, _, _ in alone.requests] == [0.0]


def test_beta_adds_the_policy_prior_and_margin_keeps_candidate_zero() -> None:
    def run(cfg: QlassConfig, sampled=(ca, cb)):
        qnet = ScriptedQNet({"open door a": 0.5, "open door b": 0.6})
        return qlass_search(TASK, SearchContext(env=TwoDoors(), policy=Recording([ca], list(sampled)), qnet=qnet), cfg)

    assert run(QlassConfig(m=2)).steps[0].action == "open door b"
    # mean log-prob per token: A -1/5, B -2/5; with beta 1: A 0.3 > B 0.2
    chose_a = run(QlassConfig(m=2, beta=1.0))
    assert chose_a.steps[0].action == "open door a"
    assert chose_a.meta["decisions"][0]["scores"] == pytest.approx([0.3, 0.2])
    assert run(QlassConfig(m=2, margin=0.05)).steps[0].action == "open door b"
    assert run(QlassConfig(m=2, margin=0.2)).steps[0].action == "open door a"
    with pytest.raises(QlassError, match="logprobs"):
        run(QlassConfig(m=2, beta=1.0), sampled=(Completion(A, 10, 5), Completion(B, 10, 5)))


def test_diverse_candidates_are_asked_to_differ_and_scored_on_the_real_history() -> None:
    class Obliging(Recording):
        """Answers B once asked to differ from A."""

        def sample(self, histories, n=1, temperature=0.0, max_new_tokens=128, seed=None):
            super().sample(histories, n, temperature, max_new_tokens, seed)
            return [[cb if "differ" in h[-1].content else ca] * n for h in histories]

    policy = Obliging([ca], [ca])
    qnet = ScriptedQNet({"open door a": 0.1, "open door b": 0.9})
    traj = qlass_search(TASK, SearchContext(env=TwoDoors(), policy=policy, qnet=qnet),
                        QlassConfig(m=3, diverse=True, max_steps=1))
    first, second, third = (req[3][0] for req in policy.requests)
    assert first[-1].content == "You see door a and door b."
    assert second[-1].content.endswith("differ from this action: 'open door a'.")
    assert third[-1].content.endswith("differ from each of these actions: 'open door a', 'open door b'.")
    assert second[:-1] == first[:-1] and len({req[2][0] for req in policy.requests}) == 3
    assert qnet.calls == [[A, B]] and traj.steps[0].action == "open door b"
    assert traj.messages[2].content == "You see door a and door b."  # the episode keeps the real history


def test_selection_by_likelihood_without_logprobs_is_refused_at_the_first_step_naming_its_option() -> None:
    """A policy that reports no log-probabilities failed only at the first real choice (three records into a run,
    or never on a short one), and select=likelihood's message named beta; best-of-n failed after all N trajectories
    were played."""

    class NoLogprobs(ScriptedPolicy):
        def sample(self, histories, n=1, temperature=0.0, max_new_tokens=128, seed=None):
            self.calls += 1
            return [[Completion(A, 10, 5)] * n for _ in histories]  # the candidates agree: no choice to make

    for opts, named in (({"select": "likelihood"}, "select=likelihood"), ({"beta": 0.5}, "beta=0.5")):
        policy, env = NoLogprobs([A]), TwoDoors()
        cfg = QlassConfig(m=2, anchor="greedy", **opts)
        with pytest.raises(QlassError, match=rf"qlass\(m=2,anchor=greedy.*\): {named} reads the policy's "
                                             "log-probabilities, and this policy backend reports none"):
            qlass_search(TASK, SearchContext(env=env, policy=policy, qnet=ScriptedQNet({})), cfg)
        assert env.steps == 0
    env = ThreeSteps()
    with pytest.raises(QlassError, match="best-of-n: select=likelihood reads the policy's log-probabilities"):
        best_of_n(TASK, SearchContext(env=env, policy=NoLogprobs([A])), BestOfNConfig(n=2, select="likelihood"))
    assert env.steps == 0
    cfg = QlassConfig(m=2, anchor="greedy", select="random")  # reads no log-probabilities
    assert qlass_search(TASK, SearchContext(env=TwoDoors(), policy=NoLogprobs([A])), cfg).reward == 1.0


def test_labels_name_every_option_that_changes_the_search() -> None:
    from qlass.search import method_label

    labels = {method_label("qlass", make_method_config("qlass", opts)) for opts in [
        {}, {"anchor": "greedy"}, {"beta": 0.5}, {"margin": 0.1}, {"diverse": True}, {"oracle_terminal": True},
        {"anchor": "greedy", "beta": 0.5, "margin": 0.1, "diverse": True}]}
    assert len(labels) == 7 and "qlass(m=2)" in labels
    assert "qlass(m=2,anchor=greedy,beta=0.5,margin=0.1,diverse)" in labels
    with pytest.raises(QlassError, match="anchor must be one of"):
        make_method_config("qlass", {"anchor": "best"})
    with pytest.raises(QlassError, match="margin must be"):
        make_method_config("qlass", {"margin": -1.0})


def test_select_controls_pick_without_a_qnet() -> None:
    """select=likelihood / random use the same candidates as the QNet would, but no QNet: the controls
    that tell a QNet's gain over greedy from the gain of leaving greedy at all."""
    from qlass.search import METHODS, method_label

    by_lik = qlass_search(TASK, SearchContext(env=TwoDoors(), policy=Recording([cb], [ca])),
                          QlassConfig(m=2, anchor="greedy", select="likelihood"))
    # mean log-prob per token: greedy B -2/5 < sampled A -1/5, so the likelihood leaves greedy
    assert by_lik.steps[0].action == "open door a" and by_lik.steps[0].qnet_tokens == 0
    assert by_lik.meta["decisions"][0]["values"] == pytest.approx([-0.4, -0.2])
    assert not METHODS["qlass"].needs_qnet(QlassConfig(m=2, select="random"))
    assert METHODS["qlass"].needs_qnet(QlassConfig(m=2))

    def pick(seed: int) -> str:
        traj = qlass_search(TASK, SearchContext(env=TwoDoors(), policy=Recording([ca], [cb]), seed=seed),
                            QlassConfig(m=2, anchor="greedy", select="random", max_steps=1))
        return traj.steps[0].action

    picks = [pick(seed) for seed in range(16)]
    assert picks == [pick(seed) for seed in range(16)]  # seeded: the same episode seed, the same pick
    assert set(picks) == {"open door a", "open door b"}  # and not always candidate 0
    with pytest.raises(QlassError, match="select must be one of"):
        make_method_config("qlass", {"select": "reward"})
    with pytest.raises(QlassError, match="select=likelihood uses none"):
        make_method_config("qlass", {"select": "likelihood", "beta": 1.0})
    label = method_label("qlass", make_method_config("qlass", {"select": "likelihood", "anchor": "greedy"}))
    assert label == "qlass(m=2,anchor=greedy,select=likelihood)"
