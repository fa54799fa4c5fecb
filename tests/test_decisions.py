"""The decision benchmark: collection (Monte-Carlo values, resume, lockstep) and the rankers' report.

``Fork`` is a toy environment and ``ScriptedPolicy`` a policy written out by hand: it implements
the :class:`~qlass.policy.base.Policy` protocol exactly (per-history seeds, ``n`` completions,
log-probabilities, truncation flags), so for collection it is a real policy whose every draw the
test can compute, which is what makes the Monte-Carlo values checkable by hand. Both are loadable
from the CLI as ``test_decisions:Fork`` and ``test_decisions:ScriptedPolicy`` with ``tests/`` on
``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml

from qlass.decision_files import read_decisions
from qlass.decisions import DecisionConfig, collect_decisions
from qlass.envs.base import parse_action
from qlass.errors import QlassError
from qlass.jsonl import read_jsonl
from qlass.seeding import candidate_seed, stable_seed
from qlass.types import Completion, Message, StepResult, Task

TESTS = Path(__file__).parent


def out(action: str) -> str:
    return f"Thought: t\nAction: {action}"


class Fork:
    """Start at a fork: ``go left`` falls (reward 0, episode over), ``go right`` reaches a bridge
    (reward 0.2), ``look`` stays. On the bridge ``cross`` wins (1.0), ``jump`` half-wins (0.5),
    anything else stays."""

    name = "fork"

    def __init__(self, tasks: int = 3) -> None:
        self.n_tasks = tasks
        self.at = "start"
        self.score = 0.0

    def splits(self) -> dict[str, int]:
        return {"seen": self.n_tasks, "unseen": self.n_tasks}

    def tasks(self, split: str, task_types: Sequence[str] | None = None) -> list[Task]:
        return [Task(f"fork/{split}/{i}", self.name, split, "fork") for i in range(self.n_tasks)]

    def prompt(self) -> list[Message]:
        return [Message("user", "Cross the river. Answer as:\nThought: ...\nAction: ..."), Message("assistant", "OK")]

    def reset(self, task: Task) -> str:
        self.at, self.score = "start", 0.0
        return "You are at a fork."

    def step(self, output: str) -> StepResult:
        action = parse_action(output)
        moves = {("start", "go left"): ("river", 0.0, True), ("start", "go right"): ("bridge", 0.2, False),
                 ("bridge", "cross"): ("far bank", 1.0, True), ("bridge", "jump"): ("water", 0.5, True)}
        self.at, self.score, done = moves.get((self.at, action), (self.at, self.score, False))
        return StepResult(f"You are at the {self.at}.", self.score, done)

    def expert(self, task: Task) -> list[str]:
        return [out("go right"), out("cross")]

    def close(self) -> None:
        pass


GREEDY = {"start": "go right", "bridge": "cross"}
# candidate j of a sampled call (n > 1) is the j-th entry; one sample (n = 1, a rollout) picks by seed parity
CANDIDATES = {"start": ["go left", "look", "TRUNCATED", "go right"], "bridge": ["jump", "cross", "wait", "look"]}
ROLLOUT = {"start": ["go right", "go left"], "bridge": ["cross", "jump"]}


def place(history: Sequence[Message]) -> str:
    return "bridge" if "bridge" in history[-1].content else "start"


def rollout_choice(where: str, seed: int) -> str:
    return ROLLOUT[where][seed % 2]


class ScriptedPolicy:
    """A hand-written policy over Fork (see the module docstring); ``delay`` seconds per call."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls: list[tuple[int, int, float]] = []  # (histories, n, temperature) of each call

    def sample(self, histories, n=1, temperature=0.0, max_new_tokens=128, seed=None) -> list[list[Completion]]:
        time.sleep(self.delay)
        self.calls.append((len(histories), n, temperature))
        seeds = seed if isinstance(seed, list) else [seed or 0] * len(histories)
        result = []
        for history, base in zip(histories, seeds, strict=True):
            where = place(history)
            if temperature == 0:
                result.append([Completion(out(GREEDY[where]), 10, 5, -0.5)] * n)
            elif n == 1:
                result.append([Completion(out(rollout_choice(where, candidate_seed(base, 0))), 10, 4, -1.0)])
            else:
                picks = [CANDIDATES[where][j % 4] for j in range(n)]
                result.append([Completion(out("go ri"), 10, max_new_tokens, -3.0, truncated=True) if p == "TRUNCATED"
                               else Completion(out(p), 10, 2 + j, -1.0 - j) for j, p in enumerate(picks)])
        return result


def expected_rollouts(task: str, step: int, cand: int, where: str, k: int) -> list[tuple[float, int]]:
    """(final reward, steps after the candidate) of each rollout, computed from the seed formula."""
    outcomes = []
    for r in range(k):
        here, t = where, 0
        while True:
            action = rollout_choice(here, stable_seed(0, task, step, cand, r, t))
            t += 1
            if here == "start" and action == "go right":
                here = "bridge"
                continue
            outcomes.append(({"go left": 0.0, "cross": 1.0, "jump": 0.5}[action], t))
            break
    return outcomes


