"""The decision benchmark's data: decision states on held-out tasks and their candidates' true values.

The policy plays each task (greedy by default). At every step it also samples M candidates (the
greedy output first when ``anchor="greedy"``); outputs cut off by the token limit are dropped and
the rest merged by :func:`~qlass.candidates.normalise_action`. A step where two or more distinct
candidates remain is a *decision state*. The played output is executed as ``qlass eval`` would (a
truncated one without its unfinished action), so decisions lie on the path that method visits.
Every candidate of a decision is executed from that state and followed by K rollouts to the
episode's end with the same continuation policy; its true value is the mean final reward of those
rollouts. A candidate whose own step ends the episode is its own outcome (K identical values, no rollout).

Work is done in chunks of ``concurrency`` tasks: first the chunk's plays, then every rollout of
its decisions, all as episode generators run in lockstep by :func:`qlass.lockstep.drive` (one
batched policy call per wave), each on an environment from a pool that grows to at most
``concurrency`` environments. Every draw has its own seed — a rollout step's is
``stable_seed(seed, task, step, candidate, k, t)`` — so records do not depend on ``concurrency``.

Output (see docs/formats.md, "Decision files"): ``NAME.jsonl`` gets one record per decision,
appended as soon as its rollouts are done; ``NAME.tasks.jsonl`` one line per finished task;
``NAME.config.yaml`` the settings. A rerun with the same settings resumes (finished tasks skipped,
recorded decisions kept, a torn last line cut); one with other settings is refused.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .agent import apply_output, check_sample_counts, episode_running, executed_text, start_messages
from .candidates import mean_logprob, normalise_action
from .config import option
from .config_fields import check_field_types, require_config
from .decision_files import (
    DECISIONS_SCHEMA_VERSION,
    check_decision,
    check_logprobs,
    check_logprobs_alike,
    check_once,
    check_settings,
    finished_tasks,
    sidecar,
)
from .envs.base import Env, check_env_factory, check_tasks, parse_action
from .envs.lending import EnvPool
from .errors import DataError, QlassError
from .jsonl import append_jsonl, is_count, read_numbered_jsonl
from .locking import writes_to
from .lockstep import Episode, Sample, drive
from .policy.base import Policy, check_policy_argument
from .precision import with_precision
from .seeding import stable_seed
from .types import Completion, Message, Step, Task

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 30.0


@dataclass(frozen=True)
class DecisionConfig:
    """How decision states are found and valued."""

    play: str = option("greedy", "the action executed along the played path: greedy, or sample (the first "
                       "sampled candidate at `temperature`)")
    anchor: str = option("greedy", "greedy: candidate 0 is the greedy action (M-1 others sampled); none: all M sampled")
    m: int = option(4, "candidates per step (the greedy anchor included)")
    temperature: float = option(0.7, "sampling temperature of the candidates")
    k: int = option(4, "rollouts per candidate (its true value is their mean final reward)")
    rollout_temperature: float = option(0.7, "temperature of the rollouts' continuation policy (0: one greedy "
                                        "rollout, copied K times)")
    max_steps: int = option(30, "episode step limit, counted from the episode start")
    max_new_tokens: int = option(128, "token limit per agent turn")
    max_decisions_per_task: int | None = option(4, "stop a task's play after this many decision states (None: "
                                                "play to the episode's end)")
    concurrency: int = option(16, "episodes (plays or rollouts) live at once; tasks are worked in chunks of this "
                              "many", runtime=True)

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.play not in ("greedy", "sample"):
            raise ValueError(f"play must be 'greedy' or 'sample', got {self.play!r}")
        if self.anchor not in ("greedy", "none"):
            raise ValueError(f"anchor must be 'greedy' or 'none', got {self.anchor!r}")
        if self.m < 2:
            raise ValueError(f"m must be >= 2 (a decision needs two candidates), got {self.m}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (candidates are sampled), got {self.temperature}")
        if self.k < 1 or self.max_steps < 1 or self.max_new_tokens < 1 or self.concurrency < 1:
            raise ValueError("k, max_steps, max_new_tokens and concurrency must be >= 1")
        check_sample_counts(m=self.m, k=self.k)
        if self.rollout_temperature < 0:
            raise ValueError(f"rollout_temperature must be >= 0, got {self.rollout_temperature}")
        if self.max_decisions_per_task is not None and self.max_decisions_per_task < 1:
            raise ValueError(f"max_decisions_per_task must be >= 1 or None, got {self.max_decisions_per_task}")

    def options(self) -> dict[str, Any]:
        """The settings that determine the records (runtime options left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata.get("runtime")}


@dataclass
class _Candidate:
    """One distinct candidate of a decision and what its rollouts found."""

    completion: Completion
    anchor: bool
    count: int = 1
    terminal: bool | None = None
    reward: float | None = None
    rewards: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)


