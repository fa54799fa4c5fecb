"""``qlass run CONFIG.yaml``: the four stages in one resumable run.

    expert data ─► SFT ─► exploration trees ─► Q data ─► QNet ─► evaluation (table + budget curve)

``sft_model: DIR`` starts from an existing SFT checkpoint instead of stage 1 (e.g. one trained
elsewhere, or to compare exploration settings on one SFT model). Every stage writes into the run
folder and is skipped when its output is complete; the stages
that are themselves resumable (SFT, exploration, QNet training, evaluation) continue where an
interrupted run stopped. The whole configuration is validated before any work (stage options,
method specs, policy options) and saved, resolved, as ``config.yaml`` in the run folder; rerunning
with changed settings for a stage that already has outputs there is refused (use a new run
folder), while task limits may grow.

Optional agents trained again after the main evaluation, each evaluated greedily on the same tasks
(their rows, ``rft (greedy)``, ``eto (greedy)`` and ``self-train[q] (greedy)`` ..., join the main rows
in ``results/``): ``rft:`` the RFT baseline (:mod:`qlass.rft`) into ``rft/``; ``eto:`` the ETO baseline
(:mod:`qlass.eto`, DPO on the SFT agent's failures paired with the expert trajectories) into
``eto/``; ``self_train:`` tree-guided self-training with each process reward of
``self_train.rewards`` (:mod:`qlass.self_train`) into ``self-train/<reward>/`` (their sections and
stage: :mod:`qlass.pipeline_retrain`). Stage 2 (trees, Q data) is skipped when neither a QNet nor self-training
reads the trees, and stage 3 (QNet) when no evaluation method uses a QNet.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from .config import load_extended_yaml
from .errors import QlassError
from .file_checks import require_model_folder
from .locking import writer_lock
from .pipeline_checks import check_eval_records, check_stage_splits
from .pipeline_config import Resolved, resolve, save_resolved
from .pipeline_retrain import SELF_TRAIN_DIR, combined_report, expert_data, retrained_agents
from .types import Task

log = logging.getLogger(__name__)


def _expert_and_sft(r: Resolved, base: Path) -> Path:
    """Stage 1: export verified expert trajectories (unless given) and fine-tune ``base`` on them."""
    from .data import save_trajectories
    from .envs.base import env_close, env_tasks, make_env
    from .expert import export_expert
    from .training.sft import train_sft

    cfg, run = r.cfg, r.run_dir
    expert_path = Path(r.expert.data) if r.expert.data else run / "expert.json"
    if r.expert.data and not expert_path.exists():
        raise QlassError(f"expert.data: {expert_path} not found (it names expert trajectories to use instead of "
                         "exporting them; leave it out to export them into the run folder)")
    if not expert_path.exists():
        log.info("stage 1a: exporting expert trajectories to %s", expert_path)
        progress = run / ".expert.json.progress.jsonl"  # a killed export resumes: its replayed tasks are kept
        env = make_env(cfg.env, **cfg.env_args)
        try:
            tasks = env_tasks(env, r.expert.split, cfg.task_types)  # some: checked by check_stage_splits
            result = export_expert(env, tasks, r.expert.per_task, r.expert.max_steps, progress_file=progress,
                                   env_kwargs=dict(cfg.env_args))
        finally:
            env_close(env)
        if not result.trajectories:
            raise QlassError(f"no expert trajectory could be verified for {cfg.env} {cfg.task_types}")
        save_trajectories(expert_path, result.trajectories)
        progress.unlink(missing_ok=True)
        log.info("stage 1a: %d verified expert trajectories → %s (%d tasks excluded)", len(result.trajectories),
                 expert_path, len(result.excluded))
    log.info("stage 1b: SFT → %s", run / "sft")
    return train_sft(expert_path, base, run / "sft", r.sft)


def _exploration_tasks(r: Resolved, tasks: list[Task], config_path: str | Path) -> list[Task]:
    """The ``explore`` section's selection from ``tasks`` (the split's tasks of the run's types)."""
    from .explore_config import expert_task_ids, exploration_tasks

    stage, exclude = r.explore_stage, set()
    if stage.exclude_expert:
        path = Path(r.expert.data) if r.expert.data else r.run_dir / "expert.json"
        if not path.exists():
            raise QlassError(f"{config_path}: explore.exclude_expert: no expert data at {path} (set expert.data to "
                             "the trajectory file the SFT model was trained on)")
        exclude = expert_task_ids(path)
    chosen = exploration_tasks(tasks, stage.skip, stage.limit, exclude)
    if not chosen:
        raise QlassError(f"{config_path}: explore: no task left in split {stage.split!r} after skip {stage.skip}"
                         + (f" and the {len(exclude)} expert tasks" if stage.exclude_expert else ""))
    _refuse_changed_trees(r, chosen, config_path)
    return chosen


