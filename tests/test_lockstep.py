"""Lockstep play: waves batch the requests of every live episode, and results do not depend on them.

The scheduler is checked with scripted models (what each call received); the evaluation's records
with a tiny random HF model and a QNet made from it, played one episode at a time and eight at once.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

import pytest
from toy_envs import Corridor

from qlass.errors import QlassError
from qlass.eval_worker import EvalWorker, MethodRun
from qlass.evaluate import evaluate
from qlass.executor import ProcessExecutor
from qlass.jsonl import read_jsonl
from qlass.lockstep import Sample, Score, Scored, drive, run_one
from qlass.search import make_method_config
from qlass.types import Completion, Message


class Recorder:
    """A policy that answers every history with its length and the seed it got; records each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, float, list]] = []

    def sample(self, histories, n=1, temperature=0.0, max_new_tokens=128, seed=None):
        self.calls.append((n, temperature, list(seed) if seed is not None else None))
        seeds = seed if seed is not None else [None] * len(histories)
        return [[Completion(f"{len(h)}:{s}:{j}", 3, 2) for j in range(n)] for h, s in zip(histories, seeds)]


class BatchQNet:
    def __init__(self) -> None:
        self.batches: list[int] = []

    def score_batch(self, items):
        self.batches.append(len(items))
        self.last_item_tokens = [10 * len(c) for _, c in items]
        return [[float(len(x)) for x in c] for _, c in items]


def episode(length: int, seed: int):
    """Asks for one sample per step, then scores it with a second candidate, ``length`` times."""
    history = [Message("user", "x")]
    got = []
    for t in range(length):
        (outs,) = yield Sample([history], 1, 0.7, 8, [seed + t])
        scored = yield Score(history, [outs[0].text, "other"])
        assert isinstance(scored, Scored)
        got.append((outs[0].text, scored.values, scored.tokens))
    return got


def test_a_wave_is_one_policy_call_and_one_qnet_call_and_slots_refill() -> None:
    policy, qnet = Recorder(), BatchQNet()
    lengths = [1, 3, 2, 1]
    done = list(drive((lambda n=n, i=i: episode(n, 100 * i) for i, n in enumerate(lengths)), policy, qnet,
                      concurrency=2))
    assert sorted(i for i, _ in done) == [0, 1, 2, 3]
    results = dict(done)
    assert [len(results[i]) for i in range(4)] == lengths
    assert results[1][2] == ("1:102:0", [7.0, 5.0], 20)  # its own seed, values and QNet tokens
    # never more than two live: a wave holds at most two requests; a finished slot refills at once
    assert all(len(seeds) <= 2 for _, _, seeds in policy.calls) and max(qnet.batches) == 2
    assert [seeds for _, _, seeds in policy.calls][:2] == [[0, 100], [101, 200]]
    assert sum(len(s) for _, _, s in policy.calls) == sum(lengths)


def test_list_requests_are_answered_in_one_wave_in_order_and_calls_group_by_settings() -> None:
    policy = Recorder()

    def two_kinds():
        greedy, sampled = yield [Sample([[]], 1, 0.0, 8, [5]), Sample([[]], 3, 0.7, 8, [5])]
        return [c.text for c in greedy[0]], [c.text for c in sampled[0]]

    def plain():
        outs = yield Sample([[], []], 1, 0.0, 8, None)
        return [o[0].text for o in outs]

    out = dict(drive([two_kinds, two_kinds, plain], policy, None, concurrency=3))
    assert out[0] == (["0:5:0"], ["0:5:0", "0:5:1", "0:5:2"]) and out[2] == ["0:None:0", "0:None:0"]
    assert sorted(policy.calls, key=str) == sorted([(1, 0.0, [5, 5]), (3, 0.7, [5, 5]), (1, 0.0, None)], key=str)



class JobRecorder(Recorder):
    """A policy that also takes mixed settings in one call (``sample_jobs``); records each call."""

    def sample_jobs(self, jobs):
        self.calls.append(("jobs", [(j.n, j.temperature, j.max_new_tokens, j.seed) for j in jobs]))
        return [[Completion(f"{len(j.history)}:{j.seed}:{k}", 3, 2) for k in range(j.n)] for j in jobs]


def test_a_policy_with_sample_jobs_gets_the_whole_wave_in_one_call() -> None:
    policy = JobRecorder()

    def two_kinds():
        greedy, sampled = yield [Sample([[]], 1, 0.0, 8, [5]), Sample([[]], 3, 0.7, 16, [6])]
        return [c.text for c in greedy[0]], [c.text for c in sampled[0]]

    out = dict(drive([two_kinds, two_kinds], policy, None, concurrency=2))
    assert out[0] == (["0:5:0"], ["0:6:0", "0:6:1", "0:6:2"]) == out[1]
    assert policy.calls == [("jobs", [(1, 0.0, 8, 5), (3, 0.7, 16, 6)] * 2)]

