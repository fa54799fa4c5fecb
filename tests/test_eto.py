"""The ETO baseline (``qlass.eto``, ``qlass eto``, the pipeline's ``eto:`` stage) on the toy corridor
(tests/toy_envs.py): pairs from real episodes, DPO rounds on a tiny model taught to walk east, resume
and refusals."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from toy_envs import Corridor
from transformers import AutoModelForCausalLM

from qlass.config import build
from qlass.data import load_trajectories, record_to_trajectory, save_trajectories, trajectory_to_record
from qlass.envs.base import parse_action
from qlass.errors import QlassError
from qlass.eto import ETOConfig, experts_by_task, failure_pairs, run_eto
from qlass.expert import export_expert, replay_expert
from qlass.jsonl import read_jsonl
from qlass.training.dpo import DPOConfig, load_pairs
from qlass.training.sft import SFTConfig, train_sft

TESTS = Path(__file__).resolve().parent
ENV = "toy_envs:Corridor"
EAST = "Thought: The goal is further east.\nAction: go east"
WEST = "Thought: Maybe west.\nAction: go west"
TINY_DPO = DPOConfig(epochs=1, lr=1e-3, batch_size=2, micro_batch=1, val_fraction=0.0, warmup_ratio=0.0, threads=1)
# greedy exploration with 2 steps: the walker reaches the goal of the 1- and 2-room tasks and fails the 3-room ones;
# tasks="split" also plays corridor/5, which has no expert trajectory
EXPLORE = ETOConfig(max_steps=2, max_new_tokens=24, tasks="split")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


@pytest.fixture(scope="module")
def walker(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny model fine-tuned on the corridor's expert trajectories until it walks east (a real SFT
    agent that plays valid actions), and those expert trajectories without task corridor/5's."""
    out = tmp_path_factory.mktemp("walker")
    env = Corridor()
    experts = export_expert(env, env.tasks("train"), per_task_type=6).trajectories
    save_trajectories(out / "all.json", experts)
    sft = train_sft(out / "all.json", tiny_model_dir, out / "sft",
                    SFTConfig(epochs=25, lr=1e-2, batch_size=2, micro_batch=2, val_fraction=0.0, warmup_ratio=0.0,
                              threads=1))
    save_trajectories(out / "expert.json", [t for t in experts if t.task != "corridor/5"])
    return sft, out / "expert.json"


def _record(task: str, outputs: list[str], step_limit: int = 12) -> dict:
    """The exploration record of ``outputs`` really played on ``task``."""
    env = Corridor(step_limit=step_limit)
    traj = replay_expert(env, next(t for t in env.tasks("train") if t.id == task), outputs)
    return {"task": task, "reward": traj.reward, "trajectory": trajectory_to_record(traj)}


def _turns(side: dict) -> list[str]:
    return [t["value"] for t in side["conversations"]]