def test_monte_carlo_values_match_hand_computed_ones(tmp_path: Path) -> None:
    cfg = DecisionConfig(m=5, k=4, max_steps=10, max_new_tokens=16)
    policy = ScriptedPolicy()
    recs = collect_decisions(Fork, Fork().tasks("seen")[:1], policy, cfg, tmp_path / "d.jsonl")
    assert [r["step"] for r in recs] == [0, 1]  # the fork, then the bridge; the greedy path then crosses
    first, second = recs
    # step 0: greedy "go right" (anchor) + samples go left, look, a truncated output (dropped), go right (merged)
    assert first["samples"] == 5 and first["truncated"] == 1 and first["prefix"] == [] and first["played"] == 0
    assert [c["action"] for c in first["candidates"]] == ["go right", "go left", "look"]
    assert [c["count"] for c in first["candidates"]] == [2, 1, 1]
    assert [c["anchor"] for c in first["candidates"]] == [True, False, False]
    assert [c["terminal"] for c in first["candidates"]] == [False, True, False]
    assert [c["reward"] for c in first["candidates"]] == [0.2, 0.0, 0.0]
    assert first["candidates"][0]["logprob"] == -0.5 and first["candidates"][0]["mean_logprob"] == -0.1
    assert first["candidates"][2]["mean_logprob"] == -2.0 / 3
    assert first["history"][-1] == {"role": "user", "content": "You are at a fork."}
    task = "fork/seen/0"
    for i, where in [(0, "bridge"), (2, "start")]:
        exp = expected_rollouts(task, 0, i, where, 4)
        cand = first["candidates"][i]
        assert cand["rollout_rewards"] == [r for r, _ in exp] and cand["rollout_lengths"] == [n for _, n in exp]
        assert cand["mean"] == pytest.approx(statistics.fmean(r for r, _ in exp))
        assert cand["std"] == pytest.approx(statistics.pstdev(r for r, _ in exp))
    # the seeds give both outcomes somewhere, so the values are not trivially constant
    assert {r for c in first["candidates"] for r in c["rollout_rewards"]} >= {0.5, 1.0}
    left = first["candidates"][1]
    assert left["rollout_rewards"] == [0.0] * 4 and left["rollout_lengths"] == [0] * 4 and left["std"] == 0.0
    # step 1 on the bridge: cross (anchor, ends at 1.0), jump (ends at 0.5), wait (rolled out), look
    assert second["prefix"] == [out("go right")]
    assert [c["action"] for c in second["candidates"]] == ["cross", "jump", "wait", "look"]
    assert [c["terminal"] for c in second["candidates"]] == [True, True, False, False]
    assert [c["mean"] for c in second["candidates"][:2]] == [1.0, 0.5]
    wait = second["candidates"][2]
    exp = expected_rollouts(task, 1, 2, "bridge", 4)
    assert wait["rollout_rewards"] == [r for r, _ in exp] and wait["rollout_lengths"] == [1] * 4
    done = read_jsonl(tmp_path / "d.tasks.jsonl")
    assert done == [{"split": "seen", "task": task, "decisions": 2, "steps": 2, "stop": "done"}]


def test_decision_cap_greedy_rollouts_and_sampled_play(tmp_path: Path) -> None:
    task = Fork().tasks("seen")[:1]
    capped = collect_decisions(Fork, task, ScriptedPolicy(), DecisionConfig(m=3, max_decisions_per_task=1),
                               tmp_path / "a.jsonl")
    assert [r["step"] for r in capped] == [0]
    assert read_jsonl(tmp_path / "a.tasks.jsonl")[0]["stop"] == "decisions"
    # greedy rollouts: one per candidate, copied K times (rollout from "look": greedy goes right, then crosses)
    policy = ScriptedPolicy()
    greedy = collect_decisions(Fork, task, policy, DecisionConfig(m=3, k=3, rollout_temperature=0.0),
                               tmp_path / "b.jsonl")
    look = greedy[0]["candidates"][2]
    assert look["action"] == "look" and look["rollout_rewards"] == [1.0] * 3 and look["rollout_lengths"] == [2] * 3
    # play=sample executes the first sampled candidate: "go left" at the fork ends the task at step 0
    sampled = collect_decisions(Fork, task, ScriptedPolicy(), DecisionConfig(m=3, play="sample"), tmp_path / "c.jsonl")
    assert [r["step"] for r in sampled] == [0] and sampled[0]["played"] == 1


def test_records_do_not_depend_on_concurrency(tmp_path: Path) -> None:
    tasks = Fork(tasks=4).tasks("seen") + Fork(tasks=4).tasks("unseen")
    runs = {}
    for conc in (1, 8):
        policy = ScriptedPolicy()
        cfg = DecisionConfig(m=4, k=3, max_steps=6, concurrency=conc)
        runs[conc] = collect_decisions(lambda: Fork(4), tasks, policy, cfg, tmp_path / f"c{conc}.jsonl")
        runs[conc, "calls"] = max(h for h, _, _ in policy.calls)
    assert runs[1] == runs[8]
    assert (tmp_path / "c1.jsonl").read_text() == (tmp_path / "c8.jsonl").read_text()  # same order too
    assert len(runs[1]) == 16  # 8 tasks x 2 decisions
    assert runs[1, "calls"] == 1 and runs[8, "calls"] == 8  # lockstep batched 8 histories per policy call


def test_settings_check_names_the_changed_field(tmp_path: Path) -> None:
    task = Fork().tasks("seen")[:1]
    collect_decisions(Fork, task, ScriptedPolicy(), DecisionConfig(m=3), tmp_path / "d.jsonl", settings={"model": "x"})
    with pytest.raises(Exception, match=r"options\.k: 4 → 2"):
        collect_decisions(Fork, task, ScriptedPolicy(), DecisionConfig(m=3, k=2), tmp_path / "d.jsonl",
                          settings={"model": "x"})
    with pytest.raises(Exception, match=r"policy\.autocast: \(unset\) → True"):
        collect_decisions(Fork, task, ScriptedPolicy(), DecisionConfig(m=3), tmp_path / "d.jsonl",
                          settings={"model": "x", "policy": {"autocast": True}})
    # concurrency and the policy's threads are runtime options: the rerun resumes (nothing left to do)
    again = collect_decisions(Fork, task, ScriptedPolicy(), DecisionConfig(m=3, concurrency=2), tmp_path / "d.jsonl",
                              settings={"model": "x", "policy": {"threads": 2}})
    assert len(again) == 2 and len(read_jsonl(tmp_path / "d.jsonl")) == 2
    # a library call without settings added another policy's decisions unchecked
    with pytest.raises(QlassError, match=r"was made with 'model' recorded in .*d\.config\.yaml, and this run gives "
                                         r"none"):
        collect_decisions(Fork, Fork().tasks("seen")[:2], ScriptedPolicy(), DecisionConfig(m=3), tmp_path / "d.jsonl")