def test_an_episode_that_fails_closes_the_others() -> None:
    closed = []

    def ok():
        try:
            yield Sample([[]], 1, 0.0, 8, [1])
            yield Sample([[]], 1, 0.0, 8, [1])
        finally:
            closed.append("ok")

    def bad():
        yield Sample([[]], 1, 0.0, 8, [1])
        raise RuntimeError("broken episode")

    with pytest.raises(RuntimeError, match="broken episode"):
        list(drive([ok, bad], Recorder(), None, concurrency=2))
    assert closed == ["ok"]
    with pytest.raises(ValueError, match="no QNet"):
        run_one(episode(1, 0), Recorder(), None)


METHODS = ["greedy", "sample", "best-of-n:n=2", "best-of-n:n=2,select=likelihood", "qlass:m=2",
           "qlass:m=3,anchor=greedy", "qlass:m=2,beta=0.5"]


def _runs() -> list[MethodRun]:
    from qlass.search import parse_method

    runs = []
    for spec in METHODS:
        name, opts = parse_method(spec)
        runs.append(MethodRun(name, make_method_config(name, {**opts, "max_steps": 4, "max_new_tokens": 8})))
    return runs


class Finished:
    """The tiny random model's outputs made into complete actions (``Action: <its first word>``): at 8
    new tokens a random model never closes an ``Action:`` line, so every output would be truncated and
    qlass would never have a choice to make. The decoding itself (batched, seeded) is the model's."""

    def __init__(self, policy) -> None:
        self.policy = policy

    def sample(self, histories, n=1, temperature=0.0, max_new_tokens=128, seed=None):
        outs = self.policy.sample(histories, n, temperature, max_new_tokens, seed=seed)
        return [[replace(c, text=f"Thought: {c.text}\nAction: {(c.text.split() or ['look'])[0]}", truncated=False)
                 for c in row] for row in outs]


def _rounded(value):
    """``value`` with floats rounded to 5 decimals: log-probability sums differ by ~1e-7 between batch
    shapes in fp32 (measured: at most 2e-7 on these records); everything else is compared exactly."""
    if isinstance(value, float):
        return round(value, 5)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def finished_policy(model_dir: Path) -> Finished:
    from qlass.policy import HFPolicy

    return Finished(HFPolicy(model_dir, threads=1))


def _records(tiny_model_dir: Path, out: Path, concurrency: int, executor=None) -> dict:
    from qlass.qnet import QNet

    worker = EvalWorker(functools.partial(Corridor, step_limit=4, tasks_per_split=3),
                        functools.partial(finished_policy, tiny_model_dir),
                        functools.partial(QNet.from_sft, tiny_model_dir, seed=3), concurrency=concurrency)
    recs = evaluate("corridor", Corridor(tasks_per_split=3).tasks("seen"), _runs(), worker, out, seed=7,
                    executor=executor)
    assert len(read_jsonl(out / "records.jsonl")) == len(recs) == len(METHODS) * 3  # each episode once
    return {(r["method"], r["task"]): _rounded({k: v for k, v in r.items() if k != "wall_time"}) for r in recs}


@pytest.mark.slow
def test_records_are_the_same_one_at_a_time_and_eight_at_once(tiny_model_dir: Path, tmp_path: Path) -> None:
    """fp32: every method (greedy and sampled, QNet-scored) gives identical records whether its
    episodes play alone or in waves with seven others of other methods and tasks."""
    alone = _records(tiny_model_dir, tmp_path / "one", concurrency=1)
    waves = _records(tiny_model_dir, tmp_path / "eight", concurrency=8)
    assert len(alone) == len(METHODS) * 3
    assert waves == alone
    # two worker processes, four live episodes each, pulling jobs from one queue
    assert _records(tiny_model_dir, tmp_path / "two-by-four", concurrency=4, executor=ProcessExecutor(2)) == alone
    assert any(r["qnet_choices"] for r in alone.values() if r["method_name"] == "qlass")


class Answering:
    """A policy object handed to the library directly (not through load_policy) that answers ``answer``."""

    def __init__(self, answer) -> None:
        self.answer = answer

    def sample(self, histories, n=1, temperature=0.0, max_new_tokens=128, seed=None):
        return self.answer(histories, n)


