"""Crash-safe JSON Lines: appends never glue records, repairs cut only what an append could leave."""

from __future__ import annotations

import contextlib
import errno
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from qlass.errors import DataError
from qlass.jsonl import append_jsonl, read_jsonl


def test_append_after_a_last_line_without_newline_starts_a_new_line(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps({"a": 1}))  # hand-edited / concatenated: no final newline
    append_jsonl(path, {"b": 2})
    append_jsonl(path, {"c": 3})
    assert read_jsonl(path) == [{"a": 1}, {"b": 2}, {"c": 3}]
    assert path.read_text().count("\n") == 3


def test_a_torn_tail_after_records_is_cut_and_a_torn_first_record_too(tmp_path: Path) -> None:
    path = tmp_path / "trees.jsonl"
    path.write_text('{"a": 1}\n{"b": ')
    assert read_jsonl(path, skip_torn_tail=True) == [{"a": 1}]  # a reader that only shows it: left as it is
    assert path.read_text() == '{"a": 1}\n{"b": '
    with pytest.raises(DataError, match="line 2: invalid JSON"):
        read_jsonl(path)
    assert read_jsonl(path, repair_tail=True) == [{"a": 1}]
    assert path.read_text() == '{"a": 1}\n'
    first = tmp_path / "first.jsonl"
    first.write_text('{"schema_version": 1, "tre')  # killed during the very first append
    assert read_jsonl(first, repair_tail=True) == [] and first.read_text() == ""


def test_a_reader_that_does_not_repair_says_a_torn_last_line_may_be_a_killed_writer(tmp_path: Path) -> None:
    """report, validate or a viewer reading a file with a torn last line said "invalid JSON" only; a cut-off
    last line (no newline, starting like a record) now says what it most likely is. A bad complete line
    does not."""
    torn = tmp_path / "records.jsonl"
    torn.write_text('{"a": 1}\n{"a": 2, "b"')
    with pytest.raises(DataError, match=r"line 2: invalid JSON \(.*\) \(a last line cut short: was its writer "
                                        r"killed\? a rerun of that command cuts it\)"):
        read_jsonl(torn)
    torn.write_text('{"a": 1}\n{"a": 2, "b"\n')
    with pytest.raises(DataError, match=r"line 2: invalid JSON \([^)]*\)$"):
        read_jsonl(torn)


def test_a_torn_last_line_cut_inside_a_character_or_in_a_gzip_file_is_named_as_it_is(tmp_path: Path) -> None:
    """The hint (f06b8ca) missed a line cut inside a multi-byte character (the repairing reader cuts it:
    "not UTF-8 text" alone blamed the encoding), and told of a gzip-compressed file that a rerun cuts its
    torn line, where every run refuses to append to one."""
    import gzip

    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(b'{"a": 1}\n' + '{"a": "é'.encode()[:-1])
    with pytest.raises(DataError, match=r"line 2: not UTF-8 text \(.*\) \(a last line cut short: was its writer "
                                        r"killed\? a rerun of that command cuts it\)"):
        read_jsonl(cut)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"a": 1}\n{"a": "\xff"}')
    with pytest.raises(DataError, match=r"line 2: not UTF-8 text \([^)]*\)$"):
        read_jsonl(bad)
    zipped = tmp_path / "records.jsonl.gz"
    zipped.write_bytes(gzip.compress(b'{"a": 1}\n{"a": 2, "b"'))
    with pytest.raises(DataError, match=r"line 2: invalid JSON \(.*\) \(a last line cut short: was its writer "
                                        r"killed\?\)$"):
        read_jsonl(zipped)


