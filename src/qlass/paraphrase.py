"""Paraphrased task descriptions (task perturbation, paper Fig. 9): building the cache and reading it.

With the ``paraphrase`` option of exploration and of the qlass method, the candidates after the first
are sampled from the conversation with the task description replaced by a paraphrase
(:func:`qlass.perturb.paraphrase_prompt`); the tree, the Q data and the episode records keep the real
conversation. The paraphrases are made once per task by :func:`build_paraphrases` (``qlass
paraphrase``): sampled from any policy backend (a local model, an OpenAI-compatible server, a user's
class) asked to reword the text and keep the goal's terms, or taken from per-environment templates.
Each is checked against the goal's constraints (:mod:`qlass.paraphrase_goals`); a rejected one is
counted, logged and recorded, and the task falls back to the template paraphrase (when it keeps every
constraint) or to the original text.

The cache (JSON Lines): a header line ``{"kind": "qlass-paraphrases", "version": 1, "settings": {...}}``
(how it was made: environment, source, model and `model_files` (a model replaced at its path is refused),
sampling options, seed), then one record per task::

    {"task": "webshop/3", "env": "webshop", "split": "seen", "original": "...", "paraphrase": "...",
     "source": "model" | "template" | "original", "rejected": [{"text": "...", "source": "model",
     "reasons": ["drops option 'black'"]}]}

A task is known by its split and id (a user environment's ids may repeat across splits). A rerun
adds the tasks not yet in the file (a torn last line is cut first) and refuses a file made with other
settings, naming them; the header is written with the first record, so a run that fails before any
(a model that does not load) leaves no settings behind.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .agent import check_sample_counts
from .config import option
from .config_fields import check_field_types, require_config
from .envs.base import Env, check_env_factory, check_tasks, env_close, env_reset
from .errors import DataError, QlassError
from .jsonl import append_jsonl, read_numbered_jsonl
from .locking import writes_to
from .paraphrase_goals import (
    TEMPLATE_ENVS,
    Constraint,
    check_paraphrase,
    goal_constraints,
    task_text,
    template_paraphrase,
)
from .perturb import paraphrase_prompt
from .policy.base import Policy, check_policy_argument, ready_policy
from .policy.user import checked_answer
from .recorded import check_recorded, with_model_files
from .seeding import stable_seed
from .types import Completion, History, Message, Task

CACHE_KIND = "qlass-paraphrases"
CACHE_VERSION = 1
SOURCES = ("model", "template", "original")
REQUEST_VERSION = 1
"""Bumped when :func:`paraphrase_request` or the checks change, so an older cache is not resumed."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParaphraseConfig:
    """How paraphrases are sampled from a model (templates need none of this)."""

    samples: int = option(4, "paraphrases sampled per task; the first that keeps every goal constraint is used")
    temperature: float = option(0.9, "sampling temperature of the paraphrases")
    max_new_tokens: int = option(192, "token limit of one paraphrase (one cut by it is rejected)")
    batch: int = option(8, "tasks per policy call", runtime=True)

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.samples < 1 or self.batch < 1 or self.max_new_tokens < 1:
            raise ValueError("samples, batch and max_new_tokens must be >= 1")
        check_sample_counts(samples=self.samples)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


@dataclass(frozen=True)
class Paraphrase:
    """One task's entry of the cache."""

    task: str
    split: str
    original: str
    paraphrase: str
    source: str


@dataclass(frozen=True)
class ParaphraseTable:
    """A read cache: what the candidates after the first see instead of each task's description."""

    path: str
    settings: dict[str, Any]
    entries: dict[tuple[str, str], Paraphrase]
    """By (split, task id)."""

    def perturb(self, history: History, task: Task) -> list[Message]:
        """``history`` with ``task``'s description replaced by its paraphrase."""
        entry = self.entries.get((task.split, task.id))
        if entry is None:
            raise QlassError(f"{self.path}: no paraphrase of task {task.id!r} of split {task.split!r}; add it with "
                             "qlass paraphrase (a rerun on more tasks adds to the file)")
        try:
            return paraphrase_prompt(history, entry.original, entry.paraphrase)
        except ValueError:
            raise QlassError(f"{self.path}: task {task.id!r}: the description recorded there ({entry.original!r}) "
                             "is not in the conversation; the cache was made with other environment settings") from None

    def missing(self, tasks: Iterable[Task]) -> list[str]:
        """The ids of ``tasks`` that have no entry."""
        return [t.id for t in tasks if (t.split, t.id) not in self.entries]


