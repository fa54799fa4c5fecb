"""Exploration trees on a small deterministic text game with a seeded scripted policy.

``Rooms`` and ``ScriptedPolicy`` are a legitimate user-defined environment and policy (the Env and
Policy protocols only); other test modules and the CLI (``--env test_explore:Rooms --model
test_explore:ScriptedPolicy`` with ``tests/`` on ``PYTHONPATH``) use them too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import pytest
from toy_envs import Corridor

from qlass.config import to_dict
from qlass.data import save_trajectories
from qlass.envs.base import FORMAT_HINT, parse_action
from qlass.errors import QlassError
from qlass.expert import export_expert
from qlass.explore import ExploreConfig, build_tree, explore_tasks, settings_file, tree_seed
from qlass.explore_config import expert_task_ids, exploration_tasks, explore_digest
from qlass.jsonl import read_jsonl
from qlass.perturb import diversity_prompt
from qlass.pipeline import _exploration_tasks
from qlass.pipeline_config import resolve
from qlass.qdata import qdata_records
from qlass.search import normalise_action
from qlass.seeding import candidate_seed, stable_seed
from qlass.tree import Tree, read_trees
from qlass.types import Completion, History, Message, StepResult, Task

TESTS = Path(__file__).parent
ROOMS = ("hall", "kitchen", "garden", "cellar")


class Rooms:
    """Fetch the key from the key room, then open the chest in the chest room.

    Reward (cumulative): 0.5 once the key is held, 1.0 when the chest is opened. Opening the chest
    without the key breaks the lock: the episode ends with reward 0.
    """

    name = "rooms"

    def __init__(self, step_limit: int = 8, n_tasks: int = 6, broken_task: str | None = None) -> None:
        self.step_limit, self.n_tasks, self.broken_task = step_limit, n_tasks, broken_task
        self.task: Task | None = None

    def splits(self) -> dict[str, int]:
        return {"train": self.n_tasks}

    def tasks(self, split: str, task_types: Sequence[str] | None = None) -> list[Task]:
        out = []
        for i in range(self.n_tasks):
            key, chest = ROOMS[1 + i % 3], ROOMS[(2 + i) % 4]
            out.append(Task(f"rooms/{i}", self.name, split, "fetch", {"key": key, "chest": chest}))
        return out

    def prompt(self) -> list[Message]:
        return [Message("system", "You play a text game."),
                Message("user",
                        "Actions: go to <room>, take key, open chest, look.\nAnswer as:\nThought: ...\nAction: ..."),
                Message("assistant", "OK")]

    def reset(self, task: Task) -> str:
        if task.id == self.broken_task:
            raise RuntimeError(f"cannot load {task.id}")
        self.task, self.room, self.key, self.steps, self.score, self.done = task, "hall", False, 0, 0.0, False
        return "Task: open the chest. The key is somewhere. You are in the hall."

    def step(self, output: str) -> StepResult:
        assert self.task is not None
        if self.done:
            return StepResult("The episode is over.", self.score, True)
        self.steps += 1
        action = parse_action(output)
        meta = self.task.meta
        if action is None:
            obs = FORMAT_HINT
        elif action.startswith("go to ") and action[6:] in ROOMS:
            self.room = action[6:]
            obs = self._look()
        elif action == "take key" and self.room == meta["key"] and not self.key:
            self.key, self.score = True, 0.5
            obs = "You take the key."
        elif action == "open chest" and self.room == meta["chest"]:
            if self.key:
                self.score, obs = 1.0, "The chest opens. You win."
            else:
                self.score, obs = 0.0, "You force the lock and break it."
            self.done = True
        elif action == "look":
            obs = self._look()
        else:
            obs = "Nothing happens."
        self.done = self.done or self.steps >= self.step_limit
        return StepResult(obs, self.score, self.done, {"steps": self.steps})

    def _look(self) -> str:
        meta = self.task.meta  # type: ignore[union-attr]
        here = [w for w, r in (("a key", meta["key"]), ("a chest", meta["chest"])) if r == self.room]
        if self.key and "a key" in here:
            here.remove("a key")
        return f"You are in the {self.room}. You see: {', '.join(here) or 'nothing'}."

    def expert(self, task: Task) -> list[str]:
        m = task.meta
        return [f"Thought: go fetch the key.\nAction: go to {m['key']}", "Thought: take it.\nAction: take key",
                f"Thought: now the chest.\nAction: go to {m['chest']}", "Thought: open it.\nAction: open chest"]

    def close(self) -> None:
        self.task = None


class ScriptedPolicy:
    """Chooses among a fixed action list with a seeded RNG (history ``i`` has base seed ``seed[i]``
    when ``seed`` is a list, else ``seed + 1000003 * i``; its candidate ``j`` draws from
    ``candidate_seed(base, j)``, like the HF backend): with probability ``smart`` the sensible action
    for the last observation (take a key it sees, open a chest once it took the key), else one drawn
    with ``weights``; at temperature 0 the RNG is seeded by a hash of the history. ``delay`` seconds
    per call imitates a slow model."""

    ACTIONS = tuple(f"go to {r}" for r in ROOMS) + ("take key", "open chest", "look", "dance")

    def __init__(self, weights: Sequence[float] | None = None, smart: float = 0.5, delay: float = 0.0,
                 invalid: float = 0.05, seed: int = 0) -> None:
        self.weights = list(weights) if weights else [1.0] * len(self.ACTIONS)
        self.smart, self.delay, self.invalid = smart, delay, invalid
        self.rng = random.Random(seed)
        self.calls = 0

    def _one(self, history: History, rng: random.Random) -> Completion:
        prompt = sum(len(m.content.split()) for m in history)
        if rng.random() < self.invalid:
            return Completion("Thought: I am lost.", prompt, 4)
        action = rng.choices(self.ACTIONS, self.weights)[0]
        if rng.random() < self.smart:
            action = self.sensible(history) or action
        text = f"Thought: I will {action}.\nAction: {action}"
        return Completion(text, prompt, len(text.split()))

    @staticmethod
    def sensible(history: History) -> str | None:
        """The sensible action after ``history``, if any: take a key in sight, open a chest once holding it."""
        last = history[-1].content
        has_key = any("You take the key" in m.content for m in history)
        if "a key" in last and not has_key:
            return "take key"
        if "a chest" in last and has_key:
            return "open chest"
        return None

    def sample(self, histories: Sequence[History], n: int = 1, temperature: float = 0.0,
               max_new_tokens: int = 128, seed: int | Sequence[int] | None = None) -> list[list[Completion]]:
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        if seed is None or isinstance(seed, int):
            start = self.rng.getrandbits(31) if seed is None else seed
            seed = [start + 1_000_003 * i for i in range(len(histories))]
        out = []
        for h, base in zip(histories, seed, strict=True):
            if temperature == 0:
                digest = hashlib.sha256(json.dumps([m.content for m in h]).encode()).digest()
                out.append([self._one(h, random.Random(digest))] * n)
            else:
                out.append([self._one(h, random.Random(candidate_seed(base, j))) for j in range(n)])
        return out


def small_cfg(**kw) -> ExploreConfig:
    return ExploreConfig(**{"max_depth": 3, "candidates": 3, "max_steps": 8, **kw})


def tree_for(task_index: int = 0, seed: int = 1, env: Rooms | None = None, policy=None, **kw) -> Tree:
    env = env or Rooms()
    task = env.tasks("train")[task_index]
    return build_tree(env, policy or ScriptedPolicy(), task, small_cfg(**kw), seed)


def replay_check(tree: Tree) -> None:
    """Every node's stored observation and reward is what a fresh env gives on its path."""
    env = Rooms()
    task = next(t for t in env.tasks("train") if t.id == tree.tree_id)
    for node in tree.nodes[1:]:
        assert env.reset(task) == tree.nodes[0].observation
        for n in tree.path(node.id):
            res = env.step(n.output)
        assert (res.observation, res.reward, res.done) == (node.observation, node.reward, node.done)


