"""Remote environment overhead: ``HttpEnv`` against ``qlass serve`` on loopback vs the same
environment in process.

Plays the same episodes both ways (reset, then the expert's steps) with a toy environment whose own
step costs microseconds, so the remote numbers are the protocol's cost alone: HTTP, JSON, the
server's checks. Prints the median milliseconds per step and per reset, and the ratio. Usage::

    python benchmarks/bench_http_env.py [--episodes 40] [--env toy_envs:Corridor]

(``toy_envs`` lives in tests/: run with ``PYTHONPATH=tests``.)
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

from bench_args import positive_int, run_main

from qlass.envs.base import Env, env_close, env_expert, env_reset, env_step, env_tasks, make_env
from qlass.errors import QlassError
from qlass.serve import BackgroundServer, EnvPool

log = logging.getLogger("bench_http_env")


def play(env: Env, episodes: int) -> tuple[list[float], list[float]]:
    """Seconds per reset and per step over ``episodes`` expert episodes of the train split."""
    tasks = env_tasks(env, "train")
    resets, steps = [], []
    for i in range(episodes):
        task = tasks[i % len(tasks)]
        outputs = env_expert(env, task)
        start = time.perf_counter()
        env_reset(env, task)
        resets.append(time.perf_counter() - start)
        for output in outputs:
            start = time.perf_counter()
            done = env_step(env, output).done
            steps.append(time.perf_counter() - start)
            if done:
                break
    return resets, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=positive_int, default=40)
    parser.add_argument("--env", default="toy_envs:Corridor")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    local = make_env(args.env)
    if not env_tasks(local, "train"):  # before: a division by zero (the task index modulo no tasks)
        raise QlassError(f"env {args.env}: its train split has no task to play")
    with BackgroundServer(EnvPool(args.env)) as server:
        remote = make_env("qlass.envs.http:HttpEnv", url=server.url)
        play(remote, 2)  # warm up: connection, first imports
        times = {"in process": play(local, args.episodes), "qlass serve + HttpEnv": play(remote, args.episodes)}
        env_close(remote)
    env_close(local)
    med = {name: (statistics.median(r) * 1e3, statistics.median(s) * 1e3) for name, (r, s) in times.items()}
    for name, (reset_ms, step_ms) in med.items():
        log.info("%-22s reset %.3f ms  step %.3f ms (median of %d steps)", name, reset_ms, step_ms,
                 len(times[name][1]))
    (_, local_step), (_, remote_step) = med.values()
    log.info("remote step costs %.2f ms more than in process (%.0fx)", remote_step - local_step,
             remote_step / local_step)


if __name__ == "__main__":
    run_main(main)