@dataclass
class _Decision:
    task: Task
    step: int
    outputs: list[Completion]  # the earlier steps' outputs as played, replayed by the rollouts
    history: list[Message]
    candidates: list[_Candidate]
    played: int | None
    samples: int
    truncated: int

    @property
    def prefix(self) -> list[str]:
        """What the environment received at each earlier step (the record's ``prefix``)."""
        return [executed_text(c) for c in self.outputs]


@dataclass
class _Play:
    task: Task
    decisions: list[_Decision]
    steps: int
    stop: str


def merge_candidates(completions: Sequence[Completion], anchored: bool) -> tuple[list[_Candidate], dict[int, int]]:
    """Distinct candidates (truncated outputs dropped, duplicates merged by normalised action, first
    kept) and the map from each kept completion's index to its candidate's."""
    cands: list[_Candidate] = []
    where: dict[str, int] = {}
    index: dict[int, int] = {}
    for i, c in enumerate(completions):
        if c.truncated:
            continue
        key = normalise_action(c.text)
        if key in where:
            cands[where[key]].count += 1
        else:
            where[key] = len(cands)
            cands.append(_Candidate(c, anchor=anchored and i == 0))
        index[i] = where[key]
    return cands, index


def _play(pool: EnvPool, task: Task, cfg: DecisionConfig, seed: int) -> Episode[_Play]:
    """Play ``task`` along the greedy (or sampled) path, collecting its decision states."""
    env = pool.take()
    try:
        messages = start_messages(env, task)
        steps: list[Step] = []
        found: list[_Decision] = []
        taken: list[Completion] = []  # each step's output: replaying them restores the state and the conversation
        limit, anchored = cfg.max_decisions_per_task, cfg.anchor == "greedy"
        while episode_running(steps, cfg.max_steps):
            if limit is not None and len(found) >= limit:
                return _Play(task, found, len(steps), "decisions")
            t = len(steps)
            greedy: list[Completion] = []
            if anchored or cfg.play == "greedy":
                (greedy,) = yield Sample([messages], 1, 0.0, cfg.max_new_tokens, [0])
            (sampled,) = yield Sample([messages], cfg.m - anchored, cfg.temperature, cfg.max_new_tokens,
                                      [stable_seed(seed, task.id, t, "candidates")])
            pool_of = (greedy if anchored else []) + list(sampled)
            cands, index = merge_candidates(pool_of, anchored)
            if cfg.play == "greedy" and not anchored:  # the greedy output is not a candidate: find its action
                chosen = greedy[0]
                played = next((i for i, c in enumerate(cands) if not chosen.truncated and
                               normalise_action(c.completion.text) == normalise_action(chosen.text)), None)
            else:
                at = 1 if cfg.play == "sample" and anchored else 0
                chosen, played = pool_of[at], index.get(at)
            if len(cands) >= 2:
                check_logprobs(task.id, t, [c.completion.logprob for c in cands])
                found.append(_Decision(task, t, list(taken), list(messages), cands, played, len(pool_of),
                                       sum(c.truncated for c in pool_of)))
            taken.append(chosen)
            apply_output(env, messages, steps, chosen)  # a truncated output is sent without its unfinished action
        return _Play(task, found, len(steps), "done" if steps and steps[-1].done else "max_steps")
    finally:
        pool.give(env)


def _rollout(pool: EnvPool, dec: _Decision, i: int, k: int, cfg: DecisionConfig, seed: int
             ) -> Episode[tuple[float, int]]:
    """Execute candidate ``i`` of ``dec`` and roll out to the end (rollout ``k``); returns the final
    reward and the steps taken after the candidate's own.

    Starters run in index order and an episode runs up to its first request when started, so
    rollout 0 of a candidate has taken its step before rollout 1 starts: once the candidate is
    known to end the episode, the other rollouts return its outcome without an environment."""
    cand = dec.candidates[i]
    if cand.terminal:
        return float(cand.reward or 0.0), 0
    env = pool.take()
    try:
        messages = start_messages(env, dec.task)
        steps: list[Step] = []
        for output in dec.outputs:  # as played: the environment gets what it got, the policy reads what it read
            apply_output(env, messages, steps, output)
        first = apply_output(env, messages, steps, Completion(cand.completion.text, 0, 0))
        cand.terminal, cand.reward = first.done, first.reward
        start = len(steps)
        while episode_running(steps, cfg.max_steps):
            t = len(steps) - start
            (outs,) = yield Sample([messages], 1, cfg.rollout_temperature, cfg.max_new_tokens,
                                   [stable_seed(seed, dec.task.id, dec.step, i, k, t)])
            apply_output(env, messages, steps, outs[0])
        return steps[-1].reward, len(steps) - start
    finally:
        pool.give(env)


