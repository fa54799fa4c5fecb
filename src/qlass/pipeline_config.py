"""The settings of ``qlass run CONFIG.yaml`` (:mod:`qlass.pipeline`): each stage's section built
into its config class and checked before any work (:func:`resolve`), ``qlass run --list-options``
(:func:`pipeline_options`), and the run folder's ``config.yaml``, saved resolved and compared with a
rerun's settings for the stages that already have outputs (:func:`save_resolved`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .config import (
    build,
    check_minimums,
    config_differences,
    load_yaml,
    option,
    save_yaml,
    to_dict,
)
from .errors import QlassError
from .eval_worker import MethodRun
from .evaluate import check_resumable
from .executor import BACKENDS
from .pipeline_checks import check_top_level, check_trainers
from .pipeline_retrain import (
    ETO_DIR,
    RFT_DIR,
    SELF_TRAIN_DIR,
    ETOOptions,
    ETOSection,
    Retrain,
    RetrainOptions,
    SelfTrainStage,
    eto_section,
    retrain_dict,
    retrain_section,
)
from .recorded import setting_changes


@dataclass(frozen=True)
class ExpertStage:
    """Which expert trajectories to export for SFT."""

    split: str = option("train", "split the expert tasks come from")
    per_task: int | None = option(10, "verified expert trajectories per task type")
    max_steps: int | None = option(None, "skip expert trajectories that do not finish within this many steps")
    data: str | None = option(None, "use this existing trajectory file instead of exporting (a relative path is "
                                    "taken from the working directory, as run_dir is)")

    def __post_init__(self) -> None:
        check_minimums(self, per_task=1, max_steps=1)


@dataclass(frozen=True)
class ExploreStage:
    """Which training tasks get exploration trees (see ``qlass.explore_config.exploration_tasks``)."""

    split: str = option("train", "split the exploration tasks come from")
    limit: int | None = option(None, "at most this many tasks (round-robin over task types)")
    skip: int = option(0, "skip the first this-many tasks of each task type")
    exclude_expert: bool = option(False, "leave out the tasks of the expert/SFT data (expert.data, else the run's "
                                         "expert.json), so exploration runs on tasks the SFT model has not seen")
    concurrency: int = option(8, "trees each worker builds at once in lockstep (batched policy calls); the trees "
                                 "do not depend on it")

    def __post_init__(self) -> None:
        check_minimums(self, limit=1, skip=0, concurrency=1)


@dataclass(frozen=True)
class QDataStage:
    """How the Q dataset is read from the trees (the backup of Eq. 7 discounts by ``explore.gamma``)."""

    keep_intermediate: bool = option(False, "keep intermediate rewards (as score increments) instead of zeroing them")
    normalize: bool = option(False, "min-max normalise Q per tree")
    max_per_tree: int | None = option(300, "at most this many records per tree (None: no limit)")

    def __post_init__(self) -> None:
        check_minimums(self, max_per_tree=1)


@dataclass(frozen=True)
class EvalStage:
    """Which methods are evaluated where."""

    splits: list[str] = option(["seen"], "splits to evaluate")
    limit: int | None = option(None, "at most this many tasks per split (round-robin over task types)")
    methods: list[str] = option(["greedy", "best-of-n:n=4", "qlass:m=2"], "method specs NAME[:k=v,...]")
    max_steps: int | None = option(None, "step limit per episode for every method")
    concurrency: int = option(16, "episodes each worker plays at once in lockstep (batched policy and QNet "
                              "calls; results do not depend on it); a local model's cache_slots is raised to "
                              "hold every live conversation unless policy.cache_slots is set")

    def __post_init__(self) -> None:
        check_minimums(self, limit=1, max_steps=1, concurrency=1)
        if not self.splits or not self.methods:
            raise ValueError("splits and methods must each name at least one")


@dataclass(frozen=True)
class PipelineConfig:
    """A whole QLASS run; stage sections take the options of their stage's config class."""

    run_dir: str = option("runs/qlass", "folder for every output of the run")
    seed: int = option(0, "run seed")
    model: str = option("default", "base causal-LM folder or 'default' (SmolLM2-135M-Instruct)")
    env: str = option("sciworld", "environment name or package.module:Class")
    env_args: dict = option({}, "environment constructor options")
    task_types: list[str] | None = option(None, "task types used by every stage (None: all)")
    policy: dict = option({}, "policy options for exploration and evaluation (e.g. autocast: true)")
    policy_server: str | None = option(None, "base URL (http://host:port/v1) of an OpenAI-compatible server "
                                       "(vLLM, SGLang) serving the SFT checkpoint: exploration and evaluation "
                                       "sample through it (prompts rendered with the checkpoint's tokenizer)")
    backend: str = option("local", "executor for exploration and evaluation: local, process or ray")
    workers: int = option(1, "worker processes / Ray actors (process and ray backends; use threads: 1 "
                          "in policy with several workers on one machine)")
    sft_model: str | None = option(None, "an existing SFT checkpoint (HF causal-LM folder) to explore and "
                                   "evaluate with: stage 1 (expert data, SFT) is skipped")
    expert: dict = option({}, "ExpertStage options")
    sft: dict = option({}, "SFTConfig options")
    explore: dict = option({}, "ExploreStage options plus ExploreConfig options")
    qdata: dict = option({}, "QDataStage options")
    qnet: dict = option({}, "QNetTrainConfig options")
    eval: dict = option({}, "EvalStage options")
    rft: dict | None = option(None, "the RFT baseline: RFTConfig options plus sft (absent: no RFT; {}: defaults)",
                              added=True)
    self_train: dict | None = option(None, "tree-guided self-training (paper Fig. 4): SelfTrainStage and "
                                           "SelfTrainConfig options plus sft (absent: none; {}: all three rewards)",
                                     added=True)
    eto: dict | None = option(None, "the ETO baseline: ETOConfig options plus dpo (absent: no ETO; {}: defaults)",
                              added=True)


