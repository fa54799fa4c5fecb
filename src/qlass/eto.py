"""The ETO baseline (exploration-based trajectory optimisation): the agent learns from its own
failures by preferring the expert's trajectory of the same task, with DPO, round after round.

    agent_0 = the SFT agent
    round k = 1 .. iterations:
        agent_{k-1} plays every training task ─► its failures (final reward < min_reward and below the
        expert's) ─► pairs (chosen: the task's expert trajectory, rejected: the failure)
        ─► DPO from agent_{k-1}, reference model agent_{k-1} ─► agent_k

This is the ETO row of the paper's Table 2 (Song et al., 2024, "Trial and Error: Exploration-Based
Trajectory Optimization for LLM Agents"; QLASS compares against it on ETO's own setup). ETO's three
parts map to this module as follows:

- *Behavioural cloning*: the starting agent is the SFT agent (``model``; stage 1 of ``qlass run``).
- *Exploration*: the agent plays the training tasks (``split``), greedily by default
  (``temperature: 0``, as ETO's scripts play them with the evaluation's decoding) or sampled. It runs
  in the evaluation harness (:func:`qlass.rollouts.play_split`), so episodes are played in lockstep
  and ``explore/records.jsonl`` resumes after a crash; round ``k`` uses the run seed plus ``k - 1``.
- *Training*: an explored trajectory whose final reward is below ``min_reward`` is a failure; it is
  paired with the expert trajectory of its task when the expert's reward is higher (ETO's rule: the
  pair is "expert ≻ failure" when the expert's reward beats the agent's; with the default
  ``min_reward`` 1.0 the two rules agree). The pairs train the agent with DPO
  (:func:`qlass.training.dpo.train_dpo`, TRL's sigmoid loss on the agent turns after the task turn),
  the agent being improved serving as the reference model.
- *Iteration*: ``iterations`` rounds, each exploring with the previous round's agent (ETO's script runs
  three; its later rounds use beta 0.5 and lr 5e-7, which ``later_dpo`` expresses).

Where ETO's reference code differs: it also pairs the other way round when the agent beats the expert
(chosen: the agent's trajectory); here the chosen side is always the expert's, and such tasks are
counted as ``expert_not_better``. It cuts a failure to the expert's number of agent turns plus five
(``rejected_extra_turns: 5`` does the same; by default the whole failure is kept). The first expert
trajectory of a task in the expert file is its chosen side; a failure whose task has no expert
trajectory is skipped and counted (``no_expert``), as is one that is not valid training data (an agent
turn without an ``Action:`` line: ``unusable``). A pair longer than DPO's ``max_length`` (a failure that
loops over long pages) loses the rejected side's last agent turns until it fits (``shortened``); one
that does not fit with a single rejected turn is ``unusable``.

Output folder::

    eto_config.yaml            the settings; a rerun with others is refused, naming them
    round-<k>/explore/         records.jsonl + config.yaml of the exploration (resumable)
    round-<k>/pairs.jsonl      the round's preference pairs (qlass dpo's format)
    round-<k>/summary.json     exploration reward and pair counts of the round
    round-<k>/dpo/             agent_k (plain HF causal-LM folder; resumable, see train_dpo)

Every part resumes: a killed run continues where it stopped, finished rounds are not played or
trained again, and ``iterations`` may grow (a rerun adds rounds).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import save_yaml, to_dict
from .config_fields import require_config
from .data import load_trajectories, record_to_trajectory, trajectory_to_record
from .errors import QlassError
from .eto_config import ETOConfig
from .evaluate import DEFAULT_CONCURRENCY
from .file_checks import require_model_folder
from .jsonl import write_jsonl, write_text_atomic
from .locking import writes_to
from .recorded import check_recorded, with_model_files
from .rollouts import play_split
from .training.common import DONE_MARK, file_digest
from .training.dpo import CONFIG_FILE as DPO_CONFIG_FILE
from .training.dpo import DPOConfig, PreferencePair, encode_pair, pair_length, pair_problems, train_dpo
from .training.run_folders import refuse_foreign_folder
from .training.sft import prefix_length
from .types import Trajectory

log = logging.getLogger(__name__)

CONFIG_FILE = "eto_config.yaml"
EXPLORE_DIR = "explore"
PAIRS_FILE = "pairs.jsonl"


class NoPairsError(QlassError):
    """A round's exploration gave no failure to pair with an expert trajectory: there is nothing to train on."""
