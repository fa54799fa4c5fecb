"""Trajectory files: validation errors name file, record and problem; the CLI exits non-zero."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from toy_envs import Corridor
from typer.testing import CliRunner

from qlass.cli import app
from qlass.data import load_trajectories, save_trajectories, validate_file
from qlass.errors import DataError, QlassError
from qlass.types import Message, Step, Task, Trajectory

GOOD = {
    "id": "t0",
    "conversations": [
        {"from": "human", "value": "You are an agent. Answer with Thought and Action."},
        {"from": "gpt", "value": "OK"},
        {"from": "human", "value": "Your task is to find a plant."},
        {"from": "gpt", "value": "Thought: Plants grow in the greenhouse.\nAction: go to greenhouse"},
        {"from": "human", "value": "Observation: You move to the greenhouse."},
        {"from": "gpt", "value": "Thought: There it is.\nAction: focus on pea plant"},
    ],
    "reward": 1.0,
}


def qlass_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qlass", *args], capture_output=True, text=True)


def write(tmp_path: Path, records, name="data.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(records) if name.endswith(".json") else "".join(json.dumps(r) + "\n" for r in records))
    return path


def test_valid_eto_file_loads_with_acknowledgement(tmp_path: Path) -> None:
    trajs = load_trajectories(write(tmp_path, [GOOD]))
    assert len(trajs) == 1 and trajs[0].id == "t0" and trajs[0].reward == 1.0
    assert trajs[0].messages[1] == Message("assistant", "OK")
    result = qlass_cli("data", "validate", str(tmp_path / "data.json"))
    assert result.returncode == 0, result.stderr
    assert "1 records, 1 valid, 0 invalid (0 problems)" in result.stdout


def test_jsonl_and_round_trip(tmp_path: Path) -> None:
    traj = Trajectory("x", [Message("user", "task"), Message("assistant", "Thought: t\nAction: look")],
                      reward=0.5, task="env/x", steps=[Step("Thought: t\nAction: look", "look", "o", 0.5, True, 3, 4)])
    for name in ("out.json", "out.jsonl"):
        save_trajectories(tmp_path / name, [traj])
        (back,) = load_trajectories(tmp_path / name)
        assert back.messages == traj.messages and back.steps == traj.steps and back.task == "env/x"


def test_bad_json_names_file_and_position(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[{"id": "a", "conversations": [}]')
    with pytest.raises(DataError, match=r"bad\.json: invalid JSON at line 1"):
        validate_file(path)
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text(json.dumps(GOOD) + "\n{not json\n")
    result = qlass_cli("data", "validate", str(jsonl))
    assert result.returncode != 0
    assert "bad.jsonl" in result.stderr and "line 2 (record 1): invalid JSON" in result.stderr


def test_missing_action_line(tmp_path: Path) -> None:
    rec = json.loads(json.dumps(GOOD))
    rec["conversations"][5]["value"] = "Thought: I am done."
    result = qlass_cli("data", "validate", str(write(tmp_path, [GOOD | {"id": "ok"}, rec])))
    assert result.returncode == 1
    assert "data.json, record 1 (id 't0'): conversations[5].value: agent turn has no 'Action:' line" in result.stderr
    assert "2 records, 1 valid, 1 invalid (1 problems)" in result.stdout


def test_wrong_role_order(tmp_path: Path) -> None:
    rec = json.loads(json.dumps(GOOD))
    rec["conversations"].insert(3, {"from": "human", "value": "again"})
    result = qlass_cli("data", "validate", str(write(tmp_path, [rec])))
    assert result.returncode == 1
    assert "record 0 (id 't0'): conversations[3].from: roles must alternate" in result.stderr


def test_duplicate_ids_bad_reward_and_missing_fields(tmp_path: Path) -> None:
    dup = GOOD | {"reward": 1.5}
    path = write(tmp_path, [GOOD, dup, {"conversations": []}], "many.jsonl")
    report = validate_file(path)
    text = "\n".join(report.errors)
    assert "line 2 (id 't0'): field 'id': duplicate of line 1" in text
    assert "line 2 (id 't0'): field 'reward': 1.5 is not a number in [0, 1]" in text
    assert "line 3: field 'id': missing" in text
    assert "line 3: field 'conversations': missing or not a non-empty list" in text
    with pytest.raises(DataError, match="2 invalid record"):
        load_trajectories(path)
    result = qlass_cli("data", "validate", str(path))
    assert result.returncode == 1
    assert "many.jsonl, line 2 (id 't0'): field 'id': duplicate of line 1" in result.stderr
    assert "many.jsonl, line 2 (id 't0'): field 'reward': 1.5 is not a number in [0, 1]" in result.stderr


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    result = qlass_cli("data", "validate", str(tmp_path / "nope.json"))
    assert result.returncode == 2
    assert "nope.json: file not found" in result.stderr


def as_role_content(rec: dict, key: str = "conversations", system: str | None = None) -> dict:
    """``rec`` with ``{"role", "content"}`` turns under ``key`` (and a leading system turn if given)."""
    roles = {"human": "user", "gpt": "assistant"}
    turns = [{"role": roles[t["from"]], "content": t["value"]} for t in rec["conversations"]]
    if system is not None:
        turns.insert(0, {"role": "system", "content": system})
    return {k: v for k, v in rec.items() if k != "conversations"} | {key: turns}


def test_role_content_and_messages_files_load_like_from_value(tmp_path: Path) -> None:
    reference = load_trajectories(write(tmp_path, [GOOD], "ref.json"))
    files = [write(tmp_path, [as_role_content(GOOD)], "role_content.json"),
             write(tmp_path, [as_role_content(GOOD, "messages")], "messages.jsonl"),
             write(tmp_path, [{k: v for k, v in GOOD.items() if k != "conversations"}
                              | {"messages": GOOD["conversations"]}], "messages_from_value.jsonl")]
    for path in files:
        result = qlass_cli("data", "validate", str(path))
        assert result.returncode == 0, result.stderr
        assert "1 records, 1 valid, 0 invalid (0 problems), 6 turns" in result.stdout
        assert load_trajectories(path) == reference
    save_trajectories(tmp_path / "out.jsonl", load_trajectories(files[1]))  # writing stays canonical
    written = json.loads((tmp_path / "out.jsonl").read_text())
    assert "messages" not in written and written["conversations"] == GOOD["conversations"]


def test_leading_system_turn_is_kept_as_a_system_message(tmp_path: Path) -> None:
    path = write(tmp_path, [as_role_content(GOOD, "messages", system="You are a helpful agent.")], "sys.jsonl")
    result = qlass_cli("data", "validate", str(path))
    assert result.returncode == 0, result.stderr
    (traj,) = load_trajectories(path)
    assert traj.messages[0] == Message("system", "You are a helpful agent.") and len(traj.messages) == 7
    save_trajectories(tmp_path / "out.json", [traj])
    assert json.loads((tmp_path / "out.json").read_text())[0]["conversations"][0] == {
        "from": "system", "value": "You are a helpful agent."}
    assert load_trajectories(tmp_path / "out.json") == [traj]


def test_mixed_or_unknown_turn_shapes_name_file_record_and_field(tmp_path: Path) -> None:
    mixed = json.loads(json.dumps(GOOD))
    mixed["conversations"][2] = {"role": "user", "content": "Your task is to find a plant."}
    both = json.loads(json.dumps(GOOD)) | {"id": "both"}
    both["conversations"][1] = {"from": "gpt", "content": "OK"}
    neither = json.loads(json.dumps(GOOD)) | {"id": "neither"}
    neither["conversations"][4] = {"speaker": "env", "text": "Observation: ..."}
    two_lists = as_role_content(GOOD, "messages") | {"id": "two", "conversations": GOOD["conversations"]}
    result = qlass_cli("data", "validate", str(write(tmp_path, [mixed, both, neither, two_lists], "mixed.jsonl")))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert ("mixed.jsonl, line 1 (id 't0'): conversations[2]: has 'role'/'content' keys but earlier turns have "
            "'from'/'value'") in result.stderr
    assert ("mixed.jsonl, line 2 (id 'both'): conversations[1]: mixes 'from'/'value' with 'role'/'content'"
            in result.stderr)
    assert ("mixed.jsonl, line 3 (id 'neither'): conversations[4]: expected an object with 'from' and 'value' or "
            "'role' and 'content', got a JSON object with keys ['speaker', 'text']") in result.stderr
    assert "mixed.jsonl, line 4 (id 'two'): fields 'conversations' and 'messages': both present" in result.stderr
    assert "4 records, 0 valid, 4 invalid" in result.stdout


def test_unknown_role_and_late_system_turn(tmp_path: Path) -> None:
    tool = as_role_content(GOOD, "messages")
    tool["messages"][3] = {"role": "tool", "content": "Thought: t\nAction: look"}
    late = as_role_content(GOOD, "messages") | {"id": "late"}
    late["messages"].insert(2, {"role": "system", "content": "Be brief."})
    result = qlass_cli("data", "validate", str(write(tmp_path, [tool, late], "roles.json")))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "roles.json, record 0 (id 't0'): messages[3].role: 'tool' is not a known role" in result.stderr
    assert ("roles.json, record 1 (id 'late'): messages[2].role: a system turn may only be the first turn"
            in result.stderr)


def test_valid_json_of_another_shape_is_not_called_invalid(tmp_path: Path) -> None:
    path = tmp_path / "eval_output.json"
    path.write_text(json.dumps({"model": "m", "accuracy": 0.5, "results": [GOOD]}, indent=2))
    expected = ("eval_output.json: valid JSON of another shape: a JSON object with keys ['model', 'accuracy', "
                "'results']; expected a list of trajectory records or JSON Lines")
    with pytest.raises(DataError, match=re.escape(expected)):
        validate_file(path)
    result = qlass_cli("data", "validate", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert expected in result.stderr and "invalid JSON" not in result.stderr


def test_a_byte_order_mark_is_read_like_any_utf8_file(tmp_path: Path) -> None:
    """Editors on Windows save UTF-8 with a BOM; every reader accepts it, as `report` always did."""
    bom = "\ufeff".encode()
    for name in ("bom.json", "bom.jsonl"):
        path = write(tmp_path, [GOOD], name)
        path.write_bytes(bom + path.read_bytes())
        (traj,) = load_trajectories(path)
        assert traj.id == "t0"
        result = qlass_cli("data", "validate", str(path))
        assert result.returncode == 0, result.stderr
        assert "1 records, 1 valid" in result.stdout
    tree = tmp_path / "trees.jsonl"
    tree.write_bytes(bom + json.dumps({"tree_id": "x", "nodes": []}).encode() + b"\n")
    result = qlass_cli("data", "validate", str(tree))  # read as a tree (one with problems), not as broken JSON
    assert result.returncode == 1 and "missing field 'schema_version'" in result.stdout + result.stderr, result
    assert "BOM" not in result.stdout + result.stderr


def test_validate_checks_every_file_past_one_that_cannot_be_read(tmp_path: Path) -> None:
    good = write(tmp_path, [GOOD], "good.json")
    bad = write(tmp_path, [{**GOOD, "reward": 7}], "bad.json")
    missing = tmp_path / "missing.json"
    result = qlass_cli("data", "validate", str(good), str(missing), str(bad))
    assert result.returncode == 2, result  # a file could not be read
    assert f"{good}: 1 records, 1 valid" in result.stdout and f"{bad}: 1 records, 0 valid" in result.stdout
    assert f"error: {missing}: file not found" in result.stderr and "'reward'" in result.stderr
    assert qlass_cli("data", "validate", str(good), str(bad)).returncode == 1


def test_validate_checks_the_files_after_a_socket(tmp_path: Path) -> None:
    """A socket given among the files ended the command (its open raised past the per-file handler, the
    files after it unchecked); it is named as unreadable and the next file is checked, as before pipes
    were copied."""
    import socket

    good = write(tmp_path, [GOOD], "good.json")
    sock = tmp_path / "sock"
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(sock))
        result = qlass_cli("data", "validate", str(sock), str(good))
    finally:
        server.close()
    assert result.returncode == 2, result
    assert f"error: {sock}: cannot read" in result.stderr and "Traceback" not in result.stderr
    assert f"{good}: 1 records, 1 valid" in result.stdout


def test_validate_reads_a_pipe_whole_and_refuses_a_device(tmp_path: Path) -> None:
    """Telling a pipe's kind (<(zcat f.gz)) read its first line, so the check then read what was left:
    'file is empty'; /dev/zero was read as one endless first line until killed."""
    import os
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    text = json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "id": "t1", "reward": 7}) + "\n"
    writer = threading.Thread(target=fifo.write_text, args=(text,), daemon=True)
    writer.start()
    result = subprocess.run([sys.executable, "-m", "qlass", "data", "validate", str(fifo)], capture_output=True,
                            text=True, timeout=60)
    writer.join(timeout=10)
    assert result.returncode == 1, result.stderr
    assert f"{fifo}: 2 records, 1 valid, 1 invalid" in result.stdout
    assert f"{fifo}, line 2 (id 't1'): field 'reward'" in result.stderr
    good = write(tmp_path, [GOOD], "good.json")
    result = subprocess.run([sys.executable, "-m", "qlass", "data", "validate", "/dev/zero", str(good)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "error: /dev/zero: is a character device" in result.stderr
    assert f"{good}: 1 records, 1 valid" in result.stdout


def test_validate_names_a_paraphrase_cache_and_a_finished_task_list(tmp_path: Path) -> None:
    """Both were read as trajectory files: every line invalid for lacking 'id' and 'conversations'."""
    cache = write(tmp_path, [{"kind": "qlass-paraphrases", "version": 1, "settings": {}}], "para.jsonl")
    tasks = write(tmp_path, [{"split": "seen", "task": "t/1", "decisions": 2, "steps": 2, "stop": "done"}],
                  "d.tasks.jsonl")
    result = qlass_cli("data", "validate", str(cache), str(tasks))
    assert result.returncode == 2, result
    assert f"error: {cache}: line 1: this is a paraphrase cache (qlass paraphrase), which qlass data validate " \
           "does not check" in result.stderr
    assert f"error: {tasks}: line 1: this is a decisions file's finished-task list" in result.stderr
    assert "field 'id'" not in result.stdout + result.stderr


def test_another_stages_file_given_as_trajectories_is_named_as_what_it_is(tmp_path: Path) -> None:
    """Evaluation records, trees, Q data, decisions or preference pairs given where trajectories belong
    (--expert, --exclude-tasks-of, --data) gave a wall of missing 'id' and 'conversations' for every line."""
    kinds = {"records": ({"method": "greedy", "trajectory": {}, "reward": 0.0}, "evaluation records"),
             "trees": ({"tree_id": "t", "nodes": []}, "a trees file"),
             "qdata": ({"tree_id": "t", "node_id": 1, "messages": [], "q": 0.5}, "a Q-data file"),
             "decisions": ({"history": [], "candidates": []}, "a decisions file"),
             "pairs": ({"id": "p", "chosen": GOOD, "rejected": GOOD}, "preference pairs")}
    for name, (record, what) in kinds.items():
        path = write(tmp_path, [record, record], f"{name}.jsonl")
        with pytest.raises(DataError, match=rf"{name}\.jsonl: line 1: this is {what}.*, not a trajectory file"):
            load_trajectories(path)
    result = qlass_cli("data", "validate", "--kind", "trajectories", str(tmp_path / "records.jsonl"))
    assert result.returncode == 2 and "field 'id'" not in result.stderr, result
    messages = {"id": "m", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
    assert validate_file(write(tmp_path, [messages], "m.jsonl")).records == 1  # a trajectory in messages form


def test_a_trajectory_in_messages_form_with_other_stages_field_names_is_still_a_trajectory(tmp_path: Path) -> None:
    """The file-kind table (5203196) knew a trajectory only by 'id' and 'conversations': one in 'messages'
    form whose extra fields (kept in meta) are another kind's ('task' and 'stop') was refused as a
    decisions file's finished-task list by load_trajectories and data validate; it loaded before."""
    turns = [{"role": "user", "content": "Your task is to go."},
             {"role": "assistant", "content": "Thought: t\nAction: go"}]
    record = {"id": "m", "messages": turns, "task": "m", "stop": "done"}
    path = write(tmp_path, [record], "m.jsonl")
    assert [t.meta["stop"] for t in load_trajectories(path)] == ["done"]
    result = qlass_cli("data", "validate", str(path))
    assert result.returncode == 0 and "1 valid" in result.stdout, result