@dataclass
class Resolved:
    """A pipeline config with every stage section built into its config class."""

    cfg: PipelineConfig
    expert: ExpertStage
    sft: Any
    explore_stage: ExploreStage
    explore: Any
    qdata: QDataStage
    qnet: Any
    eval: EvalStage
    rft: Retrain | None = None
    self_train: Retrain | None = None
    eto: ETOSection | None = None
    run_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.cfg.run_dir)

    def eval_methods(self) -> list[tuple[str, dict[str, Any]]]:
        """The evaluation's (method name, options) pairs, ``eval.max_steps`` applied."""
        from .search import parse_method, set_method_option

        methods = []
        for spec in self.eval.methods:
            name, opts = parse_method(spec)
            if self.eval.max_steps is not None:
                set_method_option(spec, opts, "max_steps", self.eval.max_steps, "eval.max_steps")
            methods.append((name, opts))
        return methods


def _split_options(options: dict[str, Any], cls: type) -> tuple[dict[str, Any], dict[str, Any]]:
    names = set(cls.__dataclass_fields__)
    return {k: v for k, v in options.items() if k in names}, {k: v for k, v in options.items() if k not in names}


def resolve(data: dict[str, Any], source: str, recorded: bool = False) -> Resolved:
    """Build and validate every section of a pipeline config (fails before any work starts). ``recorded``:
    a run folder's config.yaml, read only to compare settings, so the checks that guard the work to come
    are left out (an older qlass recorded values they refuse)."""
    from .config import check_known
    from .envs.base import check_env_options
    from .explore import ExploreConfig
    from .models import check_device
    from .policy import check_policy_options
    from .search import make_method_config
    from .training.configs import QNetTrainConfig, SFTConfig

    cfg = build(PipelineConfig, data, source)
    if not recorded:
        check_top_level(cfg, source)
    if cfg.backend not in BACKENDS:
        raise QlassError(f"{source}: field 'backend' must be one of {', '.join(BACKENDS)}, got {cfg.backend!r}")
    if cfg.workers < 1:
        raise QlassError(f"{source}: field 'workers' must be >= 1, got {cfg.workers}")
    check_known(cfg.explore, set(ExploreStage.__dataclass_fields__) | set(ExploreConfig.__dataclass_fields__),
                f"{source}: explore", "ExploreStage or ExploreConfig")
    stage_opts, explore_opts = _split_options(dict(cfg.explore), ExploreStage)
    try:
        explore = build(ExploreConfig, explore_opts, f"{source}: explore")
    except QlassError as exc:  # the paraphrase cache's own errors name the file, not the config key
        said = str(exc)
        raise QlassError(said if said.startswith(source) else f"{source}: explore.paraphrase: {said}") from None
    r = Resolved(
        cfg=cfg,
        expert=build(ExpertStage, dict(cfg.expert), f"{source}: expert"),
        sft=build(SFTConfig, dict(cfg.sft), f"{source}: sft"),
        explore_stage=build(ExploreStage, stage_opts, f"{source}: explore"),
        explore=explore,
        qdata=build(QDataStage, dict(cfg.qdata), f"{source}: qdata"),
        qnet=build(QNetTrainConfig, dict(cfg.qnet), f"{source}: qnet"),
        eval=build(EvalStage, dict(cfg.eval), f"{source}: eval"),
    )
    try:  # labels too: two methods under one label are refused by the evaluation, after stages 1-3 ran
        check_resumable([MethodRun(name, make_method_config(name, opts)) for name, opts in r.eval_methods()], [],
                        Path(source))
    except QlassError as exc:
        raise QlassError(f"{source}: eval.methods: {exc}") from None
    r.rft = retrain_section(cfg, "rft", source)
    r.self_train = retrain_section(cfg, "self_train", source)
    r.eto = eto_section(cfg, source)
    retrained = [name for name in ("rft", "self_train", "eto") if getattr(r, name) is not None]
    if retrained and not any(name == "greedy" for name, _ in r.eval_methods()):  # its settings are theirs
        raise QlassError(f"{source}: the {', '.join(retrained)} agents are evaluated with eval.methods' greedy "
                         "settings, and they list no greedy method; add one (e.g. greedy:max_new_tokens=N, as "
                         "the other methods)")
    try:  # imports the environment's module (not its simulator): an unknown option fails here, not mid-run
        check_env_options(cfg.env, cfg.env_args)
    except QlassError as exc:
        raise QlassError(f"{source}: field 'env_args': {exc}") from None
    if recorded:
        return r
    try:
        check_policy_options(cfg.policy_server or "default", cfg.policy)
        if cfg.policy_server is None and cfg.backend != "ray":  # a Ray actor may run where a GPU is
            check_device(cfg.policy.get("device", "auto"))  # this machine's workers: found at stage 2 before
    except QlassError as exc:
        raise QlassError(f"{source}: field 'policy': {exc}") from None
    check_trainers(r, source)
    return r