SUMMARY_FILE = "summary.json"
MODEL_DIR = "dpo"
EPS = 1e-9


@dataclass
class RoundPairs:
    """One round's preference pairs and what the exploration gave."""

    pairs: list[dict[str, Any]]
    episodes: int
    mean_reward: float
    failures: int = 0
    no_expert: int = 0
    expert_not_better: int = 0
    unusable: int = 0
    shortened: int = 0

    def summary(self) -> dict[str, Any]:
        """The counts as saved in ``summary.json`` (the pairs left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "pairs"} | {"pairs": len(self.pairs)}


def experts_by_task(trajectories: Sequence[Trajectory], path: str | Path) -> dict[str, Trajectory]:
    """The first expert trajectory of each task (their ``task`` field); an error when none names one."""
    experts: dict[str, Trajectory] = {}
    for traj in trajectories:
        if traj.task is not None:
            experts.setdefault(traj.task, traj)
    if not experts:
        raise QlassError(f"{path}: no expert trajectory names its task (field 'task'); ETO pairs each failure with "
                         "the expert trajectory of the same task")
    if not any(traj.reward > 0 for traj in experts.values()):  # a file without rewards reads as reward 0
        raise QlassError(f"{path}: no expert trajectory records a reward above 0 (field 'reward', 0 when left out); "
                         "ETO pairs a failure with its task's expert only where the expert's reward is higher, so "
                         "there would be no pairs: record the rewards (qlass data expert writes them)")
    return experts


def _side(traj: Trajectory) -> dict[str, Any]:
    """One side of a pair: the conversation, its reward and task."""
    rec = trajectory_to_record(traj, with_steps=False)
    return {k: rec[k] for k in ("task", "reward", "success", "conversations") if k in rec}


def _cut(failure: Trajectory, expert: Trajectory, extra: int | None) -> Trajectory:
    """``failure`` up to its last agent turn, at most the expert's agent turns plus ``extra`` of them."""
    keep = prefix_length(failure.messages)
    turns = [i for i, m in enumerate(failure.messages) if m.role == "assistant" and i >= keep]
    if extra is not None:
        allowed = sum(m.role == "assistant" for m in expert.messages[prefix_length(expert.messages):]) + extra
        turns = turns[:allowed]
    end = turns[-1] + 1 if turns else len(failure.messages)
    return dataclasses.replace(failure, messages=failure.messages[:end], steps=[], meta={})


def failure_pairs(records: Sequence[Mapping[str, Any]], task_order: Sequence[str], experts: Mapping[str, Trajectory],
                  cfg: ETOConfig, expert_path: str | Path,
                  pair_tokens: Callable[[PreferencePair], int] | None = None, max_length: int | None = None
                  ) -> RoundPairs:
    """The pairs of one round's exploration ``records`` (one per task), in ``task_order``: each failure
    (reward < ``cfg.min_reward``) whose task has an expert trajectory with a higher reward, as
    ``{"id": task, "chosen": expert, "rejected": failure}``. A failure played from another prompt than
    its expert trajectory's is an error naming both (the expert data do not belong to this
    environment); one that is not valid training data is counted as unusable and logged. With
    ``pair_tokens`` (a pair's length in tokens) and ``max_length``, a longer pair has its rejected
    side shortened to fit (:func:`_fit`)."""
    rank = {t: i for i, t in enumerate(task_order)}
    ordered = sorted(records, key=lambda r: rank.get(r["task"], len(rank)))
    out = RoundPairs([], len(ordered), sum(r["reward"] for r in ordered) / max(len(ordered), 1))
    unusable = []
    for rec in ordered:
        if rec["reward"] >= cfg.min_reward - EPS:
            continue
        out.failures += 1
        expert = experts.get(rec["task"])
        if expert is None:
            out.no_expert += 1
            continue
        if expert.reward <= rec["reward"] + EPS:
            out.expert_not_better += 1
            continue
        failure = record_to_trajectory(rec["trajectory"])
        keep = prefix_length(expert.messages)
        if failure.messages[:keep] != expert.messages[:keep]:
            raise QlassError(f"{expert_path}: expert trajectory {expert.id!r} of task {rec['task']!r} starts from "
                             "another prompt (instruction and task turns) than the agent was given; ETO needs expert "
                             "data of this environment")
        rejected = _cut(failure, expert, cfg.rejected_extra_turns)
        if pair_tokens is not None and max_length is not None and any(
                m.role == "assistant" for m in rejected.messages[prefix_length(rejected.messages):]):
            fitted = _fit(PreferencePair(rec["task"], expert, rejected), pair_tokens, max_length)
            if fitted is None:
                unusable.append(f"{rec['task']} (longer than max_length {max_length} tokens with one rejected turn)")
                continue
            out.shortened += fitted is not rejected
            rejected = fitted
        pair = {"id": rec["task"], "chosen": _side(expert), "rejected": _side(rejected)}
        problems = pair_problems(pair)
        if problems:
            unusable.append(f"{rec['task']} ({problems[0]})")
            continue
        out.pairs.append(pair)
    out.unusable = len(unusable)
    if out.shortened:
        log.info("%d failures shortened (their last agent turns dropped) to fit max_length %s", out.shortened,
                 max_length)
    if unusable:
        log.info("%d failures left out as training data: %s", len(unusable),
                 "; ".join(unusable[:3]) + (" ..." if len(unusable) > 3 else ""))
    return out