def test_each_failure_is_paired_with_the_expert_of_its_task(tmp_path: Path) -> None:
    env = Corridor()
    experts = {t.task: t for t in export_expert(env, env.tasks("train"), per_task_type=6).trajectories}
    del experts["corridor/3"]
    experts["corridor/5"] = dataclasses.replace(experts["corridor/5"], reward=0.0)  # an expert no better than 0
    records = [_record("corridor/0", [EAST]),                              # success: no pair
               _record("corridor/1", [EAST, WEST, WEST, "Thought: Hm.\nAction: look"]),  # reward 0
               _record("corridor/2", [EAST, EAST, WEST], step_limit=3),   # reward 1/3
               _record("corridor/3", [WEST]),                              # failure without an expert
               _record("corridor/4", ["I am lost."]),                      # no action: not training data
               _record("corridor/5", [WEST])]                              # the expert is no better
    order = [f"corridor/{i}" for i in range(6)]
    got = failure_pairs(list(reversed(records)), order, experts, EXPLORE, "expert.json")
    assert [p["id"] for p in got.pairs] == ["corridor/1", "corridor/2"]
    assert (got.episodes, got.failures, got.no_expert, got.expert_not_better, got.unusable) == (6, 5, 1, 1, 1)
    assert got.mean_reward == pytest.approx((1 + 0 + 1 / 3 + 0 + 0 + 0) / 6)
    for pair, rec in zip(got.pairs, records[1:3]):
        expert = trajectory_to_record(experts[pair["id"]])
        assert _turns(pair["chosen"]) == _turns(expert) and pair["chosen"]["reward"] == 1.0
        assert _turns(pair["rejected"]) == _turns(rec["trajectory"])[:-1]  # up to the last agent turn
        assert pair["rejected"]["reward"] == rec["reward"] < 1.0 and pair["rejected"]["task"] == pair["id"]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in got.pairs))
    assert [p.id for p in load_pairs(path)] == ["corridor/1", "corridor/2"]  # qlass dpo reads them
    # the threshold: 1/3 is not below 0.3
    assert [p["id"] for p in failure_pairs(records, order, experts, ETOConfig(min_reward=0.3), "e").pairs] == [
        "corridor/1"]
    # rejected_extra_turns cuts a failure to the expert's agent turns (2 for corridor/1) plus that many
    for extra, kept in ((0, 2), (1, 3), (None, 4)):
        [cut] = failure_pairs(records[1:2], order, experts, ETOConfig(rejected_extra_turns=extra), "e").pairs
        assert _turns(cut["rejected"])[3::2] == _turns(records[1]["trajectory"])[3::2][:kept]
    # expert data of another prompt: a named error, not a silent skip
    experts["corridor/1"] = experts["corridor/2"]
    with pytest.raises(QlassError, match=r"expert\.json: expert trajectory 'corridor/2' of task 'corridor/1' starts "
                                         r"from another prompt"):
        failure_pairs(records, order, experts, EXPLORE, "expert.json")
    with pytest.raises(QlassError, match=r"x\.json: no expert trajectory names its task"):
        experts_by_task([dataclasses.replace(t, task=None) for t in experts.values()], "x.json")
    # a file without rewards (optional in the format; ETO's own SFT files have none) read as reward 0: every
    # failure then counted as "the expert is no better", and the run stopped with no pairs, saying so
    with pytest.raises(QlassError, match=r"x\.json: no expert trajectory records a reward above 0"):
        experts_by_task([dataclasses.replace(t, reward=0.0, success=False) for t in experts.values()], "x.json")


def test_a_pair_longer_than_dpo_max_length_loses_its_last_rejected_turns(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from qlass.training.dpo import PreferencePair, encode_pair, pair_length

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))

    def tokens(pair: PreferencePair) -> int:
        return pair_length(encode_pair(tokenizer, pair))

    env = Corridor()
    experts = {t.task: t for t in export_expert(env, env.tasks("train"), per_task_type=6).trajectories}
    loop = [EAST, WEST, EAST, WEST, EAST, WEST]  # a failure that loops: 6 agent turns
    records = [_record("corridor/2", loop, step_limit=6)]
    whole = failure_pairs(records, ["corridor/2"], experts, EXPLORE, "e").pairs[0]

    def length(pair: dict) -> int:
        sides = [record_to_trajectory({"id": f"x/{s}", **pair[s]}) for s in ("chosen", "rejected")]
        return tokens(PreferencePair(pair["id"], *sides))

    full = length(whole)
    limit = full - 1  # one token too long: the last rejected turn goes, nothing more
    got = failure_pairs(records, ["corridor/2"], experts, EXPLORE, "e", tokens, limit)
    [pair] = got.pairs
    assert (got.shortened, got.unusable) == (1, 0) and length(pair) <= limit
    assert _turns(pair["rejected"]) == _turns(whole["rejected"])[:-2]  # one agent turn and its observation fewer
    assert got.summary()["shortened"] == 1
    # a pair that fits is left whole; one that does not fit with a single rejected turn is unusable
    same = failure_pairs(records, ["corridor/2"], experts, EXPLORE, "e", tokens, full)
    assert same.shortened == 0 and same.pairs == [whole]
    none = failure_pairs(records, ["corridor/2"], experts, EXPLORE, "e", tokens, 10)
    assert (none.pairs, none.unusable, none.shortened) == ([], 1, 0)