def test_a_file_that_is_not_ours_is_never_cut(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    with pytest.raises(DataError, match="not a JSON Lines file"):
        read_jsonl(notes, repair_tail=True)
    assert notes.read_text() == "my notes"


def test_explore_out_on_a_notes_file_is_a_clear_error_and_keeps_it(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    done = subprocess.run([sys.executable, "-m", "qlass", "explore", "--model", "test_explore:ScriptedPolicy",
                           "--env", "test_explore:Rooms", "--limit", "1", "--out", str(notes), "--no-progress"],
                          capture_output=True, text=True, check=False,
                          env={"PYTHONPATH": str(Path(__file__).parent), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2, done.stderr
    assert "exists and is not a trees file" in done.stderr and str(notes) in done.stderr
    assert "Traceback" not in done.stderr
    assert notes.read_text() == "my notes"


def test_a_compressed_output_is_named_as_compressed_not_as_another_kind(tmp_path: Path) -> None:
    """``explore --out trees.jsonl`` on a gzip-compressed trees file (a name without ``.gz``, which is
    refused by name) said it "is not a trees file", and ``qdata --out`` on a compressed Q-data file that
    it "is not a Q-data file". Both now say what it is."""
    import gzip

    from qlass.data import refuse_replacing_other_kind
    from qlass.errors import QlassError

    trees = tmp_path / "trees.jsonl"
    trees.write_bytes(gzip.compress(b'{"tree_id": "t", "nodes": []}\n'))
    done = subprocess.run([sys.executable, "-m", "qlass", "explore", "--model", "test_explore:ScriptedPolicy",
                           "--env", "test_explore:Rooms", "--limit", "1", "--out", str(trees), "--no-progress"],
                          capture_output=True, text=True, check=False,
                          env={"PYTHONPATH": str(Path(__file__).parent), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2, done.stderr
    assert f"{trees}: gzip-compressed; a trees file is written uncompressed" in done.stderr
    assert "not a trees file" not in done.stderr and "Traceback" not in done.stderr
    q = tmp_path / "q.jsonl"
    q.write_bytes(gzip.compress(b'{"tree_id": "t", "node_id": "n", "q": 1.0}\n'))
    with pytest.raises(QlassError, match="gzip-compressed; a Q-data file is written uncompressed"):
        refuse_replacing_other_kind(q, "a Q-data file", lambda r: "q" in r)


def test_a_key_given_twice_is_an_error_naming_file_line_and_key(tmp_path: Path) -> None:
    """``json`` keeps the last of two equal keys without a word: every reader of user files refuses."""
    from qlass.data import load_records
    from qlass.errors import QlassError
    from qlass.jsonl import read_json_object

    lines = tmp_path / "d.jsonl"
    lines.write_text('{"task": "a", "step": 1}\n{"task": "b", "step": 1, "step": 99}\n')
    with pytest.raises(DataError, match=r"d.jsonl: line 2: key 'step' appears twice"):
        read_jsonl(lines)
    with pytest.raises(DataError, match=r"d.jsonl: line 2 \(record 1\): key 'step' appears twice"):
        load_records(lines)
    listed = tmp_path / "t.json"
    listed.write_text('[{"id": "a", "conversations": [{"from": "human", "from": "gpt"}]}]')
    with pytest.raises(DataError, match=r"t.json: key 'from' appears twice"):
        load_records(listed)
    obj = tmp_path / "qnet.json"
    obj.write_text('{"rank": "q", "rank": "advantage"}')
    with pytest.raises(QlassError, match=r"qnet.json: not valid JSON \(key 'rank' appears twice"):
        read_json_object(obj)
    obj.write_text("[" * 100_000 + "]" * 100_000)  # a traceback from every reader of JSON objects before
    with pytest.raises(QlassError, match=r"qnet.json: not valid JSON \(nested too deeply\)"):
        read_json_object(obj)
    lines.write_text('{"task": "a", "nested": {"x": 1}, "other": {"x": 2}}\n')  # equal keys in different objects
    assert read_jsonl(lines)[0]["other"] == {"x": 2}


def test_text_that_is_not_unicode_or_not_utf8_is_named_by_every_json_lines_reader(tmp_path: Path) -> None:
    """A JSON ``\\ud800`` escape read into a Q-data action or a tree node's output passed ``data validate``, then
    stopped train-qnet's tokenizer with a traceback; a UTF-16 or UTF-32 file was read (json detects them) while
    the detector called it not UTF-8. A trajectory's id or task holding one passed and broke the writer."""
    from qlass.data import validate_file

    path = tmp_path / "q.jsonl"
    path.write_text('{"task": "a"}\n{"task": "b", "steps": [{"action": "go \\ud800"}]}\n')
    with pytest.raises(DataError, match=r"q.jsonl: line 2: field 'steps\[0\].action' holds an unpaired surrogate"):
        read_jsonl(path)
    path.write_text('{"task": "\\ud83d\\ude00 \\\\ud800"}\n')  # a paired escape (an emoji) and an escaped backslash
    assert read_jsonl(path) == [{"task": "\U0001f600 \\ud800"}]
    for encoding in ("utf-16-le", "utf-16", "utf-32"):
        path.write_bytes('{"task": "a"}\n{"task": "b"}\n'.encode(encoding))
        with pytest.raises(DataError, match=r"q.jsonl: line 1: not UTF-8 text"):
            read_jsonl(path)
    path.write_bytes(b'\xef\xbb\xbf{"task": "a"}\n')  # a UTF-8 byte-order mark is still read
    assert read_jsonl(path) == [{"task": "a"}]
    traj = tmp_path / "t.json"
    traj.write_text('[{"id": "a\\ud800", "conversations": [{"from": "human", "value": "hi"}, '
                    '{"from": "gpt", "value": "Action: go"}]}]')
    report = validate_file(traj)
    assert not report.ok and any("field 'id': holds an unpaired surrogate" in e for e in report.errors), report.errors


def test_an_integer_too_large_for_a_float_is_an_error_naming_file_line_and_field(tmp_path: Path) -> None:
    """completion_tokens 10**400 passed the record checks and crashed report and view (OverflowError in the
    averages); 5000 digits crashed every reader (Python's int conversion limit, a ValueError traceback)."""
    from typer.testing import CliRunner

    from qlass.cli import app
    from qlass.data import load_records

    record = {"schema_version": 1, "method": "greedy", "method_name": "greedy", "config": {}, "env": "e",
              "split": "s", "task": "t", "reward": 1.0, "success": True, "prompt_tokens": 1, "completion_tokens": 1,
              "qnet_tokens": 0, "env_steps": 1, "wall_time": 1.0, "oracle": False}
    lines = tmp_path / "records.jsonl"
    text = json.dumps(record)
    lines.write_text("\n" + text + "\n" + text.replace('"task": "t"', '"task": "u"').replace(
        '"completion_tokens": 1', '"completion_tokens": 1' + "0" * 400) + "\n")
    with pytest.raises(DataError, match=r"records.jsonl: line 3: field 'completion_tokens' holds an integer of "
                                        r"401 digits"):
        read_jsonl(lines)
    res = CliRunner().invoke(app, ["report", str(lines), "--out", str(tmp_path / "r")])
    assert "line 3: field 'completion_tokens' holds an integer of 401 digits" in str(res.exception)
    nested = tmp_path / "t.json"
    nested.write_text('[{"id": "a", "steps": [{"prompt_tokens": -' + "9" * 5000 + '}]}]')
    with pytest.raises(DataError, match=r"t.json: field '\[0\]\.steps\[0\]\.prompt_tokens' holds an integer of 5000"):
        load_records(nested)
    lines.write_text('{"seed": 9' + "9" * 29 + ', "low": -' + "9" * 300 + ', "n": 12}\n')  # a float's range is read
    assert read_jsonl(lines)[0] == {"seed": 10 ** 30 - 1, "low": 1 - 10 ** 300, "n": 12}


def test_readers_still_on_plain_json_refuse_5000_digits_without_a_traceback(tmp_path: Path) -> None:
    """Readers left on ``json.loads`` raised Python's int conversion ValueError as a traceback on 5000 digits:
    data validate (and every trajectory reader) on a multi-line JSON object, ``qlass view`` on a folder's
    results.json, and serve's AgentGym game list."""
    from typer.testing import CliRunner

    from qlass.cli import app
    from qlass.serve_agentgym import _alfworld_index

    huge = "9" * 5000
    multi = tmp_path / "multi.json"
    multi.write_text('{"id": "a",\n "n": ' + huge + '}\n')  # line 1 alone is no JSON: the whole file is described
    done = subprocess.run([sys.executable, "-m", "qlass", "data", "validate", str(multi)], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"{multi}: valid JSON of another shape: a JSON object with keys ['id', 'n']" in done.stderr
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "results.json").write_text('{"rows": [], "n": ' + huge + '}\n')
    res = CliRunner().invoke(app, ["view", str(ev), "--out", str(tmp_path / "v.html")])
    assert "found no trees, evaluation records, decisions or results" in str(res.exception), res.output
    assert "results.json: not a qlass results file, left out (not JSON: field 'n' holds an integer of 5000 digits" \
        in res.output, res.output
    games = tmp_path / "games"
    games.mkdir()
    (games / "mappings_train.json").write_text('[{"task_type": "pick", "task_id": "t", "n": ' + huge + '}]')
    with pytest.raises(DataError, match=r"mappings_train.json: invalid JSON: field '\[0\]\.n' holds an integer of "
                                        r"5000 digits"):
        _alfworld_index(None, games)
    for raw, why in ((b"\xff[]", "invalid JSON: .*can't decode byte 0xff"), (b"[" * 100_000 + b"]" * 100_000,
                                                                            "invalid JSON: nested too deeply")):
        (games / "mappings_train.json").write_bytes(raw)  # were a UnicodeDecodeError's, a RecursionError's traceback
        with pytest.raises(DataError, match=rf"mappings_train.json: {why}"):
            _alfworld_index(None, games)


def test_outputs_that_are_not_regular_files_are_refused_and_kept(tmp_path: Path) -> None:
    """``--out`` naming a FIFO (or, as root, ``/dev/null``) was replaced by a regular file: the atomic
    rename went over whatever the path was, and a resumed run blocked reading the pipe."""
    import os
    import stat

    from qlass.errors import QlassError
    from qlass.jsonl import write_jsonl, write_text_atomic
    from qlass.locking import writer_lock

    fifo = tmp_path / "out.jsonl"
    os.mkfifo(fifo)
    writers = [lambda: write_text_atomic(fifo, "x\n"), lambda: write_jsonl(fifo, [{"a": 1}]),
               lambda: append_jsonl(fifo, {"a": 1}), lambda: read_jsonl(fifo, repair_tail=True),
               lambda: writer_lock(fifo, folder=False).__enter__()]
    for write in writers:
        with pytest.raises(QlassError, match=r"out.jsonl: is a named pipe \(FIFO\), not a regular file"):
            write()
    assert stat.S_ISFIFO(fifo.stat().st_mode) and sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]
    env = {"PYTHONPATH": str(Path(__file__).parent), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "qlass", "data", "expert", "--env", "toy_envs:Corridor", "--split",
                           "train", "--out", str(fifo)], capture_output=True, text=True, check=False, env=env,
                          timeout=60)
    assert done.returncode == 2 and "is a named pipe (FIFO), not a regular file" in done.stderr, done.stderr
    assert stat.S_ISFIFO(fifo.stat().st_mode) and sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


@pytest.mark.parametrize("record,field,problem", [
    ({"candidates": [{"score": float("nan")}]}, "candidates[0].score", "is nan"),
    ({"q": float("inf")}, "q", "is inf"),
    ({"trajectory": {"steps": [{"output": "Action: \ud800"}]}}, "trajectory.steps[0].output", "not valid Unicode"),
])
def test_a_record_that_would_not_read_back_is_never_written(tmp_path: Path, record: dict, field: str,
                                                            problem: str) -> None:
    """A NaN (bare ``NaN``, not JSON) was written and then refused by every reader; a lone surrogate was a
    UnicodeEncodeError traceback."""
    from qlass.errors import QlassError
    from qlass.jsonl import write_jsonl

    path = tmp_path / "records.jsonl"
    append_jsonl(path, {"ok": 1, "score": float("-inf")})  # -inf (an impossible candidate) reads back
    for write in (lambda: append_jsonl(path, record), lambda: write_jsonl(tmp_path / "all.jsonl", [record])):
        with pytest.raises(QlassError, match="refusing to write a record whose field") as err:
            write()
        assert repr(field) in str(err.value) and problem in str(err.value)
    assert read_jsonl(path) == [{"ok": 1, "score": float("-inf")}] and not (tmp_path / "all.jsonl").exists()


def loader_errors(model: Path, calls: str) -> list[str]:
    """The QlassError message of each of ``calls`` (lambdas, as Python source, reading the model folder
    ``sys.argv[1]``), run in a subprocess so that a loader that blocks is a timeout, not a hung test."""
    script = f"""
import sys
from qlass.errors import QlassError
from qlass.jsonl import read_json_object
from qlass.policy.loading import load_causal_lm
from qlass.qnet import QNet
for call in ({calls},):
    try:
        call()
    except QlassError as exc:
        print(exc)
"""
    done = subprocess.run([sys.executable, "-c", script, str(model)], capture_output=True, text=True, check=False,
                          timeout=120)
    assert done.returncode == 0, (done.stdout, done.stderr)
    return done.stdout.splitlines()


def test_a_named_pipe_where_a_json_file_or_model_config_belongs_is_named_not_read(tmp_path: Path) -> None:
    """Reading a FIFO blocks until something writes it: a model folder whose config.json is one hung the
    loaders (and ``read_json_object``) for ever; each is now one line naming the file."""
    import os

    model = tmp_path / "model"
    model.mkdir()
    os.mkfifo(model / "config.json")
    lines = loader_errors(model, 'lambda: read_json_object(sys.argv[1] + "/config.json"), '
                                 "lambda: load_causal_lm(sys.argv[1]), lambda: QNet.load(sys.argv[1]), "
                                 "lambda: QNet.from_sft(sys.argv[1])")
    assert len(lines) == 4, lines
    assert all(line.startswith(f"{model}/config.json: is a named pipe (FIFO), not a regular file") for line in lines)


@pytest.mark.parametrize("name", ["tokenizer.json", "model.safetensors"])
def test_a_named_pipe_among_a_model_folders_other_files_is_named(tmp_path: Path, tiny_model_dir: Path,
                                                                  name: str) -> None:
    """Only config.json was checked: a FIFO named tokenizer.json or *.safetensors still hung the loaders."""
    import os
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / name).unlink()
    os.mkfifo(model / name)
    lines = loader_errors(model, "lambda: load_causal_lm(sys.argv[1]), lambda: QNet.from_sft(sys.argv[1])")
    assert len(lines) == 2, lines
    assert all(line.startswith(f"{model}/{name}: is a named pipe (FIFO), not a regular file") for line in lines)


def test_a_device_given_as_an_input_is_refused_not_read_for_ever() -> None:
    """``/dev/zero`` as a decisions file, records or ``--config`` was read until memory ran out (5 GB in
    6 s); a named pipe is still read (process substitution)."""
    from qlass.config import load_yaml
    from qlass.data import load_records
    from qlass.errors import QlassError

    for read in (read_jsonl, load_yaml, lambda p: load_records(Path(p))):
        with pytest.raises(QlassError, match="/dev/zero: is a character device, not a file qlass can read"):
            read("/dev/zero")


KILLED_MID_WRITE = """
import os, signal, sys, threading, time
from pathlib import Path
from qlass.jsonl import write_text_atomic
out = Path(sys.argv[1])
def kill_once_the_temporary_file_exists():
    while not list(out.parent.glob("." + out.name + ".tmp*")):
        time.sleep(0.0005)
    os.kill(os.getpid(), signal.SIGKILL)
threading.Thread(target=kill_once_the_temporary_file_exists, daemon=True).start()
write_text_atomic(out, "x" * 300_000_000)
"""


def test_a_writer_killed_mid_write_leaves_no_partial_copy_after_the_rerun(tmp_path: Path) -> None:
    """Before: each kill -9 of an atomic writer (qdata, view, report, config.yaml, data expert) mid-write left a
    hidden partial copy of the output (.NAME.tmpPID) that no rerun removed. The writer is killed for real, by a
    thread of its own that sends SIGKILL once the temporary file exists."""
    from qlass.jsonl import write_text_atomic

    out = tmp_path / "q.jsonl"
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(out)], capture_output=True, timeout=120)
    assert killed.returncode == -9 and not out.exists()
    assert len(list(tmp_path.glob(".q.jsonl.tmp*"))) == 1  # the killed writer's partial copy
    other_host = tmp_path / ".q.jsonl.tmp-otherhost-1"  # another machine's writer, on a shared folder: kept
    other_host.write_text("partial")
    write_text_atomic(out, "done\n")
    assert out.read_text() == "done\n" and list(tmp_path.glob(".q.jsonl.tmp*")) == [other_host]


@contextlib.contextmanager
def tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A real tmpfs mounted at ``where`` (``mount -o OPTIONS``) for the block; tests run as root. A machine where it
    cannot be mounted fails the test, saying so, rather than skipping what it checks."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                             text=True, check=False)
    if mounted.returncode != 0:
        pytest.fail(f"this test needs to mount a tmpfs (as root) and could not: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_a_file_on_a_read_only_file_system_is_named_not_its_temporary_copy(tmp_path: Path) -> None:
    """``qlass view run --out RO/page.html`` (report, qdata alike) said 'RO/.page.html.tmp-HOST-PID: Read-only file
    system', naming a file that never existed: removing the temporary copy failed too and replaced the error."""
    from qlass.jsonl import write_text_atomic

    with tmpfs(tmp_path / "ro", "ro,size=64k") as ro:
        with pytest.raises(OSError) as err:
            write_text_atomic(ro / "page.html", "<html>")
        assert err.value.filename == str(ro / "page.html") and err.value.errno == errno.EROFS


def test_an_append_that_fills_the_disk_leaves_whole_records_only(tmp_path: Path) -> None:
    """On a full disk (a real tmpfs of 64 KiB), an evaluation's record was written part-way before ENOSPC: the
    file kept a torn last line that ``qlass report`` and ``data validate`` refused ('was its writer killed?') until
    the run was repeated. The part written is cut off again; the error names the file."""
    with tmpfs(tmp_path / "full", "size=64k") as full:
        path = full / "records.jsonl"
        append_jsonl(path, {"id": 0, "text": "x" * 40_000})
        before = path.read_bytes()
        with pytest.raises(OSError) as err:
            append_jsonl(path, {"id": 1, "text": "y" * 40_000})
        assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)
        assert path.read_bytes() == before
        assert [r["id"] for r in read_jsonl(path)] == [0]


def test_a_json_list_given_for_json_lines_says_so(tmp_path: Path) -> None:
    """A trees, Q-data or records file written as one JSON list (pretty-printed: its first line is '[') was
    'line 1: invalid JSON (Expecting value)', which does not say what is wrong. Now the error says the file is a
    JSON list where JSON Lines are expected; a '[' on a later line gets no such hint."""
    hint = "; the file looks like a JSON list, and this kind of file is JSON Lines (one object per line)"
    pretty, one_line, later = tmp_path / "pretty.jsonl", tmp_path / "one.jsonl", tmp_path / "later.jsonl"
    pretty.write_text('[\n  {"a": 1}\n]\n')
    one_line.write_text('[{"a": 1}]\n')
    later.write_text('{"a": 1}\n[{"a": 2}]\n')
    for path, error in ((pretty, "line 1: invalid JSON (Expecting value at column 2)"),
                        (one_line, "line 1: expected a JSON object, got list")):
        with pytest.raises(DataError) as err:
            read_jsonl(path)
        assert str(err.value) == f"{path}: {error}{hint}"
    with pytest.raises(DataError) as err:
        read_jsonl(later)
    assert str(err.value) == f"{later}: line 2: expected a JSON object, got list"