def test_outputs_are_written_only_over_files_of_their_kind(tmp_path: Path) -> None:
    """An empty export ([]) or a file of the output's kind may be replaced; a pair file, trees file or
    text is refused; of a JSON Lines file only the first record is read."""
    import json

    from qlass.data import refuse_replacing_other_kind
    from qlass.errors import QlassError

    def trajectories(r: dict) -> bool:
        return "id" in r and ("conversations" in r or "messages" in r)

    traj = {"id": "t/0", "conversations": [{"from": "human", "value": "Walk."}]}
    cases = {"empty.json": ("[]", True), "blank.json": ("\n", True), "list.json": (json.dumps([traj], indent=1), True),
             "lines.jsonl": (json.dumps(traj) + "\n" + "{not json" * 1000 + "\n", True),
             "pairs.json": (json.dumps([{"id": "p", "chosen": traj, "rejected": traj}]), False),
             "trees.jsonl": (json.dumps({"tree_id": "t", "nodes": []}) + "\n", False), "notes.txt": ("hello\n", False)}
    for name, (text, allowed) in cases.items():
        (tmp_path / name).write_text(text)
        if allowed:
            refuse_replacing_other_kind(tmp_path / name, "a trajectory file", trajectories)
        else:
            with pytest.raises(QlassError, match=f"{name}: exists and is not a trajectory file"):
                refuse_replacing_other_kind(tmp_path / name, "a trajectory file", trajectories)
    refuse_replacing_other_kind(tmp_path / "missing.json", "a trajectory file", trajectories)


REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "reference" / "guidance"


def test_validate_reads_decision_files_and_evaluation_records(tmp_path: Path) -> None:
    """``data validate`` knows decision files and (gzipped) evaluation records by their fields and runs
    their readers' checks, instead of reporting every record as a trajectory without ``id``."""
    import gzip

    decisions = REFERENCE / "decisions218.jsonl"
    records = REFERENCE / "episodes60" / "records.jsonl.gz"

    def validate(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "qlass", "data", "validate", *args], capture_output=True,
                              text=True, timeout=120)

    ok = validate(str(decisions), str(records))
    assert ok.returncode == 0, ok.stderr
    assert f"{decisions}: 218 decisions from 76 tasks, all valid" in ok.stdout
    assert f"{records}: 180 evaluation records of 3 methods, all valid" in ok.stdout

    rows = [json.loads(line) for line in decisions.read_text().splitlines()[:3]]
    rows[1]["candidates"][0]["mean"] = 1.5
    bad_decisions = tmp_path / "dec.jsonl"
    bad_decisions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with gzip.open(records, "rt") as fh:
        recs = [json.loads(line) for line in fh.read().splitlines()[:2]]
    recs[1]["reward"] = "high"
    bad_records = tmp_path / "records.jsonl.gz"
    with gzip.open(bad_records, "wt") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in recs))
    bad = validate(str(bad_decisions), str(bad_records))
    assert bad.returncode == 1
    assert "dec.jsonl" in bad.stderr and "candidates[0].mean" in bad.stderr and "[0, 1]" in bad.stderr
    assert "records.jsonl.gz" in bad.stderr and "line 2" in bad.stderr and "'reward'" in bad.stderr
    assert "conversations" not in bad.stderr  # not read as trajectory files

    wrong = validate("--kind", "decisions", str(records))
    assert wrong.returncode == 2 and "this is evaluation records" in wrong.stderr  # unreadable as decisions


