"""The library's entry points called from Python with the wrong kind of argument: a dict of options where a
config object belongs, an environment where its factory belongs, no tasks at all. Each is named at once,
before any model loads or file is written."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Callable

import pytest
from toy_envs import Corridor

from qlass.decision_report import score_decisions, write_decision_report
from qlass.decisions import DecisionConfig, collect_decisions
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
