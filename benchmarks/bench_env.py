"""Environment speed: this project's ScienceWorld env vs the stock ``ScienceWorldEnv.step`` path.

Both replay the same gold action sequences (load + reset + every step) in one run; prints steps
per second for each and the ratio, and writes a JSON report. Usage::

    python benchmarks/bench_env.py [--task-types find-plant,lifespan-longest-lived] [--per-type 3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from qlass.envs.base import parse_action
from qlass.envs.sciworld import ScienceWorldEnv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task-types", default="find-plant,find-animal,lifespan-longest-lived,chemistry-mix-paint-secondary-color")
    ap.add_argument("--per-type", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_env.json"))
    args = ap.parse_args()

    ours = ScienceWorldEnv(step_limit=1000)
    tasks = [t for tt in args.task_types.split(",") for t in ours.tasks("train", [tt])[: args.per_type]]
    episodes = [(t, ours.expert(t)) for t in tasks]
    n_steps = sum(len(e) for _, e in episodes)

    start = time.perf_counter()
    for task, outputs in episodes:
        ours.reset(task)
        for out in outputs:
            ours.step(out)
    ours_s = time.perf_counter() - start

    from scienceworld import ScienceWorldEnv as StockEnv

    stock = StockEnv("", envStepLimit=1000)
    start = time.perf_counter()
    for task, outputs in episodes:
        stock.load(task.meta["task_name"], task.meta["variation"], "easy")
        stock.reset()
        for out in outputs:
            stock.step(parse_action(out))
    stock_s = time.perf_counter() - start
    stock.close()

    report = {
        "episodes": len(episodes), "steps": n_steps,
        "qlass_steps_per_s": n_steps / ours_s, "stock_steps_per_s": n_steps / stock_s,
        "speedup": stock_s / ours_s,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{len(episodes)} episodes, {n_steps} steps (load + reset + gold steps)")
    print(f"qlass ScienceWorldEnv : {report['qlass_steps_per_s']:8.1f} steps/s")
    print(f"stock ScienceWorldEnv : {report['stock_steps_per_s']:8.1f} steps/s")
    print(f"ratio                 : {report['speedup']:8.1f}x (target >= 10x)")


if __name__ == "__main__":
    main()