def test_jsonl_problems_name_the_line_an_editor_shows(tmp_path: Path) -> None:
    """In JSON Lines a bad record is named by its line in the file, blank lines counted, as the trees,
    Q-data and evaluation-records readers name it (before: ``record 2``, its index among the records);
    a JSON list, which has no lines to name, keeps ``record N``."""
    bad = GOOD | {"id": "corridor/2", "reward": "high"}
    path = tmp_path / "gaps.jsonl"
    path.write_text(f"{json.dumps(GOOD)}\n\n  \n{json.dumps(GOOD | {'id': 'corridor/1'})}\n{json.dumps(bad)}\n")
    want = f"{path}, line 5 (id 'corridor/2'): field 'reward': 'high' is not a number in [0, 1]"
    with pytest.raises(DataError) as err:
        load_trajectories(path)
    assert want in str(err.value) and "record 2" not in str(err.value)
    result = qlass_cli("data", "validate", str(path))
    assert result.returncode == 1 and want in result.stderr.splitlines(), result.stderr
    assert f"{path}: 3 records, 2 valid, 1 invalid (1 problems)" in result.stdout
    path.write_text(path.read_text() + "\n" + json.dumps(GOOD | {"id": "corridor/1"}) + "\n")
    assert f"{path}, line 7 (id 'corridor/1'): field 'id': duplicate of line 4" in validate_file(path).errors
    listed = write(tmp_path, [GOOD, bad, GOOD], "gaps.json")
    assert validate_file(listed).errors == [
        f"{listed}, record 1 (id 'corridor/2'): field 'reward': 'high' is not a number in [0, 1]",
        f"{listed}, record 2 (id 't0'): field 'id': duplicate of record 0"]


