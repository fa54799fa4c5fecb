"""The evaluation harness: methods × tasks → per-task records, resumable after a crash.

A worker (:class:`qlass.eval_worker.EvalWorker`) plays ``concurrency`` episodes at once in lockstep
(:func:`qlass.lockstep.drive`): the policy requests of every live episode are answered by one
batched call per wave, the QNet requests by another, each episode steps its own environment, and a
finished episode's slot is refilled at once. Each episode is seeded by the run seed, its method
label and its task, and every draw by the step and candidate too, so records do not depend on
``concurrency``, the backend or the worker.

Each finished (method, task) appends one record to ``records.jsonl`` in the run folder (whole-line
appends, fsynced); a rerun skips the (method, env, split, task) keys already recorded and a torn
last line is cut, so killing and rerunning never duplicates or loses finished work. Record fields
(:func:`qlass.eval_worker.make_record`; ``docs/formats.md``): ``schema_version``, ``method``
(label), ``method_name``, ``config``, ``env``, ``split``, ``task``, ``task_type``, ``reward``,
``success``, ``prompt_tokens``, ``completion_tokens``, ``qnet_tokens``, ``env_steps``, ``steps``,
``wall_time`` (from the episode's start to its end, shared with the episodes live beside it),
``oracle`` and ``trajectory`` (the conversation record) plus ``candidates`` and
``oracle_pass_at_n`` for best-of-n, ``qnet_choices`` for qlass (``trajectory.decisions`` lists
them) and ``trials`` for Reflexion. ``config.yaml``
in the run folder records how the evaluation was made; a rerun with another model, QNet,
environment, environment or policy option or seed, or with other method settings under a recorded
label, is refused, naming the differences, rather than mixed into the same folder or row.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .config import differences, load_yaml, save_yaml
from .config_fields import require_count, require_names
from .console import stderr_console
from .envs.base import Env, check_splits, env_close, env_tasks
from .errors import DataError, QlassError
from .eval_records import check_record
from .eval_worker import EvalWorker, MethodRun
from .executor import Executor, LocalExecutor, runs_here
from .jsonl import append_jsonl, read_numbered_jsonl
from .locking import writes_to
from .precision import with_precision
from .recorded import check_recorded, with_model_files
from .search import METHODS
from .seeding import stable_seed
from .types import Task

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 16
"""Episodes a worker keeps live by default."""
DEFAULT_CACHE_SLOTS = 8
"""HFPolicy's own default; raised, never lowered, to hold every live conversation."""
SEEDING = 2
"""How episodes are seeded, as ``config.yaml`` records it (``seeding``): 2, from the run seed, the task
and the method's sampling label (:func:`~qlass.search.sampling_label`), so that methods differing only
in how they choose among their samples (a QNet's pick and its ``select=random`` or ``likelihood``
control, ``beta``, ``margin``, the oracle) play from the same draws and their paired differences
come from the choice alone; 1, what a ``config.yaml`` without the entry means (folders begun before
it): from the method's full label, kept when such a folder resumes."""
RESUMABLE_SETTINGS = ("limit", "splits", "task_types", "tasks", "methods")
"""``config.yaml`` entries a rerun may change besides the runtime ones: which tasks are played (records
are keyed by task) and the method list (each method's settings are checked per record)."""


def round_robin(tasks: Sequence[Task]) -> list[Task]:
    """Every task, taken round-robin over task types (each type's tasks in order, the types in order of
    first appearance)."""
    by_type: dict[str, list[Task]] = {}
    for t in tasks:
        by_type.setdefault(t.task_type, []).append(t)
    queues = [list(reversed(q)) for q in by_type.values()]
    picked: list[Task] = []
    while len(picked) < len(tasks):
        picked += [q.pop() for q in queues if q]
    return picked


def select_tasks(tasks: Sequence[Task], limit: int | None) -> list[Task]:
    """At most ``limit`` tasks, the first of their :func:`round_robin` order, so every type is
    represented; all tasks, in their own order, when ``limit`` is None or covers them."""
    if limit is None or limit >= len(tasks):
        return list(tasks)
    return round_robin(tasks)[:limit]


