"""Compute accounting of every method and the report's budget curves and paired statistics, checked
against counts worked out by hand on the toy Corridor environment with a deterministic policy."""

from __future__ import annotations

import random

import numpy as np
import pytest
from toy_envs import Corridor

from qlass import report
from qlass.compare import bootstrap_interval, interval_positions, paired_rows
from qlass.errors import QlassError
from qlass.eval_worker import EvalWorker, MethodRun
from qlass.report import budget_points
from qlass.search import make_method_config
from qlass.types import Completion, Task

ACTIONS = ["go east", "look", "go west"]


class Counted:
    """A deterministic policy with token counts easy to add up: a prompt of k messages is 10·k tokens;
    sampled candidate j plays ACTIONS[j % 3] in 4 + j tokens; a greedy output plays ``go east`` in 4 tokens
    (``n`` greedy completions are one output repeated, as the protocol lets backends answer)."""

    def sample(self, histories, n=1, temperature=0.0, max_new_tokens=128, seed=None):
        out = []
        for h in histories:
            if temperature == 0:
                out.append([Completion("Thought: t\nAction: go east", 10 * len(h), 4, -1.0)] * n)
            else:
                out.append([Completion(f"Thought: t\nAction: {ACTIONS[j % 3]}", 10 * len(h), 4 + j, -(j + 1.0))
                            for j in range(n)])
        return out


class Values:
    """A value model preferring look > go east > go west; it reads one token per history message and 7
    per candidate."""

    def score(self, history, candidates):
        self.last_tokens = len(history) + 7 * len(candidates)
        return [{"look": 0.9, "go east": 0.5, "go west": 0.1}[c.split("Action: ")[1]] for c in candidates]


def play(name: str, options: dict, length: int) -> dict:
    run = MethodRun(name, make_method_config(name, options))
    worker = EvalWorker(lambda: Corridor(step_limit=4), Counted(), Values())()
    return worker((run, Task(f"corridor/{99 + length}", "corridor", "seen", "walk", {"length": length}), 0))


def totals(rec: dict) -> tuple:
    return tuple(rec[k] for k in ("prompt_tokens", "completion_tokens", "qnet_tokens", "env_steps"))


def test_greedy_best_of_n_qlass_and_reflexion_count_what_they_spent() -> None:
    # greedy, 2 rooms: prompts of 3 and 5 messages, 4 tokens a turn
    assert totals(play("greedy", {}, 2)) == (30 + 50, 4 + 4, 0, 2)
    # best-of-3, 1 room: three one-step trajectories, each's final step valued (3 messages + 7 tokens)
    rec = play("best-of-n", {"n": 3}, 1)
    assert totals(rec) == (3 * 30, 3 * 4, 3 * 10, 3)
    assert [(c["completion_tokens"], c["qnet_tokens"], c["env_steps"]) for c in rec["candidates"]] == [(4, 10, 1)] * 3
    # qlass m=3: every step samples go east (4), look (5), go west (6) from one prompt; the QNet values all
    # three and picks look, which never ends the task: 3 steps of 3, 5, 7 messages
    rec = play("qlass", {"m": 3, "max_steps": 3}, 1)
    assert totals(rec) == (30 + 50 + 70, 3 * 15, (3 + 21) + (5 + 21) + (7 + 21), 3) and rec["qnet_choices"] == 3
    # select=random: the same candidates, no QNet read
    rec = play("qlass", {"m": 3, "select": "random", "max_steps": 3}, 1)
    assert rec["qnet_tokens"] == 0 and all(s["qnet_tokens"] == 0 for s in rec["trajectory"]["steps"])
    # reflexion, 3 rooms, 2 steps a trial: trial 1 (30 + 50 prompt, 8 completion) fails, the reflection reads
    # its 7 messages + the request (80) and writes 4 tokens, trial 2 as trial 1
    rec = play("reflexion", {"trials": 2, "max_steps": 2}, 3)
    assert totals(rec) == (80 + 80 + 80, 8 + 4 + 8, 0, 4)