# -- structure --------------------------------------------------------------------------------
@pytest.mark.parametrize("task,graft", [(1, False), (5, False), (0, True), (4, True)])
def test_tree_invariants(task: int, graft: bool) -> None:
    tree = tree_for(task, expert_graft=graft)
    assert any(n.expanded for n in tree.nodes[1:]), "the tree should expand below the root"
    replay_check(tree)
    kids = tree.children()
    d = 3
    for n in tree.nodes:
        keys = [normalise_action(tree.nodes[c].output) for c in kids[n.id]]
        assert len(keys) == len(set(keys)), "siblings must have distinct actions"
        if n.expanded:  # expert steps get their sibling at any depth
            assert (n.depth < d or n.source == "expert") and not n.pruned and not n.done
        if not kids[n.id] and n.id:  # every leaf ends an episode or reaches the rollout step limit
            assert n.done or n.depth == 8
        if n.source in ("sample", "expert") and n.id:
            chain = [n]
            while kids[chain[-1].id] and tree.nodes[kids[chain[-1].id][0]].source == "rollout":
                chain.append(tree.nodes[kids[chain[-1].id][0]])
            if n.source == "sample":
                assert all(c.pruned for c in chain) == (chain[-1].reward == 0.0)
        if not (n.done or n.pruned or n.expanded or n.depth >= d):
            pytest.fail(f"node {n.id} should have been expanded")
    assert tree.stats["stopped_by"] is None
    assert sum(n.env_steps for n in tree.nodes) == tree.stats["env_steps"]
    assert sum(n.completion_tokens for n in tree.nodes) <= tree.stats["completion_tokens"]
    assert tree.nodes[0].q is None and all(n.q is not None for n in tree.nodes[1:])


def test_env_steps_meet_the_replay_floor() -> None:
    """Each root-to-leaf path is walked once; no steps to sample or for merged candidates."""
    for i in range(6):
        tree = tree_for(i, expert_graft=bool(i % 2))
        kids = tree.children()
        floor = sum(n.depth for n in tree.nodes if not kids[n.id] and n.id)
        assert tree.stats["env_steps"] == floor
        per_node_replay = sum(n.depth for n in tree.nodes)
        assert tree.stats["env_steps"] < per_node_replay
        assert tree.stats["leaves"] == sum(1 for n in tree.nodes if not kids[n.id] and n.id)


