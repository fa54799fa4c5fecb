"""The pipeline's retrained-agent baselines (``rft:``, ``eto:`` and ``self_train:`` sections of ``qlass
run``): their options, the checks :func:`qlass.pipeline_config.resolve` runs before any work, and the stage
that trains each agent after the main evaluation, evaluates it greedily on the same tasks and puts
its row (``rft (greedy)``, ``eto (greedy)``, ``self-train[q] (greedy)`` ...) beside the main rows in
``results/``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import build, option, to_dict
from .errors import QlassError

if TYPE_CHECKING:
    from .pipeline_config import PipelineConfig, Resolved

log = logging.getLogger(__name__)

RFT_DIR = "rft"
ETO_DIR = "eto"
SELF_TRAIN_DIR = "self-train"
RESULTS_DIR = "results"


@dataclass(frozen=True)
class RetrainOptions:
    """How an agent trained again (RFT, self-training) is fine-tuned."""

    sft: dict = option({}, "SFTConfig options for this agent's fine-tuning, on top of the run's sft section")


@dataclass(frozen=True)
class ETOOptions:
    """How the ETO agent is trained."""

    dpo: dict = option({}, "DPOConfig options for the DPO of every round")


@dataclass(frozen=True)
class SelfTrainStage:
    """Which self-trained agents the run makes (one per process reward) and what they start from."""

    rewards: list[str] = option(["q", "avg", "reward"], "process rewards, one agent each: q (Q-value, Eq. 7), avg "
                                                        "(average reward of the leaves below), reward (the node's own)")
    init: str = option("base", "fine-tune from the 'base' model or from the 'sft' checkpoint")

    def __post_init__(self) -> None:
        from .rft import INITS
        from .self_train import check_reward

        if not self.rewards or len(set(self.rewards)) != len(self.rewards):
            raise ValueError(f"rewards must be a non-empty list without repeats, got {self.rewards}")
        for reward in self.rewards:
            try:
                check_reward(reward)
            except QlassError as exc:
                raise ValueError(str(exc)) from None
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")


@dataclass(frozen=True)
class Retrain:
    """A resolved ``rft`` or ``self_train`` section: its stage config(s), the fine-tuning config and the
    section's own SFT overrides (as written, for ``config.yaml``)."""

    stage: Any
    sft: Any
    sft_overrides: dict[str, Any]
    select: Any = None


@dataclass(frozen=True)
class ETOSection:
    """A resolved ``eto`` section: its :class:`~qlass.eto_config.ETOConfig` and the DPO settings of its rounds."""

    stage: Any
    dpo: Any

    def as_dict(self) -> dict[str, Any]:
        """The section as it is saved in ``config.yaml`` (the DPO settings resolved)."""
        return {**to_dict(self.stage), "dpo": to_dict(self.dpo)}


def retrain_section(cfg: PipelineConfig, name: str, source: str) -> Retrain | None:
    """The ``rft`` or ``self_train`` section built and checked (``None`` when absent)."""
    from .config import check_known
    from .rft import RFTConfig
    from .self_train import SelfTrainConfig
    from .training.configs import SFTConfig

    section = getattr(cfg, name)
    if section is None:
        return None
    where = f"{source}: {name}"
    classes = [RFTConfig] if name == "rft" else [SelfTrainStage, SelfTrainConfig]
    known = {f for c in classes + [RetrainOptions] for f in c.__dataclass_fields__}
    check_known(section, known, where, " or ".join(c.__name__ for c in classes) + " or sft")
    options = build(RetrainOptions, {k: v for k, v in section.items() if k == "sft"}, where)
    built = [build(c, {k: v for k, v in section.items() if k in c.__dataclass_fields__}, where) for c in classes]
    sft = build(SFTConfig, {**dict(cfg.sft), **options.sft}, f"{where}.sft")
    if sft.max_trajectories is not None:
        raise QlassError(f"{where}: sft.max_trajectories would cap the expert data and the agent's own trajectories "
                         "together; limited supervision with RFT or self-training is not supported (set "
                         f"{name}: {{sft: {{max_trajectories: null}}}} to train this agent on all of them)")
    check_local_agent(cfg, where)
    return Retrain(built[0], sft, dict(options.sft), built[1] if len(built) > 1 else None)


