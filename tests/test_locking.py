"""One writer per output: a second process is refused while the first writes; a killed holder
never blocks a rerun."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from qlass.decisions import DecisionConfig, collect_decisions
from qlass.errors import QlassError
from qlass.eto import ETOConfig, run_eto
from qlass.evaluate import evaluate
from qlass.explore import ExploreConfig, explore_tasks
from qlass.locking import lock_path, writer_lock
from qlass.pipeline import run_pipeline
from qlass.qdata import export_qdata
from qlass.rft import RFTConfig, run_rft
from qlass.self_train import self_train
from qlass.training.dpo import DPOConfig
from qlass.training.qnet import QNetTrainConfig, train_qnet
from qlass.training.sft import SFTConfig, train_sft
from qlass.tree import read_trees

TESTS = Path(__file__).parent
HOLD = ("import sys, time; from qlass.locking import writer_lock\n"
        "with writer_lock(sys.argv[1], sys.argv[2] != 'file', beside=sys.argv[2] == 'beside'):\n"
        "    print('held', flush=True); time.sleep(600)\n")


def hold(target: Path, folder: bool, beside: bool = False) -> subprocess.Popen:
    """Another process holding the writer lock of ``target`` (``beside``: of a folder replaced whole)."""
    kind = "beside" if beside else "folder" if folder else "file"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(target), kind], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_every_writer_refuses_an_output_another_process_writes(tmp_path: Path) -> None:
    folder, file = tmp_path / "out", tmp_path / "trees.jsonl"
    config = tmp_path / "run.yaml"  # `qlass run`: its run folder
    config.write_text(f"run_dir: {folder}\nmodel: model\nenv: toy_envs:Corridor\n")
    holders = [hold(folder, True), hold(file, False)]
    try:
        calls = [lambda: explore_tasks(list, [], None, ExploreConfig(), file),
                 lambda: collect_decisions(list, [], None, DecisionConfig(), file),
                 lambda: evaluate("toy", [], [], None, folder),
                 lambda: train_sft("data.json", "model", folder, SFTConfig()),
                 lambda: train_qnet("qdata.jsonl", "model", folder, QNetTrainConfig()),
                 lambda: run_rft("model", "e.json", "model", "toy", folder, RFTConfig(), SFTConfig()),
                 lambda: run_eto("model", "e.json", "toy", folder, ETOConfig(), DPOConfig()),
                 lambda: self_train("trees.jsonl", "e.json", "model", folder, "q", SFTConfig()),
                 lambda: export_qdata("other-trees.jsonl", file),  # it held no lock
                 lambda: run_pipeline(config)]
        for call in calls:
            with pytest.raises(QlassError, match=r"is being written by another qlass process \(pid \d+ on "):
                call()
        assert not file.exists() and list(folder.iterdir()) == [lock_path(folder, True)]
    finally:
        for proc in holders:
            proc.kill()
            proc.wait()


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path: Path) -> None:
    proc = hold(tmp_path / "run", True)
    with pytest.raises(QlassError, match="another qlass process"):
        with writer_lock(tmp_path / "run", True):
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with writer_lock(tmp_path / "run", True):
        assert f"pid {os.getpid()}" in lock_path(tmp_path / "run", True).read_text()


def test_an_output_named_through_a_symbolic_link_is_the_file_it_names(tmp_path: Path) -> None:
    """The lock (and NAME.config.yaml) were named from the path as typed: explore into link.jsonl and into the
    real.jsonl it names ran at once, and every tree was written twice. A whole-file write replaced the link with
    a file, and the file the link named stayed empty."""
    from qlass.jsonl import write_text_atomic

    real, link = tmp_path / "real.jsonl", tmp_path / "link.jsonl"
    real.touch()
    link.symlink_to(real.name)
    holder = hold(real, False)
    try:
        with pytest.raises(QlassError, match=r"real\.jsonl is being written by another qlass process"):
            explore_tasks(list, [], None, ExploreConfig(), link)
    finally:
        holder.kill()
        holder.wait()
    write_text_atomic(link, "{}\n")
    assert link.is_symlink() and real.read_text() == "{}\n"


@pytest.mark.slow
def test_two_explore_commands_on_one_file_do_not_double_the_trees(tmp_path: Path) -> None:
    """The review's reproduction: two `qlass explore` on one file at once. The second is refused
    with a clear message; the first writes each tree once."""
    out = tmp_path / "trees.jsonl"
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "qlass", "explore", "--model", "test_explore:ScriptedPolicy", "--env",
           "test_explore:Rooms", "--set", "max_depth=2", "--set", "max_steps=6", "--out", str(out), "--no-progress"]
    first = subprocess.Popen(cmd + ["--policy-arg", "delay=0.2"], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not lock_path(out, False).exists():
        time.sleep(0.02)
    time.sleep(0.5)
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    assert first.wait(timeout=300) == 0, first.stderr.read() if first.stderr else ""
    assert second.returncode == 2 and "being written by another qlass process" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr
    trees = read_trees(out)
    assert len(trees) == len({t.tree_id for t in trees}) == 6


def test_qlass_eval_on_a_folder_another_process_writes_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The real `qlass eval` command, while another process holds the folder: a clear refusal, no
    traceback, no records written; once the holder is gone the same command runs."""
    out = tmp_path / "eval"
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "qlass", "eval", "--model", str(tiny_model_dir), "--env", "toy_envs:Corridor",
           "--env-arg", "step_limit=3", "--method", "greedy:max_new_tokens=4", "--limit", "1", "--max-steps", "2",
           "--out", str(out)]
    holder = hold(out, True)
    try:
        refused = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    finally:
        holder.kill()
        holder.wait()
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "being written by another qlass process" in refused.stderr and "Traceback" not in refused.stderr
    assert not (out / "records.jsonl").exists()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "records.jsonl").read_text().count("\n") == 1


