"""Evaluation throughput: many episodes in lockstep vs one episode at a time, on real ScienceWorld tasks.

One run plays the same mixed evaluation (greedy, best-of-n, qlass with a QNet) twice with the same
loaded policy and QNet: once with one live episode (``concurrency 1``, the old evaluation loop) and
once with ``--concurrency`` live episodes (one batched policy call and one batched QNet call per
wave). It prints episodes per hour and completion tokens per second for both, their ratio, how many
records came out identical (bf16 autocast may flip a near-tie; fp32 gives identical records), and
the raw batched decode rate of the policy on as many first prompts for reference. The QNet is
``QNet.from_sft`` on the same model unless ``--qnet`` is given (a fresh head: fine for timing).
Usage::

    python benchmarks/bench_eval.py [--model DIR] [--tasks 16] [--max-steps 10] [--concurrency 16]
    python benchmarks/bench_eval.py --tasks 2 --max-steps 2 --concurrency 4   # a quick check
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench_args import output_file, positive_int, run_main

from qlass.agent import start_messages
from qlass.envs.base import make_env
from qlass.eval_worker import EvalWorker, MethodRun
from qlass.evaluate import evaluate, live_histories, select_tasks
from qlass.models import default_model_dir
from qlass.search import make_method_config, parse_method

if TYPE_CHECKING:  # torch loads after the arguments are read: a usage error or --help is answered at once
    from qlass.policy.hf import HFPolicy
    from qlass.qnet import QNet

log = logging.getLogger("bench_eval")


def timed_evaluation(policy: HFPolicy, qnet: QNet, tasks: list, runs: list[MethodRun], max_steps: int,
                     concurrency: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evaluate every method on every task with ``concurrency`` live episodes; rates and records."""
    policy.clear_cache()
    qnet.clear_cache()
    worker = EvalWorker(functools.partial(make_env, "sciworld", step_limit=max_steps), policy, qnet, concurrency)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        records = evaluate("sciworld", tasks, runs, worker, Path(out), seed=0)
        wall = time.perf_counter() - start
    tokens = sum(r["completion_tokens"] for r in records)
    return {"concurrency": concurrency, "seconds": wall, "episodes": len(records), "completion_tokens": tokens,
            "episodes_per_hour": 3600 * len(records) / wall, "tokens_per_s": tokens / wall}, records


def raw_decode(policy: HFPolicy, tasks: list, width: int, max_new_tokens: int) -> dict[str, float]:
    """Completion tokens per second of one batched sample over ``width`` first prompts (``tasks``
    cycled), prompts prefilled beforehand so only decoding is timed."""
    env = make_env("sciworld")
    try:
        prompts = [start_messages(env, tasks[i % len(tasks)]) for i in range(width)]
    finally:
        env.close()
    policy.sample(prompts, 1, 0.7, 1, seed=list(range(width)))  # prefill (cached)
    start = time.perf_counter()
    outs = policy.sample(prompts, 1, 0.7, max_new_tokens, seed=list(range(width)))
    wall = time.perf_counter() - start
    tokens = sum(row[0].completion_tokens for row in outs)
    return {"width": width, "seconds": wall, "completion_tokens": tokens, "tokens_per_s": tokens / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="policy folder (default: the default model)")
    ap.add_argument("--qnet", type=Path, default=None, help="QNet folder (default: QNet.from_sft on --model)")
    ap.add_argument("--split", default="seen")
    ap.add_argument("--task-types", default="find-plant,find-animal,lifespan-longest-lived")
    ap.add_argument("--tasks", type=positive_int, default=16, help="tasks (round-robin over the task types)")
    ap.add_argument("--method", action="append", default=None,
                    help="method spec (repeatable; default: greedy, best-of-n:n=4, qlass:m=2)")
    ap.add_argument("--max-steps", type=positive_int, default=10)
    ap.add_argument("--max-new-tokens", type=positive_int, default=64)
    ap.add_argument("--concurrency", type=positive_int, default=16, help="live episodes in the lockstep run")
    ap.add_argument("--threads", type=positive_int, default=1)
    ap.add_argument("--no-autocast", dest="autocast", action="store_false", help="fp32 instead of bf16 autocast")
    ap.add_argument("--out", type=output_file, default=Path("benchmarks/results/bench_eval.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from qlass.policy.hf import HFPolicy
    from qlass.qnet import QNet

    runs = []
    for spec in args.method or ["greedy", "best-of-n:n=4", "qlass:m=2"]:
        name, opts = parse_method(spec)
        opts = {**opts, "max_steps": args.max_steps, "max_new_tokens": args.max_new_tokens}
        runs.append(MethodRun(name, make_method_config(name, opts)))
    model = args.model or default_model_dir()
    slots = max(8, args.concurrency * max(map(live_histories, runs)))
    policy = HFPolicy(model, autocast=args.autocast, threads=args.threads, cache_slots=slots)
    qnet = (QNet.load(args.qnet, autocast=None if args.autocast else False, threads=args.threads, cache_slots=slots)
            if args.qnet
            else QNet.from_sft(model, autocast=args.autocast, cache_slots=slots))
    probe = make_env("sciworld")
    try:
        tasks = select_tasks(probe.tasks(args.split, args.task_types.split(",")), args.tasks)
    finally:
        probe.close()

    one, one_records = timed_evaluation(policy, qnet, tasks, runs, args.max_steps, 1)
    many, many_records = timed_evaluation(policy, qnet, tasks, runs, args.max_steps, args.concurrency)
    raw = raw_decode(policy, tasks, args.concurrency, args.max_new_tokens)
    single = raw_decode(policy, tasks, 1, args.max_new_tokens)
    key = lambda r: (r["method"], r["task"])
    alone = {key(r): r["trajectory"]["conversations"] for r in one_records}
    same = sum(alone.get(key(r)) == r["trajectory"]["conversations"] for r in many_records)
    ratio = many["episodes_per_hour"] / one["episodes_per_hour"]
    report = {"model": str(model), "qnet": str(args.qnet) if args.qnet else "from_sft", "autocast": args.autocast,
              "threads": args.threads, "methods": [r.label for r in runs], "tasks": len(tasks),
              "max_steps": args.max_steps, "max_new_tokens": args.max_new_tokens, "one_at_a_time": one,
              "lockstep": many, "ratio_episodes_per_hour": ratio, "raw_decode": raw, "raw_decode_single": single,
              "identical_trajectories": same, "episodes": len(many_records)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for name, r in (("one at a time", one), (f"lockstep ({args.concurrency} live)", many)):
        print(f"{name:20s}: {r['seconds']:8.1f} s, {r['episodes']:4d} episodes, {r['episodes_per_hour']:8.1f} "
              f"episodes/h, {r['completion_tokens']:7d} completion tokens, {r['tokens_per_s']:6.1f} tokens/s")
    print(f"lockstep vs one at a time: {ratio:.2f}x episodes per hour, "
          f"{many['tokens_per_s'] / one['tokens_per_s']:.2f}x completion tokens per second")
    print(f"raw decode: {raw['tokens_per_s']:.1f} tokens/s at {args.concurrency} sequences, "
          f"{single['tokens_per_s']:.1f} tokens/s at 1; lockstep reaches "
          f"{many['tokens_per_s'] / raw['tokens_per_s']:.0%} of the batched rate")
    print(f"identical trajectories in both runs: {same}/{len(many_records)}")


if __name__ == "__main__":
    run_main(main)
