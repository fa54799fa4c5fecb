"""Tree-guided self-training (``qlass.self_train``, ``qlass self-train``): the three process rewards on a
hand-built tree, the selection, the fine-tuning on expert + selection with the tiny model, resumption
and named errors."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from toy_envs import Corridor

from qlass.config import build
from qlass.data import load_trajectories, save_trajectories
from qlass.errors import DataError, QlassError
from qlass.expert import export_expert
from qlass.jsonl import write_jsonl
from qlass.rft import RFTConfig, run_rft
from qlass.self_train import (
    SelfTrainConfig,
    guided_path,
    process_rewards,
    select_trajectories,
    self_train,
)
from qlass.training.sft import SFTConfig
from qlass.tree import Node, Tree, compute_q, mean_leaf_outcome

TESTS = Path(__file__).resolve().parent
TINY_SFT = SFTConfig(epochs=1, lr=1e-3, batch_size=2, micro_batch=2, val_fraction=0.0, threads=1)


def _step(i: int, parent: int, depth: int, action: str, reward: float, done: bool, source: str = "sample") -> Node:
    return Node(i, parent, depth, f"Thought: try {action}.\nAction: {action}", action, f"after {action} ({i})",
                reward, done, source)


def hand_tree(task: str = "corridor/1", gamma: float = 0.9) -> Tree:
    """root ── 1 go west (0.0) ── 3 go east (1.0, done) · 4 go west (0.0, done) · 5 look (0.0, done)
            ├─ 2 go east (0.5) ── 6 go east (0.6, done)
            └─ 7 look (0.7)    ── 8 go west (0.2, done)

    Q (gamma 0.9, intermediate rewards zeroed): 1 → 0.9, 2 → 0.54, 7 → 0.18: Q walks 1, 3 (outcome 1.0).
    Average reward: 1 → 1/3, 2 → 0.6, 7 → 0.2: it walks 2, 6 (outcome 0.6).
    Reward: 1 → 0.0, 2 → 0.5, 7 → 0.7: it walks 7, 8 (outcome 0.2)."""
    nodes = [Node(0, None, 0, "", None, "Task: reach the goal 2 rooms east. You are in room 0.", 0.0, False, "root"),
             _step(1, 0, 1, "go west", 0.0, False), _step(2, 0, 1, "go east", 0.5, False),
             _step(3, 1, 2, "go east", 1.0, True), _step(4, 1, 2, "go west", 0.0, True),
             _step(5, 1, 2, "look", 0.0, True),
             _step(6, 2, 2, "go east", 0.6, True), _step(7, 0, 1, "look", 0.7, False),
             _step(8, 7, 2, "go west", 0.2, True)]
    return Tree(task, task, "corridor", "train", "walk", Corridor().prompt(), nodes, config={"gamma": gamma})


def test_the_three_process_rewards_on_a_hand_built_tree() -> None:
    tree = hand_tree()
    q = process_rewards(tree, "q")
    assert q == pytest.approx({1: 0.9, 2: 0.54, 3: 1.0, 4: 0.0, 5: 0.0, 6: 0.6, 7: 0.18, 8: 0.2})
    assert q == compute_q(tree)  # the Q data's backup (Eq. 7)
    assert process_rewards(tree, "avg") == pytest.approx({1: 1 / 3, 2: 0.6, 3: 1.0, 4: 0.0, 5: 0.0, 6: 0.6, 7: 0.2,
                                                           8: 0.2})
    assert process_rewards(tree, "reward") == {1: 0.0, 2: 0.5, 3: 1.0, 4: 0.0, 5: 0.0, 6: 0.6, 7: 0.7, 8: 0.2}
    walks = {kind: [n.id for n in guided_path(tree, process_rewards(tree, kind))] for kind in ("q", "avg", "reward")}
    assert walks == {"q": [1, 3], "avg": [2, 6], "reward": [7, 8]}
    # the trees' own gamma is the default; another one may be asked for
    assert process_rewards(hand_tree(gamma=0.5), "q")[1] == pytest.approx(0.5)
    assert process_rewards(tree, "q", SelfTrainConfig(gamma=0.5))[2] == pytest.approx(0.3)
    # intermediate rewards kept as score increments: 2 is worth its +0.5 step plus 0.9 x (0.6 - 0.5)
    assert process_rewards(tree, "q", SelfTrainConfig(keep_intermediate=True))[2] == pytest.approx(0.5 + 0.9 * 0.1)


def test_the_walk_prefers_the_agents_own_nodes_to_the_grafted_expert_chain(tmp_path: Path) -> None:
    tree = hand_tree()
    tree.nodes[1].source = tree.nodes[3].source = "expert"  # the best branch is the expert's
    q = process_rewards(tree, "q")
    assert [n.id for n in guided_path(tree, q)] == [1, 3]
    assert [n.id for n in guided_path(tree, q, prefer_agent=True)] == [2, 6]
    write_jsonl(tmp_path / "trees.jsonl", [tree.to_dict()])
    (traj,), summary = select_trajectories(tmp_path / "trees.jsonl", "q")
    assert traj.meta["nodes"] == [2, 6] and summary["expert_steps"] == 0 and summary["steps"] == 2
    (traj,), summary = select_trajectories(tmp_path / "trees.jsonl", "q", SelfTrainConfig(prefer_agent=False))
    assert traj.meta["nodes"] == [1, 3] and summary["expert_steps"] == 2
    tree.nodes[2].source = tree.nodes[7].source = "expert"  # the root offers only expert steps: one is taken
    write_jsonl(tmp_path / "trees.jsonl", [tree.to_dict()])
    (traj,), summary = select_trajectories(tmp_path / "trees.jsonl", "q")
    assert traj.meta["nodes"] == [1, 4] and summary["expert_steps"] == 1, "then the agent's own, even if worse"


def test_average_reward_is_the_mean_over_every_leaf_below_at_any_depth() -> None:
    tree = hand_tree()
    tree.nodes += [_step(9, 6, 3, "look", 1.0, True)]  # 6 is no longer a leaf: 2 now has one leaf, 9
    tree.nodes[6].done = False
    avg = mean_leaf_outcome(tree)
    assert avg[6] == avg[2] == 1.0
    tree.nodes += [_step(10, 2, 2, "go west", 0.0, True)]  # a second leaf under 2, one level up
    assert mean_leaf_outcome(tree)[2] == pytest.approx(0.5)
    assert 0 not in mean_leaf_outcome(tree), "the root has no action, hence no process reward"


def test_ties_go_to_the_earlier_child_and_a_bare_root_gives_no_trajectory(tmp_path: Path) -> None:
    tree = hand_tree()
    assert [n.id for n in guided_path(tree, {i: 0.0 for i in range(1, 9)})] == [1, 3]
    bare = Tree("corridor/2", "corridor/2", "corridor", "train", "walk", Corridor().prompt(), tree.nodes[:1])
    write_jsonl(tmp_path / "trees.jsonl", [hand_tree().to_dict(), bare.to_dict()])
    selected, summary = select_trajectories(tmp_path / "trees.jsonl", "q")
    assert [t.task for t in selected] == ["corridor/1"]
    assert summary["tasks"][1] == {"tree_id": "corridor/2", "task": "corridor/2", "nodes": [], "kept": False,
                                   "why": "the tree has no step below its root"}


def test_selected_trajectory_is_the_conversation_along_the_path(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "trees.jsonl", [hand_tree("corridor/4").to_dict(), hand_tree("corridor/1").to_dict()])
    selected, summary = select_trajectories(tmp_path / "trees.jsonl", "avg")
    assert [t.task for t in selected] == ["corridor/1", "corridor/4"]  # tree-id order
    traj = selected[0]
    tree = hand_tree()
    assert traj.messages == tree.history(6) and traj.id == "corridor/1#self-train-avg"
    assert [m.content for m in traj.messages if m.role == "assistant"][-2:] == [tree.nodes[2].output,
                                                                                   tree.nodes[6].output]
    assert (traj.reward, traj.success, [s.action for s in traj.steps]) == (0.6, False, ["go east", "go east"])
    assert traj.meta == {"source": "self-train", "process_reward": "avg", "tree_id": "corridor/1", "nodes": [2, 6]}
    assert summary["mean_outcome"] == pytest.approx(0.6) and summary["successes"] == 0
    assert summary["tasks"][0]["values"] == pytest.approx([0.6, 0.6])
    # min_reward leaves out a selection whose outcome is too low, saying why
    kept, summary = select_trajectories(tmp_path / "trees.jsonl", "reward", SelfTrainConfig(min_reward=0.5))
    assert kept == [] and summary["tasks"][0]["why"] == "outcome below min_reward 0.5"


def _expert(path: Path) -> Path:
    env = Corridor()
    save_trajectories(path, export_expert(env, env.tasks("train"), per_task_type=6).trajectories)
    return path


def test_self_train_fine_tunes_on_expert_plus_selection_and_resumes(tiny_model_dir: Path, tmp_path: Path) -> None:

    expert = _expert(tmp_path / "expert.json")
    # corridor/0 needs one step east: its tree's best path is the expert's own action, a duplicate
    first = Tree("corridor/0", "corridor/0", "corridor", "train", "walk", Corridor().prompt(),
                 [Node(0, None, 0, "", None, "Task: reach the goal 1 rooms east. You are in room 0.", 0.0, False,
                       "root"),
                  _step(1, 0, 1, "look", 0.0, False), _step(2, 0, 1, "go east", 1.0, True),
                  _step(3, 1, 2, "go east", 1.0, True)])
    trees = tmp_path / "trees.jsonl"
    write_jsonl(trees, [first.to_dict(), hand_tree().to_dict()])
    out = tmp_path / "q"
    # killed (SIGKILL) as its fine-tuning starts: no cleanup runs
    code = (f"import os, sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\nimport qlass.training.sft\n"
            "qlass.training.sft.train_sft = lambda *args, **kwargs: os.kill(os.getpid(), 9)\n"
            "from qlass.self_train import self_train\nfrom test_self_train import TINY_SFT\n"
            f"self_train({str(trees)!r}, {str(expert)!r}, {str(tiny_model_dir)!r}, {str(out)!r}, 'q', TINY_SFT)\n")
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert killed.returncode == -9, killed.stderr[-3000:]
    written = (out / "data.json").read_bytes()
    agent, data, summary = self_train(trees, expert, tiny_model_dir, out, "q", TINY_SFT)
    assert (out / "data.json").read_bytes() == written, "the rerun selects the same data"
    assert (agent / ".qlass-complete").exists()
    ids = [t.id for t in load_trajectories(out / "data.json")]
    assert ids == [f"corridor/{i}" for i in range(6)] + ["corridor/1#self-train-q"]
    assert (data.added, data.duplicates) == (1, 1)
    saved = json.loads((out / "selection.json").read_text())
    assert saved["selected"] == 2 and saved["duplicates_of_expert"] == 1 and saved["mean_outcome"] == 1.0
    assert saved == summary
    self_train(trees, expert, tiny_model_dir, out, "q", TINY_SFT)  # complete: nothing to redo
    with pytest.raises(QlassError, match="trained on other data than these settings give"):
        self_train(trees, expert, tiny_model_dir, out, "reward", TINY_SFT)


def test_bad_self_training_inputs_are_named_errors(tiny_model_dir: Path, tmp_path: Path) -> None:
    trees = tmp_path / "trees.jsonl"
    write_jsonl(trees, [hand_tree().to_dict()])
    expert = _expert(tmp_path / "expert.json")
    with pytest.raises(QlassError, match=r"unknown process reward 'value'; one of q, avg, reward"):
        select_trajectories(trees, "value")
    with pytest.raises(DataError, match=r"nothere\.jsonl: file not found"):
        select_trajectories(tmp_path / "nothere.jsonl", "q")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl: no trees"):
        select_trajectories(tmp_path / "empty.jsonl", "q")
    bad = hand_tree().to_dict()
    bad["nodes"][3]["reward"] = 2.0
    write_jsonl(tmp_path / "bad.jsonl", [bad])
    with pytest.raises(DataError, match=r"bad\.jsonl: line 1 \(tree 'corridor/1'\), nodes\[3\]: field 'reward'"):
        select_trajectories(tmp_path / "bad.jsonl", "avg")
    with pytest.raises(QlassError, match=r"nomodel: the model to fine-tune is not a local model folder"):
        self_train(trees, expert, tmp_path / "nomodel", tmp_path / "a", "q", TINY_SFT)
    capped = dataclasses.replace(TINY_SFT, max_trajectories=2)  # it cut the expert and own data together
    with pytest.raises(QlassError, match=r"self_train: sft_cfg\.max_trajectories \(2\) would cap the expert data"):
        self_train(trees, expert, tiny_model_dir, tmp_path / "capped", "q", capped)
    with pytest.raises(QlassError, match=r"run_rft: sft_cfg\.max_trajectories \(2\) would cap the expert data"):
        run_rft("nowhere:Policy", expert, tiny_model_dir, "corridor", tmp_path / "rft", RFTConfig(), capped)
    assert not (tmp_path / "capped").exists() and not (tmp_path / "rft").exists()
    with pytest.raises(DataError, match=r"noexpert\.json: file not found"):
        self_train(trees, tmp_path / "noexpert.json", tiny_model_dir, tmp_path / "b", "q", TINY_SFT)
    (tmp_path / "d").mkdir()  # the expert data given as OUT/data.json was replaced by expert + selection
    inside = tmp_path / "d" / "data.json"
    inside.write_bytes(expert.read_bytes())
    with pytest.raises(QlassError, match=r"d/data\.json: is also an input of this command"):
        self_train(trees, inside, tiny_model_dir, tmp_path / "d", "q", TINY_SFT)
    assert inside.read_bytes() == expert.read_bytes() and sorted(os.listdir(tmp_path / "d")) == ["data.json"]
    (tmp_path / "ev").mkdir()  # an evaluation folder as OUT: data.json, selection.json and sft/ went into it
    (tmp_path / "ev" / "records.jsonl").write_text("")
    with pytest.raises(QlassError, match=r"ev: holds an evaluation run \(records\.jsonl\); qlass self-train writes"):
        self_train(trees, expert, tiny_model_dir, tmp_path / "ev", "q", TINY_SFT)
    assert os.listdir(tmp_path / "ev") == ["records.jsonl"]
    for options, message in (({"gamma": 1.5}, r"gamma must be in \[0, 1\]"), ({"min_reward": -1}, "min_reward must be"),
                             ({"gama": 0.5}, "did you mean 'gamma'")):
        with pytest.raises(QlassError, match=message):
            build(SelfTrainConfig, options, "self_train")
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cli = subprocess.run([sys.executable, "-m", "qlass", "self-train", str(trees), "--reward", "Q", "--expert",
                          str(expert), "--out", str(tmp_path / "c")], env=env, capture_output=True, text=True)
    assert cli.returncode == 2 and "error: unknown process reward 'Q'; one of q, avg, reward" in cli.stderr
    assert not (tmp_path / "c").exists()


def test_the_shipped_self_training_config_runs_all_three_rewards_and_rft_without_a_qnet() -> None:
    from qlass.config import load_yaml
    from qlass.pipeline import _uses_qnet
    from qlass.pipeline_config import resolve

    path = TESTS.parent / "configs" / "self-train.yaml"
    r = resolve(load_yaml(path), str(path))
    assert r.self_train.stage.rewards == ["q", "avg", "reward"] and r.rft is not None
    assert not _uses_qnet(r)
    assert r.rft.sft == r.sft == r.self_train.sft  # every agent is fine-tuned like the SFT agent
