"""ScienceWorld on the real simulator (Java 17): splits, parsing, rewards, step limit, determinism."""

from __future__ import annotations

import pytest

from qlass.envs.base import FORMAT_HINT, make_env
from qlass.envs.sciworld import ScienceWorldEnv
from qlass.errors import QlassError

pytestmark = [pytest.mark.slow, pytest.mark.sciworld]


@pytest.fixture(scope="module")
def env():
    e = ScienceWorldEnv(step_limit=8)
    yield e
    e.close()


def act(text: str) -> str:
    return f"Thought: ok.\nAction: {text}"


def test_splits_and_task_ids(env: ScienceWorldEnv) -> None:
    sizes = env.splits()
    assert sizes == {"train": 3592, "seen": 1796, "unseen": 1819}
    assert len(env.task_types()) == 30
    tasks = env.tasks("seen", ["find-plant"])
    assert tasks and all(t.id.startswith("sciworld/find-plant/") for t in tasks)
    assert env.task(tasks[0].id) == tasks[0]
    assert not {t.id for t in env.tasks("train", ["find-plant"])} & {t.id for t in tasks}
    with pytest.raises(QlassError, match="unknown task type"):
        env.tasks("seen", ["find-unicorn"])
    with pytest.raises(QlassError, match="unknown split"):
        env.tasks("dev")


def test_reset_step_parse_and_format_feedback(env: ScienceWorldEnv) -> None:
    task = env.tasks("train", ["find-plant"])[0]
    first = env.reset(task)
    assert first.startswith("Your task is to find a(n) plant") and "This room is called" in first
    bad = env.step("I think I will go to the kitchen.")
    assert bad.observation == FORMAT_HINT and not bad.done and bad.info["steps"] == 1
    ok = env.step(act("look around"))
    assert "This room is called" in ok.observation and ok.info["steps"] == 2
    assert 0.0 <= ok.reward <= 1.0


def test_failure_scores_zero_and_ends(env: ScienceWorldEnv) -> None:
    task = env.tasks("train", ["find-plant"])[0]
    env.reset(task)
    result = env.step(act("focus on agent"))
    assert result.done and result.reward == 0.0 and result.info["failed"]
    after = env.step(act("look around"))
    assert after.done and after.reward == 0.0


def test_step_limit(env: ScienceWorldEnv) -> None:
    env.reset(env.tasks("train", ["find-animal"])[0])
    results = [env.step(act("look around")) for _ in range(8)]
    assert [r.done for r in results] == [False] * 7 + [True]


def test_expert_reaches_full_reward(env: ScienceWorldEnv) -> None:
    task = env.tasks("seen", ["lifespan-longest-lived"])[0]
    outputs = env.expert(task)
    assert outputs and all(o.startswith("Thought: ") and "\nAction: " in o for o in outputs)
    env.reset(task)
    results = [env.step(o) for o in outputs]
    assert results[-1].done and results[-1].reward == 1.0
    assert all(0.0 <= r.reward <= 1.0 for r in results)


def test_replay_is_deterministic_across_instances() -> None:
    a, b = make_env("sciworld", step_limit=20), make_env("sciworld", step_limit=20)
    try:
        task = a.tasks("train", ["find-animal"])[3]
        outputs = a.expert(task)[:6] + [act("look around"), act("open door to kitchen")]
        runs = []
        for env in (a, b, a):
            first = env.reset(task)
            runs.append([first] + [(r.observation, r.reward, r.done) for r in map(env.step, outputs)])
        assert runs[0] == runs[1] == runs[2]
    finally:
        a.close()
        b.close()