def _started(run: Path) -> list[str]:
    """The stage outputs already in the run folder ``run``."""
    return [p for p in ("expert.json", "sft", "trees.jsonl", "qnet", "eval", RFT_DIR, SELF_TRAIN_DIR, ETO_DIR)
            if (run / p).exists()]


def _stage_changes(old: Resolved, new: Resolved) -> list[str]:
    """Settings of ``new`` that differ from ``old`` (the run folder's saved config) for stages whose
    outputs exist in the run folder. Compared as resolved configs, so options added since count at
    their defaults, and runtime options (threads, device, cache_slots, ...: ``RUNTIME_SETTINGS``)
    do not count; nor do task limits, which extend a stage rather than change it. A policy option
    set in one config only is a change."""
    run = new.run_dir
    started = _started(run)
    if not started:
        return []
    shared = ["env", "env_args", "task_types"]
    if started != ["expert.json"]:  # the expert trajectories do not depend on the model
        shared += ["model", "sft_model"]
    made_by_policy = ("trees.jsonl", "eval", RFT_DIR, ETO_DIR)
    if any((run / p).exists() for p in made_by_policy):  # its settings count
        shared += ["seed", "policy", "policy_server"]
    changes = setting_changes({k: getattr(old.cfg, k) for k in shared}, {k: getattr(new.cfg, k) for k in shared})
    if not new.cfg.sft_model and ((run / "sft" / ".qlass-complete").exists() or (run / "expert.json").exists()):
        changes += [f"expert.{c}" for c in config_differences(old.expert, new.expert)]  # expert.json is reused
    if (run / "sft" / ".qlass-complete").exists() and not new.cfg.sft_model:
        changes += [f"sft.{c}" for c in config_differences(old.sft, new.sft)]
    if (run / "trees.jsonl").exists():  # limit: a larger one adds trees, a smaller one is refused at stage 2
        stage = [c for c in config_differences(old.explore_stage, new.explore_stage)
                 if not c.startswith(("limit:", "concurrency:"))]
        changes += [f"explore.{c}" for c in stage + config_differences(old.explore, new.explore)]
    if (run / "qnet").exists():
        changes += [f"qdata.{c}" for c in config_differences(old.qdata, new.qdata)]
        changes += [f"qnet.{c}" for c in config_differences(old.qnet, new.qnet)]
    for name, folder in (("rft", RFT_DIR), ("self_train", SELF_TRAIN_DIR)):
        before, now = retrain_dict(getattr(old, name)), retrain_dict(getattr(new, name))
        if (run / folder).exists() and before is not None and now is not None:
            changes += [f"{name}.{c}" for c in setting_changes(before, now, ignore=("limit", "rewards"),
                                                               open_=("sft",))]
    if (run / ETO_DIR).exists() and old.eto is not None and new.eto is not None:
        runtime = tuple(f"dpo.{f.name}" for f in fields(new.eto.dpo) if f.metadata.get("runtime"))
        changes += [f"eto.{c}" for c in setting_changes(old.eto.as_dict(), new.eto.as_dict(),
                                                        ignore=("iterations", *runtime), open_=("later_dpo",))]
    return changes