def decision_record(env_name: str, dec: _Decision) -> dict[str, Any]:
    """The JSON record of a decision whose rollouts are all done."""
    cands = []
    for c in dec.candidates:
        comp = c.completion
        redrawn = {} if comp.logprob_tokens is None else {"logprob_tokens": comp.logprob_tokens}
        cands.append({
            "output": comp.text,
            "action": parse_action(comp.text),
            "logprob": comp.logprob,
            "completion_tokens": comp.completion_tokens,
            **redrawn,
            "mean_logprob": None if comp.logprob is None else mean_logprob(comp),
            "anchor": c.anchor,
            "count": c.count,
            "terminal": bool(c.terminal),
            "reward": c.reward,
            "rollout_rewards": c.rewards,
            "rollout_lengths": c.lengths,
            "mean": statistics.fmean(c.rewards),
            "std": statistics.pstdev(c.rewards),
        })
    return {
        "schema_version": DECISIONS_SCHEMA_VERSION, "env": env_name, "split": dec.task.split, "task": dec.task.id,
        "task_type": dec.task.task_type, "step": dec.step, "prefix": dec.prefix,
        "history": [asdict(m) for m in dec.history], "played": dec.played, "samples": dec.samples,
        "truncated": dec.truncated, "candidates": cands,
    }


def _chunks(items: Sequence[Task], size: int) -> Iterator[list[Task]]:
    for at in range(0, len(items), size):
        yield list(items[at: at + size])


def check_collection(out: Path, cfg: DecisionConfig, seed: int = 0, settings: dict[str, Any] | None = None,
                     save: bool = True) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The decisions and finished tasks already in ``out`` and its ``NAME.tasks.jsonl``, checked
    (a torn last line is cut), after refusing other settings (:func:`check_settings`, which saves
    them with ``save``). :func:`collect_decisions` starts with it; calling it first (``save=False``)
    reports a problem before a model loads, and leaves no settings file when the model then fails."""
    if out.suffix != ".jsonl":  # runs/dec and runs/dec.txt would share runs/dec.jsonl's sidecars
        raise QlassError(f"{out}: a decisions file is named NAME.jsonl (its settings and finished tasks are kept "
                         "beside it as NAME.config.yaml and NAME.tasks.jsonl)")
    numbered = read_numbered_jsonl(out, repair_tail=True)
    seen: dict[tuple[Any, ...], tuple[Path, int]] = {}
    for line, rec in numbered:
        check_decision(out, line, rec)
        check_once(seen, out, line, rec, hint="; a decisions file holds each decision once (remove the copy, and "
                   "the rerun finds any decision that is missing)")
    done_path = sidecar(out, "tasks.jsonl")
    done_numbered = read_numbered_jsonl(done_path, repair_tail=True)
    for line, rec in done_numbered:
        if not isinstance(rec.get("split"), str) or not isinstance(rec.get("task"), str):
            raise DataError(str(done_path), "a finished-task record needs 'split' and 'task' (strings)", line=line)
        count = rec.get("decisions")
        if count is not None and not is_count(count):
            raise DataError(str(done_path), f"field 'decisions' is not a count (an integer >= 0): {count!r}", line=line)
    check_settings(out, with_precision({**(settings or {}), "seed": seed, "options": cfg.options()}), save)
    return [rec for _, rec in numbered], [rec for _, rec in done_numbered]


@writes_to("out", folder=False)
def collect_decisions(make_env: Callable[[], Env], tasks: Sequence[Task], policy: Policy, cfg: DecisionConfig,
                      out: str | Path, seed: int = 0, settings: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Find the decision states of ``tasks`` and value their candidates (see the module docstring),
    appending to ``out``; returns every record of these tasks in ``out`` (earlier ones included).

    ``settings`` (model, env, ...) describe the run; with ``seed`` and ``cfg``'s options they are
    checked against and saved to ``NAME.config.yaml``. A local policy should keep at least
    ``cfg.concurrency`` prompt caches (``HFPolicy(cache_slots=...)``), or each turn re-reads its history."""
    check_env_factory(make_env, "collect_decisions")
    require_config(cfg, DecisionConfig, "collect_decisions")
    check_tasks(tasks, "collect_decisions")
    check_policy_argument(policy, "collect_decisions")
    if not tasks:
        log.warning("collect_decisions: no tasks given; nothing to collect")
    if settings is None and tasks:
        log.warning("collect_decisions: no settings given (model, env, ...): %s records none, so a rerun cannot "
                    "refuse another policy's decisions", sidecar(Path(out), "config.yaml"))
    listed: set[tuple[str, str]] = set()
    for t in tasks:  # twice would value its decisions twice, and the file would hold them twice
        if (t.split, t.id) in listed:
            raise QlassError(f"collect_decisions: task {t.id!r} of split {t.split!r} is given twice")
        listed.add((t.split, t.id))
    out = Path(out)
    records, done = check_collection(out, cfg, seed, settings)
    done_path = sidecar(out, "tasks.jsonl")
    finished = finished_tasks(out, records, done)
    recorded = {(r["split"], r["task"], r["step"]) for r in records}
    lp_from = records[0]["candidates"][0].get("logprob") is not None if records else None
    todo = [t for t in tasks if (t.split, t.id) not in finished]
    if len(todo) < len(tasks):
        log.info("resuming %s: %d of %d tasks already finished", out, len(tasks) - len(todo), len(tasks))
    pool = EnvPool(make_env)
    start, count = time.perf_counter(), 0
    try:
        env_name = pool.name()
        for n_chunk, chunk in enumerate(_chunks(todo, cfg.concurrency)):
            plays = [p for _, p in sorted(drive(
                [lambda t=t: _play(pool, t, cfg, seed) for t in chunk], policy, concurrency=cfg.concurrency))]
            found = [(d.task.id, d.step, d.candidates[0].completion.logprob is not None)
                     for p in plays for d in p.decisions]
            lp_from = check_logprobs_alike(out, records, lp_from, found)
            log.info("decisions: played %d tasks (%d steps), %d decision states with %d candidates to roll out "
                     "(%.0f s)", len(plays), sum(p.steps for p in plays), sum(len(p.decisions) for p in plays),
                     sum(len(d.candidates) for p in plays for d in p.decisions), time.perf_counter() - start)
            for rec in _value_decisions(pool, policy, plays, recorded, cfg, seed, env_name, out, done_path):
                records.append(rec)
                count += 1
            log.info("decisions: %d of %d tasks done, %d decisions this run (%.0f s)",
                     len(tasks) - len(todo) + min(len(todo), (n_chunk + 1) * cfg.concurrency), len(tasks), count,
                     time.perf_counter() - start)
    finally:
        pool.close()
    wanted = {(t.split, t.id) for t in tasks}
    return [r for r in records if (r["split"], r["task"]) in wanted]


