"""The RFT baseline (rejection-sampling fine-tuning): fine-tune again on the agent's own successes.

    SFT agent ─► K sampled episodes per training task ─► keep reward >= min_reward ─► expert data
    + the kept ones (duplicates dropped) ─► SFT (from the base model, or the SFT checkpoint)

This is the RFT row of the paper's Table 2, as ETO describes it: the SFT agent explores the training
tasks, its successful trajectories are added to the expert trajectories, and the agent is trained
on the augmented set. Rejection sampling fine-tuning (Yuan et al., 2023) trains the *base* model on
the augmented data, so ``init="base"`` is the default; ``init="sft"`` continues from the SFT
checkpoint instead.

Sampling reuses the evaluation harness (:func:`qlass.evaluate.evaluate`): draw ``k`` of a task is the
``sample`` method under its own label ``sample#k``, so its seed is ``stable_seed(seed, "sample#k",
task)``, episodes are played in lockstep, and ``samples/records.jsonl`` resumes after a crash like
any evaluation (a rerun with other sampling settings is refused, naming them). The training data
(``data.json``) is written from the finished records in task and draw order, so a rerun writes the
same file and the SFT run (``sft/``) resumes too.

Duplicates: two trajectories of one task with the same action sequence are the same behaviour
(their thoughts may differ); a kept sample that repeats an expert trajectory or an earlier kept
sample is dropped, and the count reported. So is one that is not valid training data (an agent
turn without an ``Action:`` line, which the trajectory format refuses).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .agent import check_sample_counts
from .config import check_minimums, load_yaml, option, save_yaml, to_dict
from .config_fields import check_field_types, require_config
from .data import load_trajectories, record_problems, record_to_trajectory, save_trajectories, trajectory_to_record
from .envs.base import parse_action
from .errors import QlassError
from .eval_worker import MethodRun
from .evaluate import DEFAULT_CONCURRENCY
from .file_checks import refuse_overwriting_inputs, require_model_folder
from .locking import writes_to
from .rollouts import TASK_SOURCES, play_split
from .search import SampleConfig
from .types import Trajectory

log = logging.getLogger(__name__)

INITS = ("base", "sft")
DATA_FILE = "data.json"
SAMPLES_DIR = "samples"
MODEL_DIR = "sft"
RECORD = "rft_config.yaml"


@dataclass(frozen=True)
class RFTConfig:
    """How the RFT baseline samples, filters and starts its fine-tuning."""

    samples: int = option(4, "sampled episodes per training task (K)")
    temperature: float = option(0.7, "sampling temperature of the SFT agent")
    max_steps: int | None = option(None, "step limit per sampled episode (None: the sample method's 30; in "
                                         "qlass run: eval.max_steps when set)")
    max_new_tokens: int = option(128, "token limit per agent turn")
    min_reward: float = option(1.0, "keep a sampled trajectory whose final reward is at least this (1.0: successes)")
    init: str = option("base", "fine-tune from the 'base' model (as rejection-sampling fine-tuning does) or from "
                               "the 'sft' checkpoint")
    split: str = option("train", "split the sampled tasks come from")
    tasks: str = option("split", "which tasks of split are sampled: 'split' (all of the split's) or 'expert' (those "
                                 "with a trajectory in the expert data)", added=True)
    limit: int | None = option(None, "at most this many tasks (round-robin over task types; None: all)")

    def __post_init__(self) -> None:
        check_field_types(self)
        check_minimums(self, samples=1, limit=1, max_steps=1)
        check_sample_counts(samples=self.samples)
        if self.tasks not in TASK_SOURCES:
            raise ValueError(f"tasks must be one of {', '.join(TASK_SOURCES)}, got {self.tasks!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if not 0.0 <= self.min_reward <= 1.0:
            raise ValueError(f"min_reward must be in [0, 1], got {self.min_reward}")
        self.sample_config()  # temperature, max_new_tokens checked as the sampling episode checks them

    def sample_config(self) -> SampleConfig:
        """The ``sample`` method's config for every draw."""
        steps = {} if self.max_steps is None else {"max_steps": self.max_steps}
        return SampleConfig(temperature=self.temperature, max_new_tokens=self.max_new_tokens, **steps)


