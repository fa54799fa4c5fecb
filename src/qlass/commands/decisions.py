"""``qlass decisions collect|report``: the decision benchmark (issue 13's measurement of rankers)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import typer

from ..errors import QlassError

log = logging.getLogger(__name__)

EXTRA_CACHE_SLOTS = 2


def _load_qnet(path: Path, options: dict[str, Any]) -> Any:
    """The QNet at ``path`` with the ``--qnet-arg`` options, checked against :meth:`QNet.load`'s parameters; those
    and the folder's ``qnet.json`` are checked before torch is imported."""
    from ..config import check_call_options
    from ..qnet_options import check_qnet_folder, qnet_load_options, read_qnet_meta

    options = check_call_options(qnet_load_options, options, "--qnet-arg", skip=("path",))
    read_qnet_meta(path)
    check_qnet_folder(path)  # a missing folder before torch loads
    from ..qnet import QNet

    options.setdefault("cache_slots", 8)  # a task's decisions share their history prefixes
    return QNet.load(path, **options)


def policy_with_cache(model: str, options: dict[str, Any], concurrency: int) -> Any:
    """A policy factory for ``model`` whose prompt cache holds every live history: a built-in backend
    that takes ``cache_slots`` gets ``concurrency + 2`` unless the user set it (a smaller value is
    kept, with a warning: each turn then re-reads its whole history)."""
    from ..evaluate import cache_for
    from ..policy import is_class_spec
    from .explore import policy_factory

    if is_class_spec(model):  # a user's own policy class: its options are its own
        return policy_factory(model, options)
    if int(options.get("cache_slots", concurrency)) < concurrency:
        log.warning("cache_slots=%s is below concurrency=%d: prompt caches will be evicted between turns",
                    options["cache_slots"], concurrency)
    return policy_factory(model, cache_for(model, options, concurrency + EXTRA_CACHE_SLOTS))