def test_a_round_trains_a_loadable_agent_and_a_rerun_adds_rounds_only(walker: tuple[Path, Path],
                                                                       tmp_path: Path) -> None:
    sft, expert = tmp_path / "sft", walker[1]
    shutil.copytree(walker[0], sft)  # this test saves another model at the agent's path at the end
    out = tmp_path / "eto"
    agent, [summary] = run_eto(sft, expert, ENV, out, EXPLORE, TINY_DPO, env_kwargs={"step_limit": 3},
                               policy_kwargs={"threads": 1}, concurrency=4)
    assert agent == out / "round-1" / "dpo"
    records = read_jsonl(out / "round-1" / "explore" / "records.jsonl")
    failed = sorted(r["task"] for r in records if r["reward"] < 1.0)
    assert failed == ["corridor/2", "corridor/5"], "the 3-room tasks fail in 2 steps"
    pairs = load_pairs(out / "round-1" / "pairs.jsonl")
    assert [p.id for p in pairs] == ["corridor/2"]  # corridor/5 has no expert trajectory
    expert_msgs = {t.task: t.messages for t in load_trajectories(expert)}
    assert pairs[0].chosen.messages == expert_msgs["corridor/2"]
    rejected = [parse_action(m.content) for m in pairs[0].rejected.messages[3:] if m.role == "assistant"]
    assert rejected == ["go east", "go east"] and pairs[0].rejected.reward == pytest.approx(2 / 3)
    assert summary == {"episodes": 6, "mean_reward": pytest.approx(sum(r["reward"] for r in records) / 6),
                       "failures": 2, "no_expert": 1, "expert_not_better": 0, "unusable": 0, "shortened": 0,
                       "pairs": 1}
    trained = AutoModelForCausalLM.from_pretrained(agent).state_dict()
    start = AutoModelForCausalLM.from_pretrained(sft).state_dict()
    assert any(not torch.equal(trained[k], start[k]) for k in start), "DPO changed the agent"
    assert yaml.safe_load((agent / "dpo_config.yaml").read_text())["base_model"] == str(sft)  # reference: the SFT agent
    # a rerun with one more round: round 1 is neither played nor trained again; round 2 starts from its agent
    explored = (out / "round-1" / "explore" / "records.jsonl").read_bytes()
    weights = (agent / "model.safetensors").stat().st_mtime_ns
    later = dataclasses.replace(EXPLORE, iterations=2, later_dpo={"beta": 0.5})
    with pytest.raises(QlassError, match=r"other settings \(dpo_later_rounds\.beta: 0\.1 → 0\.5"):
        run_eto(sft, expert, ENV, out, later, TINY_DPO, env_kwargs={"step_limit": 3}, policy_kwargs={"threads": 1})
    agent2, summaries = run_eto(sft, expert, ENV, out, dataclasses.replace(EXPLORE, iterations=2), TINY_DPO,
                                env_kwargs={"step_limit": 3}, policy_kwargs={"threads": 2}, concurrency=2)
    assert agent2 == out / "round-2" / "dpo" and summaries[0] == summary and len(summaries) == 2
    assert (out / "round-1" / "explore" / "records.jsonl").read_bytes() == explored
    assert (agent / "model.safetensors").stat().st_mtime_ns == weights
    assert yaml.safe_load((out / "round-2" / "explore" / "config.yaml").read_text())["model"] == str(agent)
    assert yaml.safe_load((agent2 / "dpo_config.yaml").read_text())["base_model"] == str(agent)
    AutoModelForCausalLM.from_pretrained(agent2)
    # other settings for this folder are refused, naming them, before any work
    for cfg, dpo, message in ((dataclasses.replace(EXPLORE, temperature=0.7), TINY_DPO, r"temperature: 0\.0 → 0\.7"),
                              (EXPLORE, dataclasses.replace(TINY_DPO, beta=0.2), r"dpo\.beta: 0\.1 → 0\.2")):
        with pytest.raises(QlassError, match=rf"{re.escape(str(out))} was made with other settings \({message}"):
            run_eto(sft, expert, ENV, out, cfg, dpo, env_kwargs={"step_limit": 3}, policy_kwargs={"threads": 1})
    assert sorted(p.name for p in out.iterdir()) == [".qlass.lock", "eto_config.yaml", "round-1", "round-2"]
    # another agent saved at the SFT agent's path (before: the run of the old one was handed back)
    saved = sft / "model.safetensors"
    saved.write_bytes(saved.read_bytes())
    with pytest.raises(QlassError, match=r"other settings \(model: another model at the same path"):
        run_eto(sft, expert, ENV, out, dataclasses.replace(EXPLORE, iterations=2), TINY_DPO,
                env_kwargs={"step_limit": 3}, policy_kwargs={"threads": 1})