def _refuse_changed_trees(r: Resolved, chosen: list[Task], config_path: str | Path) -> None:
    """Refuse trees the selection leaves out (a smaller explore.limit: the Q data is every tree of the
    file, so the QNet would still train on them), and tasks without a tree once a QNet or a self-trained
    agent was trained on the run's trees (a grown explore.limit): the new trees would replace the Q data it
    was trained on, which it then refuses."""
    from .tree import read_trees

    path = r.run_dir / "trees.jsonl"
    if not path.exists():
        return
    have = {t.tree_id for t in read_trees(path, repair_tail=True)}
    left_out = sorted(have - {t.id for t in chosen})
    if left_out:
        raise QlassError(f"{config_path}: explore: {path} holds {len(left_out)} tree(s) of tasks this selection "
                         f"leaves out (first: {left_out[0]!r}); its Q data would still hold them (set explore.limit "
                         "and skip back, or use a new run_dir)")
    trained = [r.run_dir / p for p in ("qnet", SELF_TRAIN_DIR) if (r.run_dir / p).exists()]
    if not trained:
        return
    new = [t.id for t in chosen if t.id not in have]
    if new:
        what = "the QNet in" if trained[0].name == "qnet" else "the self-trained agents in"
        raise QlassError(f"{config_path}: explore: {len(new)} task(s) without a tree (first: {new[0]!r}), but "
                         f"{what} {trained[0]} was trained on the {len(have)} trees of {path}; more would change "
                         "its data (set explore.limit back, or use a new run_dir)")


STAGES = ("sft", "explore", "qnet", "eval")


def run_pipeline(config_path: str | Path, stop_after: str | None = None) -> list[dict[str, Any]] | None:
    """Run (or resume) every stage of the pipeline in ``config_path``; returns the result rows, or
    ``None`` when ``stop_after`` (``sft``, ``explore`` or ``qnet``) ends the run before evaluation. Another
    process running in the same run folder is refused."""
    if stop_after is not None and stop_after not in STAGES[:-1]:
        raise QlassError(f"--stop-after must be one of {', '.join(STAGES[:-1])}, got {stop_after!r}")
    bases: list[Path] = []
    data = load_extended_yaml(config_path, bases=bases)
    if not data:
        raise QlassError(f"{config_path}: holds no settings, so every stage would run at its defaults in "
                         "runs/qlass; write at least run_dir (see configs/demo.yaml; qlass run --list-options "
                         "lists every key)")
    source = f"{config_path} (extending {', '.join(map(str, bases))})" if bases else str(config_path)
    r = resolve(data, source)  # a value may come from a base file
    check_stage_splits(r, source)
    with writer_lock(r.run_dir, folder=True):  # one run per folder (each stage also locks its own output)
        _check_models(r, config_path)
        check_eval_records(r, source)  # refusals before config.yaml is rewritten, not at their stage
        chosen = None
        if _needs_trees(r, stop_after) and (r.run_dir / "trees.jsonl").exists():
            chosen = _exploration_selection(r, config_path)
        save_resolved(r)
        return _stages(r, config_path, stop_after, chosen)


def _check_models(r: Resolved, config_path: str | Path) -> None:
    """The model folders the config names (``sft_model``, or ``model`` unless it is the default, which is made on
    first use), before ``config.yaml`` records them."""
    if r.cfg.sft_model:
        require_model_folder(Path(r.cfg.sft_model), f"{config_path}: field 'sft_model': {r.cfg.sft_model} is not a "
                                                    "model folder (no config.json)")
    elif r.cfg.model != "default":
        require_model_folder(Path(r.cfg.model), f"{config_path}: field 'model': {r.cfg.model} is not a model folder "
                                                "(no config.json)")


def _needs_trees(r: Resolved, stop_after: str | None) -> bool:
    """Whether stage 2 runs: the QNet and self-training read the trees, and ``--stop-after explore/qnet``
    asks for them."""
    return stop_after in ("explore", "qnet") or r.self_train is not None or _uses_qnet(r)