@pytest.mark.parametrize("answer,message", [
    (lambda h, n: [], "sample\\(\\) of 1 histories, n=2 returned 0 list\\(s\\)"),  # was: unpacking error
    (lambda h, n: [[Completion("a", 1, 1)]], "returned 1 items for history 0; it must return 2"),  # IndexError
    (lambda h, n: [["a", "b"]], "returned a str for history 0"),  # AttributeError 'prompt_tokens'
    (lambda h, n: [[Completion("a", 1, 1, logprob=float("nan"))] * n], "logprob is nan, not a number"),  # was taken
    (lambda h, n: [[Completion("a", -5, 1)] * n], "prompt_tokens is -5"),  # taken as it was
])
def test_what_a_policy_object_answers_is_checked(answer, message: str) -> None:
    def two():
        outs = yield Sample([[Message("user", "x")]], 2, 0.7, 8, [1])
        return outs

    with pytest.raises(QlassError, match="policy test_lockstep.Answering: .*" + message):
        run_one(two(), Answering(answer))


@pytest.mark.parametrize("values", [[float("nan"), 1.0], [0.5], "ab"])
def test_what_a_qnet_object_answers_is_checked(values) -> None:
    """A NaN lost every comparison (the search kept the first candidate); a short list dropped candidates."""
    class Odd:
        def score(self, history, candidates):
            return values

    def scored():
        return (yield Score([Message("user", "x")], ["a", "b"]))

    with pytest.raises(QlassError, match="QNet test_lockstep.*Odd: score\\(\\) returned .* for 2 candidate"):
        run_one(scored(), Recorder(), Odd())


class LikelihoodRecorder(Recorder):
    """A :class:`Recorder` whose outputs have log-probabilities (for the likelihood rankers)."""

    def sample(self, histories, n=1, temperature=0.0, max_new_tokens=128, seed=None):
        got = super().sample(histories, n, temperature, max_new_tokens, seed)
        return [[replace(c, logprob=-1.0 - len(c.text)) for c in outs] for outs in got]


def _seeds_drawn(runs: list[MethodRun], out: Path) -> dict[str, list]:
    """Every seed each run's episodes asked the policy for (three Corridor tasks, one episode at a time)."""
    drawn = {}
    for run in runs:
        policy = LikelihoodRecorder()
        worker = EvalWorker(functools.partial(Corridor, step_limit=3, tasks_per_split=3), policy, BatchQNet())
        evaluate("corridor", Corridor(tasks_per_split=3).tasks("seen"), [run], worker, out, seed=7)
        drawn[run.label] = [s for _, temperature, seeds in policy.calls if temperature for s in seeds]
    return drawn


def test_a_method_and_its_selection_controls_draw_the_same_samples(tmp_path: Path) -> None:
    """The QNet's pick and its select=random control, margin or the best-of-n likelihood pick play from one
    draw per task: their paired difference is the choice alone. Other candidate counts draw otherwise."""
    import yaml

    def run(name: str, **opts) -> MethodRun:
        return MethodRun(name, make_method_config(name, {"max_steps": 2, **opts}))

    qlass = [run("qlass", m=2), run("qlass", m=2, select="random"), run("qlass", m=2, margin=0.5)]
    drawn = _seeds_drawn(qlass + [run("qlass", m=3)], tmp_path / "new")
    assert drawn["qlass(m=2)"] and drawn["qlass(m=2)"] == drawn["qlass(m=2,select=random)"] == drawn[
        "qlass(m=2,margin=0.5)"]
    assert not set(drawn["qlass(m=3)"]) & set(drawn["qlass(m=2)"])
    assert yaml.safe_load((tmp_path / "new" / "config.yaml").read_text())["seeding"] == 2
    best = _seeds_drawn([run("best-of-n", n=2), run("best-of-n", n=2, select="likelihood")], tmp_path / "bon")
    assert best["best-of-n(n=2,qnet)"] == best["best-of-n(n=2,likelihood)"]
    # a folder begun before (its config.yaml records no seeding) resumes seeding by the full label, as it began
    old = tmp_path / "old"
    _seeds_drawn(qlass[:1], old)
    saved = yaml.safe_load((old / "config.yaml").read_text())
    del saved["seeding"]
    (old / "config.yaml").write_text(yaml.safe_dump(saved))
    resumed = _seeds_drawn(qlass[1:2], old)
    assert resumed["qlass(m=2,select=random)"] and not set(resumed["qlass(m=2,select=random)"]) & set(
        drawn["qlass(m=2)"])
    assert "seeding" not in yaml.safe_load((old / "config.yaml").read_text())
    saved["seeding"] = 7
    (old / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(QlassError, match=r"field 'seeding' is 7; this qlass seeds episodes as 1 or 2"):
        _seeds_drawn(qlass[2:], old)