def _value_decisions(pool: EnvPool, policy: Policy, plays: list[_Play], recorded: set[tuple[str, str, int]],
                     cfg: DecisionConfig, seed: int, env_name: str, out: Path, done_path: Path
                     ) -> Iterator[dict[str, Any]]:
    """Roll out every candidate of the plays' new decisions in lockstep. Records are appended (and
    yielded) in play order, each as soon as its rollouts and those of the decisions before it are
    done, and a task is marked finished after its last decision, so the files do not depend on
    ``concurrency`` and a killed run loses only decisions still in flight."""
    runs = cfg.k if cfg.rollout_temperature > 0 else 1
    events: list[_Decision | _Play] = []  # each play's new decisions, then the play itself (its task is done)
    for p in plays:
        events += [d for d in p.decisions if (d.task.split, d.task.id, d.step) not in recorded] + [p]
    jobs = [(d, i, k) for d in events if isinstance(d, _Decision) for i in range(len(d.candidates))
            for k in range(runs)]
    left = {id(d): len(d.candidates) * runs for d in events if isinstance(d, _Decision)}
    results: dict[tuple[int, int, int], tuple[float, int]] = {}
    cursor, last_log = 0, time.perf_counter()
    starters = [lambda j=j: _rollout(pool, *j, cfg, seed) for j in jobs]
    finished = enumerate(drive(starters, policy, concurrency=cfg.concurrency), 1)
    while True:
        while cursor < len(events) and left.get(id(events[cursor]), 0) == 0:
            event = events[cursor]
            cursor += 1
            if isinstance(event, _Play):
                append_jsonl(done_path, {"split": event.task.split, "task": event.task.id,
                                         "decisions": len(event.decisions), "steps": event.steps, "stop": event.stop})
                continue
            for i, cand in enumerate(event.candidates):
                got = [results.pop((id(event), i, k)) for k in range(runs)]
                cand.rewards = [r for r, _ in got] * (cfg.k // runs)
                cand.lengths = [n for _, n in got] * (cfg.k // runs)
            rec = decision_record(env_name, event)
            append_jsonl(out, rec)
            yield rec
        got_one = next(finished, None)
        if got_one is None:
            return
        done, (index, result) = got_one
        dec, i, k = jobs[index]
        results[id(dec), i, k] = result
        left[id(dec)] -= 1
        if time.perf_counter() - last_log > PROGRESS_EVERY_S:
            last_log = time.perf_counter()
            log.info("rollouts: %d of %d done in this chunk", done, len(jobs))