@dataclass(frozen=True)
class DrawRun(MethodRun):
    """Draw ``draw`` of the ``sample`` method: its own record label, hence its own seed stream."""

    draw: int = 0

    @property
    def label(self) -> str:
        return f"sample#{self.draw}"


@dataclass
class AugmentedData:
    """Expert trajectories plus the agent's own, and what was left out of the latter."""

    trajectories: list[Trajectory]
    expert: int
    added: int
    duplicates: int
    unusable: int = 0
    below_threshold: int = 0


def action_key(traj: Trajectory) -> tuple[str, tuple[str | None, ...]]:
    """What makes two trajectories the same behaviour: the task and the sequence of actions."""
    return traj.task or "", tuple(parse_action(m.content) for m in traj.messages if m.role == "assistant")


def augment(expert: Sequence[Trajectory], extra: Iterable[Trajectory]) -> AugmentedData:
    """``expert`` followed by every trajectory of ``extra`` whose :func:`action_key` is new (neither
    an expert trajectory's nor an earlier extra one's) and that is valid training data (an agent turn
    without an ``Action:`` line is not: such trajectories are counted as unusable and logged); an id
    already taken is an error."""
    seen = {action_key(t) for t in expert}
    ids = {t.id for t in expert}
    out, duplicates, unusable = list(expert), 0, []
    for traj in extra:
        if traj.id in ids:
            raise QlassError(f"trajectory id {traj.id!r} is used twice in the augmented data")
        problems = record_problems(trajectory_to_record(traj))
        if problems:
            unusable.append(f"{traj.id} ({problems[0]})")
            continue
        key = action_key(traj)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        ids.add(traj.id)
        out.append(traj)
    if unusable:
        log.info("%d trajectories left out as training data: %s", len(unusable),
                 "; ".join(unusable[:3]) + (" ..." if len(unusable) > 3 else ""))
    return AugmentedData(out, len(expert), len(out) - len(expert), duplicates, len(unusable))


def kept_samples(records: Sequence[dict[str, Any]], task_order: Sequence[str], min_reward: float
                 ) -> tuple[list[Trajectory], int]:
    """The sampled trajectories of ``records`` with reward >= ``min_reward``, in task then draw order,
    each with the id ``<task>#rft<k>``; and how many fell below the threshold."""
    rank = {t: i for i, t in enumerate(task_order)}
    ordered = sorted(records, key=lambda r: (rank.get(r["task"], len(rank)), int(r["method"].split("#")[1])))
    kept, below = [], 0
    for rec in ordered:
        if rec["reward"] < min_reward - 1e-9:
            below += 1
            continue
        traj = record_to_trajectory(rec["trajectory"])
        traj.id = f"{rec['task']}#rft{rec['method'].split('#')[1]}"
        traj.meta = {**traj.meta, "source": "rft", "draw": int(rec["method"].split("#")[1])}
        kept.append(traj)
    return kept, below