def test_qlass_at_temperature_zero_counts_the_one_output_its_m_copies_are() -> None:
    """At temperature 0 a backend computes one output and copies it M times (HFPolicy and the server backend
    do): the record counted its tokens M times."""
    rec = play("qlass", {"m": 2, "temperature": 0.0, "max_steps": 2}, 1)
    assert totals(rec) == (30, 4, 0, 1)
    rec = play("qlass", {"m": 3, "temperature": 0.0, "anchor": "greedy", "max_steps": 2}, 1)
    assert rec["completion_tokens"] == 4 + 4  # the anchor and the (greedy) samples are separate requests


def rec(method: str, name: str, task: str, reward: float, tokens: int, config: dict, split: str = "seen",
        **extra) -> dict:
    return {"method": method, "method_name": name, "config": config, "env": "e", "split": split, "task": task,
            "reward": reward, "success": reward == 1.0, "prompt_tokens": 0, "completion_tokens": tokens,
            "qnet_tokens": 0, "env_steps": 1, "wall_time": 0.0, "oracle": "[oracle]" in method, **extra}


def cand(reward: float, score: float, tokens: int) -> dict:
    return {"reward": reward, "score": score, "completion_tokens": tokens}


def test_budget_curves_keep_method_variants_apart() -> None:
    """qlass(m=4,anchor=greedy,beta=1) and its select=random control were both points of one curve 'qlass'
    at M=4 (budget.csv could not tell them apart, budget.png drew a line through them); so were the
    likelihood and QNet picks of best-of-n."""
    records = [rec("qlass(m=2)", "qlass", "t", 0.5, 20, {"m": 2}),
               rec("qlass(m=4)", "qlass", "t", 0.7, 40, {"m": 4}),
               rec("qlass(m=4,anchor=greedy,beta=1)", "qlass", "t", 0.9, 41, {"m": 4}),
               rec("qlass(m=4,anchor=greedy,select=random)", "qlass", "t", 0.2, 42, {"m": 4}),
               rec("qlass(m=2)[oracle]", "qlass", "t", 1.0, 22, {"m": 2}),
               rec("best-of-n(n=2,qnet)", "best-of-n", "t", 0.0, 9, {"n": 2},
                   candidates=[cand(0, 1, 4), cand(1, 0, 5)]),
               rec("best-of-n(n=2,likelihood)", "best-of-n", "t", 1.0, 9, {"n": 2},
                   candidates=[cand(0, 0, 4), cand(1, 1, 5)]),
               rec("reflexion(trials=2,memory=1)", "reflexion", "t", 0.0, 8, {"trials": 2},
                   trials=[{"reward": 0.0, "completion_tokens": 4}]),
               rec("greedy", "greedy", "t", 0.3, 10, {})]
    points = {(p["curve"], p["budget_param"]): (p["completion_tokens"], p["avg_reward"])
              for p in budget_points(records)}
    assert points == {("qlass", 2): (20, 0.5), ("qlass", 4): (40, 0.7), ("qlass(anchor=greedy,beta=1)", 4): (41, 0.9),
                      ("qlass(anchor=greedy,select=random)", 4): (42, 0.2), ("qlass[oracle]", 2): (22, 1.0),
                      ("best-of-n", 1): (4, 0), ("best-of-n", 2): (9, 0), ("best-of-n(likelihood)", 1): (4, 0),
                      ("best-of-n(likelihood)", 2): (9, 1), ("reflexion(memory=1)", 1): (4, 0.0),
                      ("reflexion(memory=1)", 2): (4, 0.0), ("greedy", 1): (10, 0.3)}
    odd = rec("qlass(m=4,paraphrase=a)b,c)", "qlass", "t", 0, 1, {"m": 4})
    assert report.budget_curve(odd) == "qlass(paraphrase=a)b,c)"


