"""The checks of a pipeline config (:mod:`qlass.pipeline_config`) that would otherwise fail only once their
stage starts, after the stages before it ran: top-level values, every trainer's ``report_to`` and ``device``,
the environment's splits and tasks for each stage, the evaluation's paraphrase caches, and the evaluation
methods' settings against the records a rerun would add to.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import QlassError

if TYPE_CHECKING:
    from .pipeline_config import PipelineConfig, Resolved


def trainer_configs(r: Resolved) -> dict[str, Any]:
    """The training configs of the run's trainers, by config key (``sft`` only where stage 1 trains it)."""
    trainers = {"sft": r.sft} if not r.cfg.sft_model else {}
    trainers["qnet"] = r.qnet
    for name in ("rft", "self_train"):
        section = getattr(r, name)
        if section is not None:
            trainers[f"{name}.sft"] = section.sft
    if r.eto is not None:
        trainers["eto.dpo"] = r.eto.dpo
        trainers["eto.later_dpo"] = r.eto.stage.dpo_for(r.eto.dpo, 2)  # rounds 2 on
    return trainers


def check_trainers(r: Resolved, source: str) -> None:
    """Every trainer's ``report_to`` and ``device`` (``cuda`` on a machine without a GPU), before any work."""
    from .models import check_device
    from .training.configs import check_report_to

    for name, cfg in trainer_configs(r).items():
        try:
            check_report_to(cfg.report_to)
        except QlassError as exc:
            raise QlassError(f"{source}: {name}: {exc}") from None
        try:
            check_device(cfg.device)
        except QlassError as exc:
            raise QlassError(f"{source}: field '{name}.device': {exc}") from None


def check_top_level(cfg: PipelineConfig, source: str) -> None:
    """The top-level values that would fail only once their stage starts."""
    if cfg.task_types is not None and not cfg.task_types:
        raise QlassError(f"{source}: field 'task_types' must name at least one task type (null: all of them)")
    if not cfg.run_dir.strip():  # Path("") is the working directory
        raise QlassError(f"{source}: field 'run_dir' must name a folder, got {cfg.run_dir!r}")
    if Path(cfg.run_dir).exists() and not Path(cfg.run_dir).is_dir():
        raise QlassError(f"{source}: field 'run_dir': {cfg.run_dir} is a file, not a folder")
    data = cfg.expert.get("data")
    if isinstance(data, str) and Path(data).is_dir():
        raise QlassError(f"{source}: field 'expert.data': {data} is a folder, not a trajectory file")
    if cfg.policy_server is not None and not cfg.policy_server.lower().startswith(("http://", "https://")):
        raise QlassError(f"{source}: field 'policy_server' must be the http(s)://host:port/v1 URL of an "
                         f"OpenAI-compatible server, got {cfg.policy_server!r}")


def check_stage_splits(r: Resolved, source: str) -> None:
    """Refuse a split the environment lacks in any stage, or one without a task of the run's task types,
    before the first stage runs (an environment may hand an unknown split its default tasks; a typo in
    eval.splits would otherwise surface after SFT, an evaluation split without such tasks at stage 4)."""
    from .envs.base import check_splits, env_close, env_tasks, make_env

    used = {"expert.split": [r.expert.split]} if not r.cfg.sft_model and not r.expert.data else {}
    used |= {"explore.split": [r.explore_stage.split], "eval.splits": list(r.eval.splits)}  # in stage order
    for name, section in (("rft", r.rft), ("eto", r.eto)):
        if section is not None:
            used[f"{name}.split"] = [section.stage.split]
    env = make_env(r.cfg.env, **r.cfg.env_args)
    has_tasks: dict[str, bool] = {}  # by split: several stages often use the same one (train)
    try:
        for field_name, splits in used.items():
            try:
                check_splits(env, splits, r.cfg.env)
                for split in splits:
                    if split not in has_tasks:
                        has_tasks[split] = bool(env_tasks(env, split, r.cfg.task_types))
                    if not has_tasks[split]:
                        types = f" of the task types {r.cfg.task_types}" if r.cfg.task_types else ""
                        raise QlassError(f"{r.cfg.env} has no task in split {split!r}{types}")
            except QlassError as exc:
                raise QlassError(f"{source}: field {field_name!r}: {exc}") from None
        _check_eval_paraphrases(r, env, source)
    finally:
        env_close(env)


def _check_eval_paraphrases(r: Resolved, env: Any, source: str) -> None:
    """Refuse an evaluation method's paraphrase cache that lacks a task the evaluation will play, before
    the first stage (it was found at stage 4)."""
    from .envs.base import env_tasks
    from .eval_worker import MethodRun
    from .evaluate import paraphrase_tables, select_tasks
    from .search import make_method_config

    runs = [MethodRun(name, make_method_config(name, opts)) for name, opts in r.eval_methods()]
    if not any(getattr(run.config, "paraphrases", None) is not None for run in runs):
        return
    try:
        tasks = [t for split in r.eval.splits for t in select_tasks(env_tasks(env, split, r.cfg.task_types),
                                                                     r.eval.limit)]
        paraphrase_tables(runs, tasks)
    except QlassError as exc:
        raise QlassError(f"{source}: field 'eval.methods': {exc}") from None


def check_eval_records(r: Resolved, source: str) -> None:
    """Refuse evaluation methods whose settings differ from the records the run folder's evaluation holds under
    their labels (``eval.max_steps`` changed, say), before ``config.yaml`` is rewritten with them: found at
    stage 4, the refusal left a ``config.yaml`` that no output was made with."""
    from .eval_worker import MethodRun
    from .evaluate import check_resumable
    from .jsonl import read_jsonl
    from .search import make_method_config

    path = r.run_dir / "eval" / "records.jsonl"
    if not path.is_file():
        return
    runs = [MethodRun(name, make_method_config(name, opts)) for name, opts in r.eval_methods()]
    try:
        check_resumable(runs, read_jsonl(path, skip_torn_tail=True), path, "set eval back, or use a new run_dir")
    except QlassError as exc:
        raise QlassError(f"{source}: field 'eval': {exc}") from None
