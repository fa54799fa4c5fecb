"""Expert export on the real ScienceWorld: the issue's command writes verified trajectories."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from toy_envs import Corridor

from qlass.data import load_trajectories
from qlass.envs.base import make_env
from qlass.expert import export_expert, replay_expert

pytestmark = [pytest.mark.slow, pytest.mark.sciworld]


def test_expert_command_writes_ten_trajectories_that_replay_to_one(tmp_path: Path) -> None:
    out = tmp_path / "expert.json"
    result = subprocess.run(
        [sys.executable, "-m", "qlass", "data", "expert", "--env", "sciworld", "--split", "train",
         "--task-types", "find-plant,find-animal", "--per-task", "5", "--out", str(out)],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "wrote 10 verified expert trajectories" in result.stdout
    assert not (tmp_path / ".expert.json.progress.jsonl").exists() and (tmp_path / ".expert.json.done.jsonl").exists()
    check = subprocess.run([sys.executable, "-m", "qlass", "data", "validate", str(out)], capture_output=True,
                           text=True)
    assert check.returncode == 0 and "10 records, 10 valid, 0 invalid" in check.stdout, check.stderr
    trajs = load_trajectories(out)
    assert len(trajs) == 10
    assert sorted({t.id.split("/")[1] for t in trajs}) == ["find-animal", "find-plant"]
    env = make_env("sciworld", step_limit=100)
    try:
        tasks = {t.id: t for t in env.tasks("train", ["find-plant", "find-animal"])}
        for traj in trajs:
            outputs = [m.content for m in traj.messages if m.role == "assistant"][len(env.prompt()) // 2:]
            replay = replay_expert(env, tasks[traj.id], outputs)
            assert replay.reward == 1.0 and replay.success
            assert replay.messages == traj.messages
    finally:
        env.close()


def test_too_long_experts_are_excluded_and_reported() -> None:
    env = make_env("sciworld", step_limit=100)
    try:
        tasks = env.tasks("train", ["find-plant"])[:3]
        result = export_expert(env, tasks, max_steps=5)
    finally:
        env.close()
    assert result.trajectories == []
    assert set(result.excluded) == {t.id for t in tasks}
    assert all("> max 5" in why for why in result.excluded.values())


def test_step_limit_exclusion_names_the_fix() -> None:
    env = make_env("sciworld", step_limit=5)
    try:
        result = export_expert(env, env.tasks("train", ["find-plant"])[:1])
    finally:
        env.close()
    (why,) = result.excluded.values()
    assert "step limit 5" in why and "step_limit" in why


def test_a_gold_path_that_goes_on_after_the_task_is_done_is_kept() -> None:
    """ScienceWorld's gold path for grow-plant/0 has 63 actions and finishes the task in 29: it was excluded
    as longer than the step limit of 30 without being played."""
    env = make_env("sciworld", step_limit=30)
    try:
        (task,) = [t for t in env.tasks("train", ["grow-plant"]) if t.id == "sciworld/grow-plant/0"]
        assert len(env.expert(task)) > 30
        result = export_expert(env, [task])
    finally:
        env.close()
    (traj,) = result.trajectories
    assert traj.success and len(traj.steps) <= 30 and not result.excluded


def test_export_resumes_from_its_progress_file(tmp_path: Path) -> None:
    progress = tmp_path / "progress.jsonl"
    env = make_env("sciworld", step_limit=100)
    try:
        tasks = env.tasks("train", ["lifespan-longest-lived"])[:3]
        first = export_expert(env, tasks[:2], max_steps=20, progress_file=progress)
        with open(progress, "a") as fh:
            fh.write('{"task": "torn')  # an append cut short by a crash
        again = export_expert(env, tasks, max_steps=20, progress_file=progress)
    finally:
        env.close()
    lines = progress.read_text().splitlines()
    assert len(lines) == 3  # the two finished tasks were reused, not redone; the torn line was cut
    assert [t.id for t in again.trajectories] == [t.id for t in tasks]
    assert again.trajectories[:2] == first.trajectories


class Interrupted(Corridor):
    """Corridor that counts its resets per task, and is interrupted (Ctrl-C) at ``corridor/3`` while ``stop``."""

    resets: list[str] = []
    stop = True

    def reset(self, task):
        Interrupted.resets.append(task.id)
        if Interrupted.stop and task.id == "corridor/3":
            raise KeyboardInterrupt
        return super().reset(task)


def test_the_pipelines_expert_export_resumes(tiny_model_dir: Path, tmp_path: Path) -> None:
    """``qlass run`` exported the expert data without a progress file: a run stopped part-way replayed every task
    (``qlass data expert`` kept its replays)."""
    import yaml

    from qlass.pipeline import run_pipeline

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "model": str(tiny_model_dir),
                                    "env": "test_expert:Interrupted", "sft": {"max_steps": 1, "threads": 1}}))
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(path, stop_after="sft")
    assert Interrupted.resets[-1] == "corridor/3"
    before, Interrupted.stop = len(Interrupted.resets), False
    run_pipeline(path, stop_after="sft")
    assert Interrupted.resets[before:] == ["corridor/3", "corridor/4", "corridor/5"]
    assert len(load_trajectories(tmp_path / "run" / "expert.json")) == 6
    assert not (tmp_path / "run" / ".expert.json.progress.jsonl").exists()
