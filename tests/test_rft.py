"""The RFT baseline (``qlass.rft``, ``qlass rft``) and the retrained agents in ``qlass run``, on the
toy corridor (tests/toy_envs.py) with the tiny model."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml
from toy_envs import Corridor

from qlass.config import build
from qlass.data import load_trajectories, save_trajectories
from qlass.errors import QlassError
from qlass.expert import export_expert
from qlass.jsonl import read_jsonl
from qlass.rft import RFTConfig, action_key, augment, check_expert_env, kept_samples, run_rft
from qlass.training.sft import SFTConfig
from qlass.types import Completion, History, Message, Trajectory

TESTS = Path(__file__).resolve().parent
ENV = "toy_envs:Corridor"
TINY_SFT = SFTConfig(epochs=1, lr=1e-3, batch_size=2, micro_batch=2, val_fraction=0.0, threads=1)


class SeededWalker:
    """A user's policy: each output walks east twice as often as west, drawn from the request's seed,
    so a draw is the same whenever it is played."""

    delay = 0.0

    def sample(self, histories: Sequence[History], n: int = 1, temperature: float = 0.0,
               max_new_tokens: int = 128, seed: int | Sequence[int] | None = None) -> list[list[Completion]]:
        time.sleep(self.delay)
        seeds = seed if isinstance(seed, Sequence) else [seed] * len(histories)
        out = []
        for s in seeds:
            rng = random.Random(s)
            out.append([Completion(f"Thought: walk.\nAction: {rng.choice(['go east', 'go east', 'go west'])}", 3, 2)
                        for _ in range(n)])
        return out


class SlowWalker(SeededWalker):
    """SeededWalker slowed down, so that a run can be killed part-way."""

    delay = 0.05


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _expert(path: Path) -> Path:
    env = Corridor()
    save_trajectories(path, export_expert(env, env.tasks("train"), per_task_type=6).trajectories)
    return path


def _traj(tid: str, task: str, actions: list[str], thought: str = "go") -> Trajectory:
    msgs = [Message("user", "Walk."), Message("assistant", "OK"), Message("user", "start")]
    for a in actions:
        msgs += [Message("assistant", f"Thought: {thought}.\nAction: {a}"), Message("user", "Observation: x")]
    return Trajectory(tid, msgs, 1.0, True, task)


def test_augment_drops_repeated_action_sequences_of_a_task() -> None:
    expert = [_traj("e0", "t/0", ["go east"]), _traj("e1", "t/1", ["go east", "go east"])]
    extra = [_traj("s0", "t/0", ["go east"], thought="other words"),  # the expert's actions: dropped
             _traj("s1", "t/1", ["go west", "go east", "go east"]),
             _traj("s2", "t/1", ["go west", "go east", "go east"]),  # repeats s1
             _traj("s3", "t/0", ["go east", "go east"])]  # another task's actions: new here
    data = augment(expert, extra)
    assert [t.id for t in data.trajectories] == ["e0", "e1", "s1", "s3"]
    assert (data.expert, data.added, data.duplicates) == (2, 2, 2)
    assert action_key(extra[0]) == ("t/0", (None, "go east"))  # the prefix's "OK" has no action
    silent = _traj("s4", "t/2", ["look"])
    silent.messages[3] = Message("assistant", "Thought: I forgot the action.")  # not valid training data
    assert augment(expert, [silent]).unusable == 1 and len(augment(expert, [silent]).trajectories) == 2
    with pytest.raises(QlassError, match="trajectory id 'e0' is used twice"):
        augment(expert, [_traj("e0", "t/2", ["look"])])


def test_rft_keeps_successes_adds_them_once_and_resumes(tiny_model_dir: Path, tmp_path: Path) -> None:
    expert = _expert(tmp_path / "expert.json")
    out = tmp_path / "rft"
    cfg = RFTConfig(samples=3, max_steps=4, limit=6, max_new_tokens=16)
    agent, data = run_rft("test_rft:SeededWalker", expert, tiny_model_dir, ENV, out, cfg, TINY_SFT,
                          env_kwargs={"step_limit": 4}, policy=SeededWalker(), concurrency=4)
    records = read_jsonl(out / "samples" / "records.jsonl")
    assert sorted((r["task"], r["method"]) for r in records) == sorted(
        (f"corridor/{i}", f"sample#{k}") for i in range(6) for k in range(3))
    assert len({r["trajectory"]["steps"][0]["output"] for r in records}) == 2, "draws differ"
    successes = [r for r in records if r["reward"] >= 1.0]
    assert 0 < len(successes) < len(records)
    expert_trajs = load_trajectories(expert)
    keys = {action_key(t) for t in expert_trajs}
    new = []
    for rec in sorted(successes, key=lambda r: (int(r["task"].split("/")[1]), r["method"])):
        key = (rec["task"], (None, *[s["action"] for s in rec["trajectory"]["steps"]]))
        if key not in keys:
            keys.add(key)
            new.append(f"{rec['task']}#rft{rec['method'].split('#')[1]}")
    written = load_trajectories(out / "data.json")
    assert [t.id for t in written] == [t.id for t in expert_trajs] + new
    assert (data.expert, data.added, data.below_threshold) == (6, len(new), len(records) - len(successes))
    assert data.duplicates == len(successes) - len(new) > 0, "some successes repeat the expert's actions"
    assert all(t.reward == 1.0 for t in written)
    assert (agent / "model.safetensors").exists() and agent == out / "sft"
    assert yaml.safe_load((out / "rft_config.yaml").read_text())["train_from"] == str(tiny_model_dir)
    # rerun: nothing sampled or trained again, the same data file
    before = (out / "data.json").read_bytes()
    run_rft("test_rft:SeededWalker", expert, tiny_model_dir, ENV, out, cfg, TINY_SFT, env_kwargs={"step_limit": 4},
            policy=SeededWalker(), concurrency=2)
    assert (out / "data.json").read_bytes() == before
    assert len(read_jsonl(out / "samples" / "records.jsonl")) == len(records)
    # settings that would change what the agent was trained on are refused, naming them
    with pytest.raises(QlassError, match="trained on other data than these settings give"):
        run_rft("test_rft:SeededWalker", expert, tiny_model_dir, ENV, out, RFTConfig(samples=3, max_steps=4, limit=6,
                max_new_tokens=16, min_reward=0.0), TINY_SFT, env_kwargs={"step_limit": 4}, policy=SeededWalker())
    assert (out / "data.json").read_bytes() == before
    assert yaml.safe_load((out / "rft_config.yaml").read_text())["min_reward"] == cfg.min_reward, "the refused run's"
    for limit in (8, None):  # before: the new tasks were sampled, then the agent was refused (trained on other data)
        with pytest.raises(QlassError, match=re.escape(f"rft: its RFT agent was trained on the samples of limit=6 "
                                                       f"tasks (recorded in rft_config.yaml), not limit={limit}")):
            run_rft("test_rft:SeededWalker", expert, tiny_model_dir, ENV, out, RFTConfig(samples=3, max_steps=4,
                    limit=limit, max_new_tokens=16), TINY_SFT, env_kwargs={"step_limit": 4}, policy=SeededWalker())
    assert len(read_jsonl(out / "samples" / "records.jsonl")) == len(records)
    with pytest.raises(QlassError, match=r"line 1 .*field 'config' differs .*temperature: 0\.7 → 0\.9"):
        run_rft("test_rft:SeededWalker", expert, tiny_model_dir, ENV, out, RFTConfig(samples=3, max_steps=4, limit=6,
                max_new_tokens=16, temperature=0.9), TINY_SFT, env_kwargs={"step_limit": 4}, policy=SeededWalker())


def test_kept_samples_follow_task_then_draw_order() -> None:
    def rec(task: str, k: int, reward: float) -> dict:
        traj = {"id": task, "task": task, "reward": reward, "success": reward == 1.0, "conversations": [
            {"from": "human", "value": "go"}, {"from": "gpt", "value": "Thought: x\nAction: go east"}]}
        return {"task": task, "method": f"sample#{k}", "reward": reward, "trajectory": traj}

    records = [rec("c/1", 1, 1.0), rec("c/0", 10, 1.0), rec("c/1", 0, 0.4), rec("c/0", 2, 1.0)]
    kept, below = kept_samples(records, ["c/0", "c/1"], 1.0)
    assert [t.id for t in kept] == ["c/0#rft2", "c/0#rft10", "c/1#rft1"] and below == 1
    assert kept[0].meta == {"source": "rft", "draw": 2}
    assert len(kept_samples(records, ["c/0", "c/1"], 0.4)[0]) == 4


def test_bad_rft_inputs_are_named_errors(tiny_model_dir: Path, tmp_path: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    for options, message in (({"samples": 0}, "samples must be >= 1, got 0"),
                             ({"init": "scratch"}, "init must be one of base, sft, got 'scratch'"),
                             ({"min_reward": 1.5}, "min_reward must be in"),
                             ({"temperature": -1}, "temperature must be >= 0"),
                             ({"sampels": 2}, "did you mean 'samples'")):
        with pytest.raises(QlassError, match=message):
            build(RFTConfig, options, "--rft")
    expert = _expert(tmp_path / "expert.json")
    with pytest.raises(QlassError, match=r"missing\.json: expert trajectory file not found"):
        run_rft("x", tmp_path / "missing.json", tiny_model_dir, ENV, tmp_path / "a", RFTConfig(), TINY_SFT,
                policy=SeededWalker())
    with pytest.raises(QlassError, match=r"nobase: the base model is not a local model folder"):
        run_rft("x", expert, tmp_path / "nobase", ENV, tmp_path / "b", RFTConfig(), TINY_SFT, policy=SeededWalker())
    with pytest.raises(QlassError, match=r"test_rft:SeededWalker: the SFT checkpoint .* is not a local model folder"):
        run_rft("test_rft:SeededWalker", expert, tiny_model_dir, ENV, tmp_path / "c", RFTConfig(init="sft"), TINY_SFT,
                policy=SeededWalker())
    assert not any((tmp_path / d).exists() for d in "abc"), "refused before any work"
    (tmp_path / "e").mkdir()  # the expert data given as OUT/data.json was replaced by expert + samples
    inside = tmp_path / "e" / "data.json"
    inside.write_bytes(expert.read_bytes())
    with pytest.raises(QlassError, match=r"e/data\.json: is also an input of this command"):
        run_rft("x", inside, tiny_model_dir, ENV, tmp_path / "e", RFTConfig(), TINY_SFT, policy=SeededWalker())
    assert inside.read_bytes() == expert.read_bytes() and sorted(os.listdir(tmp_path / "e")) == ["data.json"]
    base = tmp_path / "base"  # the base model's own folder as OUT: data.json, samples/ and sft/ went into it
    shutil.copytree(tiny_model_dir, base)
    with pytest.raises(QlassError, match=r"holds a model \(config\.json\); qlass rft writes its data and agents"):
        run_rft("x", expert, base, ENV, base, RFTConfig(), TINY_SFT, policy=SeededWalker())
    assert sorted(os.listdir(base)) == sorted(os.listdir(tiny_model_dir))
    foreign = tmp_path / "foreign.json"  # expert data of another environment (no task id is the corridor's)
    save_trajectories(foreign, [_traj("s1", "sciworld/boil/0", ["go east"]), _traj("s2", "sciworld/melt/1", ["x"])])
    with pytest.raises(QlassError, match=r"foreign\.json: none of its 2 tasks is a task of toy_envs:Corridor "
                                         r"\(e\.g\. 'sciworld/boil/0'\)"):
        run_rft("x", foreign, tiny_model_dir, ENV, tmp_path / "f", RFTConfig(), TINY_SFT, policy=SeededWalker())
    assert not (tmp_path / "f").exists(), "refused before sampling"
    with caplog.at_level(logging.WARNING, logger="qlass.rft"):  # some foreign tasks: data of a larger task set
        check_expert_env(foreign, {"corridor/1", "corridor/400"}, ENV, None)
    assert "1 of its 2 tasks are not tasks of toy_envs:Corridor (e.g. 'corridor/400')" in caplog.text
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "x", "conversations": [{"from": "gpt", "value": "hi"}]}]))
    with pytest.raises(QlassError, match=r"bad\.json.*record 0 \(id 'x'\).*roles must alternate"):
        run_rft("x", bad, tiny_model_dir, ENV, tmp_path / "d", RFTConfig(samples=1, limit=1, max_steps=1), TINY_SFT,
                env_kwargs={"step_limit": 2}, policy=SeededWalker())


@pytest.mark.slow
def test_killed_rft_command_resumes_without_duplicate_samples(tiny_model_dir: Path, tmp_path: Path) -> None:
    expert = _expert(tmp_path / "expert.json")
    out = tmp_path / "rft"
    cmd = [sys.executable, "-m", "qlass", "rft", "--model", "test_rft:SlowWalker", "--expert", str(expert), "--base",
           str(tiny_model_dir), "--env", ENV, "--env-arg", "step_limit=4", "--out", str(out), "--concurrency", "2",
           "--rft", "samples=2", "--rft", "max_steps=4", "--set", "epochs=1", "--set", "batch_size=2",
           "--set", "micro_batch=2", "--set", "val_fraction=0", "--set", "lr=0.001", "--set", "threads=1"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    records = out / "samples" / "records.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (records.exists() and len(records.read_text().splitlines()) >= 3):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = read_jsonl(records, repair_tail=True)
    assert 3 <= len(before) < 12, "the run should have been killed while sampling"
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" in done.stderr
    recs = read_jsonl(records)
    assert recs[:len(before)] == before
    assert sorted((r["task"], r["method"]) for r in recs) == sorted(
        (f"corridor/{i}", f"sample#{k}") for i in range(6) for k in range(2))
    assert "the RFT agent:" in done.stdout and (out / "sft" / ".qlass-complete").exists()
    refused = subprocess.run(cmd + ["--rft", "init=later"], env=_env(), capture_output=True, text=True)
    assert refused.returncode == 2 and "error: --rft: init must be one of base, sft, got 'later'" in refused.stderr


@pytest.mark.slow
def test_pipeline_trains_and_evaluates_the_rft_and_self_trained_agents(tiny_model_dir: Path, tmp_path: Path) -> None:
    from qlass.pipeline import run_pipeline

    run = tmp_path / "run"
    config = {
        "run_dir": str(run), "model": str(tiny_model_dir), "env": ENV, "env_args": {"step_limit": 3},
        "expert": {"per_task": 4},
        "sft": {"epochs": 1, "lr": 1.0e-3, "batch_size": 2, "micro_batch": 2, "val_fraction": 0.0, "threads": 1},
        "explore": {"limit": 2, "skip": 2, "max_new_tokens": 6, "max_depth": 2, "max_nodes": 8},
        "eval": {"limit": 2, "max_steps": 3, "methods": ["greedy:max_new_tokens=6"]},
        "rft": {"samples": 2, "limit": 2, "min_reward": 0.0, "max_new_tokens": 6},
        "self_train": {"rewards": ["q", "reward"]},
    }
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(config))
    rows = run_pipeline(path)
    assert not (run / "qnet").exists(), "no evaluation method uses a QNet: stage 3 is skipped"
    assert {r["method"] for r in rows} == {"greedy", "rft (greedy)", "self-train[q] (greedy)",
                                           "self-train[reward] (greedy)"}
    assert all(r["tasks"] == 2 for r in rows)
    results = json.loads((run / "results" / "results.json").read_text())
    assert {p["method"] for p in results["paired"]} == {"rft (greedy)", "self-train[q] (greedy)",
                                                         "self-train[reward] (greedy)"}
    assert "| corridor | seen | rft (greedy) | 2 |" in (run / "results" / "results.md").read_text()
    assert len(read_jsonl(run / "rft" / "samples" / "records.jsonl")) == 4  # min_reward 0: every sample kept
    for reward in ("q", "reward"):
        selection = json.loads((run / "self-train" / reward / "selection.json").read_text())
        assert selection["trees"] == 2 and selection["process_reward"] == reward
        assert (run / "self-train" / reward / "sft" / ".qlass-complete").exists()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["rft"]["samples"] == 2 and saved["self_train"]["rewards"] == ["q", "reward"]
    # rerun: every part is complete, the same table
    assert run_pipeline(path) == rows
    # other settings for a retrained agent with outputs: refused, named
    path.write_text(yaml.safe_dump({**config, "rft": {**config["rft"], "samples": 3}}))
    with pytest.raises(QlassError, match=r"other settings \(rft\.samples: 2 → 3\)"):
        run_pipeline(path)


def test_pipeline_sections_for_retrained_agents_are_checked_before_any_work() -> None:
    from qlass.pipeline_config import resolve

    for data, message in (
        ({"rft": {"sampels": 2}}, r"p\.yaml: rft: unknown option\(s\) 'sampels' \(did you mean 'samples'\?\)"),
        ({"rft": {"init": "none"}}, r"p\.yaml: rft: init must be one of base, sft"),
        ({"rft": {"sft": {"epoch": 1}}}, r"p\.yaml: rft\.sft: unknown option\(s\) 'epoch'"),
        ({"rft": {"sft": 3}}, r"p\.yaml: rft: option 'sft' expects dict"),
        ({"self_train": {"rewards": ["q", "value"]}}, r"p\.yaml: self_train: unknown process reward 'value'"),
        ({"self_train": {"rewards": []}}, r"self_train: rewards must be a non-empty list"),
        ({"self_train": {"gamma": 2.0}}, r"self_train: gamma must be in \[0, 1\]"),
        ({"sft": {"max_trajectories": 10}, "rft": {}}, r"rft: sft\.max_trajectories would cap"),
        ({"policy_server": "http://127.0.0.1:9/v1", "self_train": {}}, r"self_train: not available with policy_server"),
    ):
        with pytest.raises(QlassError, match=message):
            resolve(data, "p.yaml")
    r = resolve({"rft": {"sft": {"epochs": 1}}, "sft": {"lr": 1e-4}}, "p.yaml")
    assert (r.rft.sft.epochs, r.rft.sft.lr) == (1, 1e-4)
    assert resolve({}, "p.yaml").rft is None and resolve({"self_train": {}}, "p.yaml").self_train.stage.rewards == [
        "q", "avg", "reward"]


def test_tasks_expert_samples_only_the_expert_datas_tasks(tmp_path: Path) -> None:
    from qlass.rft import sample_training_tasks

    cfg = RFTConfig(samples=1, max_steps=2, max_new_tokens=16, tasks="expert")
    records, order = sample_training_tasks("test_rft:SeededWalker", ENV, tmp_path / "s", cfg, {"step_limit": 2},
                                           policy=SeededWalker(), expert_tasks={"corridor/1", "corridor/4", "other/9"})
    assert order == ["corridor/1", "corridor/4"] and sorted(r["task"] for r in records) == order
    with pytest.raises(QlassError, match="none of the 1 given tasks is in split 'train'"):
        sample_training_tasks("test_rft:SeededWalker", ENV, tmp_path / "t", cfg, {"step_limit": 2},
                              policy=SeededWalker(), expert_tasks={"corridor/100"})
    with pytest.raises(QlassError, match="needs the expert data's task ids"):
        sample_training_tasks("test_rft:SeededWalker", ENV, tmp_path / "u", cfg, policy=SeededWalker())
    with pytest.raises(QlassError, match="tasks must be one of expert, split"):
        build(RFTConfig, {"tasks": "all"}, "rft")