def sample_training_tasks(
    model: str,
    env_spec: str,
    out_dir: Path,
    cfg: RFTConfig,
    env_kwargs: dict[str, Any] | None = None,
    task_types: Sequence[str] | None = None,
    policy_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    backend: str = "local",
    workers: int = 1,
    concurrency: int = DEFAULT_CONCURRENCY,
    policy: Any = None,
    expert_tasks: Collection[str] | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Play ``cfg.samples`` sampled episodes of the agent ``model`` on each task of ``cfg.split``
    (``cfg.limit`` of them, round-robin over task types; with ``cfg.tasks == "expert"``, of those in
    ``expert_tasks``); records go to ``out_dir/records.jsonl``
    (resumable). ``policy``: see :func:`qlass.rollouts.play_split` (e.g. a user's own policy class;
    ``model`` then only names it in ``config.yaml``). Returns the records of these tasks and draws,
    and the task ids in order."""
    sample = cfg.sample_config()
    runs = [DrawRun("sample", sample, draw=k) for k in range(cfg.samples)]
    if cfg.tasks == "expert" and expert_tasks is None:
        raise QlassError("RFT with tasks='expert' needs the expert data's task ids")
    return play_split(model, env_spec, out_dir, runs, cfg.split, cfg.limit, env_kwargs, task_types, policy_kwargs,
                      seed, backend, workers, concurrency, policy, what="RFT sampling",
                      only=expert_tasks if cfg.tasks == "expert" else None)


def refuse_capped_data(sft_cfg: Any, caller: str) -> None:
    """Refuse ``sft_cfg.max_trajectories``: the data of RFT and self-training is the expert data plus the
    agent's own trajectories, and a cap would cut both together (the own ones can fall out entirely)."""
    if sft_cfg.max_trajectories is not None:
        raise QlassError(f"{caller}: sft_cfg.max_trajectories ({sft_cfg.max_trajectories}) would cap the expert "
                         "data and the agent's own trajectories together; limited supervision with RFT or "
                         "self-training is not supported (leave max_trajectories unset)")


def write_augmented_data(expert_path: str | Path, extra: Sequence[Trajectory], out_dir: Path, what: str
                         ) -> AugmentedData:
    """Write ``out_dir/data.json``: the expert data of ``expert_path`` plus ``extra``, duplicates
    dropped (:func:`augment`). ``what`` names the agent in logs."""
    expert = load_trajectories(expert_path)
    if not expert:
        raise QlassError(f"{expert_path}: no expert trajectories")
    data = augment(expert, extra)
    log.info("%s: %d expert + %d own trajectories (%d duplicates of earlier ones and %d unusable ones left out) → %s",
             what, data.expert, data.added, data.duplicates, data.unusable, out_dir / DATA_FILE)
    out_dir.mkdir(parents=True, exist_ok=True)
    path, fresh = out_dir / DATA_FILE, out_dir / (DATA_FILE + ".new")
    save_trajectories(fresh, data.trajectories)
    if (out_dir / MODEL_DIR).exists() and path.exists() and path.read_bytes() != fresh.read_bytes():
        fresh.unlink()
        raise QlassError(f"{path}: the agent in {out_dir / MODEL_DIR} was (partly) trained on other data than "
                         f"these settings give ({data.expert} expert + {data.added} own trajectories now); "
                         "use a new output folder")
    fresh.replace(path)
    return data


@writes_to("out_dir", folder=True)
def run_rft(
    model: str | os.PathLike[str],
    expert: str | Path,
    base: str | Path,
    env_spec: str,
    out_dir: str | Path,
    cfg: RFTConfig,
    sft_cfg: Any,
    env_kwargs: dict[str, Any] | None = None,
    task_types: Sequence[str] | None = None,
    policy_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    backend: str = "local",
    workers: int = 1,
    concurrency: int = DEFAULT_CONCURRENCY,
    policy: Any = None,
) -> tuple[Path, AugmentedData]:
    """The whole RFT baseline: sample with the SFT agent ``model`` (a model folder or server URL),
    keep the successes, fine-tune ``base`` (``cfg.init="base"``) or the local SFT folder ``model``
    (``"sft"``) on the expert data of ``expert`` plus them (``sft_cfg``: a
    :class:`~qlass.training.sft.SFTConfig`; ``policy``: see :func:`sample_training_tasks`). Writes
    ``out_dir/samples/`` (records), ``out_dir/data.json``, ``out_dir/sft/`` (the RFT agent) and
    ``out_dir/rft_config.yaml``; every part resumes. Returns the agent's folder and the data summary."""
    from .policy import check_policy_spec, spec_text
    from .training.configs import SFTConfig
    from .training.run_folders import refuse_foreign_folder
    from .training.sft import train_sft

    require_config(cfg, RFTConfig, "run_rft")
    require_config(sft_cfg, SFTConfig, "run_rft", "sft_cfg")
    model = spec_text(model)
    refuse_capped_data(sft_cfg, "run_rft")
    out = Path(out_dir)
    refuse_foreign_folder(out, "rft")
    expert_path = Path(expert)
    if not expert_path.is_file():
        raise QlassError(f"{expert_path}: expert trajectory file not found (RFT adds its samples to it)")
    refuse_overwriting_inputs(out / DATA_FILE, [expert_path])  # the expert data would become expert + own
    expert_tasks = {t.task for t in load_trajectories(expert_path) if t.task}  # a bad record is named first
    train_from = Path(base) if cfg.init == "base" else Path(model)
    which = "base model" if cfg.init == "base" else "SFT checkpoint (init='sft' fine-tunes the sampling agent)"
    require_model_folder(train_from, f"{train_from}: the {which} is not a local model folder (no config.json)")
    if policy is None:  # the sampling agent's folder and options, before anything is sampled or loaded
        check_policy_spec(model, policy_kwargs or {})
    _refuse_new_limit(out, cfg)
    check_expert_env(expert_path, expert_tasks, env_spec, env_kwargs)
    records, order = sample_training_tasks(model, env_spec, out / SAMPLES_DIR, cfg, env_kwargs, task_types,
                                           policy_kwargs, seed, backend, workers, concurrency, policy, expert_tasks)
    kept, below = kept_samples(records, order, cfg.min_reward)
    log.info("RFT: %d of %d sampled episodes reach reward %.2f", len(kept), len(records), cfg.min_reward)
    data = write_augmented_data(expert_path, kept, out, "RFT")
    data.below_threshold = below
    agent = train_sft(out / DATA_FILE, train_from, out / MODEL_DIR, sft_cfg)
    # written once the agent exists (a rerun refused by train_sft leaves the record of what made it)
    save_yaml(out / RECORD, {**to_dict(cfg), "model": str(model), "expert": str(expert_path),
                                         "train_from": str(train_from), "seed": seed})
    return agent, data


def check_expert_env(expert_path: Path, expert_tasks: Collection[str], env_spec: str,
                     env_kwargs: dict[str, Any] | None) -> None:
    """Refuse expert data none of whose tasks is a task of ``env_spec`` (in any split): the RFT agent would
    learn another environment's trajectories plus this one's. Some foreign tasks only get a warning (e.g. data
    of a larger task set than ``env_kwargs`` selects)."""
    from .envs.base import env_close, env_splits, env_tasks, make_env

    if not expert_tasks:
        return
    env = make_env(env_spec, **dict(env_kwargs or {}))
    try:
        known = {t.id for split in env_splits(env) for t in env_tasks(env, split)}
    finally:
        env_close(env)
    foreign = sorted(set(expert_tasks) - known)
    if len(foreign) == len(expert_tasks):
        raise QlassError(f"{expert_path}: none of its {len(foreign)} tasks is a task of {env_spec} (e.g. "
                         f"{foreign[0]!r}); give the expert data of this environment")
    if foreign:
        log.warning("%s: %d of its %d tasks are not tasks of %s (e.g. %r)", expert_path, len(foreign),
                    len(expert_tasks), env_spec, foreign[0])


def _refuse_new_limit(out: Path, cfg: RFTConfig) -> None:
    """Refuse another ``limit`` once the RFT agent exists: the samples of a larger limit resume the sampling (so the
    extra tasks were sampled first, for nothing) and the agent, trained on the smaller set, is then refused."""
    path = out / RECORD
    if not path.exists():
        return
    recorded = load_yaml(path)
    if recorded.get("limit", cfg.limit) != cfg.limit:
        raise QlassError(f"{out}: its RFT agent was trained on the samples of limit={recorded['limit']!r} tasks "
                         f"(recorded in {RECORD}), not limit={cfg.limit!r}; set the limit back, or use a new "
                         "output folder")