# -- reading ---------------------------------------------------------------------------------------
def _header(path: Path, records: Sequence[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """The settings of a cache's header line (a :class:`DataError` when it has none); ``records`` with
    their line numbers (:func:`~qlass.jsonl.read_numbered_jsonl`)."""
    line, head = records[0] if records else (1, {})
    if head.get("kind") != CACHE_KIND:
        raise DataError(str(path), f"not a paraphrase cache: its first line has no \"kind\": \"{CACHE_KIND}\" "
                                   "(write one with qlass paraphrase)")
    if head.get("version") != CACHE_VERSION:
        raise DataError(str(path), f"paraphrase cache version {head.get('version')!r}, this qlass reads "
                                   f"{CACHE_VERSION}", line=line)
    if not isinstance(head.get("settings"), dict):
        raise DataError(str(path), "field 'settings': expected a mapping", line=line)
    return head["settings"]


def _entry(path: Path, line: int, rec: dict[str, Any]) -> Paraphrase:
    task = rec.get("task")
    if not isinstance(task, str) or not task:
        raise DataError(str(path), "field 'task': expected a task id", line=line)
    for name in ("split", "original", "paraphrase"):
        if not isinstance(rec.get(name), str) or not rec[name].strip():
            raise DataError(str(path), f"field {name!r}: expected a non-empty string", line=line, record_id=task)
    if rec.get("source") not in SOURCES:
        raise DataError(str(path), f"field 'source': expected one of {', '.join(SOURCES)}, got {rec.get('source')!r}",
                        line=line, record_id=task)
    return Paraphrase(task, rec["split"], rec["original"], rec["paraphrase"], rec["source"])


def _entries(path: Path, records: Sequence[tuple[int, dict[str, Any]]]) -> dict[tuple[str, str], Paraphrase]:
    out: dict[tuple[str, str], Paraphrase] = {}
    for line, rec in records[1:]:
        entry = _entry(path, line, rec)
        if (entry.split, entry.task) in out:
            raise DataError(str(path), f"task given twice in split {entry.split!r}", line=line, record_id=entry.task)
        out[entry.split, entry.task] = entry
    return out


def load_paraphrases(path: str | Path) -> ParaphraseTable:
    """The cache at ``path``, checked (a :class:`DataError` names the file, record and field)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(str(p), "paraphrase cache not found (write it with qlass paraphrase)")
    records = read_numbered_jsonl(p)
    return ParaphraseTable(str(p), _header(p, records), _entries(p, records))


# -- asking a model --------------------------------------------------------------------------------
def paraphrase_request(text: str, constraints: Sequence[Constraint]) -> list[Message]:
    """The conversation that asks a policy to reword the task description ``text``."""
    keep = f" Keep these terms exactly as written: {'; '.join(c.term for c in constraints)}." if constraints else ""
    return [Message("user", "Rewrite the task description below in other words, keeping its meaning." + keep
                    + " Reply with the rewritten description only, on one line.\n\nTask description: " + text)]


_LABEL = re.compile(r"^(?:rewritten(?: task)?(?: description)?|paraphrase(?:d)?(?: description)?|rephrased|"
                    r"new description|task description)\s*:\s*", re.IGNORECASE)


def clean_output(text: str) -> str:
    """A model's reply as a one-line paraphrase: its first paragraph, a leading label (``Paraphrase:``)
    and surrounding quotes removed, whitespace collapsed."""
    first = re.split(r"\n\s*\n", text.strip(), maxsplit=1)[0]
    first = _LABEL.sub("", " ".join(first.split()))
    if len(first) >= 2 and first[0] == first[-1] and first[0] in "\"'":
        first = first[1:-1].strip()
    return first


# -- building --------------------------------------------------------------------------------------
@dataclass
class _Job:
    task: Task
    text: str
    constraints: list[Constraint]


def _job(env: Env, task: Task) -> _Job:
    first = env_reset(env, task)
    try:
        text = task_text(env.name, task, first)
        attributes = env.goal(task).attributes if env.name == "webshop" else ()  # type: ignore[attr-defined]
        return _Job(task, text, goal_constraints(env.name, text, attributes))
    except ValueError as exc:
        raise QlassError(f"{env.name}: task {task.id!r}: cannot read its task description: {exc}") from None


def _choose(env_name: str, job: _Job, sampled: Sequence[Completion], seed: int) -> dict[str, Any]:
    """The record of one task: the first sampled paraphrase that keeps every constraint, else the
    template paraphrase (variant drawn from ``seed``) when it does, else the original; every rejected
    one with its reasons."""
    rejected: list[dict[str, Any]] = []
    candidates = [("model", clean_output(c.text), ["cut by the token limit"] if c.truncated else []) for c in sampled]
    template = template_paraphrase(env_name, job.text, seed)
    candidates += [("template", template, [])] if template is not None else []
    chosen, source = job.text, "original"
    for kind, text, reasons in candidates:
        reasons = reasons + check_paraphrase(job.constraints, job.text, text)
        if not reasons:
            chosen, source = text, kind
            break
        rejected.append({"text": text, "source": kind, "reasons": reasons})
    if rejected:
        log.info("%s: %d paraphrase(s) rejected (%s); using the %s", job.task.id, len(rejected),
                 "; ".join(dict.fromkeys(r for item in rejected for r in item["reasons"])),
                 {"model": "model's paraphrase", "template": "template paraphrase", "original": "original"}[source])
    return {"task": job.task.id, "env": env_name, "split": job.task.split, "original": job.text,
            "paraphrase": chosen, "source": source, "rejected": rejected}


def _settings(policy: object, cfg: ParaphraseConfig, seed: int, settings: dict[str, Any] | None) -> dict[str, Any]:
    # model_files: another model saved at the model's path is refused, as by the other resumable stages
    out = {**with_model_files(settings or {}), "source": "model" if policy is not None else "template", "seed": seed,
           "request_version": REQUEST_VERSION}
    if policy is not None:
        out["sampling"] = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                           if not f.metadata.get("runtime")}
    return out


REQUIRED_SETTINGS = ("env", "source", "seed", "request_version", "sampling.samples", "sampling.temperature",
                     "sampling.max_new_tokens")
"""What a cache's header must record when this run has it: a header emptied by hand (``settings: {}``)
would let tasks made with any settings join the file."""


def _start(path: Path, settings: dict[str, Any]) -> tuple[set[tuple[str, str]], dict[str, Any] | None]:
    """The (split, task id) pairs already in the cache at ``path``, and the header line to write
    before the first record (None: the file has one); a file made with other settings is refused."""
    records = read_numbered_jsonl(path, repair_tail=True)
    if not records:
        return set(), {"kind": CACHE_KIND, "version": CACHE_VERSION, "settings": settings}
    recorded = _header(path, records)
    check_recorded(path, settings, str(path), advice="use a new output file", recorded=recorded,
                   required=REQUIRED_SETTINGS)
    return set(_entries(path, records)), None


@writes_to("out_path", folder=False)
def build_paraphrases(
    make_env: Callable[[], Env],
    tasks: Sequence[Task],
    out_path: str | Path,
    policy: Policy | Callable[[], Policy] | None = None,
    cfg: ParaphraseConfig = ParaphraseConfig(),
    seed: int = 0,
    settings: dict[str, Any] | None = None,
) -> dict[str, int]:
    """Paraphrase every task not yet in ``out_path`` and append its record (see module docstring);
    returns the counts of this run: ``tasks``, per source (``model``, ``template``, ``original``) and
    ``rejected`` paraphrases.

    ``policy`` samples the paraphrases (``None``: templates only, for the environments in
    :data:`~qlass.paraphrase_goals.TEMPLATE_ENVS`); ``settings`` (e.g. ``env``, ``env_args``,
    ``model``, ``policy`` options) are recorded in the header with the sampling options and the seed,
    and a rerun with others is refused. Task ``t``'s samples draw from ``stable_seed(seed, t)``."""
    check_env_factory(make_env, "build_paraphrases")
    require_config(cfg, ParaphraseConfig, "build_paraphrases")
    check_tasks(tasks, "build_paraphrases")
    check_policy_argument(policy, "build_paraphrases")
    listed: set[tuple[str, str]] = set()
    for t in tasks:  # both records would be written, and the cache then refused by every reader
        if (t.split, t.id) in listed:
            raise QlassError(f"build_paraphrases: task {t.id!r} of split {t.split!r} is given twice")
        listed.add((t.split, t.id))
    path = Path(out_path)
    env = make_env()
    try:
        if policy is None and env.name not in TEMPLATE_ENVS:
            raise QlassError(f"{env.name}: no paraphrase templates for this environment (they exist for "
                             f"{', '.join(TEMPLATE_ENVS)}); give a model as the source")
        # the environment's own name: another's tasks (the same ids) must not read this cache's text
        done, header = _start(path, {**_settings(policy, cfg, seed, settings), "env_name": env.name})
        todo = [t for t in tasks if (t.split, t.id) not in done]
        if len(todo) < len(tasks):
            log.info("resuming: %d of %d tasks already in %s", len(tasks) - len(todo), len(tasks), path)
        model = ready_policy(policy) if policy is not None else None
        counts = dict.fromkeys(("tasks", *SOURCES, "rejected"), 0)
        for start in range(0, len(todo), cfg.batch):
            jobs = [_job(env, t) for t in todo[start:start + cfg.batch]]
            seeds = [stable_seed(seed, j.task.id) for j in jobs]
            sampled: list[list[Completion]] = [[] for _ in jobs]
            if model is not None:
                sampled = checked_answer(f"{type(model).__name__}.sample", model.sample(
                    [paraphrase_request(j.text, j.constraints) for j in jobs], cfg.samples, cfg.temperature,
                    cfg.max_new_tokens, seeds), [cfg.samples] * len(jobs), strict=False)
            for job, outs, s in zip(jobs, sampled, seeds, strict=True):
                record = _choose(env.name, job, outs, s)
                if header is not None:
                    append_jsonl(path, header)
                    header = None
                append_jsonl(path, record)
                counts["tasks"] += 1
                counts[record["source"]] += 1
                counts["rejected"] += len(record["rejected"])
            log.info("paraphrased %d of %d tasks (model %d, template %d, original %d; %d rejected)",
                     counts["tasks"], len(todo), counts["model"], counts["template"], counts["original"],
                     counts["rejected"])
        return counts
    finally:
        env_close(env)


__all__ = ["ParaphraseConfig", "ParaphraseTable", "build_paraphrases", "clean_output",
           "load_paraphrases", "paraphrase_request"]