def test_bad_eto_inputs_are_named_errors(walker: tuple[Path, Path], tmp_path: Path) -> None:
    sft, expert = walker
    for options, message in (({"iterations": 0}, "iterations must be >= 1, got 0"),
                             ({"min_reward": 1.5}, r"min_reward must be in \[0, 1\]"),
                             ({"temperature": -1}, "temperature must be >= 0"),
                             ({"rejected_extra_turns": -1}, "rejected_extra_turns must be >= 0"),
                             ({"iteratons": 2}, "did you mean 'iterations'"),
                             ({"iterations": 100_000}, "iterations must be <= 100, got 100000")):
        with pytest.raises(QlassError, match=message):
            build(ETOConfig, options, "--eto")
    with pytest.raises(QlassError, match=r"missing\.json: expert trajectory file not found"):
        run_eto(sft, tmp_path / "missing.json", ENV, tmp_path / "a", EXPLORE, TINY_DPO)
    with pytest.raises(QlassError, match=r"nomodel: the SFT agent is not a local model folder"):
        run_eto(tmp_path / "nomodel", expert, ENV, tmp_path / "b", EXPLORE, TINY_DPO)
    with pytest.raises(QlassError, match=r"later_dpo: unknown option\(s\) 'bta'"):
        run_eto(sft, expert, ENV, tmp_path / "c", ETOConfig(later_dpo={"bta": 0.5}), TINY_DPO)
    assert not any((tmp_path / d).exists() for d in "abc"), "refused before any work"
    with pytest.raises(QlassError, match=r"holds an SFT run \(qlass sft\) \(sft_config\.yaml\); qlass eto writes"):
        run_eto(sft, expert, ENV, sft, EXPLORE, TINY_DPO)  # the agent's own folder: round-1/ went into it
    assert not (sft / "round-1").exists()
    # a folder holding a round whose eto_config.yaml is gone or emptied: its settings are unknown
    (tmp_path / "e" / "round-1").mkdir(parents=True)
    with pytest.raises(QlassError, match=r"e holds earlier work but .*eto_config\.yaml is missing"):
        run_eto(sft, expert, ENV, tmp_path / "e", EXPLORE, TINY_DPO)
    (tmp_path / "e" / "eto_config.yaml").write_text("{}\n")
    with pytest.raises(QlassError, match=r"eto_config\.yaml does not record 'model', 'env', 'seed'"):
        run_eto(sft, expert, ENV, tmp_path / "e", EXPLORE, TINY_DPO)
    # nothing is a failure below reward 0: a clear error after exploring, and no training
    with pytest.raises(QlassError, match=r"ETO round 1: no failure pairs to train on \(6 episodes, 0 below min_reward"):
        run_eto(sft, expert, ENV, tmp_path / "d", dataclasses.replace(EXPLORE, min_reward=0.0), TINY_DPO,
                env_kwargs={"step_limit": 3}, policy_kwargs={"threads": 1}, concurrency=6)
    assert len(read_jsonl(tmp_path / "d" / "round-1" / "explore" / "records.jsonl")) == 6
    assert not (tmp_path / "d" / "round-1" / "dpo").exists()