def split_tasks(make_env: Callable[[], Env], env_spec: str, splits: Sequence[str], task_types: Sequence[str] | None,
                limit: int | None, offset: int = 0, exclude: Collection[str] = ()) -> tuple[str, list[Task]]:
    """The environment's name and the tasks of ``splits`` whose id is not in ``exclude`` (each
    :func:`select_tasks`; with ``offset``, the :func:`round_robin` order after its first ``offset``, at
    most ``limit``: ``offset=30`` continues where ``limit=30`` stopped, and never repeats its tasks), the
    splits interleaved so that a run stopped part-way covers each."""
    if offset < 0:
        raise QlassError(f"offset must be >= 0, got {offset}")
    probe = make_env()
    try:
        env_name = probe.name
        check_splits(probe, splits, env_spec)
        by_split = {}
        for split in splits:
            kept = [t for t in env_tasks(probe, split, task_types) if t.id not in exclude]
            by_split[split] = (round_robin(kept)[offset:None if limit is None else offset + limit] if offset
                               else select_tasks(kept, limit))
    finally:
        env_close(probe)
    for split, tasks in by_split.items():
        if not tasks:
            skipped = f" after skipping the first {offset} (offset)" if offset else ""
            raise QlassError(f"{env_spec}: no tasks in split {split!r} for task types {task_types}{skipped}")
    return env_name, [t for row in itertools.zip_longest(*by_split.values()) for t in row if t is not None]


def record_key(rec: dict[str, Any]) -> tuple[str, str, str, str]:
    """What identifies an evaluation record: method label, environment, split and task."""
    return (rec["method"], rec["env"], rec["split"], rec["task"])


def check_resumable(runs: Sequence[MethodRun], records: Sequence[dict[str, Any]], path: Path,
                    advice: str = "use another output folder for these settings") -> None:
    """Refuse method lists whose labels collide, and records in ``path`` that were made under a
    method's label with other settings (resuming would mix them into one row; ``advice`` ends that error).

    Settings a record does not have (options added since) count as unchanged."""
    configs: dict[str, dict[str, Any]] = {}
    for run in runs:
        cfg = asdict(run.config)
        if run.label in configs:
            diff = ", ".join(differences(configs[run.label], cfg, " vs "))
            raise QlassError(f"method {run.label!r} is listed twice" + (
                f" with different settings ({diff}); evaluate the variants into separate run folders" if diff else ""))
        configs[run.label] = cfg
    for i, rec in enumerate(records):
        cfg = configs.get(rec.get("method"))
        diff = ", ".join(differences(rec.get("config") or {}, cfg)) if cfg is not None else ""
        if diff:
            raise QlassError(f"{path}: line {i + 1} (method {rec['method']!r}, task {rec.get('task')!r}): field "
                             f"'config' differs from this run's ({diff}); {advice}")


