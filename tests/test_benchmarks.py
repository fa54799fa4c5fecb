"""The benchmark scripts (benchmarks/*.py) on bad arguments and input files: one line naming the option or
the file, exit status 2, no traceback, and no measurement of nothing (a median of no timings, a ratio of
zero edges). Each script runs as a user runs it (``python benchmarks/NAME.py ...``), in a temporary
folder so that its default report path is not the repository's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from setup_parts import installed, java

TESTS = Path(__file__).resolve().parent
BENCHMARKS = TESTS.parent / "benchmarks"


# Runs a script as ``python SCRIPT`` does (its folder first on the path), then says on stderr whether torch was loaded.
TORCH_PROBE = ("import runpy, sys\nsys.argv = sys.argv[1:]\nsys.path.insert(0, sys.argv[0].rsplit('/', 1)[0])\n"
               "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\nfinally:\n"
               "    print('torch loaded:', 'torch' in sys.modules, file=sys.stderr)")


def run_benchmark(script: str, args: list[str], cwd: Path, timeout: float = 120,
                  probe_torch: bool = False) -> subprocess.CompletedProcess:
    # toy envs live in tests/; a test's own env module in its folder
    path = os.pathsep.join(filter(None, [str(TESTS), str(cwd), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, *(["-c", TORCH_PROBE] if probe_torch else []), str(BENCHMARKS / script)]
    return subprocess.run([*run, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


def assert_usage_error(done: subprocess.CompletedProcess, message: str) -> None:
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == 2, done.stderr[-3000:]
    assert message in done.stderr, done.stderr[-3000:]


TOY_EXPLORE = ["--env", "test_explore:Rooms", "--model", "test_explore:ScriptedPolicy", "--task-types", ""]

# Counts of zero or below: before, a traceback after the model was loaded (no median for empty data, a
# division by zero, an unbound variable, zip of None) or a run that measured nothing.
COUNT_CASES = [
    ("bench_autocast.py", ["--repeats", "0"], "argument --repeats: 0 is not a positive integer"),
    ("bench_http_env.py", ["--episodes", "0"], "argument --episodes: 0 is not a positive integer"),
    ("bench_explore.py", [*TOY_EXPLORE, "--limit", "0"], "argument --limit: 0 is not a positive integer"),
    ("bench_policy.py", ["--repeats", "0"], "argument --repeats: 0 is not a positive integer"),
    ("bench_policy.py", ["--ms", "2,,8"], "argument --ms: '' is not an integer"),
    ("bench_qnet.py", ["--repeats", "0"], "argument --repeats: 0 is not a positive integer"),
    ("bench_qnet.py", ["--m", "0"], "argument --m: 0 is not a positive integer"),
    ("bench_qnet_train.py", ["--trees", "0"], "argument --trees: 0 is not a positive integer"),
    ("bench_qnet_train.py", ["--depth", "2"], "--depth 2: at least 3"),
    ("bench_qnet_train.py", ["--repeats", "0"], "argument --repeats: 0 is not a positive integer"),
    ("bench_search.py", ["--tasks", "-1"], "argument --tasks: -1 is not a positive integer"),
    ("bench_eval.py", ["--concurrency", "0"], "argument --concurrency: 0 is not a positive integer"),
    ("bench_env.py", ["--repeats", "0"], "argument --repeats: 0 is not a positive integer"),
    ("bench_env.py", ["--other-envs", "alfworld,nosuch"], "--other-envs: unknown environment 'nosuch'"),
    ("bench_llamacpp.py", ["--ns", "1,0"], "argument --ns: 0 is not a positive integer"),
    ("probe_focus.py", ["--model", "m", "--out", "o", "--offset", "-1"], "argument --offset: -1 is negative"),
    ("rank_pmi.py", ["d.jsonl", "--model", "m", "--out", "o", "--resamples", "50"],
     "--resamples: resamples must be in 100..1000000, got 50"),
    ("rank_pmi.py", ["d.jsonl", "--model", "m", "--out", "o", "--threads", "0"],
     "argument --threads: 0 is not a positive integer"),
]


@pytest.mark.parametrize(("script", "args", "message"), COUNT_CASES, ids=[f"{c[0]}{c[1]}" for c in COUNT_CASES])
def test_counts_below_one_are_usage_errors(tmp_path: Path, script: str, args: list[str], message: str) -> None:
    """Also answered before torch is imported: the scripts that measure a model took 2.5-9 s before their one-line
    usage error (or --help)."""
    done = run_benchmark(script, args, tmp_path, probe_torch=True)
    assert_usage_error(done, message)
    assert "torch loaded: False" in done.stderr, done.stderr[-3000:]
    assert not list(tmp_path.rglob("*.json"))  # no report of nothing


# Input files and folders that are not there or not what the script reads: before, the QlassError (or
# FileNotFoundError) that names the file came as the last line of a traceback; rank_pmi exited 1.
INPUT_CASES = [
    ("bench_explore.py", ["--env", "test_explore:Rooms", "--trees", "{tmp}/none.jsonl"], "none.jsonl: file not found"),
    ("bench_qnet_train.py", ["--qdata", "{tmp}/none.jsonl", "--model", "{tiny}"], "none.jsonl: file not found"),
    ("bench_http_env.py", ["--env", "toy_envs:NoSuchEnv", "--episodes", "1"], "NoSuchEnv"),
    ("bench_policy.py", ["--model", "{tmp}/nomodel"], "nomodel: not a model folder"),
    ("bench_llamacpp.py", ["--model", "{tiny}", "--dtype", "q4"], "--dtype 'q4': expected one of f16, f32, bf16"),
    ("bench_llamacpp.py", ["--model", "{tiny}", "--gguf", "{tmp}/none.gguf"], "none.gguf: file not found"),
    ("bench_qnet.py", ["--model", "{tiny}", "--out", "{tmp}/report.md"], "report.md: the JSON report's name"),
    ("rank_pmi.py", ["{tmp}/none.jsonl", "--model", "{tiny}", "--out", "{tmp}/o"], "none.jsonl: file not found"),
    ("probe_focus.py", ["--model", "{tiny}", "--exclude", "{tmp}/none.jsonl", "--out", "{tmp}/o"],
     "none.jsonl: file not found"),
]


@pytest.mark.parametrize(("script", "args", "message"), INPUT_CASES, ids=[c[0] for c in INPUT_CASES])
def test_bad_input_files_are_one_line_errors(tmp_path: Path, tiny_model_dir: Path, script: str, args: list[str],
                                             message: str) -> None:
    args = [a.format(tmp=tmp_path, tiny=tiny_model_dir) for a in args]
    done = run_benchmark(script, args, tmp_path)
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == 2, done.stderr[-3000:]
    assert "error: " in done.stderr and message in done.stderr.splitlines()[-1], done.stderr[-3000:]


def _explore_trees(path: Path, env: str = "test_explore:Rooms") -> Path:
    """Two small trees of the toy game, explored by the scripted policy."""
    import functools

    from qlass.envs.base import make_env
    from qlass.explore import ExploreConfig, explore_tasks
    from qlass.policy import load_policy

    make = functools.partial(make_env, env)
    probe = make()
    tasks = probe.tasks("train")[:2]
    probe.close()
    explore_tasks(make, tasks, load_policy("test_explore:ScriptedPolicy"), ExploreConfig(max_nodes=10), path,
                  progress=False)
    return path


def test_bench_explore_trees_that_give_nothing_to_measure(tmp_path: Path) -> None:
    """``bench_explore.py --trees``: an empty file was an IndexError, trees of another env (or --env forgotten) a
    KeyError of a tree id."""
    import json

    trees = _explore_trees(tmp_path / "trees.jsonl")
    rooms = ["--env", "test_explore:Rooms", "--out", str(tmp_path / "r.json")]
    done = run_benchmark("bench_explore.py", [*rooms, "--trees", str(trees)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "r.json").read_text())["trees"] == 2

    (tmp_path / "empty.jsonl").write_text("")
    assert_usage_error(run_benchmark("bench_explore.py", [*rooms, "--trees", str(tmp_path / "empty.jsonl")], tmp_path),
                       "empty.jsonl: holds no trees")
    other = ["--env", "toy_envs:Corridor", "--trees", str(trees), "--out", str(tmp_path / "c.json")]
    assert_usage_error(run_benchmark("bench_explore.py", other, tmp_path),
                       "trees.jsonl: tree 'rooms/0' (env 'rooms', split 'train') is no task of the env's train split")
    assert not (tmp_path / "c.json").exists()


@pytest.mark.parametrize("turn", ["0", "16"])
def test_bench_policy_candidates_turn_outside_the_episode(tmp_path: Path, turn: str) -> None:
    """The episode has turns 1 to 15: ``--candidates-turn 0`` silently timed the candidates at turn 15 (index -1),
    16 was an IndexError after the model was loaded."""
    done = run_benchmark("bench_policy.py", ["--candidates-turn", turn], tmp_path, timeout=60)
    assert_usage_error(done, f"--candidates-turn {turn}: the episode has turns 1 to 15")


def test_probe_focus_options_and_exclude_files(tmp_path: Path, tiny_model_dir: Path) -> None:
    """probe_focus: a --qnet without NAME= was a ValueError (dictionary update sequence), an --exclude line that is
    not JSON or has no task a JSONDecodeError or KeyError, and a probe with no focus state (every task excluded, or
    an --offset past the tasks) an IndexError after the policy was loaded."""
    base = ["--model", str(tiny_model_dir), "--out", str(tmp_path / "o")]
    assert_usage_error(run_benchmark("probe_focus.py", [*base, "--qnet", str(tmp_path)], tmp_path),
                       f"argument --qnet: {str(tmp_path)!r} is not NAME=DIR")
    done = run_benchmark("probe_focus.py", [*base, "--qnet", f"likelihood={tmp_path}"], tmp_path)
    assert_usage_error(done, "--qnet: give each NAME once, and neither 'likelihood' nor")  # replaced the baseline's
    done = run_benchmark("probe_focus.py", [*base, "--qnet", f"a={tmp_path}", "--qnet", f"a={tmp_path}/2"], tmp_path)
    assert_usage_error(done, "--qnet: give each NAME once")  # the first was left out, silently
    (tmp_path / "x.jsonl").write_text('{"task": "a"}\n{"step": 1}\n')
    done = run_benchmark("probe_focus.py", [*base, "--exclude", str(tmp_path / "x.jsonl")], tmp_path)
    assert_usage_error(done, "x.jsonl, line 2: task is None, expected a task id")
    (tmp_path / "x.jsonl").write_text('{"task": "a"}\nnot json\n')
    done = run_benchmark("probe_focus.py", [*base, "--exclude", str(tmp_path / "x.jsonl")], tmp_path)
    assert_usage_error(done, "x.jsonl: line 2: invalid JSON")


def test_probe_focus_with_no_state_to_probe(tmp_path: Path, tiny_model_dir: Path) -> None:
    java()
    installed("scienceworld")
    args = ["--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--splits", "seen", "--per-type", "1",
            "--offset", "100000"]
    assert_usage_error(run_benchmark("probe_focus.py", args, tmp_path, timeout=300),
                       "no focus state to probe (seen split, --offset 100000, --per-type 1")
    assert not (tmp_path / "o").exists()


def test_bench_trainers_checks_its_inputs_before_training(tmp_path: Path, tiny_model_dir: Path) -> None:
    """bench_trainers runs each trainer in a child process: a missing --data, an --old-src without qlass or an
    unknown --set key was a child's traceback and then the parent's CalledProcessError traceback (the --set key
    only after both trainers had run); each is now one line before any training."""
    base = ["--model", str(tiny_model_dir), "--out", str(tmp_path / "o")]
    args = [*base, "--data", str(tmp_path / "none.json"), "--old-src", str(tmp_path)]
    assert_usage_error(run_benchmark("bench_trainers.py", args, tmp_path), f"--old-src {tmp_path}: holds no qlass")
    args = [*base, "--data", str(tmp_path / "none.json"), "--old-src", str(tmp_path), "--only", "new"]
    assert_usage_error(run_benchmark("bench_trainers.py", args, tmp_path), "none.json: file not found")
    args += ["--set", "nosuch=1"]
    assert_usage_error(run_benchmark("bench_trainers.py", args, tmp_path), "with --set: unknown option(s) 'nosuch'")
    assert not (tmp_path / "o").exists()
    (tmp_path / "o" / "new").mkdir(parents=True)  # a finished run: the trainer would hand it back, timed as training
    assert_usage_error(run_benchmark("bench_trainers.py", [*base, "--data", "d.json", "--old-src", str(tmp_path),
                                                           "--only", "new"], tmp_path),
                       "new exists, and a trainer would resume it rather than train")


def test_bench_trainers_held_out_loss_reads_the_windows(tiny_model_dir: Path, tmp_path: Path) -> None:
    """encode_windows returns (windows, cut) since c1c2ba7; the SFT comparison unpacked it as the windows, so
    ``--kind sft`` (the README's command) failed after the old trainer's whole run."""
    import importlib
    import json
    import math

    sys.path.insert(0, str(BENCHMARKS))
    try:
        bench = importlib.import_module("bench_trainers")
    finally:
        sys.path.remove(str(BENCHMARKS))
    turns = [{"from": "human", "value": "Task: go east."}, {"from": "gpt", "value": "Thought: east.\nAction: go east"}]
    (tmp_path / "d.json").write_text(json.dumps([{"id": f"t{i}", "conversations": turns} for i in range(4)]))
    loss = bench.held_out_loss(tiny_model_dir, tmp_path / "d.json", bench.SFTConfig(val_fraction=0.5, max_length=64))
    assert math.isfinite(loss) and loss > 0


@pytest.mark.slow
def test_rank_pmi_probe_focus_and_bench_policy_run_to_their_reports(tmp_path: Path, tiny_model_dir: Path) -> None:
    """rank_pmi and probe_focus scored every state, then failed writing their JSON (--out became a Path); bench_policy
    said its shared and separate sampling give the same tokens, but seeded the separate calls otherwise."""
    import json

    java()
    installed("scienceworld")
    reference = Path(__file__).resolve().parents[1] / "docs" / "reference" / "guidance" / "decisions218.jsonl"
    lines = reference.read_text().splitlines()
    (tmp_path / "d.jsonl").write_text("\n".join(lines[:2] + lines[-2:]) + "\n")
    tiny = str(tiny_model_dir)
    done = run_benchmark("rank_pmi.py", ["d.jsonl", "--model", tiny, "--out", "pmi", "--threads", "1",
                                         "--resamples", "100"], tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "pmi" / "rank_pmi.json").read_text())["args"]["out"] == "pmi"
    done = run_benchmark("probe_focus.py", ["--model", tiny, "--splits", "seen", "--per-type", "1", "--resamples", "50",
                                            "--out", "probe"], tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "probe" / "probe.json").read_text())["states"]
    done = run_benchmark("bench_policy.py", ["--model", tiny, "--ms", "2,4", "--repeats", "1", "--max-new-tokens", "8",
                                             "--out", "policy.json"], tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [(r["M"], r["same_outputs"]) for r in json.loads((tmp_path / "policy.json").read_text())["candidates"]] \
        == [(2, True), (4, True)]


@pytest.mark.parametrize("script", ["bench_qnet.py", "bench_qnet_train.py"])
def test_bench_qnet_device_is_checked(tmp_path: Path, tiny_model_dir: Path, script: str) -> None:
    """--device was given to torch as it came: a RuntimeError (or, for cuda without a GPU, an AssertionError)
    traceback after the model was loaded; it is checked as qlass checks --device (``resolve_device``)."""
    done = run_benchmark(script, ["--model", str(tiny_model_dir), "--device", "nosuch"], tmp_path)
    assert_usage_error(done, "unknown torch device 'nosuch'")


def test_values_found_only_after_the_measurement_are_checked_first(tmp_path: Path) -> None:
    """Before: --temperature -1 failed (ValueError traceback) only after the GGUF export and the server start; an
    --out that is a folder was refused after the whole measurement; an env with no train task divided by zero."""
    done = run_benchmark("bench_llamacpp.py", ["--temperature", "-1"], tmp_path)
    assert_usage_error(done, "argument --temperature: -1.0 is not a finite number of at least 0")
    (tmp_path / "report").mkdir()
    done = run_benchmark("bench_search.py", ["--out", "report"], tmp_path)
    assert_usage_error(done, "argument --out: report: is a folder; this output is a file")
    (tmp_path / "empty_env.py").write_text("from toy_envs import Corridor\n\n\nclass Empty(Corridor):\n"
                                          "    def __init__(self) -> None:\n"
                                          "        super().__init__(tasks_per_split=0)\n")
    done = run_benchmark("bench_http_env.py", ["--env", "empty_env:Empty", "--episodes", "1"], tmp_path)
    assert_usage_error(done, "env empty_env:Empty: its train split has no task to play")


@pytest.mark.parametrize("script", ["rank_pmi.py", "probe_focus.py"])
def test_an_out_folder_that_is_a_file_is_refused_before_measuring(tmp_path: Path, script: str) -> None:
    """rank_pmi and probe_focus write their reports into the --out folder: an existing file there was refused
    (FileExistsError from mkdir) only after every decision or focus state had been scored."""
    (tmp_path / "report").write_text("")
    inputs = [str(tmp_path / "d.jsonl")] if script == "rank_pmi.py" else []
    done = run_benchmark(script, [*inputs, "--model", "m", "--out", str(tmp_path / "report")], tmp_path, timeout=60)
    assert_usage_error(done, f"argument --out: {tmp_path / 'report'}: is a file; this output is a folder")