@pytest.mark.slow
def test_killed_eto_command_resumes_without_redoing_round_one(walker: tuple[Path, Path], tmp_path: Path) -> None:
    sft, expert = walker
    out = tmp_path / "eto"
    cmd = [sys.executable, "-m", "qlass", "eto", "--model", str(sft), "--expert", str(expert), "--env", ENV,
           "--env-arg", "step_limit=3", "--out", str(out), "--concurrency", "3", "--policy-arg", "threads=1",
           "--eto", "iterations=2", "--eto", "max_steps=2", "--eto", "max_new_tokens=24", "--set", "epochs=1",
           "--set", "lr=0.001", "--set", "batch_size=2", "--set", "micro_batch=1", "--set", "val_fraction=0",
           "--set", "warmup_ratio=0", "--set", "threads=1"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done_mark = out / "round-1" / "dpo" / ".qlass-complete"
    deadline = time.time() + 300
    while time.time() < deadline and not done_mark.exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert done_mark.exists() and not (out / "round-2" / "dpo" / ".qlass-complete").exists(), \
        "the run should have been killed after round 1"
    weights = (out / "round-1" / "dpo" / "model.safetensors").stat().st_mtime_ns
    explored = (out / "round-1" / "explore" / "records.jsonl").read_bytes()
    rerun = subprocess.run(cmd, env=_env(), capture_output=True, text=True, check=False)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "ETO round 1/2 is complete" in rerun.stderr
    assert (out / "round-1" / "dpo" / "model.safetensors").stat().st_mtime_ns == weights
    assert (out / "round-1" / "explore" / "records.jsonl").read_bytes() == explored
    assert f"the ETO agent: {out / 'round-2' / 'dpo'}" in rerun.stdout
    # by default only the expert data's tasks are explored: corridor/5 has no expert trajectory
    assert "round 1: 5 episodes" in rerun.stdout and "round 2: 5 episodes" in rerun.stdout
    explored_tasks = {r["task"] for r in read_jsonl(out / "round-2" / "explore" / "records.jsonl")}
    assert explored_tasks == {f"corridor/{i}" for i in range(5)}
    refused = subprocess.run(cmd + ["--eto", "temperature=0.5"], env=_env(), capture_output=True, text=True,
                             check=False)
    assert refused.returncode == 2 and "temperature: 0.0 → 0.5" in refused.stderr


@pytest.mark.slow
def test_pipeline_trains_and_evaluates_the_eto_agent(walker: tuple[Path, Path], tmp_path: Path) -> None:
    from qlass.pipeline import run_pipeline

    sft, expert = walker
    run = tmp_path / "run"
    config = {
        "run_dir": str(run), "sft_model": str(sft), "env": ENV, "env_args": {"step_limit": 3},
        "policy": {"threads": 1}, "expert": {"data": str(expert)},
        "explore": {"limit": 1, "max_new_tokens": 24, "max_depth": 1, "max_nodes": 3},
        "eval": {"limit": 3, "max_steps": 2, "methods": ["greedy:max_new_tokens=24"]},
        "eto": {"limit": 3, "max_new_tokens": 24, "dpo": {"epochs": 1, "lr": 1.0e-3, "batch_size": 2,
                                                          "val_fraction": 0.0, "warmup_ratio": 0.0,
                                                          "threads": 1}},
    }
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(config))
    rows = run_pipeline(path)
    assert not (run / "trees.jsonl").exists(), "no QNet method and no self-training: stage 2 is skipped"
    assert {r["method"] for r in rows} == {"greedy", "eto (greedy)"} and all(r["tasks"] == 3 for r in rows)
    results = json.loads((run / "results" / "results.json").read_text())
    assert [p["method"] for p in results["paired"]] == ["eto (greedy)"]
    assert "| corridor | seen | eto (greedy) | 3 |" in (run / "results" / "results.md").read_text()
    from qlass.eval_records import read_records  # the table's records, readable by qlass report (--side)
    combined = read_records([run / "results" / "records.jsonl"])
    tasks = {r["task"] for r in combined}
    assert len(tasks) == 3 and sorted((r["method"], r["task"]) for r in combined) == sorted(
        (m, t) for m in ("greedy", "eto (greedy)") for t in tasks)
    eto_cfg = yaml.safe_load((run / "eto" / "eto_config.yaml").read_text())
    assert eto_cfg["max_steps"] == 2 and eto_cfg["model"] == str(sft)  # eval.max_steps applies
    assert [p.id for p in load_pairs(run / "eto" / "round-1" / "pairs.jsonl")] == ["corridor/2"]
    assert len(read_jsonl(run / "eto" / "eval" / "records.jsonl")) == 3
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["eto"]["limit"] == 3 and saved["eto"]["dpo"]["lr"] == 1.0e-3 and saved["eto"]["dpo"]["beta"] == 0.1
    assert run_pipeline(path) == rows  # rerun: every part is complete, the same table
    path.write_text(yaml.safe_dump({**config, "eto": {**config["eto"], "temperature": 0.5}}))
    with pytest.raises(QlassError, match=r"other settings \(eto\.temperature: 0\.0 → 0\.5\)"):
        run_pipeline(path)