@writes_to("out_dir", folder=True)
def evaluate(
    env_name: str,
    tasks: Sequence[Task],
    runs: Iterable[MethodRun],
    worker: EvalWorker,
    out_dir: Path,
    seed: int = 0,
    executor: Executor | None = None,
    settings: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Run every method on every task of environment ``env_name`` with ``worker`` (on ``executor``,
    in-process by default), appending to ``out_dir/records.jsonl`` as pairs finish; returns all
    records (earlier ones included) for these methods and tasks.

    ``out_dir/config.yaml`` receives ``settings`` (how the run was made) with ``seed`` and every
    method's resolved config, once the records already there are known to match them: a folder
    with records whose ``config.yaml`` records other settings is refused, naming them (runtime
    options and :data:`RESUMABLE_SETTINGS` may change; a setting an older ``config.yaml`` lacks counts
    as unchanged, and ``qnet`` is compared only when both runs use one)."""
    made = [name for name in ("config.json", "features.settings.json") if (out_dir / name).exists()]
    made += sorted(p.name for p in out_dir.glob("*_config.yaml"))  # a trainer's (sft, dpo, qnet) or ETO's settings
    if made:
        raise QlassError(f"{out_dir}: holds a model or a training run ({made[0]}); an evaluation would write its "
                         "records and results among its files: evaluate into another folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "records.jsonl"
    numbered = read_numbered_jsonl(path, repair_tail=True)
    records = [rec for _, rec in numbered]
    first_at: dict[tuple[str, ...], int] = {}
    for line, rec in numbered:  # a damaged or foreign record is named by its line, not a KeyError
        check_record(rec, str(path), line)
        if rec["env"] != env_name:
            raise DataError(str(path), f"line {line}: field 'env' is {rec['env']!r}, not this run's {env_name!r}; "
                                       "use another output folder")
        if record_key(rec) in first_at:
            raise DataError(str(path), f"line {line}: {rec['method']} on {rec['split']} {rec['task']} is also "
                                       f"recorded at line {first_at[record_key(rec)]}")
        first_at[record_key(rec)] = line
    runs = list(runs)
    check_resumable(runs, records, path)
    settings = with_model_files(with_precision({**(settings or {}), "seed": seed}, here=runs_here(executor)))
    config = out_dir / "config.yaml"
    recorded = load_yaml(config) if config.exists() else {}
    if {"sft", "explore", "qnet"} <= recorded.keys():
        raise QlassError(f"{out_dir}: is a qlass run folder ({config} holds the pipeline's settings, which this "
                         "evaluation's would replace); evaluate into another folder")
    if records and not config.exists():
        raise QlassError(f"{path} holds {len(records)} records but {config} is missing, so the settings they "
                         "were made with are unknown and resuming could mix them with this run's; use another "
                         "output folder (or move the records away)")
    if records:
        if settings.get("qnet") is None:  # this run uses no QNet: the one earlier records used stays recorded
            settings["qnet"] = recorded.get("qnet")
            if "qnet_files" in recorded:
                settings["qnet_files"] = recorded["qnet_files"]
        elif recorded.get("qnet") is None:  # no earlier record used a QNet
            recorded["qnet"] = settings["qnet"]
        check_recorded(config, settings, str(out_dir), RESUMABLE_SETTINGS,  # every eval config.yaml names model, env
                       "use another output folder for these settings", recorded, required=("model", "env"))
    seeding = recorded.get("seeding", 1) if records else SEEDING  # a folder resumes with its own
    if type(seeding) is not int or not 1 <= seeding <= SEEDING:
        raise QlassError(f"{config}: field 'seeding' is {seeding!r}; this qlass seeds episodes as 1 or "
                         f"{SEEDING} (a folder of a newer qlass? use another output folder)")
    save_yaml(config, {**settings, **({"seeding": seeding} if seeding != 1 else {}), "methods": [
        {"label": r.label, "name": r.name, "config": asdict(r.config)} for r in runs]})
    done = {record_key(r) for r in records}
    # task by task, every method on each: a run stopped part-way has comparable rows
    todo = [(run, t, stable_seed(seed, run.sampling_label if seeding == SEEDING else run.label, t.id))
            for t in tasks for run in runs if (run.label, env_name, t.split, t.id) not in done]
    if len(todo) < len(runs) * len(tasks):
        log.info("resuming: %d of %d (method, task) pairs already in %s",
                 len(runs) * len(tasks) - len(todo), len(runs) * len(tasks), path)
    columns = (TextColumn("[bold]eval[/]"), TextColumn("{task.description}", markup=False),  # a task id is text
               BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("its method's avg reward {task.fields[avg]:.3f}"))
    with Progress(*columns, transient=False, console=stderr_console()) as progress:  # stdout: results
        bar = progress.add_task("", total=len(todo), avg=0.0)
        by_method: dict[str, list[float]] = {}  # this run's rewards per method: their averages
        for i, (_, rec) in enumerate((executor or LocalExecutor()).run(worker, todo), start=1):
            append_jsonl(path, rec)
            records.append(rec)
            rewards = by_method.setdefault(rec["method"], [])
            rewards.append(rec["reward"])
            average = sum(rewards) / len(rewards)
            progress.update(bar, advance=1, avg=average, description=f"{rec['method']} {rec['task']}")
            log.info("%d/%d episodes done: %s on %s, reward %.2f (its average this run %.3f over %d)", i, len(todo),
                     rec["method"], rec["task"], rec["reward"], average, len(rewards))
    wanted = {(run.label, env_name, t.split, t.id) for run in runs for t in tasks}
    return [r for r in records if record_key(r) in wanted]


def live_histories(run: MethodRun) -> int:
    """How many prompt caches one episode of ``run`` keeps in use at once (qlass with ``diverse``
    adds one perturbed prompt per extra candidate each step, with ``paraphrase`` alone one
    paraphrased prompt)."""
    if run.name == "best-of-n":
        return run.config.n
    if run.name != "qlass":
        return 1
    if run.config.diverse:
        return run.config.m
    return 2 if getattr(run.config, "paraphrase", None) else 1


def cache_for(model: str, policy_kwargs: dict[str, Any], conversations: int) -> dict[str, Any]:
    """``policy_kwargs`` with ``cache_slots`` raised to ``conversations`` for a backend that has
    prompt caches (a local model), unless set; otherwise (a server, a user's class) unchanged."""
    from .policy import check_policy_options, is_class_spec

    if "cache_slots" in policy_kwargs or is_class_spec(model):
        return policy_kwargs
    try:
        check_policy_options(model, {"cache_slots": conversations})
    except QlassError:
        return policy_kwargs
    slots = max(conversations, DEFAULT_CACHE_SLOTS)
    log.info("policy cache_slots = %d (one prompt cache per live conversation)", slots)
    return {**policy_kwargs, "cache_slots": slots}


def paraphrase_tables(runs: Sequence[MethodRun], tasks: Sequence[Task]) -> dict[str, dict[str, Any]]:
    """The settings of each method's paraphrase cache (by label), refusing a cache without an entry for
    one of ``tasks`` before any episode is played (it was found when that task's turn came)."""
    tables = {r.label: r.config.paraphrases for r in runs if getattr(r.config, "paraphrases", None) is not None}
    for label, table in tables.items():
        missing = table.missing(tasks)
        if missing:
            raise QlassError(f"{table.path}: no paraphrase of {len(missing)} task(s) of this evaluation (first: "
                             f"{missing[0]!r}), which {label} needs; add them with qlass paraphrase")
    return {label: table.settings for label, table in tables.items()}


def run_evaluation(
    model: str | os.PathLike[str],
    env_spec: str,
    splits: Sequence[str],
    methods: Sequence[tuple[str, dict[str, Any]]],
    out_dir: str | os.PathLike[str],
    env_kwargs: dict[str, Any] | None = None,
    task_types: Sequence[str] | None = None,
    limit: int | None = None,
    qnet_dir: str | os.PathLike[str] | None = None,
    policy_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    backend: str = "local",
    workers: int = 1,
    executor_options: dict[str, Any] | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """Load policy, QNet and environment, evaluate every method on every split, write the report.

    ``offset`` skips the first tasks of each split's round-robin order (see :func:`split_tasks`), so
    an evaluation can leave out the tasks another run (a decision benchmark, say) used; a folder
    keeps the offset it started with.

    ``backend``/``workers`` choose the executor (see :mod:`qlass.executor`): with ``process`` or
    ``ray`` every worker loads its own policy, QNet and environment. Each worker keeps
    ``concurrency`` episodes live (a local model's ``cache_slots`` is raised to hold all their
    conversations unless given). Records depend on neither (each pair's seed comes from the run
    seed, method and task). Returns the summary rows (see :func:`qlass.report.summarise`).
    """
    from .envs.base import env_maker
    from .executor import make_executor
    from .policy import check_policy_spec, load_policy, spec_text
    from .report import write_report
    from .search import make_method_config

    model, out_dir = spec_text(model), Path(out_dir)
    qnet_dir = Path(qnet_dir) if qnet_dir is not None else None
    splits = require_names(splits, "run_evaluation", "splits")
    task_types = require_names(task_types, "run_evaluation", "task_types", empty_ok=True) if task_types else None
    require_count(limit, "run_evaluation", "limit", optional=True)
    require_count(concurrency, "run_evaluation", "concurrency")
    if isinstance(methods, (str, dict)) or not isinstance(methods, (list, tuple)) or not methods or not all(
            isinstance(m, (list, tuple)) and len(m) == 2 and isinstance(m[0], str) and isinstance(m[1], dict)
            for m in methods):
        raise TypeError(f"run_evaluation: argument 'methods' must be a non-empty list of (name, options) pairs such "
                        f"as [('greedy', {{}}), ('qlass', {{'m': 2}})], got {methods!r:.80}")
    runs = [MethodRun(name, make_method_config(name, opts)) for name, opts in methods]
    conversations = concurrency * max(map(live_histories, runs))
    policy_kwargs = cache_for(model, dict(policy_kwargs or {}), conversations)
    needs_qnet = [r.label for r in runs if METHODS[r.name].needs_qnet(r.config)]
    qnet: Any = None
    if needs_qnet:
        if qnet_dir is None:
            raise QlassError(f"method(s) {', '.join(needs_qnet)} need a QNet: pass --qnet DIR")
        from .qnet_options import check_qnet_folder, qnet_calibrated

        check_qnet_folder(qnet_dir)  # before the output folder is made (the worker loads it)
        oracle = [r.label for r in runs if getattr(r.config, "oracle_terminal", False)]
        if oracle and not qnet_calibrated(qnet_dir):
            raise QlassError(f"{qnet_dir}: this QNet's values are not outcome estimates (qnet.json: calibrated: "
                             f"false, a head-only fit), so {', '.join(oracle)} cannot put true rewards beside "
                             "them: use a QNet trained by train-qnet, or drop oracle_terminal")
        threads = (policy_kwargs or {}).get("threads")
        from .qnet import QNet

        qnet = functools.partial(QNet.load, qnet_dir, threads=threads, cache_slots=max(conversations, concurrency))
    policy: Any = functools.partial(load_policy, model, **(policy_kwargs or {}))
    make = env_maker(env_spec, **dict(env_kwargs or {}))
    env_name, tasks = split_tasks(make, env_spec, splits, task_types, limit, offset)
    paraphrased = paraphrase_tables(runs, tasks)
    executor = make_executor(backend, workers, **(executor_options or {}))
    settings = {
        "model": model, "qnet": str(qnet_dir) if qnet is not None else None, "env": env_spec,
        "env_args": dict(env_kwargs or {}), "splits": list(splits), "task_types": list(task_types or []) or None,
        "limit": limit, "tasks": {split: sum(t.split == split for t in tasks) for split in splits},
        "policy": dict(policy_kwargs or {}), "backend": backend, "workers": workers, "concurrency": concurrency,
        "offset": offset,  # a folder made before the option lacks it: taken as compatible
        **({"paraphrases": paraphrased} if paraphrased else {}),  # how each cache was made: another is refused
    }
    check_policy_spec(model, policy_kwargs)  # the other inputs are checked; the output folder is not made yet
    evaluate(env_name, tasks, runs, EvalWorker(make, policy, qnet, concurrency), out_dir, seed=seed,
             executor=executor, settings=settings)
    return write_report(folder_records(out_dir), out_dir)


def folder_records(out_dir: Path) -> list[dict[str, Any]]:
    """Every record of the evaluation folder ``out_dir``, earlier runs' methods and tasks included (its results
    add up over the runs), with a warning where its methods played different tasks: their summary rows then
    average over different tasks (the paired rows always use the tasks both played)."""
    from .eval_records import read_records

    records = read_records([out_dir / "records.jsonl"])
    played: dict[str, set[tuple[str, str, str]]] = {}
    for r in records:
        played.setdefault(r["method"], set()).add((r["env"], r["split"], r["task"]))
    if len({frozenset(tasks) for tasks in played.values()}) > 1:
        log.warning("%s: its methods played different tasks (%s): each summary row averages its own; qlass report "
                    "(without --all-tasks) keeps the tasks every method played", out_dir / "records.jsonl",
                    ", ".join(f"{method} {len(tasks)}" for method, tasks in sorted(played.items())))
    return records