def save_resolved(r: Resolved) -> None:
    """Save the resolved config as ``config.yaml`` in the run folder, refusing settings that differ
    from the saved ones for stages already (partly) done there."""
    r.run_dir.mkdir(parents=True, exist_ok=True)
    path = r.run_dir / "config.yaml"
    recorded = load_yaml(path) if path.exists() else {}
    if isinstance(recorded.get("methods"), list):  # qlass eval's config.yaml
        raise QlassError(f"{r.run_dir}: is an evaluation folder ({path} holds qlass eval's settings, which the "
                         "pipeline's would replace); use a new run_dir")
    started = _started(r.run_dir)
    made = [p for p in started if p != "expert.json"]  # an expert file may be put there before the first run
    if made or (started and path.exists()):
        missing = [k for k in ("model", "env") if k not in recorded]
        if missing:
            what = f"{path} does not record {', '.join(map(repr, missing))}" if path.exists() else f"{path} is missing"
            raise QlassError(f"{r.run_dir} holds {(made or started)[0]} but {what}, so the settings that made it are "
                             "unknown and later stages could mix with others; use a new run_dir (or restore "
                             "config.yaml)")
        # without a QNet its section is not compared; an older qlass recorded values QNetTrainConfig now refuses
        if not (r.run_dir / "qnet").exists():
            recorded = {**recorded, "qnet": to_dict(r.qnet)}
        changes = _stage_changes(resolve(recorded, str(path), recorded=True), r)
        if changes:
            raise QlassError(f"{path}: the run folder was made with other settings ({'; '.join(changes)}); "
                             "use a new run_dir (sft_model: DIR reuses an SFT checkpoint from this one)")
    data = {**to_dict(r.cfg), "expert": to_dict(r.expert), "sft": to_dict(r.sft),
            "explore": {**to_dict(r.explore_stage), **to_dict(r.explore)}, "qdata": to_dict(r.qdata),
            "qnet": to_dict(r.qnet), "eval": to_dict(r.eval)}
    for name in ("rft", "self_train"):  # written only when set: runs without them keep their config.yaml as it was
        if getattr(r, name) is not None:
            data[name] = retrain_dict(getattr(r, name))
    if r.eto is not None:
        data["eto"] = r.eto.as_dict()
    for name in ("rft", "self_train", "eto"):  # a section left out keeps what made its folder, to compare it again
        if data.get(name) is None and recorded.get(name) is not None:
            data[name] = recorded[name]
    save_yaml(path, data)


def pipeline_options() -> str:
    """Every key of a pipeline YAML with its default and help: the top level, then each section."""
    from .config import describe
    from .eto_config import ETOConfig
    from .explore import ExploreConfig
    from .rft import RFTConfig
    from .self_train import SelfTrainConfig
    from .training.configs import QNetTrainConfig, SFTConfig

    def indent(text: str) -> str:
        return "\n".join(f"  {line}" for line in text.splitlines())

    sections = [("expert", [ExpertStage]), ("sft", [SFTConfig]), ("explore", [ExploreStage, ExploreConfig]),
                ("qdata", [QDataStage]), ("qnet", [QNetTrainConfig]), ("eval", [EvalStage]),
                ("rft", [RFTConfig, RetrainOptions]), ("eto", [ETOConfig, ETOOptions]),
                ("self_train", [SelfTrainStage, SelfTrainConfig, RetrainOptions])]
    top = [f for f in describe(PipelineConfig).splitlines() if f.split(" ", 1)[0] not in dict(sections)]
    top.append("extends (default None): a pipeline YAML (path relative to this one) whose keys this file overrides, "
               "section by section")
    blocks = ["\n".join(top)] + [f"{name}:\n" + "\n".join(indent(describe(c)) for c in classes)
                                  for name, classes in sections]
    return "\n\n".join(blocks)