def test_an_output_where_nothing_can_be_written_is_named_not_its_lock(tmp_path: Path) -> None:
    """``--out /proc/version`` answered '/proc/.version.lock: No such file or directory': a file the
    user never named. The error names the output (and says which lock failed)."""
    target = Path("/proc/qlass-out.jsonl")
    with pytest.raises(QlassError, match=rf"^{target}: cannot be written there \(.*: its writer lock "
                                         rf"{lock_path(target, False)} could not be created\)"):
        with writer_lock(target, folder=False):
            pass
    with pytest.raises(OSError) as err:  # a run folder that cannot be made names itself
        with writer_lock(Path("/proc/qlass-run"), folder=True):
            pass
    assert err.value.filename == "/proc/qlass-run"


def test_a_lock_that_cannot_be_written_names_the_output_and_leaves_nothing(tmp_path: Path) -> None:
    """On a full disk, ``qlass eval --out NEW`` said only 'error: No space left on device': the holder line of the
    lock file failed to flush, and closing the file failed again, naming no file. Writing is made to fail for real
    with a file size limit of 0 bytes (as a full disk fails it, but with EFBIG), in a process of its own since the
    limit is the whole process's: the error names the output and its lock, and the folder made for it is gone."""
    out = tmp_path / "new" / "eval"
    code = ("import resource, signal, sys\nfrom qlass.errors import QlassError\nfrom qlass.locking import writer_lock\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
            "try:\n    with writer_lock(sys.argv[1], folder=True):\n        print('held')\n"
            "except QlassError as exc:\n    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == (f"{out}: cannot be written there (File too large: its writer lock {out}/.qlass.lock could "
                           "not be written)\n")
    assert list(tmp_path.iterdir()) == []


def test_a_refused_output_keeps_no_lock_file(tmp_path: Path) -> None:
    """A command refusing its output (here: explore on a Q-data file) left ``.NAME.lock`` beside it, and
    ``.qlass.lock`` inside a folder it refused. A lock file the failed call made is removed; one that
    was there before stays, and the next writer locks the path as before."""
    qdata = tmp_path / "qdata.jsonl"
    qdata.write_text('{"tree_id": "t", "node_id": "n", "q": 1.0}\n')
    with pytest.raises(QlassError, match="is not a trees file"):
        explore_tasks(list, [], None, ExploreConfig(), qdata)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qdata.jsonl"]
    folder = tmp_path / "kept"
    folder.mkdir()
    with pytest.raises(RuntimeError):
        with writer_lock(folder, True):
            raise RuntimeError("refused")
    assert list(folder.iterdir()) == []
    with writer_lock(folder, True):
        pass
    with pytest.raises(RuntimeError):  # a lock file from an earlier run stays
        with writer_lock(folder, True):
            raise RuntimeError("refused")
    assert [p.name for p in folder.iterdir()] == [".qlass.lock"]


def test_a_lock_file_removed_while_opened_is_not_held_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed call removes the lock file it made. A process that opened that file just before (and
    locks it just after) must not hold a lock on the removed file while another process locks the new
    one at the path: it opens the path again and is refused. The interleaving is forced by opening
    through a wrapper (a race's timing cannot be produced otherwise); the files and locks are real."""
    target = tmp_path / "out.jsonl"
    path = lock_path(target, False)
    path.write_text("")
    holders: list[subprocess.Popen] = []

    def open_then_lose_the_race(file: Path, *args: Any, **kwargs: Any) -> Any:
        fh = open(file, *args, **kwargs)
        if not holders:  # between this open and the lock: the file is removed and another process locks anew
            path.unlink()
            holders.append(hold(target, False))
        return fh

    monkeypatch.setattr("qlass.locking.open", open_then_lose_the_race, raising=False)
    try:
        with pytest.raises(QlassError, match="being written by another qlass process"):
            with writer_lock(target, False):
                pass
    finally:
        for proc in holders:
            proc.kill()
            proc.wait()


def test_processes_making_the_default_tokenizer_together_take_turns(tmp_path: Path) -> None:
    """Workers starting on a cold cache (pytest -n, two first commands) converted into one temporary
    folder, removing each other's files: tracebacks, and a folder marked complete without tokenizer.json."""
    code = "from qlass.models import default_tokenizer_dir; print(default_tokenizer_dir())"
    for attempt in range(3):  # the race was lost in most attempts of four processes
        cache = tmp_path / f"cache{attempt}"
        env = {**os.environ, "QLASS_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(4)]
        outputs = [proc.communicate(timeout=300) for proc in procs]
        folder = cache / "tokenizers" / "SmolLM2-135M-Instruct"
        assert all(proc.returncode == 0 for proc in procs), [err[-500:] for _, err in outputs]
        assert {out.strip() for out, _ in outputs} == {str(folder)}
        assert {".qlass-complete", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}


def test_a_default_model_made_again_from_the_same_gguf_is_the_same_model(tmp_path: Path) -> None:
    """Runs record the size and time of their model's files (qlass.recorded.model_files). The default model
    converted again (the cache cleared, a run folder resumed on another machine) had new file times, so every
    finished stage that started from it was refused as made from 'another model at the same path'. The
    converted files now carry the GGUF's time. The conversion itself is stood in for by writing two files
    (the real one is the GGUF load, which other tests run); the folder and its files are real."""
    from qlass.models import _once, default_gguf_path
    from qlass.recorded import model_files, setting_changes

    def convert(folder: Path, gguf: Path) -> None:
        folder.mkdir(parents=True)
        (folder / "config.json").write_text('{"model_type": "llama"}\n')
        (folder / "model.safetensors").write_bytes(b"weights")

    out = tmp_path / "models" / "default"
    first = model_files(_once(out, convert))
    shutil.rmtree(out)
    time.sleep(0.05)
    again = model_files(_once(out, convert))
    assert first == again and first["model.safetensors"][1] == default_gguf_path().stat().st_mtime_ns
    recorded = {"base_model": str(out), "base_model_files": first}
    assert setting_changes(recorded, {**recorded, "base_model_files": again}) == []


def test_a_cached_default_folder_missing_a_file_is_made_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """Before: a cached folder that had lost a file (a cleaned cache) was still handed out as complete, and the
    model load failed later with a library error. The real tokenizer conversion runs (a few seconds)."""
    from qlass.models import cache_dir, default_tokenizer_dir

    folder = default_tokenizer_dir(tmp_path)
    (folder / "tokenizer.json").unlink()
    with caplog.at_level(logging.WARNING, logger="qlass"):
        assert default_tokenizer_dir(tmp_path) == folder
    assert (folder / "tokenizer.json").is_file() and caplog.text.count("tokenizer.json missing from the cached") == 1
    monkeypatch.setenv("QLASS_CACHE", "")  # before: the working folder ('.')
    assert cache_dir() == Path.home() / ".cache" / "qlass"


def test_qlass_data_expert_takes_its_outputs_writer_lock(tmp_path: Path) -> None:
    """`qlass data expert` took no writer lock: two exports to one file both appended to its progress file, and on
    a read-only disk the error named that hidden progress file ('RO/.e.json.progress.jsonl: Read-only file
    system'). Now a second export is refused, and the read-only disk is reported for the output named."""
    from test_jsonl import tmpfs

    out = tmp_path / "e.json"
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "qlass", "data", "expert", "--env", "toy_envs:Corridor", "--out"]
    holder = hold(out, False)
    try:
        refused = subprocess.run(cmd + [str(out)], env=env, capture_output=True, text=True, check=False)
    finally:
        holder.kill()
        holder.wait()
    assert refused.returncode == 2 and "being written by another qlass process" in refused.stderr, refused.stderr
    assert not out.with_name(".e.json.progress.jsonl").exists() and not out.exists()
    with tmpfs(tmp_path / "ro", "ro,size=64k") as ro:
        done = subprocess.run(cmd + [str(ro / "e.json")], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 2 and done.stderr.startswith(f"error: {ro / 'e.json'}: cannot be written there ("), \
        done.stderr
    done = subprocess.run(cmd + [str(out)], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0 and "wrote 6 verified expert trajectories" in done.stdout, done.stderr


def test_explore_onto_a_read_only_disk_is_refused_before_the_policy_loads(tmp_path: Path) -> None:
    """`qlass explore --out RO/t.jsonl` loaded the policy (torch, the model: 6 s) before the output's writer lock
    named the read-only disk. The command now hands explore_tasks the policy's factory, which loads it after the
    lock, as `qlass run` already did."""
    from test_jsonl import tmpfs

    code = ("import sys\nfrom qlass.cli import main\ntry:\n    main()\nfinally:\n"
            "    print('torch loaded:', 'torch' in sys.modules, file=sys.stderr)")
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-c", code, "explore", "--model", "default", "--env", "toy_envs:Corridor", "--limit", "1",
           "--out"]
    with tmpfs(tmp_path / "ro", "ro,size=64k") as ro:
        done = subprocess.run(cmd + [str(ro / "t.jsonl")], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 2 and f"error: {ro / 't.jsonl'}: cannot be written there (" in done.stderr, done.stderr
    assert "torch loaded: False" in done.stderr, done.stderr


GUIDANCE = TESTS.parent / "docs" / "reference" / "guidance"


def test_an_input_another_process_still_writes_is_refused_where_it_would_last(tmp_path: Path,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    """`qlass qdata` on a trees file `qlass explore` still appended to exported the trees so far, and a trainer
    trained on part of its data, without a word. Now Q data and training refuse such an input, naming it and its
    writer; a report on it (a decision collection under way) says it reads part of it; once the writer is gone
    the same calls run."""
    from qlass.decision_qdata import write_decision_qdata
    from qlass.decision_report import ReportConfig, write_decision_report

    trees, decisions = tmp_path / "trees.jsonl", tmp_path / "decisions.jsonl"
    shutil.copy(GUIDANCE / "trees.jsonl", trees)
    shutil.copy(GUIDANCE / "decisions.jsonl", decisions)
    shutil.copy(GUIDANCE / "decisions.config.yaml", tmp_path / "decisions.config.yaml")
    holders = [hold(trees, False), hold(decisions, False)]
    try:
        calls = [(trees, "exporting Q data", lambda: export_qdata(trees, tmp_path / "q.jsonl")),
                 (decisions, "exporting Q data", lambda: write_decision_qdata([decisions], tmp_path / "dq.jsonl")),
                 (trees, "training on it", lambda: train_sft(trees, "model", tmp_path / "sft", SFTConfig()))]
        for path, use, call in calls:
            with pytest.raises(QlassError, match=rf"{path.name}: is still being written by another qlass process "
                                                 rf"\(pid \d+ on .+\); {use}"):
                call()
        with caplog.at_level(logging.WARNING, logger="qlass.locking"):
            report = write_decision_report([decisions], tmp_path / "report", cfg=ReportConfig(resamples=100))
        assert report["groups"][0]["decisions"] == 84 and (tmp_path / "report" / "decisions.md").exists()
        assert f"{decisions}: still being written by another qlass process (pid {holders[1].pid} " in caplog.text
    finally:
        for proc in holders:
            proc.kill()
            proc.wait()
    assert not (tmp_path / "q.jsonl").exists() and not (tmp_path / "dq.jsonl").exists()
    assert export_qdata(trees, tmp_path / "q.jsonl")["records"] > 0
    assert write_decision_qdata([decisions], tmp_path / "dq.jsonl") > 0


def test_an_input_this_process_writes_is_not_another_writer(tmp_path: Path) -> None:
    from qlass.locking import writer_of

    out = tmp_path / "trees.jsonl"
    assert writer_of(out) is None
    with writer_lock(out, folder=False):
        assert writer_of(out) is None  # a stage reading what it wrote itself
    holder = hold(out, False)
    try:
        assert writer_of(out) == f"pid {holder.pid} on {os.uname().nodename}"
    finally:
        holder.kill()
        holder.wait()
    assert writer_of(out) is None


def test_a_writer_waits_out_a_readers_probe(tmp_path: Path) -> None:
    """A reader's probe holds the writer lock shared for an instant; a writer starting then waits for it instead
    of being refused as if another writer held the output. A real writer is still refused."""
    import fcntl
    import threading

    out = tmp_path / "trees.jsonl"
    with writer_lock(out, folder=False):
        pass
    with open(lock_path(out, False), "rb") as probe:
        fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
        threading.Timer(0.1, fcntl.flock, (probe, fcntl.LOCK_UN)).start()
        with writer_lock(out, folder=False):
            assert f"pid {os.getpid()}" in lock_path(out, False).read_text()
    holder = hold(out, False)
    try:
        start = time.monotonic()
        with pytest.raises(QlassError, match="is being written by another qlass process"):
            with writer_lock(out, folder=False):
                pass
        assert time.monotonic() - start < 5
    finally:
        holder.kill()
        holder.wait()


def test_a_report_on_an_evaluation_under_way_says_it_reads_part_of_it(tmp_path: Path) -> None:
    """`qlass report EVAL/records.jsonl` while `qlass eval` still writes that folder: the table is made, and the
    log says it is of the records so far (the evaluation holds its folder's lock, not one beside the file)."""
    from test_report import RECORDS, _full

    from qlass.jsonl import write_jsonl

    records = tmp_path / "eval" / "records.jsonl"
    records.parent.mkdir()
    write_jsonl(records, [_full(r) for r in RECORDS])
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "qlass", "report", str(records), "--out", str(tmp_path / "r")]
    holder = hold(records.parent, True)
    try:
        during = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    finally:
        holder.kill()
        holder.wait()
    after = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    assert during.returncode == after.returncode == 0, during.stderr + after.stderr
    warning = f"records.jsonl: still being written by another qlass process (pid {holder.pid} "
    assert warning in during.stderr and "still being written" not in after.stderr, during.stderr
    assert "| e | seen | greedy |" in during.stdout