def register(app: typer.Typer) -> None:
    dec_app = typer.Typer(help="The decision benchmark: collect decision states with Monte-Carlo candidate values, "
                               "then score rankers (QNet, likelihood, mixtures, anchor, random, oracle) on them.",
                          no_args_is_help=True)

    @dec_app.command("collect")
    def collect(
        model: str | None = typer.Option(None, help="Policy: model folder, 'default', server URL (http://.../v1) or "
                                                    "package.module:Class."),
        env: str = typer.Option("sciworld", help="Environment name or package.module:Class."),
        split: list[str] = typer.Option(["seen"], help="Split(s) to play (repeatable; interleaved as in qlass eval)."),
        task_types: str | None = typer.Option(None, help="Comma-separated task types to keep."),
        limit: int | None = typer.Option(None, min=1,
            help="At most this many tasks per split (round-robin over task types; may grow on rerun)."),
        offset: int = typer.Option(0, min=0, help="Skip the first N tasks of each split's round-robin order: a second "
                                                  "collector with --offset 30 takes the tasks after a first one's "
                                                  "--limit 30."),
        exclude_tasks_of: Path | None = typer.Option(None, dir_okay=False,
            help="Leave out the tasks of this trajectory file (e.g. the expert/SFT data, to collect training-split "
                 "decisions on tasks the SFT model never saw)."),
        out: Path = typer.Option(Path("runs/decisions/decisions.jsonl"), dir_okay=False,
            help="Decisions file to append to (resumable); NAME.config.yaml and NAME.tasks.jsonl go beside it."),
        config: Path | None = typer.Option(None, dir_okay=False, help="YAML file with DecisionConfig options."),
        set_: list[str] = typer.Option([], "--set", help="Override a DecisionConfig option: key=value (repeatable)."),
        concurrency: int | None = typer.Option(None, min=1,
            help="Episodes live at once (sets the concurrency option)."),
        env_arg: list[str] = typer.Option([], help="Environment constructor option key=value (repeatable)."),
        policy_arg: list[str] = typer.Option([], help="Policy option key=value (repeatable)."),
        seed: int = typer.Option(0, help="Run seed (every draw's seed is derived from it)."),
        list_options: bool = typer.Option(False, "--list-options",
            help="Print every DecisionConfig option with its default and help, then exit."),
    ) -> None:
        """Play the policy on a split, find decision states and value every candidate by K rollouts."""
        from ..config import describe, load_config, parse_kv
        from ..decisions import DecisionConfig, check_collection, collect_decisions
        from ..envs.base import make_env
        from ..evaluate import split_tasks
        from ..explore_config import expert_task_ids
        from ..locking import writer_lock
        from ..policy import check_policy_spec

        if list_options:
            typer.echo(describe(DecisionConfig))
            return
        if model is None:
            raise QlassError("qlass decisions collect needs --model (a model folder, 'default', a server URL or "
                             "module:Class)")
        overrides = parse_kv(set_, "--set")
        if concurrency is not None:
            overrides["concurrency"] = concurrency
        cfg = load_config(config, DecisionConfig, overrides)
        env_kwargs = parse_kv(env_arg, "--env-arg")
        policy_kwargs = parse_kv(policy_arg, "--policy-arg")
        types = task_types.split(",") if task_types else None
        make = functools.partial(make_env, env, **env_kwargs)
        exclude = expert_task_ids(exclude_tasks_of) if exclude_tasks_of else set()
        _, tasks = split_tasks(make, env, split, types, limit, offset, exclude)
        # always recorded, so a rerun that changes them is refused (files collected before these
        # options lack them, which counts as compatible)
        settings = {"model": model, "env": env, "env_args": env_kwargs, "splits": list(split), "task_types": types,
                    "limit": limit, "policy": policy_kwargs, "offset": offset,
                    "exclude_tasks_of": str(exclude_tasks_of) if exclude_tasks_of else None}
        check_policy_spec(model, policy_kwargs)  # a built-in policy's folder and options, without loading it
        with writer_lock(out, folder=False):
            check_collection(out, cfg, seed, settings, save=False)  # before the model loads
        policy = policy_with_cache(model, policy_kwargs, cfg.concurrency)()
        records = collect_decisions(make, tasks, policy, cfg, out, seed=seed, settings=settings)
        typer.echo(f"{len(records)} decisions from {len(tasks)} tasks in {out}")

    @dec_app.command("report")
    def report(
        decisions: list[Path] = typer.Argument(..., dir_okay=False,
            help="Decision files written by `qlass decisions collect`."),
        out: Path = typer.Option(..., file_okay=False, help="Folder for decisions.md and decisions.json."),
        qnet: Path | None = typer.Option(None, file_okay=False,
            help="QNet folder: adds the qnet, qnet+β·likelihood and anchor+margin rankers."),
        qnet_arg: list[str] = typer.Option([], help="QNet.load option key=value, e.g. threads=1 or device=cpu "
                                                    "(repeatable)."),
        beta: list[float] = typer.Option([], help="β of a qnet+β·likelihood ranker (repeatable; default 0.1, 0.3, 1)."),
        margin: list[float] = typer.Option([], help="τ of an anchor+margin ranker (repeatable; default 0.05, 0.1, "
                                                    "0.2)."),
        resamples: int = typer.Option(10_000, min=100, max=1_000_000, help="Bootstrap resamples per interval."),
        seed: int = typer.Option(0, min=0, help="Bootstrap seed."),
        allow_mixed: bool = typer.Option(False, "--allow-mixed-settings",
            help="Pool decision files collected with other settings (model, K, M, temperatures, seed, ...; see "
                 "NAME.config.yaml); the differences are listed. By default such files are refused."),
    ) -> None:
        """Score rankers on the decisions: accuracy, regret, paired bootstrap intervals vs likelihood and anchor."""
        from ..config import build, parse_kv
        from ..decision_report import ReportConfig, markdown, write_decision_report

        if qnet is None and (beta or margin or qnet_arg):
            raise QlassError("--beta, --margin and --qnet-arg set the QNet's rankers: give --qnet too")

        opts: dict[str, Any] = {"resamples": resamples, "seed": seed}
        if beta:
            opts["betas"] = beta
        if margin:
            opts["margins"] = margin
        cfg = build(ReportConfig, opts, "qlass decisions report")
        load_qnet = None
        if qnet is not None:  # loaded (torch with it) once the decisions are read and checked
            load_qnet = functools.partial(_load_qnet, qnet, parse_kv(qnet_arg, "--qnet-arg"))
        from ..locking import writer_lock

        with writer_lock(out, folder=True):  # one report into a folder at a time
            result = write_decision_report(decisions, out, cfg=cfg, load_qnet=load_qnet, allow_mixed=allow_mixed)
        typer.echo(markdown(result))
        typer.echo(f"decisions.md and decisions.json in {out}")

    @dec_app.command("to-qdata")
    def to_qdata(
        decisions: list[Path] = typer.Argument(..., dir_okay=False,
            help="Decision files written by `qlass decisions collect`."),
        out: Path = typer.Option(..., dir_okay=False, help="Q data file to write (qdata.jsonl format)."),
        allow_mixed: bool = typer.Option(False, "--allow-mixed-settings",
            help="Pool decision files collected with other settings (model, K, M, temperatures, seed, ...; see "
                 "NAME.config.yaml); the differences are listed. By default such files are refused."),
    ) -> None:
        """Write decision states as Q data: one sibling group per decision, each candidate's Monte-Carlo
        value as its target, the task as its tree (for `qlass train-qnet-head` / `train-qnet`)."""
        from ..decision_qdata import write_decision_qdata

        typer.echo(f"{write_decision_qdata(decisions, out, allow_mixed)} records in {out}")

    @dec_app.command("cv-head")
    def cv_head(
        decisions: list[Path] | None = typer.Argument(None, dir_okay=False,
            help="Decision files to score (held out by task in turn)."),
        out: Path | None = typer.Option(None, file_okay=False,
            help="Folder for features.jsonl (resumable), decisions.md and decision_cv.json."),
        model: str = typer.Option("default", help="SFT policy folder: the frozen backbone, or 'default'."),
        extra: list[Path] = typer.Option([], dir_okay=False,
            help="Decision files used only for fitting, never scored (repeatable), e.g. from training tasks."),
        config: Path | None = typer.Option(None, dir_okay=False, help="YAML file of QNetHeadConfig options."),
        set_: list[str] = typer.Option([], "--set", help="Override a QNetHeadConfig option: key=value (repeatable)."),
        resamples: int = typer.Option(10_000, min=100, max=1_000_000, help="Bootstrap resamples per interval."),
        list_options: bool = typer.Option(False, "--list-options",
            help="Print every QNetHeadConfig option (--set, --config) with its default and help, then exit."),
        allow_mixed: bool = typer.Option(False, "--allow-mixed-settings",
            help="Pool decision files to score collected with other settings (model, K, M, temperatures, seed, ...; "
                 "see NAME.config.yaml); the differences are listed. By default such files are refused (--extra files "
                 "may differ: they only train)."),
    ) -> None:
        """Nested cross-validation by task of a head-only QNet on decision states, scored by the decision
        benchmark against the likelihood, anchor and random rankers. Rerun to resume the features."""
        from ..config import build, describe, load_config, parse_kv
        from ..decision_head import cross_validate_on_decisions, cv_markdown
        from ..decision_report import ReportConfig
        from ..models import model_folder
        from ..training.configs import QNetHeadConfig

        if list_options:
            typer.echo(describe(QNetHeadConfig))
            return
        if not decisions or out is None:
            raise QlassError("qlass decisions cv-head needs DECISIONS (one or more decision files) and --out DIR")
        cfg = load_config(config, QNetHeadConfig, parse_kv(set_, "--set"))
        report_cfg = build(ReportConfig, {"resamples": resamples}, "qlass decisions cv-head")
        sft = model_folder(model)
        result = cross_validate_on_decisions(decisions, sft, out, cfg, report_cfg, extra, allow_mixed)
        typer.echo(cv_markdown(result))
        typer.echo(f"decisions.md and decision_cv.json in {out}")

    app.add_typer(dec_app, name="decisions")