def test_config_is_validated() -> None:
    for bad, said in (({"m": 1}, "m must be >= 2"), ({"play": "best"}, "play must be 'greedy' or 'sample'"),
                      ({"anchor": "mode"}, "anchor must be 'greedy' or 'none'"),
                      ({"temperature": 0.0}, "temperature must be > 0"), ({"k": 0}, "k, max_steps, max_new_tokens"),
                      ({"max_decisions_per_task": 0}, "max_decisions_per_task must be >= 1")):
        with pytest.raises(ValueError, match=f"^{said}"):
            DecisionConfig(**bad)


def collect_cmd(out_file: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qlass", "decisions", "collect", "--model", "test_decisions:ScriptedPolicy",
            "--policy-arg", "delay=0.03", "--env", "test_decisions:Fork", "--env-arg", "tasks=6", "--split", "seen",
            "--split", "unseen", "--set", "k=3", "--concurrency", "2", "--out", str(out_file), *extra]


def test_cli_leaves_no_settings_file_when_the_model_fails_to_load(tmp_path: Path) -> None:
    """The settings were checked, and saved as NAME.config.yaml, before the model loaded: a model that
    failed to load left a settings file recording a run that never started."""
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = tmp_path / "d" / "decisions.jsonl"
    cmd = [sys.executable, "-m", "qlass", "decisions", "collect", "--model", str(tmp_path / "nomodel"), "--env",
           "test_decisions:Fork", "--split", "seen", "--out", str(out)]
    ran = subprocess.run(cmd, env=env, check=False, capture_output=True, text=True)
    assert ran.returncode == 2 and "nomodel" in ran.stderr and "Traceback" not in ran.stderr, ran.stderr
    assert not out.exists() and not (tmp_path / "d" / "decisions.config.yaml").exists()