def test_a_line_separator_inside_a_text_ends_no_line(tmp_path: Path) -> None:
    """A U+2028 or U+0085 that a web page puts in an observation is written unescaped in JSON Lines; it
    is part of the text, not a line end (before: the record was cut there and the file refused as
    "valid JSON of another shape")."""
    traj = Trajectory("web/0", [Message("user", "Find a lamp.\u2028Page 1\x85of 2"),
                                Message("assistant", "Thought: t\nAction: click lamp")], reward=1.0)
    path = tmp_path / "web.jsonl"
    save_trajectories(path, [traj])
    assert "\u2028" in path.read_text(encoding="utf-8")
    (back,) = load_trajectories(path)
    assert back.id == "web/0" and back.messages == traj.messages


def test_an_empty_file_is_one_answer_whatever_the_kind(tmp_path: Path) -> None:
    """An empty file was "0 ... all valid" (exit 0) with --kind records, trees or qdata, "holds no decision
    records" (exit 1) with --kind decisions and "file is empty" (exit 2) in auto mode. Now it is the last,
    whatever the kind, gzip-compressed or not."""
    import gzip

    empty, blank = tmp_path / "e.jsonl", tmp_path / "b.jsonl.gz"
    empty.write_text("")
    blank.write_bytes(gzip.compress(b"\n \n"))
    for kind in ("auto", "trajectories", "trees", "qdata", "decisions", "records"):
        for path in (empty, blank):
            result = qlass_cli("data", "validate", "--kind", kind, str(path))
            assert (result.returncode, result.stderr.strip()) == (2, f"error: {path}: file is empty"), (kind, result)


