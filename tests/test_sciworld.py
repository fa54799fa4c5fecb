"""ScienceWorld on the real simulator (Java 17): splits, parsing, rewards, step limit, determinism."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qlass.envs.base import FORMAT_HINT, env_reset, make_env, parse_action
from qlass.envs.sciworld import ScienceWorldEnv
from qlass.errors import QlassError
from qlass.types import Task

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
    assert env.tasks("seen", ["find-plant", "find-plant"]) == tasks  # a type given twice lists its tasks once
    with pytest.raises(QlassError, match="unknown task type"):
        env.tasks("seen", ["find-unicorn"])
    with pytest.raises(QlassError, match="unknown split"):
        env.tasks("dev")


def test_prompt_is_instruction_then_a_complete_one_shot_episode(env: ScienceWorldEnv) -> None:
    msgs = env.prompt()
    assert [m.role for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)
    assert "Thought:" in msgs[0].content and "focus on OBJ" in msgs[0].content and msgs[1].content == "OK"
    assert msgs[2].content.startswith("Your task is to")
    agent_turns = [m.content for m in msgs[3::2]]
    assert agent_turns and all(parse_action(t) for t in agent_turns)
    assert all(m.content.startswith("Observation: ") for m in msgs[4::2])


def test_reset_step_parse_and_format_feedback(env: ScienceWorldEnv) -> None:
    task = env.tasks("train", ["find-plant"])[0]
    first = env.reset(task)
    assert first.startswith("Your task is to find a(n) plant") and "This room is called" in first
    bad = env.step("I think I will go to the kitchen.")
    assert bad.observation == FORMAT_HINT and not bad.done and bad.info["steps"] == 1
    ok = env.step(act("look around"))
    assert "This room is called" in ok.observation and ok.info["steps"] == 2
    assert 0.0 <= ok.reward <= 1.0


def test_only_known_task_ids_and_tasks_are_played(env: ScienceWorldEnv) -> None:
    """A task is named only by the id tasks() gives it (was: 'sciworld/boil/1_0', '/ 1', '/+1' or '/١'
    playing a variation under an id of its own), and reset() plays only a known task (was a KeyError
    for a Task without meta, a Java exception for a negative variation)."""
    assert env.task("sciworld/boil/10").meta["variation"] == 10
    for task_id in ("sciworld/boil/1_0", "sciworld/boil/ 1", "sciworld/boil/+1", "sciworld/boil/\u0661",
                    "sciworld/boil/01", "sciworld/boil/-1", "sciworld/boil/\u00b2", "other/boil/1", "sciworld/boil"):
        with pytest.raises(QlassError, match="malformed task id"):
            env.task(task_id)
    assert env_reset(env, Task("sciworld/boil/0", "sciworld", "train")).startswith("Your task is to boil")
    for task in (Task("sciworld/boil/-1", "sciworld", "train", "boil", {"task_name": "boil", "variation": -1}),
                 Task("sciworld/boil/99999", "sciworld", "train", "boil", {"task_name": "boil", "variation": 99999})):
        with pytest.raises(QlassError, match=r"^sciworld: (no task|malformed task id)"):
            env_reset(env, task)


def test_a_failed_reset_leaves_no_episode_and_close_can_be_reopened() -> None:
    """After a reset that fails, a step is refused (was: it went on with the previous task); after
    close(), reset starts afresh as the other environments do (was: AttributeError on 'NoneType')."""
    sci = ScienceWorldEnv(step_limit=8)
    task = sci.tasks("train", ["boil"])[0]
    first = sci.reset(task)
    opened = sci.step(act("open door to kitchen")).observation
    with pytest.raises(QlassError, match="no task"):
        sci.reset(Task("sciworld/boil/99999", "sciworld", "train"))
    with pytest.raises(QlassError, match=r"step\(\) before reset\(\)"):
        sci.step(act("look around"))
    sci.close()
    sci.close()
    assert sci.reset(task) == first and sci.step(act("open door to kitchen")).observation == opened
    sci.close()


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
    env.reset(task)  # expert() loads its task into the same simulator: the episode under way ends, as documented
    env.step(outputs[0])
    env.expert(task)
    with pytest.raises(QlassError, match=r"step\(\) before reset\(\)"):
        env.step(outputs[1])


def test_valid_actions_list_the_objects_in_view_and_need_a_reset() -> None:
    fresh = ScienceWorldEnv(step_limit=8)
    try:
        with pytest.raises(QlassError, match="before reset"):
            fresh.valid_actions()
        task = fresh.tasks("seen", ["find-animal"])[0]
        fresh.reset(task)
        gold = [parse_action(o) for o in fresh.expert(task)]
        fresh.reset(task)
        first_focus = next(i for i, a in enumerate(gold) if a.startswith("focus on "))
        for action in gold[:first_focus]:
            fresh.step(act(action))
        actions = fresh.valid_actions()
        assert actions == sorted(set(actions)) and "look around" in actions
        assert gold[first_focus] in actions  # the gold focus object is in view
        focus = [a for a in actions if a.startswith("focus on ")]
        assert len(focus) > 3 and "focus on air" in focus
    finally:
        fresh.close()


def test_meta_commands_and_unknown_actions_are_observations(env: ScienceWorldEnv) -> None:
    env.reset(env.tasks("train", ["find-plant"])[0])
    task = env.step(act("task"))
    assert task.observation.startswith("Task description:") and "find a(n) plant" in task.observation
    nonsense = env.step(act("dance wildly"))
    assert nonsense.observation and not nonsense.done and nonsense.info["steps"] == 2
    lone = env.step(act("look \ud800"))  # was a QlassError quoting Py4J ("An error occurred while calling o7.step")
    assert lone.observation == env.step(act("look \ufffd")).observation and lone.info["steps"] == 3


def test_unknown_simplification_and_bad_heap_are_refused(env: ScienceWorldEnv) -> None:
    # before: taken, and every reset's room was "ERROR: Unknown simplification label: bogus", every episode
    # failed at its first step with reward 0, so an evaluation recorded zeros as the model's score
    with pytest.raises(QlassError, match=r"sciworld: unknown simplification 'easy,bogus'; known: easy, .*openDoors"):
        make_env("sciworld", simplification="easy,bogus")
    # before: "building it raised ValueError: invalid literal for int() with base 10: b''" (py4j, Java gone)
    with pytest.raises(QlassError, match="sciworld: heap must be a Java heap size such as 512m or 2g, got 'lots'"):
        make_env("sciworld", heap="lots")
    plain = ScienceWorldEnv(simplification="openDoors,openContainers")
    plain.reset(plain.tasks("train", ["find-plant"])[0])
    assert "ERROR" not in plain.step(act("look around")).observation
    plain.close()


def test_instances_share_one_jvm_and_close_independently(env: ScienceWorldEnv) -> None:
    other = ScienceWorldEnv(step_limit=5)
    assert other._jvm is env._jvm
    other.close()
    env.reset(env.tasks("train", ["find-plant"])[0])
    assert "This room is called" in env.step(act("look around")).observation


def test_replay_is_deterministic_across_instances_and_interleaving() -> None:
    """Same task + same outputs give the same episode, whatever ran in the JVM before or in between.

    grow-fruit has bees moving with the simulator's shared random generator, a disambiguation menu
    built from hash sets, and objects created mid-episode (numbered from a JVM-wide counter that
    another instance's load resets): the three things that made the stock simulator diverge.
    """
    a, b = make_env("sciworld", step_limit=200), make_env("sciworld", step_limit=200)
    try:
        task = a.tasks("train", ["grow-fruit"])[0]
        small = a.tasks("train", ["find-non-living-thing"])[0]
        outputs = a.expert(task)
        assert any(o.endswith("Action: 0") for o in outputs)  # a menu answer is replayed
        solo = [a.reset(task)] + [(r.observation, r.reward, r.done) for r in map(a.step, outputs)]
        assert solo[-1][1:] == (1.0, True)
        plant = a.tasks("train", ["find-plant"])[0]
        gold = a.expert(plant)
        b.expert(a.tasks("train", ["find-animal"])[1])  # other work in the JVM in between
        assert b.expert(plant) == gold  # gold paths too (they came from hash-set order)
        mixed = [b.reset(task)]
        for out in outputs:  # another instance loads and steps between every step of this one
            a.reset(small)
            a.step(act("look around"))
            r = b.step(out)
            mixed.append((r.observation, r.reward, r.done))
        assert mixed == solo
    finally:
        a.close()
        b.close()


def test_envs_command_lists_sizes_or_the_missing_extra() -> None:
    listed = subprocess.run([sys.executable, "-m", "qlass", "envs"], capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    assert "sciworld: train 3592, seen 1796, unseen 1819" in listed.stdout
    # The extra is installed here, so hide the package to get the real missing-extra path.
    hidden = ("import sys; sys.modules['scienceworld'] = None; sys.argv = ['qlass', 'envs']; "
              "from qlass.cli import main; main()")
    missing = subprocess.run([sys.executable, "-c", hidden], capture_output=True, text=True)
    assert missing.returncode == 0, missing.stderr
    assert "sciworld: unavailable" in missing.stdout and "pip install 'qlass[sciworld]'" in missing.stdout


@pytest.mark.parametrize("javac", [True, False], ids=["patched-class", "jre-only-fallback"])
def test_fresh_cache_builds_the_hash_patch_or_falls_back_and_replays_deterministically(tmp_path, javac: bool) -> None:
    """On a machine that never ran qlass: with a JDK the EnvObject hash patch is built into the
    cache and used; with only ``java`` on the PATH, the JVM runs with constant identity hashes
    (and says so). Either way the determinism test above passes in that process."""
    import os
    import shutil

    env = {**os.environ, "QLASS_CACHE": str(tmp_path / "cache")}
    if not javac:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "java").symlink_to(os.path.realpath(shutil.which("java")))
        env["PATH"] = str(bin_dir)
    test = f"{__file__}::test_replay_is_deterministic_across_instances_and_interleaving"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "log_level=INFO",
                           "-rP", test], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    built = list((tmp_path / "cache" / "sciworld").glob("classes-*/scienceworld/struct/EnvObject.class"))
    if javac:
        assert len(built) == 1 and "building the ScienceWorld EnvObject hash patch" in done.stdout
    else:
        assert built == [] and "constant identity hash codes" in done.stdout


def test_ctrl_c_in_a_terminal_stops_an_evaluation_in_one_line(tmp_path) -> None:
    """Ctrl-C in a terminal signals the whole foreground process group. The JVM was in it, so it died under
    the run and every later simulator call logged py4j tracebacks (69 lines of 'Traceback' measured), and a
    Ctrl-C that reached a step came back from py4j as AttributeError: 'error: environment ... step() raised
    AttributeError', exit 2. Now: exit 130 and the one line saying how to resume, after one Ctrl-C: one
    that lands in py4j's garbage collection of a Java object is lost there, and stops the run at the next
    simulator call (test_interrupt.py)."""
    import os
    import signal
    import time
    from pathlib import Path

    tests = Path(__file__).parent
    out = tmp_path / "eval"
    env = {**os.environ, "PYTHONPATH": f"{tests}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "qlass", "eval", "--model", "test_cli_errors:EastWalker", "--env", "sciworld",
           "--task-types", "find-plant", "--limit", "60", "--max-steps", "30", "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    records = out / "records.jsonl"
    deadline = time.time() + 120
    while not (records.exists() and records.read_text().count("\n") >= 1) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C: to the process group
    try:
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert stderr.rstrip().splitlines()[-1].startswith("interrupted: rerun the same command to resume")