@pytest.mark.slow
def test_cli_kill_and_rerun_resumes_without_duplicates(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    whole = tmp_path / "whole" / "decisions.jsonl"
    ran = subprocess.run(collect_cmd(whole), env=env, check=False, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    assert "24 decisions from 12 tasks" in ran.stdout
    killed = tmp_path / "killed" / "decisions.jsonl"
    proc = subprocess.Popen(collect_cmd(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed.exists() and len(killed.read_text().splitlines()) >= 3):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = len(read_jsonl(killed))
    assert 3 <= before < 24, "the run should have been killed part-way"
    with open(killed, "a") as fh:  # what a kill inside a write would leave: a torn last line
        fh.write('{"schema_version": 1, "env": "fo')
    again = subprocess.run(collect_cmd(killed), env=env, check=False, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    said = " ".join(again.stderr.split())  # the log wraps long lines where the temporary path's length puts them
    assert "torn last line" in said and "resuming" in said
    # the same decisions, each once, in the same order: the files are identical
    assert killed.read_text() == whole.read_text()
    assert len(read_jsonl(killed.with_name("decisions.tasks.jsonl"))) == 12
    saved = yaml.safe_load(killed.with_name("decisions.config.yaml").read_text())
    assert saved["options"]["k"] == 3 and saved["splits"] == ["seen", "unseen"]
    assert "concurrency" not in saved["options"]
    # other settings are refused, naming the field; nothing is added
    refused = subprocess.run(collect_cmd(killed, "--set", "rollout_temperature=1.0"), env=env, check=False,
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "options.rollout_temperature: 0.7 → 1.0" in refused.stderr
    assert killed.read_text() == whole.read_text()


def cand(mean: float, logprob: float, mean_logprob: float, anchor: bool = False, terminal: bool = False) -> dict:
    """A candidate whose ``completion_tokens`` make ``logprob`` / tokens its ``mean_logprob``."""
    tokens = round(logprob / mean_logprob)
    assert abs(logprob / tokens - mean_logprob) < 1e-9
    return {"output": out(f"act {mean} {logprob}"), "action": None, "logprob": logprob, "completion_tokens": tokens,
            "mean_logprob": mean_logprob, "anchor": anchor, "count": 1, "terminal": terminal, "reward": 0.0,
            "rollout_rewards": [mean], "rollout_lengths": [1], "mean": mean, "std": 0.0}


def hand_built() -> list[dict]:
    """Two decisions. D1 (seen, reversible): values 0.5 (anchor) / 1.0 / 0.0, a unique best.
    D2 (unseen, irreversible): values 1.0 (anchor) / 1.0 (ends the episode) / 0.0, a tie."""
    hist = [{"role": "user", "content": "Cross the river."}, {"role": "user", "content": "You are at a fork."}]
    d1 = [cand(0.5, -0.5, -0.1, anchor=True), cand(1.0, -2.0, -0.5), cand(0.0, -0.4, -0.2)]
    d2 = [cand(1.0, -0.9, -0.3, anchor=True), cand(1.0, -2.0, -0.1, terminal=True), cand(0.0, -3.0, -0.2)]
    return [{"schema_version": 1, "env": "fork", "split": split, "task": f"fork/{split}/0", "task_type": "fork",
             "step": 0, "prefix": [], "history": hist, "played": 0, "samples": 3, "truncated": 0, "candidates": c}
            for split, c in (("seen", d1), ("unseen", d2))]


Q_VALUES = [[0.2, 0.6, 0.1], [0.1, 0.0, 0.9]]


def test_report_metrics_on_hand_built_decisions() -> None:
    from qlass.decision_report import ReportConfig, score_decisions

    result = score_decisions(hand_built(), Q_VALUES, ReportConfig(betas=[0.1, 1.0], margins=[0.3, 0.5]))
    groups = {g["group"]: g for g in result["groups"]}
    assert list(groups) == ["all", "split seen", "split unseen", "irreversible", "reversible"]
    assert groups["all"]["decisions"] == 2 and groups["all"]["unique_best"] == 1
    assert groups["irreversible"]["decisions"] == 1 and groups["irreversible"]["unique_best"] == 0
    rows = {r["ranker"]: (r["accuracy"], r["regret"]) for r in groups["all"]["rows"]}
    # D1 picks (value): qnet 1 (1.0), likelihood 0 (0.5), policy-mode 2 (0.0), anchor 0 (0.5),
    # qnet+0.1 1 (1.0), qnet+1 ties 0.1/0.1 -> 0 (0.5), margin 0.3 -> 1 (1.0), margin 0.5 -> anchor (0.5)
    # D2 picks: qnet 2 (0.0), likelihood 1 (1.0, tied best: correct), policy-mode 0, anchor 0, qnet+0.1 2,
    # qnet+1 [-0.2, -0.1, 0.7] -> 2, both margins -> 2 (0.9 - 0.1 > 0.5)
    expected = {
        "oracle": (1.0, 0.0), "qnet": (0.5, 0.5), "qnet+0.1·likelihood": (0.5, 0.5), "qnet+1·likelihood": (0.0, 0.75),
        "likelihood": (0.5, 0.25), "policy-mode": (0.5, 0.5), "anchor": (0.5, 0.25),
        "anchor+margin 0.3": (0.5, 0.5), "anchor+margin 0.5": (0.0, 0.75),
        # random, exactly: D1 1/3 correct, regret 1.0 - 0.5; D2 2/3 correct, regret 1.0 - 2/3
        "random": (0.5, (0.5 + 1 / 3) / 2)}
    assert list(rows) == list(expected) and all(rows[k] == pytest.approx(v) for k, v in expected.items())
    qnet_row = next(r for r in groups["all"]["rows"] if r["ranker"] == "qnet")
    # qnet - likelihood accuracy per decision: +1, -1; resampling two decisions gives means -1, 0, +1
    assert qnet_row["vs"]["likelihood"]["accuracy"] == {"mean_diff": 0.0, "ci_low": -1.0, "ci_high": 1.0}
    assert qnet_row["vs"]["anchor"]["regret"]["mean_diff"] == pytest.approx(0.25)
    assert "likelihood" not in next(r for r in groups["all"]["rows"] if r["ranker"] == "likelihood")["vs"]
    assert groups["split seen"]["rows"][0]["vs"] == {}  # one decision: no interval
    # without a QNet the QNet rankers are gone; without log-probabilities so are the likelihood ones
    no_q = {r["ranker"] for r in score_decisions(hand_built())["groups"][0]["rows"]}
    assert no_q == {"oracle", "likelihood", "policy-mode", "anchor", "random"}
    bare = hand_built()
    for rec in bare:
        for c in rec["candidates"]:
            c["logprob"] = c["mean_logprob"] = None
    assert {r["ranker"] for r in score_decisions(bare)["groups"][0]["rows"]} == {"oracle", "anchor", "random"}


def test_anchor_rankers_are_scored_on_the_decisions_that_have_an_anchor() -> None:
    """A decision whose greedy output was cut off has no anchor: the anchor rankers leave the tables
    over all decisions and get a group of their own, beside every other ranker on the same decisions."""
    from qlass.decision_report import ANCHORED, ReportConfig, markdown, score_decisions

    records = hand_built()
    records.append({**records[0], "task": "fork/seen/1",
                    "candidates": [cand(0.0, -0.1, -0.05), cand(1.0, -1.8, -0.9)]})  # no anchor; likelihood wrong
    result = score_decisions(records, Q_VALUES + [[0.0, 0.5]], ReportConfig(betas=[0.1], margins=[0.3]))
    groups = {g["group"]: g for g in result["groups"]}
    assert list(groups) == ["all", "split seen", "split unseen", "irreversible", "reversible", ANCHORED]
    anchor_rows = {"anchor", "anchor+margin 0.3"}
    for label in ("all", "split seen", "reversible"):  # each holds the anchorless decision
        assert not anchor_rows & {r["ranker"] for r in groups[label]["rows"]}
        assert all("anchor" not in r["vs"] for r in groups[label]["rows"])
    assert anchor_rows <= {r["ranker"] for r in groups["irreversible"]["rows"]}  # D2 only: anchored
    only = groups[ANCHORED]
    assert only["decisions"] == 2 and only["tasks"] == 2
    rows = {r["ranker"]: r for r in only["rows"]}
    # the same two decisions as the hand-built report: the same numbers
    assert (rows["anchor"]["accuracy"], rows["anchor"]["regret"]) == pytest.approx((0.5, 0.25))
    assert rows["likelihood"]["accuracy"] == pytest.approx(0.5)
    assert rows["qnet"]["vs"]["anchor"]["regret"]["mean_diff"] == pytest.approx(0.25)
    assert groups["all"]["decisions"] == 3
    pooled = next(r for r in groups["all"]["rows"] if r["ranker"] == "likelihood")
    assert rows["likelihood"]["accuracy"] != pooled["accuracy"]
    text = markdown(result)
    assert "1 decision(s) have no greedy anchor" in text and f"## {ANCHORED}: 2 decisions" in text
    assert "Δ accuracy % vs anchor" in text.split(f"## {ANCHORED}")[1]
    assert "Δ accuracy % vs anchor" not in text.split("## split seen")[0]
    # every decision anchored: no extra group, the anchor rankers in every table
    assert [g["group"] for g in score_decisions(hand_built(), Q_VALUES)["groups"]][-1] == "reversible"


def test_report_options_are_checked() -> None:
    from qlass.decision_report import ReportConfig

    for bad, why in (({"betas": [0.1, 0.1]}, "distinct"), ({"betas": [0.1, 0.1000001]}, "distinct"),
                     ({"margins": [0.05, 0.05]}, "distinct"), ({"margins": [-1.0]}, ">= 0"), ({"seed": -1}, ">= 0"),
                     ({"resamples": 99}, "in 100..1000000"),
                     ({"resamples": 10**12}, "in 100..1000000")):  # every resample's mean is kept: memory grew for ever
        with pytest.raises(ValueError, match=why):
            ReportConfig(**bad)
    assert ReportConfig(betas=[0.1, 0.3], margins=[0.0]).margins == [0.0]


def test_paired_intervals_follow_the_compare_procedure() -> None:
    import random

    import numpy as np

    from qlass.compare import bootstrap_interval
    from qlass.decision_report import _intervals

    rng = random.Random(3)
    diffs = [rng.choice([-1.0, 0.0, 0.0, 1.0, 1.0]) for _ in range(80)]
    low, high = _intervals(np.array([diffs, [0.25] * 80]), 10_000, 0)
    ref = bootstrap_interval(diffs, 10_000, 0)
    assert abs(low[0] - ref[0]) <= 0.03 and abs(high[0] - ref[1]) <= 0.03 and low[0] < sum(diffs) / 80 < high[0]
    assert (low[1], high[1]) == (0.25, 0.25)
    spread = [rng.uniform(-1.0, 1.0) for _ in range(80)]  # no ties among the resampled means
    low, high = _intervals(np.array([spread, [-d for d in spread]]), 10_000, 0)  # swapped sides: negated ends
    assert (low[1], high[1]) == (-high[0], -low[0])


def test_report_files_with_a_real_qnet(tiny_model_dir: Path, tmp_path: Path) -> None:
    from qlass.decision_report import qnet_values, write_decision_report
    from qlass.jsonl import write_jsonl
    from qlass.qnet import QNet
    from qlass.search import argmax
    from qlass.types import Message

    path = tmp_path / "d.jsonl"
    write_jsonl(path, hand_built())
    qnet = QNet.from_sft(tiny_model_dir)
    result = write_decision_report([path], tmp_path / "report", qnet)
    assert result["qnet"] and result["files"] == [str(path)]
    saved = json.loads((tmp_path / "report" / "decisions.json").read_text())
    assert saved["groups"] == result["groups"]
    md = (tmp_path / "report" / "decisions.md").read_text()
    assert "## all: 2 decisions from 2 tasks, 1 with a unique best" in md and "| qnet |" in md
    # the qnet ranker picks the argmax of QNet.score on the record's history and outputs; batching does not matter
    recs = hand_built()
    batched = qnet_values(recs, qnet, batch=16)
    for rec, vals in zip(recs, batched):
        alone = qnet.score([Message(**m) for m in rec["history"]], [c["output"] for c in rec["candidates"]])
        assert vals == pytest.approx(alone, abs=1e-5)
    accuracy = statistics.fmean(float(rec["candidates"][argmax(v)]["mean"] == max(c["mean"] for c in rec["candidates"]))
                                for rec, v in zip(recs, batched))
    qnet_row = next(r for r in result["groups"][0]["rows"] if r["ranker"] == "qnet")
    assert qnet_row["accuracy"] == accuracy
    rows = {r["ranker"] for r in result["groups"][0]["rows"]}
    assert {"qnet", "qnet+0.3·likelihood", "anchor+margin 0.1"} <= rows


def test_bad_decision_files_name_record_and_field(tmp_path: Path) -> None:
    from qlass.decision_files import read_decisions
    from qlass.errors import DataError
    from qlass.jsonl import write_jsonl

    recs = hand_built()
    recs[1]["candidates"][2]["mean"] = "high"
    write_jsonl(tmp_path / "bad.jsonl", recs)
    with pytest.raises(DataError, match=r"bad.jsonl, line 2 \(id 'fork/unseen/0@0'\): field 'candidates\[2\]\.mean'"):
        read_decisions([tmp_path / "bad.jsonl"])
    write_jsonl(tmp_path / "a.jsonl", hand_built())
    write_jsonl(tmp_path / "copy.jsonl", hand_built())
    with pytest.raises(DataError, match=r"decision \('fork', 'seen', 'fork/seen/0', 0\) is also in .*a.jsonl, line 1"):
        read_decisions([tmp_path / "a.jsonl", tmp_path / "copy.jsonl"])
    with pytest.raises(QlassError, match=r"a.jsonl: given twice; give each file once"):  # not "also in" itself
        read_decisions([tmp_path / "a.jsonl", tmp_path / "a.jsonl"])
    for field, change in (("candidates[2].anchor", lambda c: c[2].update(anchor=True)),  # the anchor is candidate 0
                          ("candidates[1]': log-probabilities", lambda c: c[1].update(logprob=None, mean_logprob=None)),
                          ("candidates[0]': log-probabilities", lambda c: c[0].update(mean_logprob=None)),
                          ("candidates[1].output' holds an unpaired surrogate", lambda c: c[1].update(output="\udc80")),
                          ("candidates[0].mean' is 1.0 but its 'rollout_rewards' average 0.75",
                           lambda c: c[0].update(rollout_rewards=[1.0, 0.5]))):
        recs = hand_built()
        change(recs[1]["candidates"])
        (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))  # \\udc80 escaped
        with pytest.raises(DataError, match=rf"bad.jsonl[,:] line 2\b.*field .{re.escape(field)}"):
            read_decisions([tmp_path / "bad.jsonl"])
    # a history without the task (none, or only assistant turns) crashed the QNet rankers and cv-head with
    # a chat-template traceback, and to-qdata wrote Q data its reader refused
    for history in ([], [{"role": "assistant", "content": "Thought: t\nAction: look"}]):
        recs = hand_built()
        recs[1]["history"] = history
        write_jsonl(tmp_path / "bad.jsonl", recs)
        with pytest.raises(DataError, match=r"bad.jsonl, line 2 .*field 'history' holds no system or user message"):
            read_decisions([tmp_path / "bad.jsonl"])


def test_resuming_a_collection_needs_its_recorded_settings(tmp_path: Path) -> None:
    """Decisions (or finished tasks) without a settings file, or with one that records none, could be
    of any settings: a collection does not add to them. An empty file is no earlier work."""
    from qlass.decision_files import check_settings
    from qlass.errors import QlassError
    from qlass.jsonl import write_jsonl

    settings = {"model": "m", "env": "fork", "seed": 0, "options": {"m": 4}}
    out = tmp_path / "d.jsonl"
    write_jsonl(out, hand_built())
    with pytest.raises(QlassError, match=r"d.jsonl holds earlier work but .*d.config.yaml is missing"):
        check_settings(out, settings)
    (tmp_path / "d.config.yaml").write_text("seed: 0\n")
    with pytest.raises(QlassError, match=r"d.config.yaml does not record 'model', 'env', 'options'"):
        check_settings(out, settings)
    out.unlink()
    (tmp_path / "d.config.yaml").unlink()
    (tmp_path / "d.tasks.jsonl").write_text('{"split": "seen", "task": "fork/seen/0"}\n')
    with pytest.raises(QlassError, match="d.tasks.jsonl holds earlier work"):
        check_settings(out, settings)
    (tmp_path / "d.tasks.jsonl").write_text("")
    out.write_text("")
    check_settings(out, settings)  # nothing recorded yet: the settings are saved
    check_settings(out, settings)
    with pytest.raises(QlassError, match=r"options.m: 4 → 3"):
        out.write_text(json.dumps(hand_built()[0]) + "\n")
        check_settings(out, {**settings, "options": {"m": 3}})


def test_a_truncated_greedy_output_is_sent_without_its_action_and_play_goes_on(tmp_path: Path) -> None:
    class CutGreedy(ScriptedPolicy):
        def sample(self, histories, n=1, temperature=0.0, max_new_tokens=128, seed=None):
            if temperature == 0:
                return [[Completion("Thought: t\nAction: go ri", 10, max_new_tokens, -2.0, truncated=True)] * n
                        for _ in histories]
            return super().sample(histories, n, temperature, max_new_tokens, seed)

    recs = collect_decisions(Fork, Fork().tasks("seen")[:1], CutGreedy(), DecisionConfig(m=3, max_steps=3, k=2),
                             tmp_path / "d.jsonl")
    # the cut greedy output is never a candidate and never executed as "go ri": the env gets no action, stays
    assert [r["step"] for r in recs] == [0, 1, 2] and all(r["played"] is None for r in recs)
    assert [c["action"] for c in recs[1]["candidates"]] == ["go left", "look"]
    assert not any(c["anchor"] for r in recs for c in r["candidates"])
    assert recs[2]["prefix"] == ["Thought: t", "Thought: t"] and recs[2]["history"][-1]["content"].startswith(
        "Observation: You are at the start")
    # step 2 is the last allowed step: "look" cannot be rolled out, its value is its immediate reward
    look = recs[2]["candidates"][1]
    assert look["rollout_rewards"] == [0.0, 0.0] and look["rollout_lengths"] == [0, 0]


def test_local_policies_keep_a_prompt_cache_per_live_history(tiny_model_dir: Path) -> None:
    from qlass.commands.decisions import policy_with_cache
    from qlass.policy.user import UserPolicy

    assert policy_with_cache(str(tiny_model_dir), {}, 16).keywords == {"cache_slots": 18}
    assert policy_with_cache(str(tiny_model_dir), {"cache_slots": 4}, 16).keywords == {"cache_slots": 4}
    assert "cache_slots" not in policy_with_cache("http://127.0.0.1:9/v1", {}, 16).keywords  # the server's own
    scripted = policy_with_cache("test_decisions:ScriptedPolicy", {"delay": 0.0}, 16)
    built = scripted()  # the user's class, its answers checked
    assert isinstance(built, UserPolicy) and isinstance(built._policy, ScriptedPolicy)


def test_offset_continues_where_a_limit_stopped_and_exclusions_come_first() -> None:
    from toy_envs import Corridor

    from qlass.evaluate import split_tasks

    def ids(limit: int | None, offset: int = 0) -> list[str]:
        return [t.id for t in split_tasks(lambda: Corridor(tasks_per_split=10), "corridor", ["train", "seen"],
                                          None, limit, offset)[1]]

    first, second = ids(3), ids(4, offset=3)
    assert not set(first) & set(second) and len(second) == 8
    assert sorted(first + second) == sorted(ids(7))
    assert ids(None, offset=8) == ["corridor/8", "corridor/108", "corridor/9", "corridor/109"]
    kept = split_tasks(lambda: Corridor(tasks_per_split=10), "corridor", ["train"], None, 3, 0,
                       {"corridor/0", "corridor/2"})
    assert [t.id for t in kept[1]] == ["corridor/1", "corridor/3", "corridor/4"]
    with pytest.raises(QlassError, match=r"no tasks in split 'train' .* after skipping the first 10 \(offset\)"):
        ids(None, offset=10)


def test_offset_never_repeats_a_limits_tasks_when_it_reaches_the_end_of_a_split() -> None:
    from toy_envs import Corridor

    from qlass.evaluate import split_tasks

    class TwoTypes(Corridor):  # 5 tasks of type a, then 5 of type b: the round-robin order differs from this one
        def tasks(self, split: str, task_types: Sequence[str] | None = None) -> list[Task]:
            return [Task(f"{kind}/{i}", self.name, split, kind) for kind in ("a", "b") for i in range(5)]

    def ids(limit: int | None, offset: int = 0) -> list[str]:
        return [t.id for t in split_tasks(TwoTypes, "two", ["seen"], None, limit, offset)[1]]

    first = ids(4)
    assert first == ["a/0", "b/0", "a/1", "b/1"]
    for limit in (None, 6, 20):  # offset + limit at or past the split's 10 tasks
        assert ids(limit, offset=4) == ["a/2", "b/2", "a/3", "b/3", "a/4", "b/4"]
    assert ids(3, offset=4) == ["a/2", "b/2", "a/3"]
    assert sorted(ids(None)) == sorted(first + ids(None, offset=4))


def test_a_reward_rounded_just_above_one_is_recorded_as_one(tmp_path: Path) -> None:
    from qlass.decision_report import write_decision_report

    class SumFork(Fork):  # the winning score as a sum of float parts: 1 + 5e-10, which env_step takes
        def step(self, output: str) -> StepResult:
            got = super().step(output)
            return StepResult(got.observation, got.reward + 5e-10 if got.reward == 1.0 else got.reward, got.done)

    path, cfg = tmp_path / "d.jsonl", DecisionConfig(m=4, k=2, max_steps=6)
    recs = collect_decisions(SumFork, SumFork().tasks("seen")[:2], ScriptedPolicy(), cfg, path)
    rewards = [r for rec in recs for c in rec["candidates"] for r in c["rollout_rewards"]]
    assert 1.0 in rewards and max(rewards) == 1.0 and max(c["mean"] for rec in recs for c in rec["candidates"]) == 1.0
    # the file reads back: the report, and a rerun with one task more that resumes it
    assert write_decision_report([path], tmp_path / "report")["groups"][0]["decisions"] == len(recs)
    more = collect_decisions(SumFork, SumFork().tasks("seen"), ScriptedPolicy(), cfg, path)
    assert len(more) > len(recs) and more[:len(recs)] == recs
    # a file an older qlass wrote with the unclamped value still reads (as trees and evaluation records do)
    old = [json.loads(line) for line in path.read_text().splitlines()]
    for c in (c for rec in old for c in rec["candidates"]):
        c["rollout_rewards"] = [r + 5e-10 if r == 1.0 else r for r in c["rollout_rewards"]]
        c["mean"], c["std"] = statistics.fmean(c["rollout_rewards"]), statistics.pstdev(c["rollout_rewards"])
    assert any(c["mean"] > 1.0 for rec in old for c in rec["candidates"])
    path.write_text("".join(json.dumps(rec) + "\n" for rec in old))
    assert len(read_decisions([path])) == len(more)


def test_rollouts_continue_the_conversation_the_decision_was_made_in(tmp_path: Path) -> None:
    class CutGreedy(ScriptedPolicy):  # the played (greedy) output at the fork is cut off by the token limit
        def __init__(self) -> None:
            super().__init__()
            self.rollout_histories: list[list[str]] = []

        def sample(self, histories, n=1, temperature=0.0, max_new_tokens=128, seed=None):
            if temperature == 0 and place(histories[0]) == "start":
                return [[Completion("Thought: t\nAction: go ri", 10, max_new_tokens, -2.0, truncated=True)] * n
                        for _ in histories]
            if n == 1 and temperature > 0:
                self.rollout_histories += [[m.content for m in h if m.role == "assistant"] for h in histories]
            return super().sample(histories, n, temperature, max_new_tokens, seed)

    policy = CutGreedy()
    recs = collect_decisions(Fork, Fork().tasks("seen")[:1], policy, DecisionConfig(m=3, max_steps=3, k=2),
                             tmp_path / "d.jsonl")
    later = recs[1]  # made after the cut output: the policy read it as written, the environment got no action
    assert later["prefix"] == ["Thought: t"]
    assert [m["content"] for m in later["history"] if m["role"] == "assistant"] == ["OK", "Thought: t\nAction: go ri"]
    # its rollouts read the same conversation, never the text the environment got in its place
    assert any(h[:2] == ["OK", "Thought: t\nAction: go ri"] for h in policy.rollout_histories)
    assert not any("Thought: t" in h for h in policy.rollout_histories)


def test_a_redrawn_candidates_likelihood_is_per_token_of_its_own_output(tmp_path: Path) -> None:
    class Redrawn(ScriptedPolicy):  # as HFPolicy(distinct=True): discarded draws counted in completion_tokens
        def sample(self, histories, n=1, temperature=0.0, max_new_tokens=128, seed=None):
            got = super().sample(histories, n, temperature, max_new_tokens, seed)
            return [[Completion(c.text, c.prompt_tokens, c.completion_tokens + 10, c.logprob, c.truncated,
                                c.completion_tokens) if n > 1 else c for c in outs] for outs in got]

    path = tmp_path / "d.jsonl"
    recs = collect_decisions(Fork, Fork().tasks("seen")[:1], Redrawn(), DecisionConfig(m=3, max_steps=2), path)
    sampled = [c for rec in recs for c in rec["candidates"] if not c["anchor"]]
    assert sampled and all(c["completion_tokens"] == c["logprob_tokens"] + 10 for c in sampled)
    assert all(c["mean_logprob"] == pytest.approx(c["logprob"] / c["logprob_tokens"]) for c in sampled)
    assert all("logprob_tokens" not in c for rec in recs for c in rec["candidates"] if c["anchor"])
    assert read_decisions([path]) == recs


def test_a_task_given_twice_is_refused(tmp_path: Path) -> None:
    task = Fork().tasks("seen")[0]
    with pytest.raises(QlassError, match=r"task 'fork/seen/0' of split 'seen' is given twice"):
        collect_decisions(Fork, [task, task], ScriptedPolicy(), DecisionConfig(m=3), tmp_path / "d.jsonl")
    assert not (tmp_path / "d.jsonl").exists()


def test_split_half_check_scores_the_first_half_against_the_second() -> None:
    from qlass.decision_report import markdown, score_decisions, split_half

    recs = hand_built()
    # D1: rollouts [1, 0, 0, 0] / [0, 0, 1, 1] / [0.5, 0.5, 0.5, 0.5]: first halves 0.5, 0.0, 0.5 -> pick 0,
    # second halves 0.0, 1.0, 0.5 -> wrong; random 1/3
    for c, rolls in zip(recs[0]["candidates"], ([1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0], [0.5] * 4)):
        c["rollout_rewards"] = rolls
    # D2: candidate 1 ended the episode (exact 1.0 in both halves); [1, 1] / [0, 0]: first 1.0, 1.0, 0.0 ->
    # pick 0, second 1.0, 1.0, 0.0 -> right (ties count); random 2/3
    for c, rolls in zip(recs[1]["candidates"], ([1.0, 1.0], [1.0], [0.0, 0.0])):
        c["rollout_rewards"] = rolls
    assert split_half(recs) == {"decisions": 2, "first_half_accuracy": 0.5, "random_accuracy": pytest.approx(0.5)}
    assert "scores 50.0% against the second half (random: 50.0%; 2 decisions)" in markdown(score_decisions(recs))
    recs[0]["candidates"][2]["rollout_rewards"] = [0.5]  # one rollout: that decision cannot be split
    assert split_half(recs)["decisions"] == 1
    assert split_half([recs[0]]) is None


def test_greedy_rollouts_get_no_split_half_check(tmp_path: Path) -> None:
    from qlass.decision_report import write_decision_report

    task = Fork().tasks("seen")[:1]
    for name, temperature in (("greedy", 0.0), ("sampled", 0.7)):
        collect_decisions(Fork, task, ScriptedPolicy(), DecisionConfig(m=3, k=2, rollout_temperature=temperature),
                          tmp_path / f"{name}.jsonl")
    greedy = write_decision_report([tmp_path / "greedy.jsonl"], tmp_path / "g")
    assert greedy["split_half"] is None and greedy["greedy_rollouts"]  # two copies of one rollout agree by design
    text = (tmp_path / "g" / "decisions.md").read_text()
    assert "no measurement check by split halves" in text and "Measurement check" not in text
    sampled = write_decision_report([tmp_path / "sampled.jsonl"], tmp_path / "s")
    assert sampled["split_half"] is not None and "greedy_rollouts" not in sampled


def test_the_report_reads_every_record_the_checks_pass_and_refuses_a_file_as_its_folder(tmp_path: Path) -> None:
    from qlass.decision_report import score_decisions, split_half, write_decision_report

    recs = hand_built()
    for c in (c for rec in recs for c in rec["candidates"]):  # log-probabilities left out, not null
        for key in ("logprob", "mean_logprob"):
            del c[key]
    del recs[1]["candidates"][1]["rollout_rewards"]  # the episode-ending candidate: its reward is its value
    for c in recs[1]["candidates"][::2]:
        c["rollout_rewards"], c["rollout_lengths"] = [c["mean"]] * 2, [1, 1]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(rec) + "\n" for rec in recs))
    checked = read_decisions([path])
    rows = {r["ranker"] for r in score_decisions(checked)["groups"][0]["rows"]}
    assert "anchor" in rows and "likelihood" not in rows  # no likelihood without log-probabilities everywhere
    assert split_half(checked[1:])["decisions"] == 1
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(QlassError, match=r"taken: is a file; the report's output is a folder"):
        write_decision_report([path], tmp_path / "taken", load_qnet=lambda: pytest.fail("the QNet loaded first"))


def test_cli_leaves_out_the_tasks_of_a_trajectory_file(tmp_path: Path) -> None:
    from qlass.data import save_trajectories
    from qlass.types import Message, Trajectory

    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    sft_data = tmp_path / "expert.json"
    msgs = [Message("user", "go"), Message("assistant", "Thought: a.\nAction: left")]
    save_trajectories(sft_data, [Trajectory(f"e{i}", msgs, 1.0, True, f"fork/seen/{i}") for i in range(5)])
    out = tmp_path / "d.jsonl"
    ran = subprocess.run(collect_cmd(out, "--exclude-tasks-of", str(sft_data)), env=env, check=False,
                         capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr[-2000:]
    finished = {json.loads(x)["task"] for x in out.with_suffix(".tasks.jsonl").read_text().splitlines()}
    assert finished == {"fork/seen/5"} | {f"fork/unseen/{i}" for i in range(6)}
    assert "exclude_tasks_of" in out.with_suffix(".config.yaml").read_text()


class OddLogprobs(ScriptedPolicy):
    """Fork's scripted policy whose second sampled candidate has log-probability ``odd``: a policy that
    gives none for some candidates, a server's -inf, or one rounded just above 0."""

    def __init__(self, odd: float | None) -> None:
        super().__init__()
        self.odd = odd

    def sample(self, histories, n=1, temperature=0.0, max_new_tokens=128, seed=None) -> list[list[Completion]]:
        rows = super().sample(histories, n, temperature, max_new_tokens, seed)
        return [[Completion(c.text, c.prompt_tokens, c.completion_tokens, self.odd, c.truncated)
                 if j == 1 and n > 1 else c for j, c in enumerate(row)] for row in rows]


@pytest.mark.parametrize("odd", [None, float("-inf"), 1e-5])
def test_log_probabilities_the_readers_refuse_stop_the_collection_first(tmp_path: Path, odd: float | None) -> None:
    """The readers take a finite log-probability <= 0 for every candidate of a decision, or none; the
    collector wrote whatever the policy gave (some candidates without one, a server's -inf ...), so a run
    ended well and then its resume, report, to-qdata and cv-head refused the whole file. Such a policy
    now stops the collection before its first rollout, with nothing written."""
    out = tmp_path / "d.jsonl"
    with pytest.raises(QlassError, match=r"decisions: at task fork/seen/0 step 0 the policy gave the candidates "
                                         r"log-probabilities \[-0\.5, .*\]; a decision needs a finite number <= 0"):
        collect_decisions(Fork, Fork().tasks("seen")[:1], OddLogprobs(odd), DecisionConfig(m=3, k=2), out)
    assert not out.exists() or read_jsonl(out) == []


def test_a_decisions_file_not_named_jsonl_is_refused(tmp_path: Path) -> None:
    """``--out runs/dec`` and ``--out runs/dec.jsonl`` shared the sidecars dec.config.yaml and
    dec.tasks.jsonl (by stem), under different locks: the second run found the first's tasks finished
    and collected nothing, silently."""
    collect_decisions(Fork, Fork().tasks("seen")[:1], ScriptedPolicy(), DecisionConfig(m=3, k=2),
                      tmp_path / "dec.jsonl")
    for name in ("dec", "dec.txt"):
        with pytest.raises(QlassError, match=rf"{name}: a decisions file is named NAME.jsonl"):
            collect_decisions(Fork, Fork().tasks("seen")[:1], ScriptedPolicy(), DecisionConfig(m=3, k=2),
                              tmp_path / name)
        assert not (tmp_path / name).exists()


def test_a_policy_class_without_sample_is_named() -> None:
    """``--model pkg:Class`` naming a class without ``sample`` was an AttributeError traceback at the
    first request (and paraphrase left its cache header pinned to it)."""
    from qlass.policy import load_policy

    with pytest.raises(QlassError, match=r"policy 'test_decisions:Fork': Fork has no sample\(\) method"):
        load_policy("test_decisions:Fork")
