"""The library's entry points called from Python with the wrong kind of argument: a dict of options where a
config object belongs, an environment where its factory belongs, no tasks at all. Each is named at once,
before any model loads or file is written."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Callable

import pytest
from toy_envs import Corridor

from qlass.decision_report import score_decisions, write_decision_report
from qlass.decisions import DecisionConfig, collect_decisions
from qlass.errors import QlassError
from qlass.expert import export_expert
from qlass.explore import explore_tasks
from qlass.explore_config import ExploreConfig
from qlass.qdata import export_qdata


def _calls(tmp: Path) -> list[tuple[str, str, Callable[[Any], Any]]]:
    """(function, config class, a call of the function with ``cfg`` in the config's place)."""
    from qlass.agent import run_episode
    from qlass.eto import run_eto
    from qlass.explore_tree import build_tree
    from qlass.qnet_cv import cross_validate_qnet
    from qlass.qnet_head import train_qnet_head
    from qlass.rft import run_rft
    from qlass.self_train import select_trajectories, self_train
    from qlass.training.configs import DPOConfig, SFTConfig
    from qlass.training.dpo import train_dpo
    from qlass.training.qnet import train_qnet
    from qlass.training.sft import train_sft
    from qlass.tree import compute_q

    out, data = tmp / "out", tmp / "data.json"
    env = Corridor()
    task = env.tasks("train")[0]
    return [
        ("explore_tasks", "ExploreConfig", lambda cfg: explore_tasks(Corridor, [task], None, cfg, out)),
        ("build_tree", "ExploreConfig", lambda cfg: build_tree(env, None, task, cfg, 0)),
        ("collect_decisions", "DecisionConfig", lambda cfg: collect_decisions(Corridor, [task], None, cfg, out)),
        ("run_episode", "EpisodeConfig", lambda cfg: run_episode(env, None, task, cfg)),
        ("train_sft", "SFTConfig", lambda cfg: train_sft(data, tmp, out, cfg)),
        ("train_qnet", "QNetTrainConfig", lambda cfg: train_qnet(data, tmp, out, cfg)),
        ("cross_validate_qnet", "QNetTrainConfig", lambda cfg: cross_validate_qnet(data, tmp, out, cfg, 2)),
        ("train_qnet_head", "QNetHeadConfig", lambda cfg: train_qnet_head(data, tmp, out, cfg)),
        ("train_dpo", "DPOConfig", lambda cfg: train_dpo(data, tmp, out, cfg)),
        ("run_rft", "RFTConfig", lambda cfg: run_rft("m", data, tmp, "toy_envs:Corridor", out, cfg, SFTConfig())),
        ("run_eto", "ETOConfig", lambda cfg: run_eto(tmp, data, "toy_envs:Corridor", out, cfg, DPOConfig())),
        ("self_train", "SFTConfig", lambda cfg: self_train(data, data, tmp, out, "q", cfg)),
        ("select_trajectories", "SelfTrainConfig", lambda cfg: select_trajectories(data, "q", cfg)),
        ("compute_q", "BackupConfig", lambda cfg: compute_q(None, cfg)),
        ("export_qdata", "BackupConfig", lambda cfg: export_qdata(data, out, cfg)),
        ("score_decisions", "ReportConfig", lambda cfg: score_decisions([{}], None, cfg)),
        ("write_decision_report", "ReportConfig", lambda cfg: write_decision_report([data], out, None, cfg)),
    ]


@pytest.mark.parametrize("index", range(17))
@pytest.mark.parametrize("wrong", [{"temperature": 0.7}, {}], ids=["dict", "empty-dict"])
def test_a_dict_in_place_of_a_config_object_is_named(tmp_path: Path, index: int, wrong: dict) -> None:
    """Before: an AttributeError ('dict' object has no attribute ...) from inside the call, naming neither the
    function nor the argument; an empty dict given to score_decisions was even taken as the default config."""
    calls = _calls(tmp_path)
    assert len(calls) == 17
    name, cls, call = calls[index]
    argument = "sft_cfg" if name == "self_train" else "cfg"
    message = f"{name}: argument '{argument}' must be an instance of {cls}, got dict; make one with {cls}(**opt"
    with pytest.raises(TypeError, match=re.escape(message)):
        call(wrong)
    assert not (tmp_path / "out").exists()


def test_none_in_place_of_a_config_object_is_named(tmp_path: Path) -> None:
    message = "explore_tasks: argument 'cfg' must be an instance of ExploreConfig, got NoneType"
    with pytest.raises(TypeError, match=re.escape(message)):
        explore_tasks(Corridor, Corridor().tasks("train"), None, None, tmp_path / "trees.jsonl")


@pytest.mark.parametrize("wrong", [Corridor(), "toy_envs:Corridor"], ids=["instance", "name"])
@pytest.mark.parametrize("call", ["explore_tasks", "collect_decisions"])
def test_an_environment_in_place_of_its_factory_is_named(tmp_path: Path, wrong: Any, call: str) -> None:
    """Before: "'Corridor' object is not callable" (or "'str' object ...") from the first episode."""
    tasks, out = Corridor().tasks("train"), tmp_path / "out.jsonl"
    with pytest.raises(TypeError, match=re.escape(f"{call}: argument 'make_env' must be a callable returning a new "
                                                  f"environment (its class, or lambda: make_env(name)), got a "
                                                  f"{type(wrong).__name__}")):
        if call == "explore_tasks":
            explore_tasks(wrong, tasks, None, ExploreConfig(), out)
        else:
            collect_decisions(wrong, tasks, None, DecisionConfig(), out)
    assert not out.exists()


def test_no_tasks_is_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Before: an empty result and not a word, as from a task filter that matched nothing."""
    with caplog.at_level(logging.WARNING):
        assert explore_tasks(Corridor, [], None, ExploreConfig(), tmp_path / "trees.jsonl", progress=False) == []
        assert collect_decisions(Corridor, [], None, DecisionConfig(), tmp_path / "decisions.jsonl") == []
        assert export_expert(Corridor(), []).trajectories == []
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert said == ["explore_tasks: no tasks given; nothing to explore",
                    "collect_decisions: no tasks given; nothing to collect",
                    "export_expert: no tasks given; nothing to export"]


EVAL = {"env_spec": "toy_envs:Corridor", "splits": ["seen"], "env_kwargs": {"step_limit": 3}}


@pytest.mark.parametrize("change, message", [
    ({"limit": -1}, "argument 'limit' must be a whole number >= 1 or None, got -1"),  # played all tasks but one
    ({"limit": 0}, "argument 'limit' must be a whole number >= 1 or None, got 0"),  # "no tasks in split"
    ({"limit": 1.5}, "argument 'limit' must be a whole number >= 1 or None, got 1.5"),  # slice indices
    ({"methods": []}, "argument 'methods' must be a non-empty list of (name, options) pairs"),  # max() of nothing
    ({"methods": ["greedy"]}, "argument 'methods' must be a non-empty list of (name, options) pairs"),  # unpack
    ({"concurrency": "2"}, "argument 'concurrency' must be a whole number >= 1, got '2'"),  # '<' not supported
    ({"splits": []}, "argument 'splits' names nothing"),  # left a lock and config.yaml, then "file not found"
    ({"splits": "seen"}, "argument 'splits' must be a list of names, got 'seen' (give ['seen'])"),  # split 's'
    ({"task_types": "find-plant"}, "argument 'task_types' must be a list of names, got 'find-plant'"),  # substrings
])
def test_run_evaluation_names_an_argument_of_the_wrong_kind(tmp_path: Path, change: dict, message: str) -> None:
    from qlass.evaluate import run_evaluation

    call = {**EVAL, "model": "test_cli_errors:EastWalker", "methods": [("greedy", {})], "out_dir": tmp_path / "out",
            "limit": 1, **change}
    with pytest.raises(TypeError, match=re.escape(f"run_evaluation: {message}")):
        run_evaluation(**call)
    assert not (tmp_path / "out").exists()


def test_a_task_types_string_is_not_matched_letter_by_letter() -> None:
    """``task_types="find-plant"`` kept every task whose type is a substring of it ('plant', 'find')."""
    from qlass.envs.base import env_tasks

    with pytest.raises(TypeError, match=re.escape("task_types must be a list of task types, got the string 'nav'")):
        env_tasks(Corridor(), "seen", "nav")  # type: ignore[arg-type]


def test_paths_returned_by_one_stage_are_taken_by_the_next(tmp_path: Path) -> None:
    """run_evaluation and run_rft refused a model given as a Path ("expected string or bytes-like object"), as
    train_sft returns it; an out_dir given as a string failed with "unsupported operand type(s) for /"."""
    from qlass.eval_records import read_records
    from qlass.evaluate import run_evaluation
    from qlass.report import write_report, write_side_by_side

    user_class = Path("test_cli_errors:EastWalker")  # a spec held in a Path: what a Path to a model folder gives
    rows = run_evaluation(user_class, methods=[("greedy", {})], out_dir=str(tmp_path / "ev"), limit=1, **EVAL)
    assert [r["method"] for r in rows] == ["greedy"] and (tmp_path / "ev" / "results.md").exists()
    records = read_records([tmp_path / "ev" / "records.jsonl"])
    write_report(records, str(tmp_path / "report"))
    write_side_by_side({"a": records, "b": records}, str(tmp_path / "sides"))
    assert (tmp_path / "report" / "results.md").exists() and (tmp_path / "sides" / "sides.md").exists()
    with pytest.raises(TypeError, match=re.escape("read_records: argument 'paths' must be a list of paths, got one")):
        read_records(tmp_path / "ev" / "records.jsonl")  # type: ignore[arg-type]


def test_report_baselines_must_be_methods_of_the_records(tmp_path: Path) -> None:
    """A misspelt baseline, or one given as a string (iterated letter by letter), left the paired table out with no
    word; resamples=0 was an IndexError."""
    from qlass.compare import paired_rows
    from qlass.eval_records import read_records
    from qlass.evaluate import run_evaluation
    from qlass.report import write_report

    run_evaluation("test_cli_errors:EastWalker", methods=[("greedy", {}), ("sample", {})], out_dir=tmp_path / "ev",
                   limit=2, **EVAL)
    records = read_records([tmp_path / "ev" / "records.jsonl"])
    with pytest.raises(QlassError, match=re.escape("write_report: baseline 'grredy' is no method of the records "
                                                   "(they hold: greedy, sample)")):
        write_report(records, tmp_path / "r", baselines=["grredy"])
    with pytest.raises(TypeError, match=re.escape("argument 'baselines' must be a list of names, got 'greedy'")):
        write_report(records, tmp_path / "r", baselines="greedy")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=re.escape("paired_rows: argument 'resamples' must be a whole number >= 1")):
        paired_rows(records, resamples=0)
    assert [p["method"] for p in json.loads((tmp_path / "ev" / "results.json").read_text())["paired"]] == ["sample"]


def test_a_missing_qnet_or_a_qnet_as_the_model_leaves_no_output_folder(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The worker loaded them only after config.yaml and the lock were written, so both stayed behind."""
    import shutil

    from qlass.evaluate import run_evaluation

    with pytest.raises(QlassError, match=r"nosuch: not a QNet folder \(no config\.json\)"):
        run_evaluation("test_cli_errors:EastWalker", methods=[("qlass", {"m": 2})], out_dir=tmp_path / "a",
                       qnet_dir=tmp_path / "nosuch", limit=1, **EVAL)
    assert not (tmp_path / "a").exists()
    qnet_like = tmp_path / "qnet"
    shutil.copytree(tiny_model_dir, qnet_like)
    config = json.loads((qnet_like / "config.json").read_text())
    (qnet_like / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForSequenceClassification"]}))
    with pytest.raises(QlassError, match=r"qnet: is a QNet \(a sequence classifier\), not a causal LM"):
        run_evaluation(str(qnet_like), methods=[("greedy", {})], out_dir=tmp_path / "b", limit=1, **EVAL)
    assert not (tmp_path / "b").exists()


def test_exploration_and_decisions_name_a_policy_path_or_a_bare_task(tmp_path: Path) -> None:
    env = Corridor()
    for call in (explore_tasks, collect_decisions):
        cfg = ExploreConfig() if call is explore_tasks else DecisionConfig()
        with pytest.raises(TypeError, match=re.escape(f"{call.__name__}: argument 'policy' must be a policy or a "
                                                      "factory of one, got '/models/sft'; load")):
            call(Corridor, env.tasks("train")[:1], "/models/sft", cfg, tmp_path / "out.jsonl")
        with pytest.raises(TypeError, match=re.escape(f"{call.__name__}: argument 'tasks' must be a list of "
                                                      "qlass.types.Task")):
            call(Corridor, "corridor/0", None, cfg, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_the_decision_report_names_a_qnet_path_and_a_bare_file(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=re.escape("write_decision_report: argument 'qnet' must be a loaded QNet")):
        write_decision_report([tmp_path / "d.jsonl"], tmp_path / "out", "/qnet/folder")
    with pytest.raises(TypeError, match=re.escape("write_decision_report: argument 'paths' must be a list of paths, "
                                                  "got one path")):
        write_decision_report(tmp_path / "d.jsonl", tmp_path / "out")  # type: ignore[arg-type]


def test_a_registered_environment_name_works_in_worker_processes(tmp_path: Path) -> None:
    """A worker process starts with no register_env names: "unknown environment 'corridor-test'" from the worker,
    after the output folder was made."""
    from qlass.envs import register_env
    from qlass.evaluate import run_evaluation

    register_env("corridor-registered", Corridor)
    rows = run_evaluation("test_cli_errors:EastWalker", "corridor-registered", ["seen"], [("greedy", {})],
                          tmp_path / "ev", env_kwargs={"step_limit": 3}, limit=2, backend="process", workers=1)
    assert [(r["method"], r["tasks"]) for r in rows] == [("greedy", 2)]


def test_cross_validation_names_its_counts_and_configs_before_any_work(tmp_path: Path) -> None:
    """cross_validate_qnet trained every fold, then failed inside numpy for resamples=0 ('folds="2"' failed on a
    comparison); cross_validate_on_decisions computed the features before a dict given as its config failed."""
    from qlass.decision_head import cross_validate_on_decisions
    from qlass.decision_qdata import write_decision_qdata
    from qlass.decision_report import ReportConfig
    from qlass.qnet_cv import cross_validate_qnet
    from qlass.qnet_head import QNetHeadConfig
    from qlass.training.configs import QNetTrainConfig

    data, out = tmp_path / "q.jsonl", tmp_path / "out"
    for folds, resamples, message in ((2, 0, "'resamples' must be a whole number >= 1, got 0"),
                                      ("2", 100, "'folds' must be a whole number >= 1, got '2'")):
        with pytest.raises(TypeError, match=re.escape(f"cross_validate_qnet: argument {message}")):
            cross_validate_qnet(data, tmp_path, out, QNetTrainConfig(), folds, resamples)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="argument 'cfg' must be an instance of QNetHeadConfig"):
        cross_validate_on_decisions([data], tmp_path, out, {"folds": 2})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="argument 'report' must be an instance of ReportConfig"):
        cross_validate_on_decisions([data], tmp_path, out, QNetHeadConfig(), {"x": 1})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=re.escape("cross_validate_on_decisions: argument 'paths' must be a list of "
                                                  "paths, got one path")):
        cross_validate_on_decisions(str(data), tmp_path, out, QNetHeadConfig(), ReportConfig())
    with pytest.raises(TypeError, match=re.escape("write_decision_qdata: argument 'paths' must be a list of paths")):
        write_decision_qdata(data, out / "q.jsonl")  # type: ignore[arg-type]
    assert not out.exists()


