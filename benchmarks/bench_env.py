"""Environment speed: this project's ScienceWorld env vs the stock ``ScienceWorldEnv.step`` path.

All envs play the same gold action sequences in one run, interleaved pass by pass. For ``step``
alone (the target: >= 10x the stock path) and for whole episodes (load + reset + every step) it
prints steps per second of wall-clock time and per CPU second (the JVM's and Python's CPU time
together, which a busy shared machine disturbs much less than wall-clock time), the ratios, and
writes a JSON report. Each figure is the median over the ``--repeats`` passes, a ratio the median
of each pass's own ratio (both envs of a pass ran under the same load).

The stock env is timed twice: as shipped, and in a JVM started as this project starts it (the
patched ``EnvObject`` that hashes by object id, or constant identity hash codes where no JDK is
installed), so the second ratio isolates what the direct step path saves. Usage::

    python benchmarks/bench_env.py [--task-types find-plant,boil] [--per-type 3] [--repeats 3]
                                   [--other-envs alfworld,webshop] [--other-episodes 5]

``--other-envs`` also times ALFWorld and WebShop (expert episodes of their train split: steps/s and
reset ms, means and per-episode medians, for a first play of each game and for a replay); they
have no stock step path to compare with. WebShop reads ``$WEBSHOP_DATA`` (default:
the repository's ``../shared/data/webshop``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from bench_args import output_file, positive_int, run_main

from qlass.envs.base import parse_action, registered_envs
from qlass.envs.sciworld import ScienceWorldEnv
from qlass.envs.sciworld_hash import launch_settings
from qlass.types import Task

Episodes = list[tuple[Task, list[str]]]
_TICK = os.sysconf("SC_CLK_TCK")


def jvm_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def measure(pid: int, reset: Callable[[Task], object], step: Callable[[str], object],
            episodes: Episodes) -> dict[str, float]:
    """Wall-clock and CPU seconds (JVM + this process) spent in resets and in steps."""
    out = dict.fromkeys(("reset_wall", "reset_cpu", "step_wall", "step_cpu"), 0.0)

    def clocks() -> tuple[float, float]:
        return time.perf_counter(), jvm_cpu_seconds(pid) + time.process_time()

    for task, outputs in episodes:
        w0, c0 = clocks()
        reset(task)
        w1, c1 = clocks()
        for text in outputs:
            step(text)
        w2, c2 = clocks()
        out["reset_wall"] += w1 - w0
        out["reset_cpu"] += c1 - c0
        out["step_wall"] += w2 - w1
        out["step_cpu"] += c2 - c1
    return out


def stock_envs() -> dict:
    """The stock env as shipped, and the same class in a JVM started as this project starts it."""
    import scienceworld.scienceworld as stock_module
    from scienceworld.constants import JAR_PATH

    launch = stock_module.launch_gateway
    envs = {"stock": stock_module.ScienceWorldEnv("", envStepLimit=1000)}
    classpath, options = launch_settings(JAR_PATH)
    # Benchmark-only patch: the stock class starts its JVM through this module-level name.
    stock_module.launch_gateway = lambda *a, **kw: launch(*a, **{**kw, "classpath": classpath,
                                                                 "javaopts": [*kw.get("javaopts", []), *options]})
    try:
        envs["stock_same_jvm"] = stock_module.ScienceWorldEnv("", envStepLimit=1000)
    finally:
        stock_module.launch_gateway = launch
    return envs


def stock_reset(env) -> Callable[[Task], object]:
    def reset(task: Task) -> object:
        env.load(task.meta["task_name"], task.meta["variation"], "easy")
        return env.reset()
    return reset


def time_other_env(name: str, episodes: int) -> dict[str, float]:
    """Steps/s and reset time of ``name`` replaying its first ``episodes`` train experts twice: the
    first pass plays each game for the first time in this process, the second replays them (what
    exploration and a multi-method evaluation do; per-process game caches then apply)."""
    from qlass.envs.base import make_env

    kwargs: dict = {}
    if name == "webshop":
        default = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "webshop"
        kwargs["data_dir"] = os.environ.get("WEBSHOP_DATA", str(default))
    env = make_env(name, **kwargs)
    out: dict[str, float] = {}
    try:
        tasks = env.tasks("train")[:episodes]
        plays = [(t, env.expert(t)) for t in tasks]
        for label in ("", "replay_"):
            resets, rates = [], []
            step_s = 0.0
            for task, outputs in plays:
                start = time.perf_counter()
                env.reset(task)
                resets.append(time.perf_counter() - start)
                start = time.perf_counter()
                for text in outputs:
                    env.step(text)
                elapsed = time.perf_counter() - start
                step_s += elapsed
                rates.append(len(outputs) / max(elapsed, 1e-9))
            steps = sum(len(o) for _, o in plays)
            out.update({f"{label}steps_per_s": steps / max(step_s, 1e-9),
                        f"{label}steps_per_s_median": statistics.median(rates),
                        f"{label}reset_ms": 1000 * statistics.fmean(resets),
                        f"{label}reset_ms_median": 1000 * statistics.median(resets)})
    finally:
        env.close()
    return {"episodes": len(plays), "steps": steps, **out}


def pass_figures(measured: dict[str, dict[str, float]], n_steps: int, n_eps: int) -> dict[str, float]:
    """One pass's rates of each env (``measured``: its seconds by env, from :func:`measure`) and the ratios of
    qlass's to the stock paths'."""
    out: dict[str, float] = {}
    for name, m in measured.items():
        for clock in ("wall", "cpu"):
            out[f"{name}_{clock}_steps_per_s"] = n_steps / m[f"step_{clock}"]
            out[f"{name}_{clock}_episode_steps_per_s"] = n_steps / (m[f"step_{clock}"] + m[f"reset_{clock}"])
        out[f"{name}_reset_wall_ms"] = 1000 * m["reset_wall"] / n_eps
    for base in ("stock", "stock_same_jvm"):
        for clock in ("wall", "cpu"):
            for kind in ("steps_per_s", "episode_steps_per_s"):
                out[f"ratio_{kind}_{clock}_vs_{base}"] = out[f"qlass_{clock}_{kind}"] / out[f"{base}_{clock}_{kind}"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task-types", default="find-plant,find-animal,lifespan-longest-lived,"
                    "chemistry-mix-paint-secondary-color,test-conductivity")
    ap.add_argument("--per-type", type=positive_int, default=2)
    ap.add_argument("--repeats", type=positive_int, default=3, help="Passes over the episodes (medians reported).")
    ap.add_argument("--out", type=output_file, default=Path("benchmarks/results/bench_env.json"))
    ap.add_argument("--other-envs", default="alfworld,webshop", help="Also time these envs ('' for none).")
    ap.add_argument("--other-episodes", type=positive_int, default=5)
    args = ap.parse_args()
    unknown = [n for n in args.other_envs.split(",") if n and n not in registered_envs()]
    if unknown:  # was refused after the whole ScienceWorld timing
        ap.error(f"--other-envs: unknown environment {unknown[0]!r}; known: {', '.join(registered_envs())}")

    ours = ScienceWorldEnv(step_limit=1000)
    tasks = [t for tt in args.task_types.split(",") for t in ours.tasks("train", [tt])[: args.per_type]]
    episodes = [(t, ours.expert(t)) for t in tasks]
    n_steps, n_eps = sum(len(e) for _, e in episodes), len(episodes)
    stocks = stock_envs()
    runners = {"qlass": (ours._jvm.gateway.java_process.pid, ours.reset, ours.step)}
    for name, env in stocks.items():
        runners[name] = (env._gateway.java_process.pid, stock_reset(env), lambda o, e=env: e.step(parse_action(o)))

    passes = [pass_figures({name: measure(pid, reset, step, episodes) for name, (pid, reset, step) in runners.items()},
                           n_steps, n_eps) for _ in range(args.repeats)]
    for env in stocks.values():
        env.close()

    report: dict[str, float | int] = {"episodes": n_eps, "steps": n_steps, "repeats": args.repeats,
                                      **{key: statistics.median(p[key] for p in passes) for key in passes[0]}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")

    print(f"{n_eps} episodes, {n_steps} gold steps, median of {args.repeats} passes")
    print(f"{'':22s} {'step() /s wall':>15s} {'step() /s CPU':>14s} {'episode /s wall':>16s} "
          f"{'episode /s CPU':>15s} {'reset ms':>9s}")
    labels = {"qlass": "qlass ScienceWorldEnv", "stock": "stock ScienceWorldEnv",
              "stock_same_jvm": "stock, same JVM flags"}
    for name, label in labels.items():
        print(f"{label:22s} {report[f'{name}_wall_steps_per_s']:15.1f} {report[f'{name}_cpu_steps_per_s']:14.1f} "
              f"{report[f'{name}_wall_episode_steps_per_s']:16.1f} {report[f'{name}_cpu_episode_steps_per_s']:15.1f} "
              f"{report[f'{name}_reset_wall_ms']:9.1f}")
    for base, label in (("stock", "stock"), ("stock_same_jvm", "same-JVM stock")):
        print(f"ratio vs {label:15s}: step() {report[f'ratio_steps_per_s_wall_vs_{base}']:.1f}x wall, "
              f"{report[f'ratio_steps_per_s_cpu_vs_{base}']:.1f}x CPU; whole episodes "
              f"{report[f'ratio_episode_steps_per_s_wall_vs_{base}']:.1f}x wall, "
              f"{report[f'ratio_episode_steps_per_s_cpu_vs_{base}']:.1f}x CPU")
    print("target: step() >= 10x the stock path")
    for name in [n for n in args.other_envs.split(",") if n]:
        m = time_other_env(name, args.other_episodes)
        report[name] = m
        for label, key in (("first play", ""), ("replay", "replay_")):
            print(f"{name + ', ' + label:22s} {m[key + 'steps_per_s']:15.1f} steps/s over {m['steps']} expert steps "
                  f"(median per episode {m[key + 'steps_per_s_median']:.1f}), reset {m[key + 'reset_ms']:.1f} ms "
                  f"(median {m[key + 'reset_ms_median']:.1f}; {m['episodes']} episodes)")
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    run_main(main)
