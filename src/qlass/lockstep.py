"""Lockstep play: many episodes advance together, their model requests batched wave by wave.

An episode is written as a generator that yields what it needs from the models and receives the
answers, and steps its own environment in between::

    def my_episode(env, task, seed):
        messages = start_messages(env, task)
        while ...:
            (outs,) = yield Sample([messages], n=2, temperature=0.7, max_new_tokens=64, seeds=[s])
            scored = yield Score(messages, [o.text for o in outs])      # -> Scored(values, tokens)
            ...env.step(...)...
        return trajectory

An episode may also yield a list of requests (``[Sample(...), Sample(...)]``, ``[Score(...), ...]``);
they are answered in the same wave, with a list of answers in the same order.

:func:`drive` runs many such episodes. Each wave it takes the pending request of every live
episode, answers all :class:`Sample` requests with one policy call (a policy with ``sample_jobs``
decodes rows of any ``n``, temperature and token limit together; otherwise one call per
``(n, temperature, max_new_tokens)``), each history with its own seed so that an episode's draws do
not depend on which episodes share its wave, and all :class:`Score` requests with one QNet call, then resumes every
episode with its answer. An episode that returns frees its slot, which the next queued episode
takes at once (continuous batching at the level of episodes). Results come out as
``(index, result)`` in the order episodes finish.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import QlassError
from .policy.base import Policy, SampleJob
from .policy.user import checked_answer
from .types import Completion, History

T = TypeVar("T")


@dataclass(frozen=True)
class Sample:
    """Ask the policy for ``n`` completions of each history; history ``i`` uses base seed ``seeds[i]``
    (``seeds=None``: the policy's own unseeded draws). Answered with one list of ``n`` completions per
    history."""

    histories: Sequence[History]
    n: int
    temperature: float
    max_new_tokens: int
    seeds: Sequence[int] | None

    def __post_init__(self) -> None:
        if self.seeds is not None and len(self.seeds) != len(self.histories):
            raise ValueError(f"Sample: {len(self.seeds)} seeds for {len(self.histories)} histories")


@dataclass(frozen=True)
class Score:
    """Ask the QNet for the values of ``candidates`` (raw agent outputs) after ``history``.
    Answered with :class:`Scored`. ``value=False`` asks for the QNet's ranking score (what Q-guided
    search compares between candidates: Q, or Q − V for an advantage/dueling QNet); ``value=True``
    asks for Q itself, the estimate of the outcome (what judges finished trajectories)."""

    history: History
    candidates: Sequence[str]
    value: bool = False


@dataclass(frozen=True)
class Scored:
    """The QNet's values of a :class:`Score` request and the tokens it read for them."""

    values: list[float]
    tokens: int


Request = Sample | Score
Episode = Generator[Request | list[Request], Any, T]
Slot = tuple[int, int]
"""(episode index, position of the request in what the episode yielded)."""


def _name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _checked_values(qnet: Any, values: Any, count: int) -> list[float]:
    """A QNet's ``values`` for ``count`` candidates as floats, if there is one finite number per candidate: a NaN
    lost every comparison, so the search kept whichever candidate came first, and a short list dropped the rest."""
    try:
        floats = [float(v) for v in values]
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int too large for a float
        floats = []
    if len(floats) != count or not all(math.isfinite(v) for v in floats):
        raise QlassError(f"QNet {_name(qnet)}: score() returned {str(values)[:120]} for {count} candidate(s); it must "
                         "return one finite number per candidate")
    return floats


def _answer_samples(policy: Policy, requests: list[tuple[Slot, Sample]]) -> dict[Slot, list[list[Completion]]]:
    """Every pending Sample request in one policy call when the policy takes mixed settings
    (``sample_jobs``), else one call per ``(n, temperature, max_new_tokens)`` (unseeded requests apart
    from seeded ones)."""
    answers: dict[Slot, list[list[Completion]]] = {}
    if hasattr(policy, "sample_jobs"):
        jobs = [SampleJob(h, req.n, req.temperature, req.max_new_tokens, None if req.seeds is None else req.seeds[k])
                for _, req in requests for k, h in enumerate(req.histories)]
        outs = checked_answer(f"policy {_name(policy)}: sample_jobs() of {len(jobs)} jobs", policy.sample_jobs(jobs),
                              [job.n for job in jobs], strict=False)
        at = 0
        for slot, req in requests:
            answers[slot] = outs[at: at + len(req.histories)]
            at += len(req.histories)
        return answers
    groups: dict[tuple[int, float, int, bool], list[tuple[Slot, Sample]]] = {}
    for slot, req in requests:
        key = (req.n, req.temperature, req.max_new_tokens, req.seeds is None)
        groups.setdefault(key, []).append((slot, req))
    for (n, temperature, max_new, unseeded), members in groups.items():
        histories = [h for _, req in members for h in req.histories]
        seeds = None if unseeded else [s for _, req in members for s in req.seeds or ()]
        outs = checked_answer(f"policy {_name(policy)}: sample() of {len(histories)} histories, n={n}",
                              policy.sample(histories, n, temperature, max_new, seed=seeds), [n] * len(histories),
                              strict=False)
        at = 0
        for slot, req in members:
            answers[slot] = outs[at: at + len(req.histories)]
            at += len(req.histories)
    return answers