@pytest.mark.slow
def test_a_pipeline_whose_eto_round_finds_no_pairs_goes_on_without_its_row(
        walker: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An ETO round with nothing to train on stopped the whole run, so the sections after it (self-training)
    never ran. The run now ends with the other rows and a warning naming the round."""
    from qlass.pipeline import run_pipeline

    sft, expert = walker
    run = tmp_path / "run"
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({
        "run_dir": str(run), "sft_model": str(sft), "env": ENV, "env_args": {"step_limit": 3},
        "policy": {"threads": 1}, "expert": {"data": str(expert)},
        "eval": {"limit": 2, "max_steps": 2, "methods": ["greedy:max_new_tokens=24"]},
        "eto": {"limit": 2, "max_new_tokens": 24, "min_reward": 0.0}}))  # nothing is below reward 0
    rows = run_pipeline(path)
    assert [r["method"] for r in rows] == ["greedy"] and not (run / "eto" / "round-1" / "dpo").exists()
    assert "ETO round 1: no failure pairs to train on" in caplog.text and "no eto (greedy) row" in caplog.text


def test_pipeline_eto_section_is_checked_before_any_work() -> None:
    from qlass.pipeline_config import pipeline_options, resolve

    for data, message in (
        ({"eto": {"iteratons": 2}}, r"p\.yaml: eto: unknown option\(s\) 'iteratons' \(did you mean 'iterations'\?\)"),
        ({"eto": {"min_reward": -1}}, r"p\.yaml: eto: min_reward must be in \[0, 1\]"),
        ({"eto": {"dpo": {"bta": 0.1}}}, r"p\.yaml: eto\.dpo: unknown option\(s\) 'bta'"),
        ({"eto": {"later_dpo": {"beta": 0}}}, r"p\.yaml: eto: later_dpo: lr and beta must be > 0"),
        ({"eto": {"dpo": 3}}, r"p\.yaml: eto: option 'dpo' expects dict"),
        ({"policy_server": "http://127.0.0.1:9/v1", "eto": {}}, r"eto: not available with policy_server"),
    ):
        with pytest.raises(QlassError, match=message):
            resolve(data, "p.yaml")
    r = resolve({"eto": {"iterations": 3, "dpo": {"beta": 0.2}}}, "p.yaml")
    assert (r.eto.stage.iterations, r.eto.dpo.beta, r.eto.dpo.lr) == (3, 0.2, 1e-6)
    assert resolve({}, "p.yaml").eto is None
    options = pipeline_options()
    assert "\neto:\n" in options and "later_dpo" in options and "dpo" in options.split("\neto:\n")[1].split("\n\n")[0]


def test_under_limited_supervision_eto_pairs_only_with_the_experts_sft_saw(walker: tuple[Path, Path],
                                                                          tmp_path: Path) -> None:
    from qlass.pipeline_config import resolve
    from qlass.pipeline_retrain import supervised_expert_data
    from qlass.training.sft import limit_trajectories

    _, expert = walker
    config = {"run_dir": str(tmp_path / "run"), "env": ENV, "expert": {"data": str(expert)}, "sft": {"seed": 3},
              "eto": {"limit": 3}}
    assert supervised_expert_data(resolve(config, "p.yaml"), "p.yaml", "eto") == expert
    limited = resolve({**config, "sft": {"seed": 3, "max_trajectories": 2}}, "p.yaml")
    path = supervised_expert_data(limited, "p.yaml", "eto")
    assert path == tmp_path / "run" / "expert-sft.json"
    subset = [t.id for t in load_trajectories(path)]
    assert subset == [t.id for t in limit_trajectories(load_trajectories(expert), 2, 3)] and len(subset) == 2


def test_new_pairs_are_refused_only_once_dpo_has_started_on_the_old_ones(tmp_path: Path) -> None:
    from qlass.eto import RoundPairs, _write_pairs

    old, new = RoundPairs([{"id": "a"}], 1, 0.0), RoundPairs([{"id": "b"}], 1, 0.0)
    _write_pairs(tmp_path, old)
    (tmp_path / "dpo").mkdir()
    (tmp_path / "dpo" / ".qlass.lock").write_text("")  # DPO refused the old pairs before training: no config
    _write_pairs(tmp_path, new)
    assert read_jsonl(tmp_path / "pairs.jsonl") == [{"id": "b"}]
    (tmp_path / "dpo" / "dpo_config.yaml").write_text("lr: 1.0\n")  # DPO started on the pairs now written
    _write_pairs(tmp_path, new)  # the same pairs again: fine
    with pytest.raises(QlassError, match=r"pairs\.jsonl: the agent in .*dpo was \(partly\) trained on other pairs"):
        _write_pairs(tmp_path, old)
    assert read_jsonl(tmp_path / "pairs.jsonl") == [{"id": "b"}] and not (tmp_path / "pairs.jsonl.new").exists()