class Snapshotting(Rooms):
    """Rooms with the optional snapshot API: a copy of the episode's state, and its restoration."""

    def snapshot(self) -> dict:
        return {k: getattr(self, k) for k in ("task", "room", "key", "steps", "score", "done")}

    def restore(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def test_snapshots_cost_one_env_step_per_edge_and_build_the_same_tree() -> None:
    totals = {"plain": 0, "snap": 0}
    for i in range(6):
        graft = bool(i % 2)
        plain, snap = tree_for(i, expert_graft=graft), tree_for(i, env=Snapshotting(), expert_graft=graft)
        assert snap.to_dict()["nodes"] == [
            {**n, "env_steps": snap.to_dict()["nodes"][k]["env_steps"]} for k, n in enumerate(plain.to_dict()["nodes"])]
        replay_check(snap)
        assert snap.stats["env_steps"] == snap.edges <= plain.stats["env_steps"]
        assert snap.stats["resets"] == 1 and snap.stats["restores"] > 0 and plain.stats["restores"] == 0
        totals["plain"] += plain.stats["env_steps"]
        totals["snap"] += snap.stats["env_steps"]
    assert totals["snap"] < totals["plain"]


def test_zero_outcome_prunes_every_branch() -> None:
    """A policy that only breaks the lock: the root is expanded once, every branch is pruned."""
    always_fail = ScriptedPolicy(weights=[0, 0, 0, 0, 0, 1, 0, 0], smart=0.0, invalid=0.0)
    tree = tree_for(0, expert_graft=False, policy=always_fail)
    kids = tree.children()
    assert [n.id for n in tree.nodes if n.expanded] == [0]
    assert len(kids[0]) == 1 and tree.stats["merged"] == 2  # three identical candidates merged into one
    assert all(n.pruned for n in tree.nodes[1:])
    assert all(n.q == 0.0 for n in tree.nodes[1:])


def test_expert_graft_gives_a_success_and_one_sibling_per_step() -> None:
    tree = tree_for(2, expert_graft=True, expert_siblings=1)
    expert = [n for n in tree.nodes if n.source == "expert"]
    assert [n.depth for n in expert] == [1, 2, 3, 4]
    assert expert[-1].reward == 1.0 and expert[-1].done and tree.stats["expert_reward"] == 1.0
    kids = tree.children()
    for e in expert:
        siblings = [c for c in kids[e.parent] if c != e.id]
        assert len(siblings) <= 1 and all(tree.nodes[s].source == "sample" for s in siblings)
    assert expert[0].q == pytest.approx(0.9 ** 3)


def test_caps_stop_exploration() -> None:
    tree = tree_for(4, expert_graft=False, max_nodes=12)
    assert tree.stats["stopped_by"] == "max_nodes"
    assert 12 <= len(tree.nodes) <= 12 + 8
    tree = tree_for(4, expert_graft=False, max_env_steps=5)
    assert tree.stats["stopped_by"] == "max_env_steps" and tree.stats["env_steps"] <= 5 + 8


def test_same_seed_same_tree_other_seed_other_tree() -> None:
    a, b, c = tree_for(seed=5), tree_for(seed=5), tree_for(seed=6)
    assert a.to_dict() == b.to_dict()
    assert a.to_dict()["nodes"] != c.to_dict()["nodes"]


class Drifting(Rooms):
    """A non-deterministic environment: the observation counts resets."""

    resets = 0

    def reset(self, task: Task) -> str:
        self.resets += 1
        return super().reset(task) + f" (visit {self.resets})"


def test_non_deterministic_env_is_reported() -> None:
    with pytest.raises(QlassError, match="deterministic"):
        tree_for(0, env=Drifting(), expert_graft=False)


# -- resume -----------------------------------------------------------------------------------
def test_resume_skips_finished_tasks_and_matches_one_run(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="qlass.explore")
    env = Rooms()
    tasks = env.tasks("train")
    cfg = small_cfg()
    one = tmp_path / "one.jsonl"
    explore_tasks(Rooms, tasks, ScriptedPolicy(), cfg, one, seed=3, progress=False)
    two = tmp_path / "two.jsonl"
    explore_tasks(Rooms, tasks[:2], ScriptedPolicy(), cfg, two, seed=3, progress=False)
    with open(two, "a") as fh:  # a torn line, as left by a kill during an append
        fh.write('{"schema_version": 1, "tree_id": "rooms/2", "nod')
    policy = ScriptedPolicy()
    trees = explore_tasks(Rooms, tasks, policy, cfg, two, seed=3, progress=False)
    assert "resuming: 2 of 6" in caplog.text
    assert [t.tree_id for t in trees] == [t.id for t in tasks]
    assert one.read_text() == two.read_text()
    torn = tmp_path / "torn.jsonl"  # killed while appending its first tree: the only line is torn
    torn.write_text(one.read_text()[:300])
    explore_tasks(Rooms, tasks, ScriptedPolicy(), cfg, torn, seed=3, progress=False)
    assert torn.read_text() == one.read_text()
    calls = policy.calls
    explore_tasks(Rooms, tasks, policy, cfg, two, seed=3, progress=False)
    assert policy.calls == calls, "a finished run does no work"
    assert [t.seed for t in read_trees(two)] == [tree_seed(3, t) for t in tasks]
    with pytest.raises(QlassError, match="other exploration settings"):
        explore_tasks(Rooms, tasks, policy, small_cfg(candidates=2), two, seed=3, progress=False)
    with pytest.raises(QlassError, match="another run seed"):
        explore_tasks(Rooms, tasks, policy, cfg, two, seed=4, progress=False)


def test_trees_built_in_lockstep_equal_trees_built_one_at_a_time(tmp_path: Path) -> None:
    """``concurrency`` trees share batched policy calls (fewer calls), each on its own environment;
    every tree is the one built alone (records are appended as trees finish)."""
    tasks = Rooms().tasks("train")
    cfg = small_cfg(rollouts=2, probe=True)
    alone, together = ScriptedPolicy(), ScriptedPolicy()
    explore_tasks(Rooms, tasks, alone, cfg, tmp_path / "one.jsonl", seed=3, progress=False)
    explore_tasks(Rooms, tasks, together, cfg, tmp_path / "four.jsonl", seed=3, progress=False, concurrency=4)
    one = {t.tree_id: t.to_dict() for t in read_trees(tmp_path / "one.jsonl")}
    four = {t.tree_id: t.to_dict() for t in read_trees(tmp_path / "four.jsonl")}
    assert one == four and len(one) == len(tasks)
    assert together.calls < alone.calls / 2


@pytest.mark.slow
def test_lockstep_trees_with_a_real_hf_model_equal_trees_built_alone(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The same with a real (random, fp32) HF model: batched decoding of several trees' prompts
    (left-padded, different lengths) samples what each tree samples alone."""
    from qlass.policy.hf import HFPolicy

    tasks = Rooms().tasks("train")[:3]
    cfg = ExploreConfig(max_depth=2, candidates=2, max_new_tokens=6, max_steps=3, temperature=1.0)
    for k, concurrency in ((1, 1), (3, 3)):
        explore_tasks(Rooms, tasks, HFPolicy(tiny_model_dir, threads=1, cache_slots=8), cfg, tmp_path / f"{k}.jsonl",
                      seed=0, progress=False, concurrency=concurrency)
    one = {t.tree_id: t.to_dict() for t in read_trees(tmp_path / "1.jsonl")}
    three = {t.tree_id: t.to_dict() for t in read_trees(tmp_path / "3.jsonl")}
    assert one == three and sum(len(t["nodes"]) for t in one.values()) > 3 * 3


def explore_cmd(out: Path, delay: float) -> list[str]:
    return [sys.executable, "-m", "qlass", "explore", "--model", "test_explore:ScriptedPolicy",
            "--env", "test_explore:Rooms", "--set", "max_depth=3", "--set", "candidates=3", "--set", "max_steps=8",
            "--policy-arg", f"delay={delay}", "--seed", "5", "--out", str(out), "--no-progress"]


def test_a_wrong_policy_is_refused_before_the_settings_are_recorded(tmp_path: Path) -> None:
    """`qlass explore` hands exploration the policy's factory (a built-in policy loads after the output is locked),
    so the model and options are checked before: a trees file without a settings record (written before it
    existed, or by a library call without settings) whose trees are all finished recorded a misspelt option and
    exited 0, and the corrected rerun was then refused as other settings. Now both the built-in backend's and a
    user class's options are refused first, and nothing is recorded."""
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = tmp_path / "t.jsonl"
    assert subprocess.run(explore_cmd(out, 0.0), env=env, capture_output=True, text=True).returncode == 0
    settings_file(out).unlink()
    for model, option, message in (("test_explore:ScriptedPolicy", "dealy=0", "no option 'dealy'"),
                                   ("default", "smartt=0.5", "HFPolicy has no option 'smartt'"),
                                   (str(tmp_path / "nomodel"), "seed=1", "nomodel: not a model folder")):
        cmd = explore_cmd(out, 0.0)
        cmd[cmd.index("--model") + 1] = model
        cmd[cmd.index("--policy-arg") + 1] = option
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert not settings_file(out).exists()
    assert subprocess.run(explore_cmd(out, 0.0), env=env, capture_output=True, text=True).returncode == 0


@pytest.mark.slow
def test_kill_9_and_rerun_gives_the_uninterrupted_file(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    ref = tmp_path / "ref.jsonl"
    done = subprocess.run(explore_cmd(ref, 0.0), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "killed.jsonl"
    proc = subprocess.Popen(explore_cmd(out, 0.02), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out.exists() and out.read_text().count("\n") >= 2):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 2 <= len(read_jsonl(out, repair_tail=True)) < 6, "the run should have been killed part-way"
    again = subprocess.run(explore_cmd(out, 0.02), env=env, capture_output=True, text=True)  # same policy options
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr
    assert out.read_bytes() == ref.read_bytes()
    assert len(read_trees(out)) == 6


@pytest.mark.slow
@pytest.mark.sciworld
def test_real_sciworld_tree_with_tiny_hf_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The real simulator and a real (random) HF model: the expert graft gives a reward-1 leaf,
    every node replays to its stored observation, env steps meet the floor, Q data validates."""
    import functools

    from qlass.envs.base import make_env
    from qlass.policy.hf import HFPolicy
    from qlass.qdata import export_qdata, read_qdata

    make = functools.partial(make_env, "sciworld", step_limit=10)
    env = make()
    task = env.tasks("train", ["find-non-living-thing"])[0]
    cfg = ExploreConfig(max_depth=2, candidates=2, max_new_tokens=8, max_steps=4)
    out = tmp_path / "trees.jsonl"
    (tree,) = explore_tasks(make, [task], HFPolicy(tiny_model_dir, threads=1), cfg, out, seed=0, progress=False)
    kids = tree.children()
    assert tree.stats["expert_reward"] == 1.0 and tree.stats["best_reward"] == 1.0
    sampled = sum(n.source == "sample" for n in tree.nodes)  # a random model's 8 tokens are mostly cut off: dropped
    done = sampled + tree.stats["truncated"] + tree.stats["merged"] + tree.stats["dropped"]
    assert done == cfg.candidates * sum(n.expanded for n in tree.nodes)
    assert tree.stats["prompt_tokens"] > 0 and tree.stats["truncated"] > 0
    assert tree.stats["env_steps"] == sum(n.depth for n in tree.nodes if not kids[n.id] and n.id)
    for node in tree.nodes[1:]:
        env.reset(task)
        for n in tree.path(node.id):
            res = env.step(n.output)
        assert (res.observation, res.reward, res.done) == (node.observation, node.reward, node.done)
    env.close()
    export_qdata(out, tmp_path / "qdata.jsonl")
    recs = read_qdata(tmp_path / "qdata.jsonl")
    assert len(recs) == tree.edges and max(r["q"] for r in recs) == 1.0


# -- budget: caps on branches, the graft's share ------------------------------------------------
def dfs_expanded(tree: Tree) -> int:
    """Nodes the depth-limited search expanded (the graft expands only the root and expert nodes)."""
    return sum(1 for n in tree.nodes if n.expanded and n.source in ("sample", "rollout"))


@pytest.mark.parametrize("task", [0, 3, 5])
def test_graft_share_leaves_budget_for_the_depth_limited_search(task: int) -> None:
    whole = tree_for(task, candidates=3, max_branches=4, graft_share=1.0)
    assert whole.stats["stopped_by"] == "max_branches" and whole.stats["branches"] == 4
    assert dfs_expanded(whole) == 0, "the graft spent the whole budget: no search below its siblings"
    half = tree_for(task, candidates=3, max_branches=4, graft_share=0.5)
    assert half.stats["graft_stopped_by"] == "max_branches"
    assert dfs_expanded(half) >= 1 and half.stats["branches"] == 4
    grafted = [n for n in half.nodes if n.source == "sample" and half.nodes[n.parent].source in ("root", "expert")]
    assert len([n for n in grafted if not n.done]) == 2, "the graft may roll out half of the 4 branches"
    replay_check(half)


@pytest.mark.parametrize("task", [1, 2, 4])
def test_the_graft_goes_on_with_what_the_search_left(task: int) -> None:
    """Here the graft's siblings all fail, so the search below them has nothing to expand: the rest of
    the budget goes back to the expert steps not yet tried."""
    tree = tree_for(task, candidates=3, max_branches=4, graft_share=0.5)
    assert dfs_expanded(tree) == 0 and tree.stats["graft_stopped_by"] == "max_branches"
    assert tree.stats["branches"] == 4 and tree.stats["stopped_by"] == "max_branches"
    assert len({n.parent for n in tree.nodes if n.source == "sample"}) >= 2


def test_max_branches_counts_rolled_out_branches_not_nodes() -> None:
    for cap in (1, 3):
        tree = tree_for(4, expert_graft=False, max_branches=cap)
        heads = [n for n in tree.nodes if n.source == "sample"]
        assert tree.stats["stopped_by"] == "max_branches"
        assert tree.stats["branches"] == cap == sum(1 for n in heads if not n.done)
        assert tree.stats["branches"] + tree.stats["terminal_alternatives"] == len(heads)
    assert len(tree.nodes) > 3 * 3, "a branch costs its whole rollout in nodes, not one"


# -- every distinct alternative; the order of the expert steps ----------------------------------
def expert_step_samples(tree: Tree, parent: int, n: int) -> set[str]:
    """The distinct actions the explorer's seeded policy call at ``parent`` gave (same seed, same history)."""
    outs = ScriptedPolicy().sample([tree.history(parent)], n, 0.7, 128,
                                   seed=stable_seed(tree.seed, "expand", parent))[0]
    return {normalise_action(c.text) for c in outs}


def test_every_distinct_sample_at_an_expert_step_becomes_a_sibling() -> None:
    kept_more = 0
    for task in range(6):
        every, one = tree_for(task, candidates=4), tree_for(task, candidates=4, expert_siblings=1)
        assert every.config["expert_siblings"] is None
        for tree, limit in ((every, None), (one, 1)):
            kids = tree.children()
            for e in (n for n in tree.nodes if n.source == "expert"):
                siblings = {normalise_action(tree.nodes[c].output) for c in kids[e.parent] if c != e.id}
                sampled = expert_step_samples(tree, e.parent, 4) - {normalise_action(e.output)}
                if limit is None:
                    assert siblings == sampled
                else:
                    assert len(siblings) == min(1, len(sampled)) and siblings <= sampled
        kept_more += sum(n.source == "sample" for n in every.nodes) > sum(n.source == "sample" for n in one.nodes)
        assert one.stats["dropped"] >= every.stats["dropped"] == 0
    assert kept_more >= 3


class ScoringPolicy(ScriptedPolicy):
    """ScriptedPolicy that also reports its own log-probability of an output's action (teacher forcing)."""

    def score_outputs(self, histories: Sequence[History], outputs: Sequence[str]) -> list[tuple[float, int]]:
        total = sum(self.weights)
        out = []
        for history, output in zip(histories, outputs, strict=True):
            action = parse_action(output)
            drawn = self.weights[self.ACTIONS.index(action)] / total if action in self.ACTIONS else 0.0
            sensible = self.sensible(history)
            p = (1 - self.invalid) * ((1 - self.smart) * drawn + self.smart * (drawn if sensible is None else
                                                                                float(action == sensible)))
            out.append((math.log(p) if p > 0 else -1e9, len(output.split())))
        return out


def test_uncertain_first_gives_siblings_to_the_least_likely_expert_steps_first() -> None:
    policy = ScoringPolicy()
    tree = tree_for(0, policy=policy, expert_order="uncertain-first", max_branches=2, graft_share=0.5)
    expert = [n for n in tree.nodes if n.source == "expert"]
    scored = policy.score_outputs([tree.history(e.parent) for e in expert], [e.output for e in expert])
    logprobs = [lp for lp, _ in scored]
    assert tree.stats["expert_logprobs"] == [round(lp, 4) for lp in logprobs]
    order = sorted(range(len(expert)), key=lambda i: (logprobs[i], i))
    assert tree.stats["expert_order"] == [expert[i].depth for i in order] != [1, 2, 3, 4]
    first = min(n.id for n in tree.nodes if n.source == "sample")
    assert tree.nodes[first].parent == expert[order[0]].parent, "the least likely expert step is sampled first"
    assert tree.stats["score_tokens"] == sum(len(e.output.split()) for e in expert)
    with pytest.raises(QlassError, match="expert_order=uncertain-first"):
        tree_for(0, expert_order="uncertain-first")


def grafted_siblings(tree: Tree) -> list[tuple[int, str]]:
    """(expert step's parent, action) of the sampled siblings of expert steps, in creation order."""
    expert_ids = {n.id for n in tree.nodes if n.source in ("root", "expert")}
    return [(n.parent, normalise_action(n.output)) for n in tree.nodes
            if n.source == "sample" and n.parent in expert_ids]


def test_expert_order_all_gives_every_step_a_sibling_before_any_gets_a_second() -> None:
    for task in range(6):
        siblings = grafted_siblings(tree_for(task, candidates=4, expert_order="all"))
        parents = [p for p, _ in siblings]
        steps = len(set(parents))
        assert len(set(parents[:steps])) == steps, f"task {task}: {parents}"
        reordered = grafted_siblings(tree_for(task, candidates=4))
        assert sorted(siblings) == sorted(reordered), "the same siblings, reordered"
    root_first = tree_for(0, candidates=4)
    parents = [n.parent for n in root_first.nodes
               if n.source == "sample" and root_first.nodes[n.parent].source != "sample"]
    assert parents[0] == parents[1], "root-first grows all of a step's siblings before the next step"


# -- candidate diversity --------------------------------------------------------------------------
class Obliging(ScriptedPolicy):
    """ScriptedPolicy that follows a request for a different action (records every history it reads)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.seen: list[History] = []

    def _one(self, history: History, rng: random.Random) -> Completion:
        self.seen.append(history)
        avoid = re.findall(r"'([^']*)'", history[-1].content.partition("must differ from")[2])
        for _ in range(20):
            comp = super()._one(history, rng)
            if parse_action(comp.text) not in avoid:
                break
        return comp


def test_diversity_prompt_extends_the_last_user_turn() -> None:
    history = [Message("system", "s"), Message("user", "Task: x"), Message("assistant", "Thought: a\nAction: look"),
               Message("user", "Observation: a room")]
    out = diversity_prompt(history, ["Thought: a\nAction: go to hall", "Thought: b\nAction: go to hall", "no action"])
    assert out[:3] == history[:3] and out[3].role == "user"
    assert out[3].content == ("Observation: a room\n\nGive another reasonable response. Its action must differ "
                              "from each of these actions: 'go to hall', 'no action'.")
    assert diversity_prompt(history, []) == history and history[3].content == "Observation: a room"
    with pytest.raises(ValueError, match="no user turn"):
        diversity_prompt([Message("assistant", "x")], ["Action: look"])


def test_diverse_sampling_asks_for_other_actions_and_the_tree_keeps_the_plain_history() -> None:
    plain, diverse = Obliging(), Obliging()
    trees = {False: [tree_for(t, policy=plain, candidates=3) for t in range(6)],
             True: [tree_for(t, policy=diverse, candidates=3, diverse=True) for t in range(6)]}
    asked = [h for h in diverse.seen if "must differ from" in h[-1].content]
    assert asked and not any("must differ from" in h[-1].content for h in plain.seen)
    for tree in trees[True]:
        assert not any("must differ" in m.content for n in tree.nodes for m in tree.history(n.id))
        expert = next(n for n in tree.nodes if n.source == "expert")  # its step was sampled with the request
        assert any(f"'{expert.action}'" in h[-1].content for h in asked)

    def merged(flag: bool) -> int:
        return sum(t.stats["merged"] for t in trees[flag])

    def siblings(flag: bool) -> int:
        return sum(n.source == "sample" for t in trees[flag] for n in t.nodes)

    assert merged(True) < merged(False) and siblings(True) > siblings(False)


# -- terminal alternatives, probes -------------------------------------------------------------
LOCK_BREAKER = [1, 1, 1, 1, 0, 6, 1, 0]  # mostly "open chest"; rooms/2 keeps its chest in the hall


def test_terminal_alternatives_are_leaves_without_rollout() -> None:
    policy = ScriptedPolicy(weights=LOCK_BREAKER, smart=0.0, invalid=0.0)
    tree = tree_for(2, expert_graft=False, policy=policy, candidates=4)
    kids = tree.children()
    terminal = [n for n in tree.nodes if n.source == "sample" and n.done]
    assert terminal and tree.stats["terminal_alternatives"] == len(terminal)
    for n in terminal:
        assert not kids[n.id] and n.pruned == (n.reward == 0.0) and n.q == n.reward
    assert tree.stats["branches"] == sum(1 for n in tree.nodes if n.source == "sample" and not n.done)
    assert tree.stats["rollouts"] == tree.stats["branches"]


def test_probe_makes_terminal_alternatives_leaves_before_any_rollout() -> None:
    def leaves(tree: Tree) -> int:
        return sum(1 for n in tree.nodes if n.source == "sample" and n.done)

    gained = 0
    for seed in (3, 4, 5, 6):
        cfg = {"expert_graft": False, "candidates": 4, "max_branches": 1, "seed": seed}
        plain = tree_for(2, policy=ScriptedPolicy(weights=LOCK_BREAKER, smart=0.0, invalid=0.0), **cfg)
        probed = tree_for(2, policy=ScriptedPolicy(weights=LOCK_BREAKER, smart=0.0, invalid=0.0), probe=True, **cfg)
        assert probed.stats["branches"] == plain.stats["branches"] == 1
        assert leaves(probed) >= leaves(plain)
        gained += leaves(probed) - leaves(plain)
        assert probed.stats["probe_steps"] > 0 == plain.stats["probe_steps"]
        assert sum(n.env_steps for n in probed.nodes) + probed.stats["probe_steps"] == probed.stats["env_steps"]
        replay_check(probed)
    assert gained >= 2, "without probes the branch cap stops the tree before its terminal alternatives"
    for env in (Rooms(), Snapshotting()):  # probes leave the cursor off the tree; later branches still replay right
        replay_check(tree_for(2, env=env, probe=True, candidates=4))


# -- K rollouts per branch ----------------------------------------------------------------------
def test_k_rollouts_per_branch_back_up_as_their_mean() -> None:
    mixed = 0
    for task in range(6):
        tree = tree_for(task, expert_graft=False, rollouts=3)
        replay_check(tree)
        kids = tree.children()
        for n in tree.nodes:
            if n.rollout:
                assert n.source == "rollout" and not n.expanded
            if n.source != "sample" or n.done:
                continue
            rolls = [c for c in kids[n.id] if tree.nodes[c].source == "rollout"]
            assert sorted(tree.nodes[c].rollout for c in rolls) == [0, 1, 2]
            outcomes = []
            for head in rolls:
                chain = [tree.nodes[head]]
                while any(tree.nodes[c].source == "rollout" for c in kids[chain[-1].id]):
                    chain.append(next(tree.nodes[c] for c in kids[chain[-1].id] if tree.nodes[c].source == "rollout"))
                outcomes.append(chain[-1].reward)
                assert chain[-1].done or chain[-1].depth == 8
            mixed += len({o > 0 for o in outcomes}) > 1
            assert n.pruned == (max(outcomes) == 0.0)
            others = [tree.nodes[c].q for c in kids[n.id] if c not in rolls]
            mean = sum(tree.nodes[c].q for c in rolls) / 3
            assert n.q == pytest.approx(0.9 * max(others + [mean]))
        records = qdata_records(tree)
        assert {r["node_id"] for r in records} == {n.id for n in tree.nodes[1:] if n.rollout == 0}
        assert tree.stats["rollouts"] == 3 * tree.stats["branches"]
    assert mixed >= 2, "some branches should have both failed and successful rollouts"


# -- which tasks are explored (B2) ----------------------------------------------------------------
def test_exploration_tasks_skip_per_type_and_leave_out_the_expert_tasks(tmp_path: Path) -> None:
    tasks = [Task(f"x/{kind}/{i}", "x", "train", kind) for kind in ("a", "b") for i in range(4)]
    assert [t.id for t in exploration_tasks(tasks, skip=2)] == ["x/a/2", "x/a/3", "x/b/2", "x/b/3"]
    assert [t.id for t in exploration_tasks(tasks, skip=1, limit=3)] == ["x/a/1", "x/b/1", "x/a/2"]
    env = Corridor()  # expert data as SFT reads it (Rooms' prompt has a system turn, which that format has not)
    all_tasks = env.tasks("train")
    export = export_expert(env, all_tasks, per_task_type=4)
    save_trajectories(tmp_path / "expert.json", export.trajectories)
    expert = expert_task_ids(tmp_path / "expert.json")
    assert len(expert) == 4
    chosen = exploration_tasks(all_tasks, exclude=expert)
    assert {t.id for t in chosen}.isdisjoint(expert) and len(chosen) == 2
    (tmp_path / "anon.json").write_text(json.dumps([{"id": "t1", "conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "Thought: x\nAction: look"}]}]))
    with pytest.raises(QlassError, match="no 'task' field"):
        expert_task_ids(tmp_path / "anon.json")


def test_pipeline_explores_no_expert_task(tmp_path: Path) -> None:
    env = Corridor()
    all_tasks = env.tasks("train")
    save_trajectories(tmp_path / "expert.json", export_expert(env, all_tasks, per_task_type=3).trajectories)
    config = {"run_dir": str(tmp_path / "run"), "env": "toy_envs:Corridor",
              "expert": {"data": str(tmp_path / "expert.json")},
              "explore": {"exclude_expert": True, "limit": 2}}
    chosen = _exploration_tasks(resolve(config, "cfg.yaml"), all_tasks, "cfg.yaml")
    assert [t.id for t in chosen] == ["corridor/3", "corridor/4"]
    config["expert"] = {}
    with pytest.raises(QlassError, match="explore.exclude_expert: no expert data"):
        _exploration_tasks(resolve(config, "cfg.yaml"), all_tasks, "cfg.yaml")


class Cutting(ScriptedPolicy):
    """ScriptedPolicy whose candidates after the first are cut off by the token limit."""

    def sample(self, histories, n=1, temperature=0.0, max_new_tokens=128, seed=None):
        out = super().sample(histories, n, temperature, max_new_tokens, seed)
        return [[c if j == 0 else Completion(c.text[:-3], c.prompt_tokens, c.completion_tokens, truncated=True)
                 for j, c in enumerate(row)] for row in out]


def test_truncated_samples_never_become_alternatives() -> None:
    tree = tree_for(0, expert_graft=False, policy=Cutting(), candidates=3)
    heads = [n for n in tree.nodes if n.source == "sample"]
    assert tree.stats["truncated"] == 2 * sum(n.expanded for n in tree.nodes) > 0
    kids = tree.children()
    assert all(len([c for c in kids[n.id] if tree.nodes[c].source == "sample"]) <= 1 for n in tree.nodes)
    assert heads and all(n.action in ScriptedPolicy.ACTIONS or n.action is None for n in heads)


class CutRollout:
    """Corridor expansions go east or look; a rollout's first step is cut off mid-action by the token limit
    (the environment gets no action and answers with its format hint), its later steps go east."""

    def sample(self, histories, n=1, temperature=0.0, max_new_tokens=128, seed=None):
        out = []
        for h in histories:
            turns = sum(m.role == "assistant" and m.content.startswith("Thought") for m in h)
            if n > 1:
                out.append([Completion("Thought: a\nAction: go east", 5, 5),
                            Completion("Thought: b\nAction: look", 5, 5)][:n])
            elif turns == 1:
                out.append([Completion("Thought: hmm\nAction: go ea", 5, 8, truncated=True)])
            else:
                out.append([Completion("Thought: go\nAction: go east", 5, 5)])
        return out


def test_a_node_cut_off_by_the_token_limit_is_replayed_as_the_environment_got_it() -> None:
    """Replaying a path sent the cut node's raw text ("Action: go ea"), which the environment answers
    otherwise than the text it got: exploration stopped with "replaying ... diverged" at that task,
    on every rerun."""
    env = Corridor()
    tree = build_tree(env, CutRollout(), env.tasks("train")[2], ExploreConfig(expert_graft=False, max_depth=4,
                                                                               max_steps=10), seed=0)
    cut = [n for n in tree.nodes if n.output.endswith("Action: go ea")]
    assert cut and all(n.action is None and n.observation.startswith(FORMAT_HINT) for n in cut)
    replayed = [n for n in tree.nodes if n.parent is not None and tree.nodes[n.parent] in cut]
    assert replayed and len(tree.nodes) > 10  # nodes below a cut one were reached by replaying it


def test_new_options_enter_the_digest_and_resume_refuses_mixed_settings(tmp_path: Path) -> None:
    legacy = small_cfg(expert_siblings=1)
    before = {k: v for k, v in to_dict(legacy).items() if k not in ("expert_order", "graft_share", "diverse", "probe",
                                                                     "rollouts", "max_branches", "paraphrase")}
    digest = hashlib.sha256(json.dumps(before, sort_keys=True, default=str).encode()).hexdigest()[:12]
    assert explore_digest(legacy) == digest, "trees written before the new options resume under the same settings"
    changed = [small_cfg(expert_siblings=1, **{k: v}) for k, v in (("expert_order", "all"), ("graft_share", 0.5),
               ("diverse", True), ("probe", True), ("rollouts", 2), ("max_branches", 9))] + [small_cfg()]
    assert len({explore_digest(c) for c in changed} | {digest}) == len(changed) + 1
    out = tmp_path / "trees.jsonl"
    tasks = Rooms().tasks("train")[:2]
    explore_tasks(Rooms, tasks, ScriptedPolicy(), small_cfg(rollouts=2), out, seed=1, progress=False)
    with pytest.raises(QlassError, match="other exploration settings"):
        explore_tasks(Rooms, tasks, ScriptedPolicy(), small_cfg(), out, seed=1, progress=False)


def test_exploring_more_tasks_with_other_settings_into_a_file_is_refused_before_it_mixes(tmp_path: Path) -> None:
    """New tasks explored into a file whose trees were made with other settings made a file that qdata,
    self-train and the explore resume itself refuse (read_trees, one run's trees per file): refused up front."""
    out = tmp_path / "trees.jsonl"
    tasks = Rooms().tasks("train")
    explore_tasks(Rooms, tasks[:2], ScriptedPolicy(), small_cfg(rollouts=2), out, seed=1, progress=False)
    before = out.read_text()
    with pytest.raises(QlassError, match=r"tree 'rooms/0' was made with other exploration settings \(rollouts: 2 → 1"):
        explore_tasks(Rooms, tasks[2:4], ScriptedPolicy(), small_cfg(), out, seed=1, progress=False)
    assert out.read_text() == before
    explore_tasks(Rooms, tasks[:4], ScriptedPolicy(), small_cfg(rollouts=2), out, seed=1, progress=False)
    assert len(read_trees(out)) == 4, "the same settings add the new tasks"


def test_a_library_call_without_settings_cannot_add_to_trees_made_with_them(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """explore_tasks without ``settings`` added another policy's trees to a file whose trees.config.yaml records
    a model: the settings were checked only when given. It is refused; a file made without them warns."""
    out, tasks = tmp_path / "trees.jsonl", Rooms().tasks("train")
    explore_tasks(Rooms, tasks[:1], ScriptedPolicy(), small_cfg(), out, progress=False,
                  settings={"model": "m", "env": "rooms"})
    with pytest.raises(QlassError, match=r"was made with 'model', 'env' recorded in .*trees\.config\.yaml, and this "
                                         r"run gives none"):
        explore_tasks(Rooms, tasks[:2], ScriptedPolicy(), small_cfg(), out, progress=False)
    assert len(read_trees(out)) == 1
    explore_tasks(Rooms, tasks[:1], ScriptedPolicy(), small_cfg(), tmp_path / "bare.jsonl", progress=False)
    assert "no settings given (model, env, env_args, policy)" in caplog.text


class AllCut(ScriptedPolicy):
    """ScriptedPolicy whose every output is cut off by the token limit."""

    def sample(self, histories, n=1, temperature=0.0, max_new_tokens=128, seed=None):
        return [[Completion(c.text[:-3], c.prompt_tokens, c.completion_tokens, truncated=True) for c in row]
                for row in super().sample(histories, n, temperature, max_new_tokens, seed)]


def test_trees_without_an_alternative_are_one_warning_and_so_is_a_qnet_without_siblings(
        tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Every sampled output cut off by max_new_tokens left trees of the expert chain alone, and a QNet trained on
    zero sibling pairs: the summary said nodes and edges, and the QNet's log 'n/a over 0 pairs', nothing why."""
    from qlass.qdata import export_qdata
    from qlass.training.configs import QNetTrainConfig
    from qlass.training.qnet import train_qnet

    env = Rooms()
    trees = explore_tasks(Rooms, env.tasks("train")[:2], AllCut(), small_cfg(), tmp_path / "trees.jsonl")
    assert all(t.stats["branches"] == 0 and t.stats["truncated"] > 0 for t in trees)
    assert "no tree holds a sampled alternative (" in caplog.text and "cut off by max_new_tokens" in caplog.text
    export_qdata(tmp_path / "trees.jsonl", tmp_path / "q.jsonl")
    caplog.clear()
    train_qnet(tmp_path / "q.jsonl", tiny_model_dir, tmp_path / "qnet",
               QNetTrainConfig(epochs=1, batch_size=4, max_length=512, max_action_tokens=32, val_fraction=0.0,
                               warmup_ratio=0.0, threads=1))
    assert "no training record has a sibling" in caplog.text