def _fit(pair: PreferencePair, pair_tokens: Callable[[PreferencePair], int], max_length: int) -> Trajectory | None:
    """``pair.rejected`` with its last agent turns (and the observations after them) dropped until the
    pair is at most ``max_length`` tokens; ``pair.rejected`` itself when it fits, None when even its
    first agent turn does not."""
    rejected = pair.rejected
    while pair_tokens(dataclasses.replace(pair, rejected=rejected)) > max_length:
        keep = prefix_length(rejected.messages)
        turns = [i for i, m in enumerate(rejected.messages) if m.role == "assistant" and i >= keep]
        if len(turns) <= 1:
            return None
        rejected = dataclasses.replace(rejected, messages=rejected.messages[:turns[-2] + 1], steps=[], meta={})
    return rejected


def _settings(model: str, expert_path: Path, env_spec: str, cfg: ETOConfig, dpo_cfg: DPOConfig,
              env_kwargs: dict[str, Any], task_types: Sequence[str] | None, policy_kwargs: dict[str, Any],
              seed: int) -> dict[str, Any]:
    """What decides the run's agents, as ``eto_config.yaml`` records it (the DPO settings of round 1
    and of the later rounds resolved, runtime options left out)."""
    runtime = {f.name for f in dataclasses.fields(dpo_cfg) if f.metadata.get("runtime")}

    def recorded(dpo: DPOConfig) -> dict[str, Any]:
        return {k: v for k, v in to_dict(dpo).items() if k not in runtime}

    stage = {k: v for k, v in to_dict(cfg).items() if k != "later_dpo"}
    return {**stage, "dpo": recorded(dpo_cfg), "dpo_later_rounds": recorded(cfg.dpo_for(dpo_cfg, 2)),
            "model": str(model), "expert": str(expert_path), "expert_sha256": file_digest(expert_path),
            "env": env_spec, "env_args": dict(env_kwargs), "task_types": list(task_types or []) or None,
            "policy": dict(policy_kwargs), "seed": seed}


def _write_pairs(round_dir: Path, pairs: RoundPairs) -> Path:
    """Write ``pairs.jsonl`` and ``summary.json``; refuse pairs other than the ones the round's agent
    (partly) trained on."""
    path, fresh = round_dir / PAIRS_FILE, round_dir / (PAIRS_FILE + ".new")
    write_jsonl(fresh, pairs.pairs)
    started = (round_dir / MODEL_DIR / DPO_CONFIG_FILE).exists()  # DPO writes it once its pairs are accepted
    if started and path.exists() and path.read_bytes() != fresh.read_bytes():
        fresh.unlink()
        raise QlassError(f"{path}: the agent in {round_dir / MODEL_DIR} was (partly) trained on other pairs than this "
                         f"exploration gives now ({len(pairs.pairs)} pairs); use a new output folder")
    fresh.replace(path)
    write_text_atomic(round_dir / SUMMARY_FILE, json.dumps(pairs.summary(), indent=1) + "\n")
    return path


