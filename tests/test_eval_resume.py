"""Killing ``qlass eval`` mid-run (lockstep engine on: several live episodes) and rerunning it resumes
without duplicate or lost records."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from qlass.jsonl import read_jsonl

TESTS = Path(__file__).parent


def eval_cmd(model: Path, out: Path, concurrency: int = 3) -> list[str]:
    return [sys.executable, "-m", "qlass", "eval", "--model", str(model), "--env", "toy_envs:Corridor",
            "--split", "seen", "--method", "greedy:max_new_tokens=6", "--method", "sample:max_new_tokens=6",
            "--env-arg", "step_limit=6", "--out", str(out), "--concurrency", str(concurrency)]


@pytest.mark.slow
def test_kill_and_rerun_resumes_without_duplicates(tiny_model_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = tmp_path / "run"
    proc = subprocess.Popen(eval_cmd(tiny_model_dir, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    records = out / "records.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if records.exists() and len(records.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = len(read_jsonl(records, repair_tail=True))
    assert 3 <= before < 12, "the run should have been killed part-way"
    done = subprocess.run(eval_cmd(tiny_model_dir, out), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stderr
    assert f"{12 - before}/{12 - before} episodes done" in done.stderr  # progress lines reach a non-terminal
    recs = read_jsonl(records)
    keys = [(r["method"], r["task"]) for r in recs]
    assert len(keys) == len(set(keys)) == 12  # 2 methods x 6 tasks, each exactly once
    summary = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in summary["rows"]} == {"greedy", "sample"}
    assert all(r["tasks"] == 6 for r in summary["rows"])
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert [m["label"] for m in saved["methods"]] == ["greedy", "sample"]
    assert saved["methods"][0]["config"]["max_new_tokens"] == 6 and saved["tasks"] == {"seen": 6}
    # the same labels with other settings would mix two experiments into one row: refused
    changed = [a.replace("greedy:max_new_tokens=6", "greedy:max_new_tokens=8") for a in eval_cmd(tiny_model_dir, out)]
    refused = subprocess.run(changed, env=env, capture_output=True, text=True)
    assert refused.returncode != 0
    assert f"{records}: line 1 (method 'greedy'" in refused.stderr and "max_new_tokens: 6 → 8" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert len(read_jsonl(records)) == 12
    assert yaml.safe_load((out / "config.yaml").read_text()) == saved


@pytest.mark.slow
def test_process_workers_give_the_same_records_as_in_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Each (method, task) pair is seeded by the run seed, method and task, so two worker processes
    (each loading its own policy and environment) must write the records one process writes."""
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    results = {}
    for backend in ("local", "process"):
        out = tmp_path / backend
        cmd = eval_cmd(tiny_model_dir, out) + ["--backend", backend, "--workers", "2", "--policy-arg", "threads=1"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        results[backend] = {(r["method"], r["task"]): (r["reward"], r["trajectory"]["conversations"],
                                                       r["completion_tokens"])
                            for r in read_jsonl(out / "records.jsonl")}
    assert len(results["local"]) == 12
    assert results["process"] == results["local"]


def test_qlass_select_controls_run_from_the_cli_without_a_qnet(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The no-QNet controls of qlass (select=likelihood / random) run with a real HF policy and no --qnet,
    spending no QNet tokens (their choices are checked with a scripted policy in test_search.py: the
    tiny random model's outputs are all cut off, so it never offers two distinct actions)."""
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = tmp_path / "controls"
    cmd = [sys.executable, "-m", "qlass", "eval", "--model", str(tiny_model_dir), "--env", "toy_envs:Corridor",
           "--split", "seen", "--limit", "3", "--env-arg", "step_limit=4", "--out", str(out),
           "--method", "qlass:m=3,anchor=greedy,select=likelihood,max_new_tokens=6",
           "--method", "qlass:m=3,anchor=greedy,select=random,max_new_tokens=6"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    recs = read_jsonl(out / "records.jsonl")
    assert {r["method"] for r in recs} == {"qlass(m=3,anchor=greedy,select=likelihood)",
                                           "qlass(m=3,anchor=greedy,select=random)"}
    assert len(recs) == 6 and all(r["qnet_tokens"] == 0 for r in recs)


@pytest.mark.slow
def test_ctrl_c_stops_with_one_line_and_whole_records(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Ctrl-C (SIGINT with Python's handler, as in a terminal) mid-run: exit 130 and one line saying how to
    resume, not a traceback; the records written are whole, and the rerun resumes from them."""
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = tmp_path / "run"
    proc = subprocess.Popen(eval_cmd(tiny_model_dir, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    records = out / "records.jsonl"
    deadline = time.time() + 120
    while not (records.exists() and len(records.read_text().splitlines()) >= 3) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    assert stderr.rstrip().splitlines()[-1] == ("interrupted: rerun the same command to resume (finished records and "
                                                "the last checkpoint are kept)")
    before = len(read_jsonl(records))  # no torn last record
    assert 3 <= before < 12, "the run should have been stopped part-way"
    done = subprocess.run(eval_cmd(tiny_model_dir, out), env=env, capture_output=True, text=True)
    assert done.returncode == 0 and f"{12 - before}/{12 - before} episodes done" in done.stderr, done.stderr


def test_results_add_up_over_runs_into_one_folder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A second run into the folder with fewer methods wrote results for its own methods alone: the first run's
    greedy row and every paired difference to it left results.md while its records stayed. Results now cover
    the folder's records, and a warning says when its methods played different tasks."""
    from qlass.evaluate import run_evaluation

    out = tmp_path / "run"
    common = {"model": "test_cli_errors:EastWalker", "env_spec": "toy_envs:Corridor", "splits": ["seen"],
              "out_dir": out, "env_kwargs": {"step_limit": 4}}
    run_evaluation(methods=[("greedy", {}), ("sample", {})], limit=2, **common)
    rows = run_evaluation(methods=[("sample", {})], limit=3, **common)
    assert {(r["method"], r["tasks"]) for r in rows} == {("greedy", 2), ("sample", 3)}
    results = json.loads((out / "results.json").read_text())
    assert [(p["method"], p["baseline"], p["tasks"]) for p in results["paired"]] == [("sample", "greedy", 2)]
    assert "its methods played different tasks (greedy 2, sample 3)" in caplog.text


def test_an_evaluation_of_a_model_that_is_not_there_makes_no_output_folder(tmp_path: Path) -> None:
    """The folder, its config.yaml (recording the missing model) and a lock file were left behind."""
    from qlass.errors import QlassError
    from qlass.evaluate import run_evaluation

    with pytest.raises(QlassError, match=r"nosuch: not a model folder \(no config.json\)"):
        run_evaluation(model=str(tmp_path / "nosuch"), env_spec="toy_envs:Corridor", splits=["seen"],
                       methods=[("greedy", {})], out_dir=tmp_path / "out", limit=1)
    assert not (tmp_path / "out").exists()
