"""What exploration builds (:class:`ExploreConfig`, its digest) and on which tasks (disjoint from the
expert/SFT tasks when asked: :func:`exploration_tasks`, :func:`expert_task_ids`)."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from .agent import EpisodeConfig, check_sample_counts
from .config import option, to_dict
from .config_fields import check_field_types
from .data import load_trajectories
from .errors import QlassError
from .evaluate import select_tasks
from .paraphrase import ParaphraseTable, load_paraphrases
from .tree import BackupConfig
from .types import Task

DEFAULT_MAX_DEPTH = {"webshop": 3, "sciworld": 6, "alfworld": 8}
FALLBACK_MAX_DEPTH = 6
EXPERT_ORDERS = ("root-first", "uncertain-first", "all")
CAPS = ("max_nodes", "max_tokens", "max_env_steps", "max_branches")
LEGACY = {"expert_order": "root-first", "graft_share": 1.0, "diverse": False, "probe": False, "rollouts": 1,
          "max_branches": None, "paraphrase": None}
"""Options added after the first trees were written, at the values that build those trees: left out
of the config digest, so older trees.jsonl files resume under the same settings."""


@dataclass(frozen=True)
class ExploreConfig:
    """How exploration trees are built (defaults follow the paper)."""

    max_depth: int | None = option(None, "maximum expansion depth D (None: webshop 3, sciworld 6, alfworld 8, else 6)")
    candidates: int = option(2, "actions sampled per expansion (one policy call per node; two with diverse or "
                                "paraphrase and no child yet)")
    temperature: float = option(0.7, "sampling temperature of expansions")
    rollout_temperature: float = option(0.7, "sampling temperature of the rollouts that give new branches an outcome")
    max_new_tokens: int = option(128, "token limit of one agent output")
    max_steps: int = option(30, "episode step limit for rollouts (the environment's own limit applies too)")
    expert_graft: bool = option(True, "graft the environment's expert chain under the root when it has one")
    expert_siblings: int | None = option(None, "sampled sibling branches kept per expert step (null: every distinct "
                                               "sample; 0: none)")
    expert_order: str = option("root-first", "order in which expert steps get siblings: root-first; uncertain-first "
                                             "(lowest policy log-probability of the expert output first; needs a "
                                             "policy with score_outputs); all (sample at every step, then one "
                                             "sibling per step in turn)")
    graft_share: float = option(1.0, "fraction of each per-tree cap the expert graft may spend; the depth-limited "
                                     "search goes on with the rest")
    diverse: bool = option(False, "sample alternatives with a request for an action different from the node's "
                                  "children and earlier candidates (perturb.diversity_prompt)")
    paraphrase: str | None = option(None, "a paraphrase cache (qlass paraphrase): alternatives after a node's first "
                                          "are sampled with the task description paraphrased (task perturbation); "
                                          "null: off", added=True)
    probe: bool = option(False, "step every distinct alternative once before rolling any out (terminal ones "
                                "become leaves at no token cost)")
    rollouts: int = option(1, "rollouts per sampled branch; their mean outcome is the branch's (pruning, Q)")
    max_nodes: int | None = option(300, "per-tree cap on nodes (checked before each new branch)")
    max_branches: int | None = option(None, "per-tree cap on rolled-out sampled branches (terminal alternatives "
                                            "are leaves and do not count)")
    max_tokens: int | None = option(None, "per-tree cap on policy tokens, prompt + completion (+ teacher-forced "
                                          "scoring)")
    max_env_steps: int | None = option(None, "per-tree cap on environment steps")
    gamma: float = option(0.9, "discount of the Q values stored in the trees (Eq. 7)")

    def __post_init__(self) -> None:
        check_field_types(self)
        EpisodeConfig(self.max_steps, self.rollout_temperature, self.max_new_tokens)
        if self.max_depth is not None and self.max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {self.max_depth}")
        if self.candidates < 1 or (self.expert_siblings is not None and self.expert_siblings < 0):
            raise ValueError("candidates must be >= 1 and expert_siblings >= 0 or null")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.expert_order not in EXPERT_ORDERS:
            raise ValueError(f"expert_order must be one of {', '.join(EXPERT_ORDERS)}, got {self.expert_order!r}")
        if not 0.0 < self.graft_share <= 1.0:
            raise ValueError(f"graft_share must be in (0, 1], got {self.graft_share}")
        if self.rollouts < 1:
            raise ValueError(f"rollouts must be >= 1, got {self.rollouts}")
        check_sample_counts(candidates=self.candidates, rollouts=self.rollouts)
        for name in CAPS:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or null")
        BackupConfig(gamma=self.gamma)
        _ = self.paraphrases  # read and check the cache now rather than in the first tree

    @functools.cached_property
    def paraphrases(self) -> ParaphraseTable | None:
        """The paraphrase cache, read once (``None`` without ``paraphrase``)."""
        return load_paraphrases(self.paraphrase) if self.paraphrase is not None else None

    def depth_for(self, env_name: str) -> int:
        """D for an environment."""
        return self.max_depth if self.max_depth is not None else DEFAULT_MAX_DEPTH.get(env_name, FALLBACK_MAX_DEPTH)


def explore_digest(cfg: ExploreConfig) -> str:
    """The config digest stored with each tree (resuming with other settings is refused): a hash of
    every option, leaving out options added since the first trees at the values that built them."""
    values = {k: v for k, v in to_dict(cfg).items() if not (k in LEGACY and v == LEGACY[k])}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:12]


def exploration_tasks(tasks: Sequence[Task], skip: int = 0, limit: int | None = None,
                      exclude: Collection[str] = ()) -> list[Task]:
    """The tasks to explore: of each task type, those after its first ``skip`` (in listing order)
    whose id is not in ``exclude`` (e.g. :func:`expert_task_ids`), then at most ``limit`` taken
    round-robin over the types."""
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")
    seen: dict[str, int] = {}
    kept = []
    for task in tasks:
        rank = seen[task.task_type] = seen.get(task.task_type, -1) + 1
        if rank >= skip and task.id not in exclude:
            kept.append(task)
    return select_tasks(kept, limit)


def expert_task_ids(path: str | Path) -> set[str]:
    """The task ids of a trajectory file (the expert/SFT data), to keep exploration off them."""
    trajectories = load_trajectories(path)
    missing = [t.id for t in trajectories if not t.task]
    if missing:
        raise QlassError(f"{path}: trajectory {missing[0]!r} has no 'task' field, so its task cannot be told "
                         "apart from the exploration tasks")
    return {t.task for t in trajectories}  # type: ignore[misc]


__all__ = ["ExploreConfig", "expert_task_ids", "exploration_tasks", "explore_digest"]
