"""Best-of-n speed: N trajectories played side by side (one batched policy call per step, one
environment each: what ``qlass eval`` does) vs one after another on a single environment.

Both ways play the same ScienceWorld tasks with the same local model, N, temperature and step
limit; the samples differ (each way seeds its own streams), so the token counts are reported beside
the times and the comparison is in completion tokens per second. Usage::

    python benchmarks/bench_search.py [--model runs/reference/sft] [--n 8] [--tasks 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bench_args import output_file, positive_int, run_main

from qlass.envs.sciworld import ScienceWorldEnv
from qlass.models import default_model_dir
from qlass.search import BestOfNConfig, SearchContext, best_of_n

if TYPE_CHECKING:  # torch loads after the arguments are read: a usage error or --help is answered at once
    from qlass.policy.hf import HFPolicy


def play(policy: HFPolicy, envs: list[ScienceWorldEnv], tasks: list, cfg: BestOfNConfig, pool: bool) -> dict:
    """Best-of-n on every task; wall seconds, completion tokens and env steps in total."""
    policy.clear_cache()
    start, tokens, steps = time.perf_counter(), 0, 0
    for i, task in enumerate(tasks):
        ctx = SearchContext(env=envs[0], policy=policy, seed=i, env_pool=(lambda k: envs[:k]) if pool else None)
        traj = best_of_n(task, ctx, cfg)
        tokens += traj.meta["completion_tokens"]
        steps += traj.meta["env_steps"]
    wall = time.perf_counter() - start
    return {"seconds": wall, "completion_tokens": tokens, "env_steps": steps, "tokens_per_s": tokens / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: the default model)")
    ap.add_argument("--n", type=positive_int, default=8)
    ap.add_argument("--tasks", type=positive_int, default=2, help="seen-split find-plant tasks to play")
    ap.add_argument("--max-steps", type=positive_int, default=10)
    ap.add_argument("--threads", type=positive_int, default=None)
    ap.add_argument("--autocast", action="store_true")
    ap.add_argument("--out", type=output_file, default=Path("benchmarks/results/bench_search.json"))
    args = ap.parse_args()
    from qlass.policy.hf import HFPolicy

    model = args.model or default_model_dir()
    policy = HFPolicy(model, autocast=args.autocast, threads=args.threads, cache_slots=max(8, args.n))
    envs = [ScienceWorldEnv(step_limit=args.max_steps) for _ in range(args.n)]
    try:
        tasks = envs[0].tasks("seen", ["find-plant"])[: args.tasks]
        cfg = BestOfNConfig(n=args.n, select="likelihood", max_steps=args.max_steps, max_new_tokens=48)
        one_by_one = play(policy, envs, tasks, cfg, pool=False)
        side_by_side = play(policy, envs, tasks, cfg, pool=True)
    finally:
        for env in envs:
            env.close()
    ratio = side_by_side["tokens_per_s"] / one_by_one["tokens_per_s"]
    report = {"model": str(model), "n": args.n, "tasks": len(tasks), "one_by_one": one_by_one,
              "side_by_side": side_by_side, "ratio_tokens_per_s": ratio}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for name, r in (("one after another", one_by_one), ("side by side", side_by_side)):
        print(f"{name:18s}: {r['seconds']:7.1f} s, {r['completion_tokens']:6d} completion tokens, "
              f"{r['env_steps']:4d} env steps, {r['tokens_per_s']:6.1f} tokens/s")
    print(f"best-of-{args.n} side by side vs one after another: {ratio:.2f}x completion tokens per second")


if __name__ == "__main__":
    run_main(main)