@writes_to("out_dir", folder=True)
def run_eto(
    model: str | Path,
    expert: str | Path,
    env_spec: str,
    out_dir: str | Path,
    cfg: ETOConfig,
    dpo_cfg: DPOConfig,
    env_kwargs: dict[str, Any] | None = None,
    task_types: Sequence[str] | None = None,
    policy_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    backend: str = "local",
    workers: int = 1,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> tuple[Path, list[dict[str, Any]]]:
    """The whole ETO baseline from the SFT agent ``model`` (a local model folder) and the expert
    trajectories ``expert`` it was trained on, into ``out_dir`` (layout in the module docstring).
    ``dpo_cfg``: the DPO settings (a :class:`~qlass.training.dpo.DPOConfig`). Returns the last round's
    agent folder and each round's summary (exploration reward, failures, pairs and those left out)."""
    require_config(cfg, ETOConfig, "run_eto")
    require_config(dpo_cfg, DPOConfig, "run_eto", "dpo_cfg")
    out, expert_path, agent = Path(out_dir), Path(expert), Path(model)
    refuse_foreign_folder(out, "eto")
    if not expert_path.is_file():
        raise QlassError(f"{expert_path}: expert trajectory file not found (ETO pairs each failure with the expert "
                         "trajectory of its task)")
    experts = experts_by_task(load_trajectories(expert_path), expert_path)  # a bad record is named before any work
    require_model_folder(agent, f"{agent}: the SFT agent is not a local model folder (no config.json); ETO trains it")
    env_kwargs, policy_kwargs = dict(env_kwargs or {}), dict(policy_kwargs or {})
    settings = with_model_files(_settings(str(agent), expert_path, env_spec, cfg, dpo_cfg, env_kwargs, task_types,
                                          policy_kwargs, seed))
    started = out.is_dir() and any(out.glob("round-*"))
    check_recorded(out / CONFIG_FILE, settings, str(out), ["iterations", "expert"], "use a new output folder",
                   required=("model", "env", "seed") if started else ())
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(out / CONFIG_FILE, settings)
    summaries = []
    for k in range(1, cfg.iterations + 1):
        round_dir = out / f"round-{k}"
        if (round_dir / MODEL_DIR / DONE_MARK).exists() and (round_dir / SUMMARY_FILE).exists():
            log.info("ETO round %d/%d is complete (%s)", k, cfg.iterations, round_dir / MODEL_DIR)
            summaries.append(json.loads((round_dir / SUMMARY_FILE).read_text()))
            agent = round_dir / MODEL_DIR
            continue
        log.info("ETO round %d/%d: %s explores the %s tasks", k, cfg.iterations, agent, cfg.split)
        records, order = play_split(str(agent), env_spec, round_dir / EXPLORE_DIR, [cfg.explore_run()], cfg.split,
                                    cfg.limit, env_kwargs, task_types, policy_kwargs, seed + k - 1, backend, workers,
                                    concurrency, what=f"ETO round {k} exploration",
                                    only=set(experts) if cfg.tasks == "expert" else None)
        pairs = failure_pairs(records, order, experts, cfg, expert_path, _pair_tokens(agent),
                              cfg.dpo_for(dpo_cfg, k).max_length)
        log.info("ETO round %d: %d episodes (average reward %.3f), %d failures below %.2f → %d pairs (%d without an "
                 "expert trajectory, %d where the expert is no better, %d unusable left out)", k, pairs.episodes,
                 pairs.mean_reward, pairs.failures, cfg.min_reward, len(pairs.pairs), pairs.no_expert,
                 pairs.expert_not_better, pairs.unusable)
        if not pairs.pairs:
            raise NoPairsError(f"ETO round {k}: no failure pairs to train on ({pairs.episodes} episodes, "
                             f"{pairs.failures} below min_reward {cfg.min_reward}: {pairs.no_expert} without an "
                             f"expert trajectory, {pairs.expert_not_better} where the expert is no better, "
                             f"{pairs.unusable} unusable)"
                             + (f"; iterations: {k - 1} keeps the agent of round {k - 1}" if k > 1 else ""))
        path = _write_pairs(round_dir, pairs)
        summaries.append(pairs.summary())
        log.info("ETO round %d: DPO from %s on %d pairs → %s", k, agent, len(pairs.pairs), round_dir / MODEL_DIR)
        agent = train_dpo(path, agent, round_dir / MODEL_DIR, cfg.dpo_for(dpo_cfg, k))
    return agent, summaries


def _pair_tokens(model: Path) -> Callable[[PreferencePair], int]:
    """A pair's length in tokens as DPO encodes it, with ``model``'s tokenizer."""
    from .policy.loading import load_tokenizer

    tokenizer = load_tokenizer(model)
    return lambda pair: pair_length(encode_pair(tokenizer, pair))