def _stages(r: Resolved, config_path: str | Path, stop_after: str | None,
            chosen: list[Task] | None) -> list[dict[str, Any]] | None:
    """The stages of :func:`run_pipeline` on the resolved, saved configuration ``r`` (``chosen``: the
    exploration's tasks, where :func:`run_pipeline` selected them already)."""
    from .evaluate import run_evaluation  # it sizes its own policy cache (eval.concurrency)
    from .models import model_folder

    cfg, run = r.cfg, r.run_dir

    # 1. expert data + SFT
    if cfg.sft_model:
        sft_dir = Path(cfg.sft_model)  # a model folder: checked by run_pipeline
        log.info("stage 1: using the SFT checkpoint %s", sft_dir)
        for name in ("rft", "eto", "self_train"):  # read after the evaluation: a missing file is named now
            if getattr(r, name) is not None:
                expert_data(r, config_path, name)
        ignored = [name for name in ("expert", "sft") if getattr(cfg, name)]
        if r.explore_stage.exclude_expert:  # exploration leaves out the expert data's tasks
            ignored = [name for name in ignored if name != "expert"]
        if r.rft is not None or r.self_train is not None:  # their fine-tuning reads both
            ignored = []
        elif r.eto is not None:  # its pairs read the expert data, the subset SFT saw under sft.max_trajectories
            ignored = [name for name in ignored if name != "expert"
                       and not (name == "sft" and r.sft.max_trajectories is not None)]
        if ignored:
            log.warning("%s: section(s) %s ignored: sft_model is set, so stage 1 does not run",
                        config_path, ", ".join(ignored))
    else:
        base = model_folder(cfg.model)
        require_model_folder(base, f"{config_path}: field 'model': {base} is not a model folder (no config.json)")
        sft_dir = _expert_and_sft(r, base)
    if stop_after == "sft":
        return None

    policy_spec, policy_opts = str(sft_dir), dict(cfg.policy)
    if cfg.policy_server:
        policy_spec = cfg.policy_server
        policy_opts.setdefault("tokenizer", str(sft_dir))

    # 2. exploration trees + Q data (read by the QNet and by self-training only)
    if _needs_trees(r, stop_after):
        _trees_and_qdata(r, chosen or _exploration_selection(r, config_path), policy_spec, policy_opts)
    else:
        log.info("stage 2 skipped: no evaluation method uses a QNet and no self_train section reads the trees")
    if stop_after == "explore":
        return None

    # 3. QNet
    if stop_after == "qnet" or _uses_qnet(r):
        from .training.qnet import train_qnet

        log.info("stage 3: QNet → %s", run / "qnet")
        train_qnet(run / "qdata.jsonl", sft_dir, run / "qnet", r.qnet)
    else:
        log.info("stage 3 skipped: no evaluation method uses a QNet")
    if stop_after == "qnet":
        return None

    # 4. evaluation
    log.info("stage 4: evaluation → %s", run / "eval")
    rows = run_evaluation(model=policy_spec, env_spec=cfg.env, splits=r.eval.splits, methods=r.eval_methods(),
                          out_dir=run / "eval", env_kwargs=cfg.env_args, task_types=cfg.task_types, limit=r.eval.limit,
                          qnet_dir=run / "qnet", policy_kwargs=policy_opts, seed=cfg.seed,
                          backend=cfg.backend, workers=cfg.workers, concurrency=r.eval.concurrency)
    agents = retrained_agents(r, sft_dir, config_path)
    return combined_report(r, agents) if agents else rows


def _exploration_selection(r: Resolved, config_path: str | Path) -> list[Task]:
    """The tasks stage 2 explores (refusing a selection that the trees already explored contradict)."""
    from .envs.base import env_close, env_tasks, make_env

    env = make_env(r.cfg.env, **r.cfg.env_args)
    try:
        tasks = env_tasks(env, r.explore_stage.split, r.cfg.task_types)
    finally:
        env_close(env)
    return _exploration_tasks(r, tasks, config_path)


def _trees_and_qdata(r: Resolved, tasks: list[Task], policy_spec: str, policy_opts: dict[str, Any]) -> None:
    """Stage 2: explore a tree for each of ``tasks`` with the SFT policy, then export the Q data."""
    from .envs.base import env_maker
    from .evaluate import cache_for
    from .executor import make_executor
    from .explore import EXPLORE_CACHE_PER_TREE, explore_tasks
    from .policy import load_policy
    from .qdata import export_qdata
    from .tree import BackupConfig

    cfg, run = r.cfg, r.run_dir
    log.info("stage 2: exploration trees of %d tasks%s → %s", len(tasks),
             " (none of the expert data's)" if r.explore_stage.exclude_expert else "", run / "trees.jsonl")
    concurrency = r.explore_stage.concurrency
    explore_opts = cache_for(policy_spec, policy_opts, EXPLORE_CACHE_PER_TREE * concurrency)
    policy = functools.partial(load_policy, policy_spec, **{"seed": cfg.seed, **explore_opts})  # policy.seed wins
    explore_tasks(env_maker(cfg.env, **cfg.env_args), tasks, policy, r.explore,
                  run / "trees.jsonl", seed=cfg.seed, executor=make_executor(cfg.backend, cfg.workers),
                  concurrency=concurrency, settings={"model": policy_spec, "env": cfg.env,
                                                     "env_args": dict(cfg.env_args), "policy": explore_opts})
    backup = BackupConfig(gamma=r.explore.gamma, keep_intermediate=r.qdata.keep_intermediate,
                          normalize=r.qdata.normalize)
    counts = export_qdata(run / "trees.jsonl", run / "qdata.jsonl", backup, r.qdata.max_per_tree)
    log.info("Q data: %d records from %d trees", counts["records"], counts["trees"])


def _uses_qnet(r: Resolved) -> bool:
    """Whether an evaluation method of the run needs a QNet."""
    from .search import METHODS, make_method_config

    return any(METHODS[name].needs_qnet(make_method_config(name, opts)) for name, opts in r.eval_methods())
