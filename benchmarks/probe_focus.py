"""Knowledge probe (REVIEW-GUIDANCE H8): does the SFT policy, or a QNet, know which object to focus on?

In the six reference task types the decisive step is a ``focus on OBJ`` that needs world knowledge
(which object is an animal, a plant, living; which animal lives longest). For each held-out
ScienceWorld task this replays the gold actions up to the gold path's first ``focus on``; at that
state every ``focus on OBJ`` the simulator accepts is a candidate, written as the expert data write
it (templated thought + action), and labelled by executing it from the same state: *right* if the
score rises and the task does not fail, *wrong* if the task fails (ScienceWorld ends a task on a
wrong focus); a candidate that does neither is left out and counted. Each candidate is scored by
the policy's likelihood (mean log-probability per token, teacher-forced), its summed log-probability,
and each QNet given (alone and + 1 × likelihood).

Per state: top-1 (the ranker's best candidate is right; random's expectation is right / all) and
the within-state AUC (a right candidate scored above a wrong one; ties count half). Printed and
written: each ranker's mean over states, by split and task type, and each ranker minus the
likelihood with a paired bootstrap 95% interval over states. The baseline is the likelihood, in
the same run. Usage::

    python benchmarks/probe_focus.py --model runs/reference/sft [--qnet NAME=DIR ...] \\
        [--per-type 5] [--offset 0] [--exclude decisions.jsonl ...] [--threads 1] --out DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any, Callable

from bench_args import nonnegative_int, output_folder, positive_int, run_main

from qlass.agent import observation_message, start_messages
from qlass.compare import bootstrap_interval
from qlass.envs.base import parse_action
from qlass.envs.sciworld import ScienceWorldEnv
from qlass.envs.sciworld_thoughts import expert_thought
from qlass.errors import DataError, MissingFileError, QlassError
from qlass.jsonl import read_numbered_jsonl
from qlass.policy import load_policy
from qlass.types import Message, Task

log = logging.getLogger("probe_focus")
TASK_TYPES = ["find-plant", "find-animal", "find-living-thing", "find-non-living-thing",
              "lifespan-longest-lived", "lifespan-shortest-lived"]


@dataclass
class FocusState:
    """One probed state: the history before the gold focus and its labelled candidates."""

    task: str
    split: str
    task_type: str
    history: list[Message]
    candidates: list[str]  # agent outputs (thought + action)
    right: list[bool]
    left_out: int = 0
    scores: dict[str, list[float]] = field(default_factory=dict)


def output_for(action: str) -> str:
    """An agent output for ``action``, as the expert SFT data write one."""
    return f"Thought: {expert_thought(action)}\nAction: {action}"


def replay(env: ScienceWorldEnv, task: Task, outputs: list[str]) -> tuple[list[Message], float] | None:
    """Reset on ``task`` and play ``outputs``: the conversation and the last score, or None if the
    episode ended on the way."""
    messages = start_messages(env, task)
    score = 0.0
    for out in outputs:
        result = env.step(out)
        messages += [Message("assistant", out), observation_message(result.observation)]
        if result.done:
            return None
        score = float(result.info.get("score", 0))
    return messages, score


def probe_state(env: ScienceWorldEnv, task: Task) -> FocusState | None:
    """The labelled focus state of ``task``, or None if its gold path has no focus to probe."""
    gold = env.expert(task)
    actions = [parse_action(o) or "" for o in gold]
    at = next((i for i, a in enumerate(actions) if a.startswith("focus on ")), None)
    if at is None:
        return None
    start = replay(env, task, gold[:at])
    if start is None:
        return None
    history, before = start
    focus = sorted({a for a in env.valid_actions() if a.startswith("focus on ")} | {actions[at]})
    state = FocusState(task.id, task.split, task.meta["task_name"], history, [], [])
    for action in focus:
        if replay(env, task, gold[:at]) is None:
            raise RuntimeError(f"{task.id}: the gold prefix did not replay")
        result = env.step(output_for(action))
        failed, score = bool(result.info.get("failed")), float(result.info.get("score", 0))
        if not failed and score <= before:
            state.left_out += 1
            continue
        state.candidates.append(output_for(action))
        state.right.append(not failed)
    return state if any(state.right) and not all(state.right) else None


def auc(scores: list[float], right: list[bool]) -> float:
    """Share of (right, wrong) candidate pairs whose right one scores higher (ties: half)."""
    pos = [s for s, r in zip(scores, right) if r]
    neg = [s for s, r in zip(scores, right) if not r]
    return mean(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)


def top1(scores: list[float], right: list[bool]) -> float:
    """1 if the highest-scored candidate (the first of equals) is right."""
    return float(right[max(range(len(scores)), key=lambda i: (scores[i], -i))])


def rankers(state: FocusState) -> dict[str, list[float]]:
    """Every ranker's scores of the state's candidates (the QNets' also + 1 × likelihood)."""
    out = dict(state.scores)
    for name, values in state.scores.items():
        if name not in ("likelihood", "summed log-prob"):
            out[f"{name} + 1·likelihood"] = [v + lik for v, lik in zip(values, state.scores["likelihood"])]
    return out


def summarise(states: list[FocusState], resamples: int, seed: int) -> dict[str, Any]:
    """Each ranker's mean top-1 and AUC by group, and its paired difference to the likelihood."""
    groups: dict[str, list[FocusState]] = {"all": states}
    for key in ("split", "task_type"):
        for s in states:
            groups.setdefault(getattr(s, key), []).append(s)
    out: dict[str, Any] = {}
    for gname, members in groups.items():
        per = [rankers(s) for s in members]
        names = list(per[0])
        row: dict[str, Any] = {"states": len(members),
                               "random top-1": mean(sum(s.right) / len(s.right) for s in members),
                               "candidates": mean(len(s.right) for s in members)}
        for name in names:
            t = [top1(p[name], s.right) for p, s in zip(per, members)]
            a = [auc(p[name], s.right) for p, s in zip(per, members)]
            entry = {"top-1": mean(t), "auc": mean(a)}
            if name != "likelihood":
                base_t = [top1(p["likelihood"], s.right) for p, s in zip(per, members)]
                base_a = [auc(p["likelihood"], s.right) for p, s in zip(per, members)]
                dt = [x - y for x, y in zip(t, base_t)]
                da = [x - y for x, y in zip(a, base_a)]
                entry["top-1 - likelihood"] = [mean(dt), *bootstrap_interval(dt, resamples, seed)]
                entry["auc - likelihood"] = [mean(da), *bootstrap_interval(da, resamples, seed)]
            row[name] = entry
        out[gname] = row
    return out


def markdown(summary: dict[str, Any]) -> str:
    """The summary as tables: one per group."""
    lines = ["# Focus knowledge probe", ""]
    for gname, row in summary.items():
        lines += [f"## {gname}: {row['states']} states, {row['candidates']:.1f} candidates each, "
                  f"random top-1 {100 * row['random top-1']:.1f}%", "",
                  "| ranker | top-1 % | AUC | top-1 − likelihood [95%] | AUC − likelihood [95%] |",
                  "|---|---|---|---|---|"]
        for name, e in row.items():
            if not isinstance(e, dict):
                continue
            dt, da = e.get("top-1 - likelihood"), e.get("auc - likelihood")
            top = f"{100 * dt[0]:+.1f} [{100 * dt[1]:+.1f}, {100 * dt[2]:+.1f}]" if dt else "–"
            area = f"{da[0]:+.3f} [{da[1]:+.3f}, {da[2]:+.3f}]" if da else "–"
            lines.append(f"| {name} | {100 * e['top-1']:.1f} | {e['auc']:.3f} | {top} | {area} |")
        lines.append("")
    return "\n".join(lines)


def score_states(states: list[FocusState], name: str, score: Callable[[FocusState], list[float]]) -> None:
    """Store ``score(state)`` under ``name`` for every state, logging progress."""
    started = time.time()
    for k, state in enumerate(states, 1):
        state.scores[name] = score(state)
        if k % 10 == 0 or k == len(states):
            log.info("%s: %d/%d states scored (%.0f s)", name, k, len(states), time.time() - started)


def name_and_dir(text: str) -> tuple[str, str]:
    """A ``--qnet`` value: ``NAME=DIR``."""
    name, sep, folder = text.partition("=")
    if not (name and sep and folder):
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=DIR")
    return name, folder


def excluded_tasks(paths: list[str]) -> set[str]:
    """The tasks of the records in the ``--exclude`` files; a missing file, a line that is not a JSON object or a
    record without a task is a QlassError naming the file and line."""
    out = set()
    for path in paths:
        if not Path(path).exists():  # read_numbered_jsonl reads a missing file as empty
            raise MissingFileError(path)
        for line, record in read_numbered_jsonl(path):
            if not isinstance(record.get("task"), str):
                raise DataError(path, f"task is {record.get('task')!r}, expected a task id", line=line)
            out.add(record["task"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="SFT policy folder")
    ap.add_argument("--qnet", type=name_and_dir, action="append", default=[],
                    help="NAME=DIR of a QNet to score (repeatable)")
    ap.add_argument("--splits", default="seen,unseen")
    ap.add_argument("--per-type", type=positive_int, default=5, help="tasks per task type and split")
    ap.add_argument("--offset", type=nonnegative_int, default=0,
                    help="skip this many tasks of each type and split first")
    ap.add_argument("--exclude", action="append", default=[],
                    help="JSONL file whose records' tasks are left out, e.g. a decisions file (repeatable)")
    ap.add_argument("--threads", type=positive_int, default=1)
    ap.add_argument("--resamples", type=positive_int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=output_folder, required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    qnets = dict(args.qnet)
    taken = [name for name in qnets if name in ("likelihood", "summed log-prob")]  # would replace the baseline's scores
    if len(qnets) < len(args.qnet) or taken:
        ap.error(f"--qnet: give each NAME once, and neither 'likelihood' nor 'summed log-prob' (the likelihood "
                 f"ranker's): got {', '.join(name for name, _ in args.qnet)}")

    excluded = excluded_tasks(args.exclude)
    env = ScienceWorldEnv(step_limit=100)
    states: list[FocusState] = []
    started = time.time()
    for split in args.splits.split(","):
        for ttype in TASK_TYPES:
            for task in env.tasks(split, [ttype])[args.offset: args.offset + args.per_type]:
                if task.id in excluded:
                    log.info("%s: in an --exclude file; skipped", task.id)
                    continue
                state = probe_state(env, task)
                if state is None:
                    log.info("%s: no focus state with both right and wrong candidates; skipped", task.id)
                    continue
                states.append(state)
    env.close()
    log.info("%d focus states labelled in %.0f s", len(states), time.time() - started)
    if not states:
        raise QlassError(f"no focus state to probe ({args.splits} split, --offset {args.offset}, --per-type "
                         f"{args.per_type}, {len(excluded)} task(s) excluded)")

    policy = load_policy(args.model, autocast=True, threads=args.threads)

    def likelihood(state: FocusState) -> list[float]:
        scored = policy.score_outputs([state.history] * len(state.candidates), state.candidates)
        state.scores["summed log-prob"] = [s for s, _ in scored]
        return [s / n for s, n in scored]

    score_states(states, "likelihood", likelihood)
    from qlass.qnet import QNet  # torch, loaded by the policy above: not before the arguments are checked

    for name, path in qnets.items():
        qnet = QNet.load(path, threads=args.threads)
        score_states(states, name, lambda s, q=qnet: q.score(s.history, s.candidates))

    summary = summarise(states, args.resamples, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps({
        "args": vars(args), "summary": summary,
        "states": [{"task": s.task, "split": s.split, "task_type": s.task_type, "right": s.right,
                    "candidates": s.candidates, "left_out": s.left_out, "scores": s.scores} for s in states]},
        indent=1, default=str))  # default: --out is a Path
    text = markdown(summary)
    (out / "probe.md").write_text(text)
    print(text)


if __name__ == "__main__":
    run_main(main)
