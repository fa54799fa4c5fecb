"""Self-training guided by the exploration trees, with three process rewards (paper Fig. 4).

The paper compares three process rewards as guides for generating self-training data (N = 1
trajectory per task, Table 5), all read here from the same stage-2 trees (``trees.jsonl``):

- ``q``: the Q value of Eq. 7 (:func:`qlass.tree.compute_q`, the backup the Q dataset uses: the
  best branch under a node, discounted by gamma per step);
- ``avg``: the average reward, the mean outcome of the leaves under a node
  (:func:`qlass.tree.mean_leaf_outcome`);
- ``reward``: the node's own reward (the environment's score right after its step; with sparse
  rewards 0 until the episode ends, so this guide is myopic).

The paper steers the agent's generation with each process reward. Here the trees already hold the
agent's own generations, so each reward *selects* one of them per task: from the root, step to the
child with the highest process reward (ties to the earlier child, as Q-guided search breaks them),
until a leaf. The conversation along that path is the task's self-training trajectory. Selection
spends no environment step or policy call, and the three variants differ only in the guide.

Self-training data are the agent's own, so by default (``prefer_agent``) a step of the grafted expert
chain is taken only where the tree offers no node of the agent's own (a sampled or rolled-out one)
beside it; ``selection.json`` counts the expert steps taken. So the walk leaves the expert chain at its
first node with an agent's sibling whatever the rewards say, and the process reward decides only
where a node has two or more children of the agent's own: on the 16 trees of
``docs/reference/guidance/trees.jsonl`` at 19 of the 191 steps of the ``q`` paths, where ``q`` and
``avg`` pick the same path in 16 of 16 trees and ``q`` and ``reward`` in 10. With expert nodes
competing (``prefer_agent: false``), Q and reward pick the grafted expert trajectory itself (there:
156 of 156 steps), which adds nothing new to the expert data.

The selected trajectories are added to the expert data (a trajectory whose action sequence repeats
an expert trajectory of its task is dropped and counted: :func:`qlass.rft.augment`) and the agent is
fine-tuned on the union (:func:`qlass.training.sft.train_sft`). ``selection.json`` records every
task's path, its process rewards and outcome, and the mean outcome of the selection.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import option
from .config_fields import check_field_types, require_config
from .errors import DataError, QlassError
from .file_checks import refuse_overwriting_inputs, require_model_folder
from .jsonl import write_text_atomic
from .locking import writes_to
from .rft import DATA_FILE, MODEL_DIR, AugmentedData, refuse_capped_data, write_augmented_data
from .tree import BackupConfig, Node, Tree, compute_q, mean_leaf_outcome, read_trees
from .types import Step, Trajectory

log = logging.getLogger(__name__)

PROCESS_REWARDS = ("q", "avg", "reward")
REWARD_NAMES = {"q": "Q-value (Eq. 7)", "avg": "average reward", "reward": "reward"}
SELECTION_FILE = "selection.json"


@dataclass(frozen=True)
class SelfTrainConfig:
    """How self-training data are selected from the trees."""

    gamma: float | None = option(None, "discount of the Q-value reward (None: the gamma the trees were explored with)")
    keep_intermediate: bool = option(False, "Q-value reward: keep intermediate rewards as score increments (as the "
                                            "qdata option)")
    min_reward: float | None = option(None, "drop a selected trajectory whose outcome is below this (None: keep "
                                            "every task's, N = 1 per task as in the paper)")
    prefer_agent: bool = option(True, "at each step choose among the agent's own nodes (sampled, rolled out) where "
                                      "there are any, following the grafted expert chain only where it offers no "
                                      "alternative; false: expert nodes compete too")

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.gamma is not None:
            BackupConfig(gamma=self.gamma)
        if self.min_reward is not None and not 0.0 <= self.min_reward <= 1.0:
            raise ValueError(f"min_reward must be in [0, 1], got {self.min_reward}")


def check_reward(reward: str) -> str:
    """``reward`` if it names a process reward, else a :class:`QlassError` listing them."""
    if reward not in PROCESS_REWARDS:
        raise QlassError(f"unknown process reward {reward!r}; one of {', '.join(PROCESS_REWARDS)} "
                         "(q: Q-value, avg: average reward of the leaves below, reward: the node's own reward)")
    return reward


def process_rewards(tree: Tree, reward: str, cfg: SelfTrainConfig = SelfTrainConfig()) -> dict[int, float]:
    """The process reward ``reward`` (one of :data:`PROCESS_REWARDS`) of every non-root node."""
    check_reward(reward)
    if reward == "q":
        gamma = cfg.gamma if cfg.gamma is not None else float(tree.config.get("gamma", 0.9))
        return compute_q(tree, BackupConfig(gamma=gamma, keep_intermediate=cfg.keep_intermediate))
    if reward == "avg":
        return mean_leaf_outcome(tree)
    return {n.id: n.reward for n in tree.nodes[1:]}


def guided_path(tree: Tree, values: dict[int, float], prefer_agent: bool = False) -> list[Node]:
    """The nodes from the root's best child down to a leaf, each the child with the highest value
    (the first of equals); with ``prefer_agent`` expert children are candidates only where a node
    has no other child. Empty when the root has no child."""
    kids = tree.children()
    path: list[Node] = []
    node = 0
    while kids[node]:
        own = [c for c in kids[node] if tree.nodes[c].source != "expert"]
        options = own if prefer_agent and own else kids[node]
        best = options[0]
        for child in options[1:]:
            if values[child] > values[best]:
                best = child
        path.append(tree.nodes[best])
        node = best
    return path


def path_trajectory(tree: Tree, path: list[Node], reward: str) -> Trajectory:
    """The conversation and steps along ``path`` (ending at its leaf) as a self-training trajectory."""
    leaf = path[-1]
    steps = [Step(n.output, n.action, n.observation, n.reward, n.done, n.prompt_tokens, n.completion_tokens)
             for n in path]
    return Trajectory(id=f"{tree.task}#self-train-{reward}", messages=tree.history(leaf.id), reward=leaf.reward,
                      success=leaf.reward >= 1.0 - 1e-9, task=tree.task, steps=steps,
                      meta={"source": "self-train", "process_reward": reward, "tree_id": tree.tree_id,
                            "nodes": [n.id for n in path]})


def select_trajectories(trees_path: str | Path, reward: str, cfg: SelfTrainConfig = SelfTrainConfig()
                        ) -> tuple[list[Trajectory], dict[str, Any]]:
    """One trajectory per tree of ``trees_path`` (in tree-id order) along the path the process
    reward ``reward`` picks, those below ``cfg.min_reward`` left out; and the selection's summary
    (per tree: nodes, process rewards along the path, outcome, kept; the mean outcome)."""
    require_config(cfg, SelfTrainConfig, "select_trajectories")
    check_reward(reward)
    trees = sorted(read_trees(trees_path), key=lambda t: t.tree_id)
    if not trees:
        raise DataError(str(trees_path), "no trees: nothing to select self-training data from")
    selected, rows = [], []
    for tree in trees:
        values = process_rewards(tree, reward, cfg)
        path = guided_path(tree, values, cfg.prefer_agent)
        if not path:
            rows.append({"tree_id": tree.tree_id, "task": tree.task, "nodes": [], "kept": False,
                         "why": "the tree has no step below its root"})
            continue
        outcome = path[-1].reward
        kept = cfg.min_reward is None or outcome >= cfg.min_reward - 1e-9
        rows.append({"tree_id": tree.tree_id, "task": tree.task, "nodes": [n.id for n in path],
                     "values": [values[n.id] for n in path], "outcome": outcome,
                     "expert_steps": sum(n.source == "expert" for n in path), "kept": kept,
                     **({} if kept else {"why": f"outcome below min_reward {cfg.min_reward}"})})
        if kept:
            selected.append(path_trajectory(tree, path, reward))
    outcomes = [r["outcome"] for r in rows if "outcome" in r]
    summary = {"process_reward": reward, "trees": len(trees), "selected": len(selected),
               "mean_outcome": sum(outcomes) / len(outcomes) if outcomes else 0.0,
               "successes": sum(o >= 1.0 - 1e-9 for o in outcomes),
               "steps": sum(len(r["nodes"]) for r in rows), "expert_steps": sum(r.get("expert_steps", 0) for r in rows),
               "tasks": rows}
    left_out = [r for r in rows if not r["kept"]]
    if left_out:
        log.info("self-train[%s]: %d of %d trees give no trajectory (%s)", reward, len(left_out), len(trees),
                 "; ".join(f"{r['tree_id']}: {r['why']}" for r in left_out[:5]))
    return selected, summary


@writes_to("out_dir", folder=True)
def self_train(trees: str | Path, expert: str | Path, model_dir: str | Path, out_dir: str | Path, reward: str,
               sft_cfg: Any, cfg: SelfTrainConfig = SelfTrainConfig()) -> tuple[Path, AugmentedData, dict[str, Any]]:
    """Select one trajectory per tree with the process reward ``reward`` (:func:`select_trajectories`),
    write ``out_dir/selection.json`` and ``out_dir/data.json`` (the expert data of ``expert`` plus the
    selection) and fine-tune ``model_dir`` on it into ``out_dir/sft`` (``sft_cfg``: a
    :class:`~qlass.training.sft.SFTConfig`; resumable). Returns the agent's folder, the data summary and the
    selection summary."""
    from .training.configs import SFTConfig
    from .training.run_folders import refuse_foreign_folder
    from .training.sft import train_sft

    require_config(sft_cfg, SFTConfig, "self_train", "sft_cfg")
    require_config(cfg, SelfTrainConfig, "self_train")
    refuse_capped_data(sft_cfg, "self_train")
    out = Path(out_dir)
    refuse_foreign_folder(out, "self-train")
    for name in (DATA_FILE, SELECTION_FILE):  # the expert data would become expert + selection
        refuse_overwriting_inputs(out / name, [trees, expert])
    require_model_folder(model_dir, f"{model_dir}: the model to fine-tune is not a local model folder (no "
                                    "config.json)")
    selected, summary = select_trajectories(trees, reward, cfg)
    log.info("self-train[%s]: %d trajectories selected by %s from %d trees, mean outcome %.3f, %d successes",
             reward, len(selected), REWARD_NAMES[reward], summary["trees"], summary["mean_outcome"],
             summary["successes"])
    data = write_augmented_data(expert, selected, out, f"self-train[{reward}]")
    summary.update(added=data.added, duplicates_of_expert=data.duplicates, unusable=data.unusable)
    write_text_atomic(out / SELECTION_FILE, json.dumps(summary, indent=1) + "\n")
    return train_sft(out / DATA_FILE, model_dir, out / MODEL_DIR, sft_cfg), data, summary