def test_small_helpers_name_what_they_cannot_take(tmp_path: Path) -> None:
    """diversity_prompt read one output letter by letter; with_memory(memory=0) appended every reflection
    (``[-0:]``); read_jsonl of a folder and run_pipeline of a folder were IsADirectoryError; EnvPool took
    max_instances='3' to a TypeError; resolve_device('mps') passed on a machine without it; QNetHeadConfig took
    cache_slots=-3 and could be changed after its checks."""
    import dataclasses

    from qlass.envs.base import register_env
    from qlass.errors import DataError
    from qlass.jsonl import read_jsonl
    from qlass.models import resolve_device
    from qlass.perturb import diversity_prompt
    from qlass.pipeline import run_pipeline
    from qlass.qnet_head import QNetHeadConfig
    from qlass.reflexion import with_memory
    from qlass.serve_pool import EnvPool
    from qlass.types import Message

    history = [Message("user", "Task: go.")]
    with pytest.raises(TypeError, match="argument 'previous_outputs' must be a list of outputs, got one string"):
        diversity_prompt(history, "Thought: b\nAction: look")
    with pytest.raises(QlassError, match="with_memory: memory must be a whole number >= 1, got 0"):
        with_memory(history, ["note"], 0)
    assert with_memory(history, ["a", "b"], 1)[-1].content.endswith("- b")
    with pytest.raises(QlassError, match="is a folder, not a JSON Lines file"):
        read_jsonl(tmp_path)
    with pytest.raises(DataError, match="is a folder, not a YAML file"):
        run_pipeline(tmp_path)
    register_env("corridor-pool", Corridor)
    with pytest.raises(QlassError, match="max_instances must be a whole number >= 1, got '3'"):
        EnvPool("corridor-pool", max_instances="3")  # type: ignore[arg-type]
    import torch

    if not torch.backends.mps.is_available():
        with pytest.raises(QlassError, match="torch sees no Apple GPU"):
            resolve_device("mps")
    with pytest.raises(QlassError, match="not one qlass runs on"):
        resolve_device("meta")
    with pytest.raises(QlassError, match="cache_slots must be >= 0, got -3"):
        QNetHeadConfig(cache_slots=-3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        QNetHeadConfig().folds = 1  # type: ignore[misc]


def test_build_tiny_model_keeps_the_callers_generator_and_refuses_a_file(tmp_path: Path) -> None:
    import torch

    from qlass.models import build_tiny_model

    (tmp_path / "file").write_text("x")
    with pytest.raises(QlassError, match="file: is a file; a model is saved as a folder"):
        build_tiny_model(tmp_path / "file")  # transformers only logged it, and the call returned as if saved
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    assert build_tiny_model(str(tmp_path / "tiny"), layers=1, hidden=16, heads=2) == tmp_path / "tiny"
    assert torch.rand(1) == expected and (tmp_path / "tiny" / "config.json").exists()
