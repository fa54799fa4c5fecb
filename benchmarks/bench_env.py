"""Environment speed: this project's ScienceWorld env vs the stock ``ScienceWorldEnv.step`` path.

Both play the same gold action sequences in one run. Prints steps per second of ``step`` alone
(the target: >= 10x the stock path) and of whole episodes (load + reset + every step), the ratios,
and writes a JSON report. Usage::

    python benchmarks/bench_env.py [--task-types find-plant,boil] [--per-type 3] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from qlass.envs.base import parse_action
from qlass.envs.sciworld import ScienceWorldEnv
from qlass.types import Task


def time_qlass(env: ScienceWorldEnv, episodes: list[tuple[Task, list[str]]]) -> tuple[float, float]:
    """Seconds spent in (reset, step) replaying ``episodes`` with this project's env."""
    reset_s = step_s = 0.0
    for task, outputs in episodes:
        t0 = time.perf_counter()
        env.reset(task)
        t1 = time.perf_counter()
        for out in outputs:
            env.step(out)
        reset_s += t1 - t0
        step_s += time.perf_counter() - t1
    return reset_s, step_s


def time_stock(env, episodes: list[tuple[Task, list[str]]]) -> tuple[float, float]:
    """Seconds spent in (load + reset, step) replaying ``episodes`` with the stock env."""
    reset_s = step_s = 0.0
    for task, outputs in episodes:
        t0 = time.perf_counter()
        env.load(task.meta["task_name"], task.meta["variation"], "easy")
        env.reset()
        t1 = time.perf_counter()
        for out in outputs:
            env.step(parse_action(out))
        reset_s += t1 - t0
        step_s += time.perf_counter() - t1
    return reset_s, step_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task-types", default="find-plant,find-animal,lifespan-longest-lived,"
                    "chemistry-mix-paint-secondary-color,test-conductivity")
    ap.add_argument("--per-type", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="Passes over the episodes; the best is kept.")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_env.json"))
    args = ap.parse_args()

    ours = ScienceWorldEnv(step_limit=1000)
    tasks = [t for tt in args.task_types.split(",") for t in ours.tasks("train", [tt])[: args.per_type]]
    episodes = [(t, ours.expert(t)) for t in tasks]
    n_steps = sum(len(e) for _, e in episodes)

    from scienceworld import ScienceWorldEnv as StockEnv

    stock = StockEnv("", envStepLimit=1000)
    runs = {"qlass": [], "stock": []}
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        runs["qlass"].append(time_qlass(ours, episodes))
        runs["stock"].append(time_stock(stock, episodes))
    stock.close()
    best = {k: min(v, key=sum) for k, v in runs.items()}

    report = {"episodes": len(episodes), "steps": n_steps, "repeats": args.repeats}
    for k, (reset_s, step_s) in best.items():
        report[f"{k}_steps_per_s"] = n_steps / step_s
        report[f"{k}_episode_steps_per_s"] = n_steps / (reset_s + step_s)
        report[f"{k}_reset_ms"] = 1000 * reset_s / len(episodes)
    report["step_speedup"] = report["qlass_steps_per_s"] / report["stock_steps_per_s"]
    report["episode_speedup"] = report["qlass_episode_steps_per_s"] / report["stock_episode_steps_per_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")

    print(f"{len(episodes)} episodes, {n_steps} gold steps, best of {args.repeats} passes")
    print(f"{'':22s} {'step() steps/s':>15s} {'episode steps/s':>16s} {'load+reset ms':>14s}")
    for k, label in (("qlass", "qlass ScienceWorldEnv"), ("stock", "stock ScienceWorldEnv")):
        print(f"{label:22s} {report[f'{k}_steps_per_s']:15.1f} {report[f'{k}_episode_steps_per_s']:16.1f} "
              f"{report[f'{k}_reset_ms']:14.1f}")
    print(f"ratio step()          : {report['step_speedup']:.1f}x (target >= 10x)")
    print(f"ratio whole episodes  : {report['episode_speedup']:.1f}x (load + reset included)")


if __name__ == "__main__":
    main()
