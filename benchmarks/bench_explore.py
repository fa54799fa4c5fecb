"""Exploration step efficiency: env steps per tree edge, this explorer vs replay-from-reset.

Builds exploration trees with ``qlass.explore`` (or reads existing ones with ``--trees``), then,
in the same run, replays the very same trees in the environment two ways and times them:

- ``explorer``: what the explorer does — each root-to-leaf path walked once (reset + replay of a
  new branch's parent, then the branch). Its step count must equal the explorer's own count.
- ``replay-from-reset``: what the authors' code does — every node is reached by a reset and a
  replay of its whole path (quadratic in depth).

Prints env steps per edge (1.0 is the floor; target <= 1.5), env-only nodes per minute for both
schedules, and nodes per minute of the whole explorer (policy included) when it built the trees.
Writes a JSON report. Usage::

    python benchmarks/bench_explore.py --model default --task-types find-non-living-thing --limit 2
    python benchmarks/bench_explore.py --trees /work/runs/explore-probe/trees.jsonl

With ``--variant LABEL:key=value,...`` (repeatable) it instead builds the trees of the same tasks
once per variant of the exploration options and compares the contrast they give the QNet: sibling
pairs with different Q (:func:`qlass.tree.contrast_pairs`) per 100 policy tokens. On the test
suite's toy game and scripted policy (seconds, one thread)::

    PYTHONPATH=tests python benchmarks/bench_explore.py --env test_explore:Rooms \
        --model test_explore:ScriptedPolicy --task-types "" --limit 6 --set max_nodes=40 \
        --variant "old:expert_siblings=1" --variant "new:graft_share=0.5,probe=true,rollouts=2"
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_args import output_file, positive_int, run_main

from qlass.config import build
from qlass.envs.base import Env, make_env
from qlass.errors import QlassError
from qlass.evaluate import select_tasks
from qlass.explore import ExploreConfig, explore_tasks
from qlass.tree import Tree, contrast_pairs, read_trees, tree_summary
from qlass.types import Task


def walk(env: Env, task: Task, tree: Tree, node_id: int) -> int:
    """Reset and replay the path to ``node_id``; returns the steps taken."""
    env.reset(task)
    path = tree.path(node_id)
    for n in path:
        env.step(n.output)
    return len(path)


def replay_schedules(env: Env, trees: list[Tree], tasks: dict[str, Task]) -> dict[str, dict[str, float]]:
    """Env steps and env seconds of both schedules on the same trees."""
    out = {}
    for name in ("explorer", "replay-from-reset"):
        steps, start = 0, time.perf_counter()
        for tree in trees:
            kids = tree.children()
            targets = [n.id for n in tree.nodes[1:] if name == "replay-from-reset" or not kids[n.id]]
            steps += sum(walk(env, tasks[tree.tree_id], tree, i) for i in targets)
        seconds = time.perf_counter() - start
        edges = sum(t.edges for t in trees)
        out[name] = {"env_steps": steps, "env_steps_per_edge": steps / edges, "env_seconds": seconds,
                     "env_only_nodes_per_min": edges / (seconds / 60)}
    return out


def trees_tasks(env: Env, trees: list[Tree], path: Path) -> dict[str, Task]:
    """The task of every tree in ``path``, from ``env``'s splits; no trees, or a tree whose task ``env`` lacks (trees
    of another env: ``--env`` not given), is a :class:`QlassError` naming the file (an IndexError and a KeyError of
    the tree id before)."""
    if not trees:
        raise QlassError(f"{path}: holds no trees")
    tasks: dict[str, Task] = {}
    for split in dict.fromkeys(t.split for t in trees):
        tasks.update({t.id: t for t in env.tasks(split)})
    for tree in trees:
        if tree.tree_id not in tasks:
            raise QlassError(f"{path}: tree {tree.tree_id!r} (env {tree.env!r}, split {tree.split!r}) is no task of "
                             f"the env's {tree.split} split; give the env the trees were explored in with --env")
    return {tree.tree_id: tasks[tree.tree_id] for tree in trees}


def compare_variants(args: argparse.Namespace, make: Any, tasks: list[Task]) -> dict[str, Any]:
    """Build the trees of ``tasks`` once per ``--variant`` and measure their contrast per policy token."""
    from qlass.commands.evaluate import parse_kv
    from qlass.commands.explore import policy_factory

    rows = {}
    for spec in args.variant:
        label, _, opts = spec.partition(":")
        options = {**parse_kv(args.set, "--set"), **parse_kv([o for o in opts.split(",") if o], f"--variant {label}")}
        cfg = build(ExploreConfig, options, f"--variant {label}")
        policy = policy_factory(args.model, parse_kv(args.policy_arg, "--policy-arg"))()
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            trees = explore_tasks(make, tasks, policy, cfg, Path(tmp) / "trees.jsonl", progress=False)
        seconds = time.perf_counter() - start
        s = tree_summary(trees)
        tokens = s["prompt_tokens"] + s["completion_tokens"] + sum(int(t.stats.get("score_tokens", 0)) for t in trees)
        rows[label] = {"options": options, "trees": s["trees"], "nodes": s["nodes"], "env_steps": s["env_steps"],
                       "policy_tokens": tokens, "contrast_pairs": s["contrast_pairs"],
                       "pairs_per_100_tokens": 100 * s["contrast_pairs"] / max(tokens, 1),
                       "trees_with_contrast": sum(contrast_pairs(t) > 0 for t in trees),
                       "stopped_by": [t.stats["stopped_by"] for t in trees], "seconds": seconds}
        r = rows[label]
        print(f"{label:>12s}: {r['contrast_pairs']:4d} contrast pairs, {r['policy_tokens']:7d} policy tokens = "
              f"{r['pairs_per_100_tokens']:.2f} pairs / 100 tokens; {r['nodes']} nodes, {r['env_steps']} env steps, "
              f"{r['trees_with_contrast']}/{r['trees']} trees with contrast ({seconds:.1f} s)")
    return {"variants": rows, "tasks": [t.id for t in tasks], "model": args.model}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", type=Path, help="existing trees.jsonl to measure (skips building)")
    ap.add_argument("--model", default="default", help="policy folder or 'default' (when building)")
    ap.add_argument("--env", default="sciworld")
    ap.add_argument("--split", default="train")
    ap.add_argument("--task-types", default="find-non-living-thing,lifespan-longest-lived")
    ap.add_argument("--limit", type=positive_int, default=2)
    ap.add_argument("--set", action="append", default=[], help="ExploreConfig option key=value")
    ap.add_argument("--policy-arg", action="append", default=[], help="policy option key=value")
    ap.add_argument("--variant", action="append", default=[],
                    help="LABEL:key=value,... exploration options of one variant to compare (repeatable)")
    ap.add_argument("--out", type=output_file, default=Path("benchmarks/results/bench_explore.json"))
    args = ap.parse_args()

    from qlass.commands.evaluate import parse_kv

    make = functools.partial(make_env, args.env)
    env = make()
    if args.variant:
        chosen = select_tasks(env.tasks(args.split, [t for t in args.task_types.split(",") if t] or None), args.limit)
        env.close()
        report = compare_variants(args, make, chosen)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"report: {args.out}")
        return
    build_s = None
    if args.trees:
        trees = read_trees(args.trees)
        tasks = trees_tasks(env, trees, args.trees)
    else:
        from qlass.policy import load_policy

        cfg = build(ExploreConfig, parse_kv(args.set, "--set"), "--set")
        chosen = select_tasks(env.tasks(args.split, args.task_types.split(",")), args.limit)
        policy = load_policy(args.model, **parse_kv(args.policy_arg, "--policy-arg"))
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            trees = explore_tasks(make, chosen, policy, cfg, Path(tmp) / "trees.jsonl", progress=False)
        build_s = time.perf_counter() - start
        tasks = {t.id: t for t in chosen}
    summary = tree_summary(trees)
    schedules = replay_schedules(env, trees, tasks)
    env.close()
    probes = sum(int(t.stats.get("probe_steps", 0)) for t in trees)  # steps of probes that made no node
    assert schedules["explorer"]["env_steps"] == summary["env_steps"] - probes, \
        "explorer's recorded steps != its schedule"
    report: dict[str, Any] = {
        "trees": summary["trees"], "nodes": summary["nodes"], "edges": summary["edges"],
        "explorer_env_steps_per_edge": summary["env_steps_per_edge"],
        "replay_from_reset_env_steps_per_edge": schedules["replay-from-reset"]["env_steps_per_edge"],
        "probe_steps": probes,  # in explorer_env_steps_per_edge; no replay schedule has them
        "step_ratio": schedules["replay-from-reset"]["env_steps"] / summary["env_steps"],
        "env_time_ratio": schedules["replay-from-reset"]["env_seconds"] / schedules["explorer"]["env_seconds"],
        "schedules": schedules, "target_steps_per_edge": 1.5,
        "source": str(args.trees) if args.trees else {"model": args.model, "set": args.set, "tasks": list(tasks)},
    }
    if build_s is not None:
        report["build_seconds"] = build_s
        report["explorer_nodes_per_min"] = summary["nodes"] / (build_s / 60)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{summary['trees']} trees, {summary['nodes']} nodes, {summary['edges']} edges")
    for name, s in schedules.items():
        print(f"{name:18s}: {s['env_steps']:6d} env steps = {s['env_steps_per_edge']:5.2f} per edge, "
              f"{s['env_seconds']:6.1f} s env time, {s['env_only_nodes_per_min']:8.0f} nodes/min (env only)")
    if probes:
        print(f"explorer, probes too: {summary['env_steps']:6d} env steps = {summary['env_steps_per_edge']:5.2f} per "
              f"edge ({probes} probe steps, which the schedules above leave out)")
    counted = " (its probes counted)" if probes else ""
    print(f"replay-from-reset / explorer{counted}: {report['step_ratio']:.2f}x env steps, "
          f"{report['env_time_ratio']:.2f}x env time; target <= 1.5 steps/edge: "
          f"{'met' if report['explorer_env_steps_per_edge'] <= 1.5 else 'NOT met'}")
    if build_s is not None:
        print(f"explorer with policy: {report['explorer_nodes_per_min']:.1f} nodes/min ({build_s:.0f} s)")
    print(f"report: {args.out}")


if __name__ == "__main__":
    run_main(main)