def check_local_agent(cfg: PipelineConfig, where: str) -> None:
    """Refuse a section that trains an agent when the run samples through a server."""
    if cfg.policy_server:
        raise QlassError(f"{where}: not available with policy_server (the agent trained here is evaluated as a local "
                         "model folder); run it without policy_server")


def eto_section(cfg: PipelineConfig, source: str) -> ETOSection | None:
    """The ``eto`` section built and checked (``None`` when absent)."""
    if cfg.eto is None:
        return None
    from .config import check_known
    from .eto_config import ETOConfig
    from .training.configs import DPOConfig

    where = f"{source}: eto"
    check_known(cfg.eto, set(ETOConfig.__dataclass_fields__) | {"dpo"}, where, "ETOConfig or dpo")
    options = build(ETOOptions, {k: v for k, v in cfg.eto.items() if k == "dpo"}, where)
    stage = build(ETOConfig, {k: v for k, v in cfg.eto.items() if k != "dpo"}, where)
    dpo = build(DPOConfig, options.dpo, f"{where}.dpo")
    try:
        stage.dpo_for(dpo, 2)
    except QlassError as exc:
        raise QlassError(f"{where}: {exc}") from None
    check_local_agent(cfg, where)
    return ETOSection(stage, dpo)


def retrain_dict(section: Retrain | None) -> dict[str, Any] | None:
    """A resolved ``rft``/``self_train`` section as it is saved in ``config.yaml``."""
    if section is None:
        return None
    parts = [section.stage] + ([section.select] if section.select is not None else [])
    return {k: v for part in parts for k, v in to_dict(part).items()} | {"sft": dict(section.sft_overrides)}


def expert_data(r: Resolved, config_path: str | Path, section: str) -> Path:
    """The expert trajectories the SFT model was trained on (``expert.data``, else the run's expert.json)."""
    path = Path(r.expert.data) if r.expert.data else r.run_dir / "expert.json"
    if not path.exists():
        raise QlassError(f"{config_path}: {section}: no expert data at {path} (set expert.data to the trajectory "
                         "file the SFT model was trained on)")
    return path


def supervised_expert_data(r: Resolved, config_path: str | Path, section: str) -> Path:
    """The expert trajectories the SFT model actually saw: under limited supervision
    (``sft.max_trajectories``) the same seeded subset, written to ``expert-sft.json`` in the run folder,
    so a baseline that reads expert data (ETO's pairs) gets the trajectories SFT was given and no others
    (those SFT held out for validation, ``sft.val_fraction``, included: ETO may pair them)."""
    from .data import load_trajectories, save_trajectories
    from .training.sft import limit_trajectories

    path = expert_data(r, config_path, section)
    if r.sft.max_trajectories is None:
        return path
    subset = r.run_dir / "expert-sft.json"
    save_trajectories(subset, limit_trajectories(load_trajectories(path), r.sft.max_trajectories, r.sft.seed))
    return subset