class CountingCorridor(Corridor):
    """The toy corridor, counting its episodes: every expert replay starts one."""

    episodes = 0

    def reset(self, task: Task) -> str:
        CountingCorridor.episodes += 1
        return super().reset(task)


def test_rerunning_a_finished_expert_export_replays_nothing(tmp_path: Path) -> None:
    """Before: a rerun of a finished ``qlass data expert`` replayed every task again (its progress file was
    deleted at the end). Now the finished export's record is kept beside the output: the same settings reuse
    it, other settings replay every task as a first export does."""
    out = tmp_path / "expert.json"
    args = ["data", "expert", "--env", "test_data:CountingCorridor", "--split", "train", "--out", str(out)]
    CountingCorridor.episodes = 0
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0 and CountingCorridor.episodes == 6, first.output
    written = out.read_bytes()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "wrote 6 verified expert trajectories" in again.output, again.output
    assert CountingCorridor.episodes == 6 and out.read_bytes() == written
    shorter = CliRunner().invoke(app, [*args, "--max-steps", "2"])
    assert shorter.exit_code == 0 and "every task is replayed" in shorter.output, shorter.output
    # every task is played again, up to 2 steps: two expert paths do not finish within them
    assert CountingCorridor.episodes == 6 + 6 and len(load_trajectories(out)) == 4
    assert (tmp_path / ".expert.json.done.jsonl").exists() and not (tmp_path / ".expert.json.progress.jsonl").exists()



def test_save_trajectories_refuses_what_would_not_read_back(tmp_path: Path) -> None:
    """A NaN or out-of-range reward and an id given twice were written, then refused by load_trajectories; a meta
    key named like a field of the record replaced it (the id, the reward)."""
    from qlass.data import trajectory_to_record

    turns = [Message("user", "Task: go."), Message("assistant", "Thought: go.\nAction: go")]
    good = Trajectory("a", turns, reward=1.0)
    for bad, said in ((Trajectory("b", turns, reward=float("nan")), "field 'reward': nan is not a number in [0, 1]"),
                      (Trajectory("b", turns, reward=2.5), "field 'reward': 2.5 is not a number in [0, 1]"),
                      (Trajectory("a", turns), "field 'id': 'a' is also trajectory 0's")):
        with pytest.raises(QlassError, match=re.escape(f"trajectory 1 ({bad.id!r}) would not read back: {said}")):
            save_trajectories(tmp_path / "t.json", [good, bad])
        assert not (tmp_path / "t.json").exists()
    with pytest.raises(QlassError, match="trajectory 'a': meta key 'reward' is a field of the record itself"):
        trajectory_to_record(Trajectory("a", turns, meta={"reward": 0.0}))
    save_trajectories(tmp_path / "t.jsonl", [good, Trajectory("b", turns, meta={"task_type": "walk"})])
    assert [t.meta for t in load_trajectories(tmp_path / "t.jsonl")] == [{}, {"task_type": "walk"}]