def test_best_of_n_budget_curve_ends_at_the_n_that_was_run() -> None:
    """best-of-n(n=3) and (n=16) had no budget point at their own N (only at 1, 2, 4, 8 up to N)."""
    def run(n: int) -> list:
        cands = [cand(float(k == n - 1), float(k), 10) for k in range(n)]
        records = [rec(f"best-of-n(n={n},qnet)", "best-of-n", "t", 1.0, 10 * n, {"n": n}, candidates=cands)]
        return [(p["budget_param"], p["completion_tokens"], p["avg_reward"]) for p in budget_points(records)]

    assert run(3) == [(1, 10, 0.0), (2, 20, 0.0), (3, 30, 1.0)]
    assert [p[0] for p in run(16)] == [1, 2, 4, 8, 16] and run(16)[-1] == (16, 160, 1.0)
    assert [p[0] for p in run(4)] == [1, 2, 4]


def test_bootstrap_interval_is_the_percentile_interval_of_its_resampled_means() -> None:
    diffs = [0.0, 1.0, -0.5, 0.25, 0.0, 1.0, 0.5]
    rng = random.Random(3)
    picks = np.array([[rng.randrange(len(diffs)) for _ in diffs] for _ in range(2000)])
    means = np.sort(np.asarray(diffs)[picks].mean(axis=1))
    # as many resampled means left out below the interval as above it: 49 of the 2,000 each (⌊0.025 · 1999⌋)
    assert bootstrap_interval(diffs, 2000, 3) == pytest.approx((means[49], means[1950]), abs=1e-12)
    assert bootstrap_interval(diffs, 2000, 3) == bootstrap_interval(diffs, 2000, 3)  # seeded
    # ⌊tail · (R − 1)⌋ as written, not as floats round it ((1 − 0.9) / 2 · 100 is 4.999…)
    assert [interval_positions(r, c) for r, c in ((101, 0.9), (10_000, 0.95), (10_000, 0.975), (2000, 0.95))] == \
        [(5, 95), (249, 9750), (124, 9875), (49, 1950)]


def test_paired_rows_pool_splits_task_by_task_and_count_ties() -> None:
    records = [rec("greedy", "greedy", t, r, 1, {}, split=s) for s, t, r in
               [("seen", "a", 0.0), ("seen", "b", 1.0), ("unseen", "a", 0.5)]]
    records += [rec("qlass(m=2)", "qlass", t, r, 1, {"m": 2}, split=s) for s, t, r in
                [("seen", "a", 1.0), ("seen", "b", 1.0), ("unseen", "a", 0.0), ("unseen", "z", 1.0)]]
    rows = {r["split"]: r for r in paired_rows(records, resamples=500)}
    assert (rows["seen"]["mean_diff"], rows["seen"]["wins"], rows["seen"]["ties"]) == (0.5, 1, 1)
    assert (rows["unseen"]["tasks"], rows["unseen"]["losses"]) == (1, 1)  # task z has no greedy pair
    assert rows["all"]["tasks"] == 3 and rows["all"]["mean_diff"] == pytest.approx((1.0 + 0.0 - 0.5) / 3)
    assert (rows["all"]["wins"], rows["all"]["ties"], rows["all"]["losses"]) == (1, 1, 1)


def test_an_oracle_method_is_never_the_baseline_of_paired_differences() -> None:
    """Oracle rows were left out as compared methods, but --baseline 'qlass(m=2)[oracle]' compared every
    method with a row that read the environment's reward."""
    records = [rec("greedy", "greedy", "t", 0.0, 1, {}), rec("qlass(m=2)[oracle]", "qlass", "t", 1.0, 1, {"m": 2})]
    with pytest.raises(QlassError, match=r"is an oracle method \(it reads the environment's reward\)"):
        paired_rows(records, baseline="qlass(m=2)[oracle]", resamples=10)
    assert [r["method"] for r in paired_rows(records, resamples=10)] == []