def _answer_scores(qnet: Any, requests: list[tuple[Slot, Score]]) -> dict[Slot, Scored]:
    """One QNet call per kind (ranking score, value) over every pending Score request
    (``score_batch`` when the QNet has it)."""
    if qnet is None:
        raise ValueError("an episode asked for QNet values but no QNet was given")
    answers: dict[Slot, Scored] = {}
    for kind in (False, True):
        members = [(slot, req) for slot, req in requests if req.value is kind]
        if not members:
            continue
        items = [(req.history, list(req.candidates)) for _, req in members]
        if hasattr(qnet, "score_batch"):
            ranked = getattr(qnet, "rank", "q") != "q"  # only such a QNet's ranking score differs from Q
            values = qnet.score_batch(items, value=True) if kind and ranked else qnet.score_batch(items)
            tokens = list(getattr(qnet, "last_item_tokens", None) or [0] * len(items))
        else:
            values, tokens = [], []
            for history, candidates in items:
                values.append(qnet.score(history, candidates))
                tokens.append(int(getattr(qnet, "last_tokens", 0) or 0))
        for (slot, req), vals, tok in zip(members, values, tokens, strict=True):
            answers[slot] = Scored(_checked_values(qnet, vals, len(req.candidates)), int(tok))
    return answers


def _flat(pending: Request | list[Request]) -> list[Request]:
    return pending if isinstance(pending, list) else [pending]


def drive(episodes: Iterable[Callable[[], Episode[T]]], policy: Policy, qnet: Any = None,
          concurrency: int = 16) -> Iterator[tuple[int, T]]:
    """Run episodes in lockstep, at most ``concurrency`` live at once; yield ``(index, result)`` as each
    finishes (``index`` counts ``episodes`` in order). ``episodes`` yields zero-argument callables
    that start an episode (called only when a slot is free, so an episode can take its environment
    then, and ``episodes`` itself is advanced only then); an exception raised by an episode closes the
    others and propagates."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    queue = enumerate(episodes)
    live: dict[int, tuple[Episode[T], Request | list[Request]]] = {}  # index -> (generator, what it asked)
    exhausted = False
    try:
        while True:
            while not exhausted and len(live) < concurrency:
                nxt = next(queue, None)
                if nxt is None:
                    exhausted = True
                    break
                index, start = nxt
                gen = start()
                try:
                    live[index] = (gen, next(gen))
                except StopIteration as stop:
                    yield index, stop.value
            if not live:
                return
            pending = [((i, k), r) for i, (_, asked) in live.items() for k, r in enumerate(_flat(asked))]
            samples = [(slot, r) for slot, r in pending if isinstance(r, Sample)]
            scores = [(slot, r) for slot, r in pending if isinstance(r, Score)]
            others = [r for _, r in pending if not isinstance(r, (Sample, Score))]
            if others:
                raise TypeError(f"an episode yielded {others[0]!r}; episodes yield Sample or Score requests")
            answers: dict[Slot, Any] = _answer_samples(policy, samples) if samples else {}
            if scores:
                answers.update(_answer_scores(qnet, scores))
            for index in sorted(live):
                gen, asked = live[index]
                reply = ([answers[(index, k)] for k in range(len(asked))] if isinstance(asked, list)
                         else answers[(index, 0)])
                try:
                    live[index] = (gen, gen.send(reply))
                except StopIteration as stop:
                    del live[index]
                    yield index, stop.value
    finally:
        for gen, _ in live.values():
            gen.close()


def run_one(episode: Episode[T], policy: Policy, qnet: Any = None) -> T:
    """Play one episode generator to its end (the sequential path: a wave of one)."""
    for _, result in drive([lambda: episode], policy, qnet, concurrency=1):
        return result
    raise AssertionError("unreachable: drive yields every episode's result")