def retrained_agents(r: Resolved, sft_dir: Path, config_path: str | Path) -> list[tuple[str, Path]]:
    """Train (or resume) the RFT, ETO and self-trained agents the config asks for and evaluate each
    greedily on the evaluation's tasks; returns (row label prefix, evaluation folder) per agent."""
    import dataclasses

    from .eto import NoPairsError, run_eto
    from .evaluate import run_evaluation
    from .models import model_folder
    from .rft import run_rft
    from .self_train import self_train

    cfg, run = r.cfg, r.run_dir
    base = model_folder(cfg.model)
    agents: list[tuple[str, Path, Path]] = []
    if r.rft is not None:
        rft_cfg = r.rft.stage
        if rft_cfg.max_steps is None and r.eval.max_steps is not None:
            rft_cfg = dataclasses.replace(rft_cfg, max_steps=r.eval.max_steps)
        log.info("RFT baseline → %s", run / RFT_DIR)
        agent, _ = run_rft(str(sft_dir), expert_data(r, config_path, "rft"), base, cfg.env, run / RFT_DIR, rft_cfg,
                           r.rft.sft, env_kwargs=cfg.env_args, task_types=cfg.task_types, policy_kwargs=cfg.policy,
                           seed=cfg.seed, backend=cfg.backend, workers=cfg.workers, concurrency=r.eval.concurrency)
        agents.append(("rft", agent, run / RFT_DIR / "eval"))
    if r.eto is not None:
        eto_cfg = r.eto.stage
        if eto_cfg.max_steps is None and r.eval.max_steps is not None:
            eto_cfg = dataclasses.replace(eto_cfg, max_steps=r.eval.max_steps)
        log.info("ETO baseline → %s", run / ETO_DIR)
        try:
            agent, _ = run_eto(sft_dir, supervised_expert_data(r, config_path, "eto"), cfg.env, run / ETO_DIR,
                               eto_cfg, r.eto.dpo, env_kwargs=cfg.env_args, task_types=cfg.task_types,
                               policy_kwargs=cfg.policy, seed=cfg.seed, backend=cfg.backend, workers=cfg.workers,
                               concurrency=r.eval.concurrency)
        except NoPairsError as exc:  # the other agents still train and are reported
            log.warning("%s: the results have no eto (greedy) row", exc)
        else:
            agents.append(("eto", agent, run / ETO_DIR / "eval"))
    if r.self_train is not None:
        stage = r.self_train.stage
        start = base if stage.init == "base" else sft_dir
        for reward in stage.rewards:
            out = run / SELF_TRAIN_DIR / reward
            log.info("self-training guided by process reward %r → %s", reward, out)
            agent, _, _ = self_train(run / "trees.jsonl", expert_data(r, config_path, "self_train"), start, out,
                                     reward, r.self_train.sft, r.self_train.select)
            agents.append((f"self-train[{reward}]", agent, out / "eval"))
    greedy = next((n, o) for n, o in r.eval_methods() if n == "greedy")  # resolve() requires one
    for label, agent, out in agents:
        log.info("evaluating the %s agent greedily → %s", label, out)
        run_evaluation(model=str(agent), env_spec=cfg.env, splits=r.eval.splits, methods=[greedy], out_dir=out,
                       env_kwargs=cfg.env_args, task_types=cfg.task_types, limit=r.eval.limit,
                       policy_kwargs=dict(cfg.policy), seed=cfg.seed, backend=cfg.backend, workers=cfg.workers,
                       concurrency=r.eval.concurrency)
    return [(label, out) for label, _, out in agents]


def combined_report(r: Resolved, agents: list[tuple[str, Path]]) -> list[dict[str, Any]]:
    """One table (``results/``) of the main evaluation's rows and each retrained agent's greedy row
    (``<agent> (greedy)``), over the tasks every row played, with paired differences to greedy; the
    records it was built from go beside it (``results/records.jsonl``, e.g. for ``qlass report --side``)."""
    from .jsonl import read_jsonl, write_jsonl
    from .report import common_tasks, write_report
    from .search import make_method_config, method_label

    labels = {method_label(name, make_method_config(name, opts)) for name, opts in r.eval_methods()}
    records = [rec for rec in read_jsonl(r.run_dir / "eval" / "records.jsonl") if rec["method"] in labels]
    for prefix, out in agents:
        for rec in read_jsonl(out / "records.jsonl"):
            if rec["method"] == "greedy":
                name = f"{prefix} (greedy)"
                records.append({**rec, "method": name, "method_name": name})
    out_dir = r.run_dir / RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "records.jsonl", records)
    rows = write_report(common_tasks(records), out_dir, title="qlass results with the retrained agents")
    log.info("results with the retrained agents → %s", out_dir / "results.md")
    return rows
