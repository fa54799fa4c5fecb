"""The files of a decision collection kept consistent: decision files read together were collected
alike, a settings file cut by hand is no settings file, lost decisions are found again on resume,
and log-probabilities are given in every decision of a file or in none."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_decisions import Fork, ScriptedPolicy

from qlass.decision_files import check_pooled, read_decisions
from qlass.decision_head import cross_validate_on_decisions
from qlass.decision_qdata import write_decision_qdata
from qlass.decision_report import write_decision_report
from qlass.decisions import DecisionConfig, collect_decisions
from qlass.errors import QlassError
from qlass.jsonl import read_jsonl
from qlass.qnet_head import QNetHeadConfig
from qlass.types import Completion

SETTINGS = {"model": "scripted", "env": "fork", "policy": {}}


def collect(out: Path, split: str = "seen", tasks: int = 2, **options) -> Path:
    """Decisions of ``tasks`` Fork tasks of ``split``, collected with ``options``."""
    cfg = DecisionConfig(**{"m": 3, "k": 2, **options})
    collect_decisions(Fork, Fork(tasks).tasks(split), ScriptedPolicy(), cfg, out,
                      settings={**SETTINGS, "splits": [split]})
    return out


def test_files_collected_with_other_settings_are_not_pooled(tmp_path: Path, caplog) -> None:
    """report, to-qdata and cv-head pooled any decision files: decisions valued by other models, K or
    temperatures were scored as one measurement. The split (and the other settings that choose tasks)
    may differ; anything else is refused unless asked for, and the report then says so."""
    seen, unseen = collect(tmp_path / "seen.jsonl"), collect(tmp_path / "unseen.jsonl", "unseen")
    other_k = collect(tmp_path / "k3.jsonl", "unseen", k=3)
    assert len(write_decision_report([seen, unseen], tmp_path / "ok")["files"]) == 2  # only the split differs

    named = r"k3.jsonl was collected with other settings than .*seen.jsonl \(options.k: 2 → 3; see .*k3.config.yaml"
    with pytest.raises(QlassError, match=named):
        write_decision_report([seen, other_k], tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()
    with pytest.raises(QlassError, match=named):
        write_decision_qdata([seen, other_k], tmp_path / "q.jsonl")
    with pytest.raises(QlassError, match=named):  # refused before any model loads
        cross_validate_on_decisions([seen, other_k], "unused-model", tmp_path / "cv", QNetHeadConfig())

    result = write_decision_report([seen, other_k], tmp_path / "mixed", allow_mixed=True)
    assert result["mixed_settings"] == [f"{other_k}: options.k: 2 → 3"]
    assert "pool files collected with other settings" in (tmp_path / "mixed" / "decisions.md").read_text()
    assert json.loads((tmp_path / "mixed" / "decisions.json").read_text())["mixed_settings"] == result["mixed_settings"]
    assert write_decision_qdata([seen, other_k], tmp_path / "q.jsonl", allow_mixed=True) > 0

    model = yaml.safe_load((tmp_path / "unseen.config.yaml").read_text())
    (tmp_path / "unseen.config.yaml").write_text(yaml.safe_dump({**model, "model": "another", "offset": 30}))
    with pytest.raises(QlassError, match=r"model: 'scripted' → 'another'"):  # offset may differ, the model not
        check_pooled([seen, unseen])

    (tmp_path / "unseen.config.yaml").unlink()
    with caplog.at_level(logging.WARNING):
        assert check_pooled([seen, unseen]) == []
    assert f"no settings file beside {unseen}" in caplog.text


@pytest.mark.slow
def test_cli_allow_mixed_settings(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The CLI refuses the mixed files with one line and pools them with --allow-mixed-settings."""
    seen, other = collect(tmp_path / "seen.jsonl"), collect(tmp_path / "t.jsonl", "unseen", temperature=0.9)
    for cmd in (["report", str(seen), str(other), "--out", str(tmp_path / "r")],
                ["to-qdata", str(seen), str(other), "--out", str(tmp_path / "q.jsonl")],
                ["cv-head", str(seen), str(other), "--out", str(tmp_path / "cv"), "--model", str(tiny_model_dir)]):
        run = subprocess.run([sys.executable, "-m", "qlass", "decisions", *cmd], capture_output=True, text=True)
        assert run.returncode != 0 and "Traceback" not in run.stderr
        assert "options.temperature: 0.7 → 0.9" in run.stderr and "--allow-mixed-settings" in run.stderr
        if cmd[0] != "cv-head":  # cv-head's fit needs more tasks than these; its refusal is what is checked
            again = subprocess.run([sys.executable, "-m", "qlass", "decisions", *cmd, "--allow-mixed-settings"],
                                   capture_output=True, text=True)
            assert again.returncode == 0, again.stderr


def test_a_settings_file_emptied_by_hand_records_no_settings(tmp_path: Path) -> None:
    """``options: {}`` (or options without K, M, ...) let a rerun with any options add to the file."""
    out = collect(tmp_path / "d.jsonl", tasks=1)
    config = tmp_path / "d.config.yaml"
    recorded = yaml.safe_load(config.read_text())
    for options in ({}, {k: v for k, v in recorded["options"].items() if k != "k"}):
        config.write_text(yaml.safe_dump({**recorded, "options": options}))
        with pytest.raises(QlassError, match=r"d.config.yaml does not record .*'options.k'"):
            collect(out, tasks=1, k=3)


def test_decisions_lost_from_the_file_are_found_again(tmp_path: Path, caplog) -> None:
    """Resume trusted NAME.tasks.jsonl: a finished task's decisions missing from the decisions file
    (lines lost or cut) were never collected again. Each task line counts its decisions, so the task
    is played again and only the missing decisions are valued."""
    out = collect(tmp_path / "d.jsonl", tasks=3)
    full = read_jsonl(out)
    assert len(full) == 6
    kept = [r for i, r in enumerate(full) if i not in (1, 4)]
    out.write_text("".join(json.dumps(r) + "\n" for r in kept))
    with caplog.at_level(logging.WARNING):
        collect(out, tasks=3)
    assert "holds 1 of the 2 decisions" in caplog.text
    again = read_jsonl(out)
    assert sorted(map(json.dumps, again)) == sorted(map(json.dumps, full))  # the same decisions, none twice
    caplog.clear()
    collect(out, tasks=3)  # nothing missing now: nothing redone
    assert read_jsonl(out) == again and "played again" not in caplog.text


class LogprobsAtTheStartOnly(ScriptedPolicy):
    """Gives log-probabilities on the first step's candidates and none on the bridge's (none at all
    with ``everywhere``)."""

    def __init__(self, everywhere: bool = False) -> None:
        super().__init__()
        self.everywhere = everywhere

    def sample(self, histories, n=1, temperature=0.0, max_new_tokens=128, seed=None) -> list[list[Completion]]:
        rows = super().sample(histories, n, temperature, max_new_tokens, seed)
        return [[Completion(c.text, c.prompt_tokens, c.completion_tokens, None, c.truncated)
                 if self.everywhere or "bridge" in h[-1].content else c for c in row]
                for h, row in zip(histories, rows, strict=True)]


def test_log_probabilities_in_some_decisions_only_stop_the_collection(tmp_path: Path) -> None:
    """Each decision passed its own check, so the file got decisions with and without
    log-probabilities, which every reader then refused. The collection now stops before valuing them,
    and a file it already wrote keeps its first decision's kind."""
    out = tmp_path / "d.jsonl"
    with pytest.raises(QlassError, match=r"at task fork/seen/0 step 1 the policy gave no log-probabilities but the "
                                         r"first decision of this run has them"):
        collect_decisions(Fork, Fork(1).tasks("seen"), LogprobsAtTheStartOnly(), DecisionConfig(m=3, k=2), out)
    assert read_jsonl(out) == []

    collect(out, tasks=1, max_decisions_per_task=1)  # the start's decision only, with log-probabilities
    with pytest.raises(QlassError, match=r"d.jsonl's first decision \(fork/seen/0 step 0\) has them"):
        collect_decisions(Fork, Fork(2).tasks("seen")[1:], LogprobsAtTheStartOnly(everywhere=True),
                          DecisionConfig(m=3, k=2, max_decisions_per_task=1), out,
                          settings={**SETTINGS, "splits": ["seen"]})
    assert len(read_decisions([out])) == 1


def _edit(rec: dict, field: str, value) -> None:
    """Set the dotted ``field`` (``candidates.1.count``) of ``rec``."""
    *path, last = field.split(".")
    for key in path:
        rec = rec[int(key)] if isinstance(rec, list) else rec[key]
    rec[int(last) if isinstance(rec, list) else last] = value


@pytest.mark.parametrize(("field", "value", "named"), [
    ("candidates.1.count", 0, r"'candidates\[1\]\.count' must be an integer >= 1"),
    ("candidates.0.completion_tokens", -3, r"'candidates\[0\]\.completion_tokens' must be an integer >= 0"),
    ("candidates.0.reward", 7.0, r"'candidates\[0\]\.reward' must be null or a number in \[0, 1\]"),
    ("candidates.0.rollout_lengths", [1], r"'candidates\[0\]': 2 'rollout_rewards' but 1 'rollout_lengths'"),
    ("candidates.0.rollout_lengths", [1, -1], r"'candidates\[0\]\.rollout_lengths' must be null or a list"),
    ("candidates.1.mean_logprob", -0.001, r"'candidates\[1\]\.mean_logprob' is -0\.001 but 'logprob' / "),
    ("candidates.1.logprob_tokens", 99, r"'candidates\[1\]\.logprob_tokens' must be an integer >= 0, at most "),
    ("candidates.1.logprob_tokens", 1, r"'candidates\[1\]\.mean_logprob' is -?[0-9.]+ but 'logprob' / "
                                       r"'logprob_tokens' is"),
    ("played", 9, r"field 'played' must be null or a candidate's index \(0 to 2\)"),
    ("prefix", ["x", "y"], r"field 'prefix' must list the 0 output\(s\) played before step 0"),
    ("samples", 9, r"field 'samples' is 9 but the candidates' counts \(3\) and 'truncated' \(0\) add up to 3"),
    ("truncated", -1, r"field 'truncated' must be an integer >= 0"),
    ("candidates.2.output", "Thought: other words\nAction:   Go  Left ", r"'candidates\[2\]' is the same action as "
                                                                         r"candidates\[1\]"),
])
def test_impossible_decision_fields_are_named(tmp_path: Path, field: str, value, named: str) -> None:
    """Fields the readers did not check (counts, rollout lengths, the played index, the prefix, repeated
    candidates) could hold values no collection writes; each is now named with its record."""
    rec = read_jsonl(collect(tmp_path / "d.jsonl", tasks=1, max_decisions_per_task=1))[0]
    assert [c["action"] for c in rec["candidates"]] == ["go right", "go left", "look"] and rec["samples"] == 3
    _edit(rec, field, value)
    (tmp_path / "bad.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(QlassError, match=r"bad.jsonl, line 1 \(id 'fork/seen/0@0'\): (field )?" + named):
        read_decisions([tmp_path / "bad.jsonl"])


def test_splits_and_tasks_that_would_share_a_tree_id_are_refused(tmp_path: Path) -> None:
    """Q data names a decision's tree split/task: split 'a/b' with task 'c' and split 'a' with task 'b/c'
    were one tree, their candidates pooled into one sibling group family."""
    rec = read_jsonl(collect(tmp_path / "d.jsonl", tasks=1, max_decisions_per_task=1))[0]
    rows = [{**rec, "split": "a/b", "task": "c"}, {**rec, "split": "a", "task": "b/c"}]
    (tmp_path / "two.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(QlassError, match=r"task 'c' of split 'a/b' and task 'b/c' of split 'a' would both be Q-data "
                                         r"tree 'a/b/c'"):
        write_decision_qdata([tmp_path / "two.jsonl"], tmp_path / "q.jsonl")


def test_cv_head_output_problems_come_first_and_a_failed_run_leaves_no_folder(tmp_path: Path) -> None:
    """cv-head found an output that could not be written (decisions.md a folder) only after computing
    every feature, and a model that did not load left an empty --out folder behind."""
    seen, unseen = collect(tmp_path / "seen.jsonl"), collect(tmp_path / "unseen.jsonl", "unseen")
    (tmp_path / "cv" / "decisions.md").mkdir(parents=True)
    with pytest.raises(QlassError, match=r"cv/decisions.md: is a folder"):  # before the model is looked for
        cross_validate_on_decisions([seen, unseen], tmp_path / "no-model", tmp_path / "cv", QNetHeadConfig(folds=2))
    with pytest.raises(QlassError, match=r"no-model: not a model folder \(no config\.json\)"):
        cross_validate_on_decisions([seen, unseen], tmp_path / "no-model", tmp_path / "new", QNetHeadConfig(folds=2))
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    # a folder that was there before stays
    with pytest.raises(QlassError, match=r"no-model: not a model folder \(no config\.json\)"):
        cross_validate_on_decisions([seen, unseen], tmp_path / "no-model", tmp_path / "kept", QNetHeadConfig(folds=2))
    assert (tmp_path / "kept").is_dir()


def test_a_decision_recorded_twice_in_the_collected_file_is_refused(tmp_path: Path) -> None:
    """A copied line counted towards its task's decisions, so a lost decision of that task looked
    complete and was never replayed; collect ended well and left a file report refused."""
    out = collect(tmp_path / "d.jsonl", tasks=2)
    rows = read_jsonl(out)
    out.write_text("".join(json.dumps(r) + "\n" for r in [rows[0], rows[0], *rows[2:]]))
    with pytest.raises(QlassError, match=r"d.jsonl, line 2: decision \('fork', 'seen', 'fork/seen/0', 0\) is "
                                          r"also at line 1"):
        collect(out, tasks=2)


def test_pooled_settings_files_cut_by_hand_or_not_files_are_refused(tmp_path: Path) -> None:
    """A settings file cut to a few keys was compared on those alone (k=2 and k=3 pooled without a
    word), and a named pipe there blocked the readers and collect."""
    import os

    seen, other_k = collect(tmp_path / "a.jsonl"), collect(tmp_path / "b.jsonl", "unseen", k=3)
    (tmp_path / "b.config.yaml").write_text("env_args:\n  tasks: 3\n")
    with pytest.raises(QlassError, match=r"b.config.yaml does not record 'model', 'env', 'seed', 'options', "
                                         r"'options.m'.*cannot be compared"):
        write_decision_report([seen, other_k], tmp_path / "r")
    result = write_decision_report([seen, other_k], tmp_path / "r", allow_mixed=True)
    assert f"{other_k}: does not record 'options.k'" in result["mixed_settings"]
    (tmp_path / "b.config.yaml").unlink()
    os.mkfifo(tmp_path / "b.config.yaml")
    with pytest.raises(QlassError, match=r"b.config.yaml: is a named pipe \(FIFO\), not a regular file"):
        check_pooled([seen, other_k])
    with pytest.raises(QlassError, match=r"b.config.yaml: is a named pipe \(FIFO\), not a regular file"):
        collect(other_k, "unseen", k=3)


def test_to_qdata_writes_over_q_data_only(tmp_path: Path) -> None:
    """to-qdata wrote over any file but its inputs: the input's NAME.tasks.jsonl, another collection's
    decisions, evaluation records."""
    seen, other = collect(tmp_path / "a.jsonl"), collect(tmp_path / "b.jsonl", "unseen")
    for target in (tmp_path / "a.tasks.jsonl", other, tmp_path / "a.config.yaml"):
        before = target.read_bytes()
        with pytest.raises(QlassError, match=rf"{target.name}: exists and is not a Q-data file"):
            write_decision_qdata([seen], target)
        assert target.read_bytes() == before
    assert write_decision_qdata([seen], tmp_path / "q.jsonl") == write_decision_qdata([seen], tmp_path / "q.jsonl")


def test_other_files_are_named_for_what_they_are(tmp_path: Path) -> None:
    """Evaluation records given to a decisions reader were "field 'history' missing (id '…@None')"; a
    task clash between the scored and --extra files that only shared a tree id was called the same task."""
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"schema_version": 1, "method": "greedy", "trajectory": {}, "task": "t"}) + "\n")
    with pytest.raises(QlassError, match=r"records.jsonl, line 1: this is evaluation records \(qlass eval's "
                                         r"records.jsonl\), not a decisions file"):
        read_decisions([records])
    rec = read_jsonl(collect(tmp_path / "d.jsonl", tasks=1, max_decisions_per_task=1))[0]
    (tmp_path / "s.jsonl").write_text(json.dumps({**rec, "split": "a/b", "task": "c"}) + "\n")
    (tmp_path / "e.jsonl").write_text(json.dumps({**rec, "split": "a", "task": "b/c"}) + "\n")
    with pytest.raises(QlassError, match=r"task 'c' of split 'a/b' \(scored\) and task 'b/c' of split 'a' \(extra\) "
                                         r"would both be Q-data tree 'a/b/c'"):
        cross_validate_on_decisions([tmp_path / "s.jsonl"], "unused-model", tmp_path / "cv", QNetHeadConfig(),
                                    extra=[tmp_path / "e.jsonl"])


@pytest.mark.slow
def test_a_failed_command_leaves_no_folder_it_made_for_an_output_file(tmp_path: Path) -> None:
    """A command writing a file (to-qdata, paraphrase, collect) left the folder it had made for it,
    holding only the writer lock, when it failed."""
    run = subprocess.run([sys.executable, "-m", "qlass", "decisions", "to-qdata", str(tmp_path / "none.jsonl"),
                          "--out", str(tmp_path / "new" / "deeper" / "q.jsonl")], capture_output=True, text=True)
    assert run.returncode != 0 and "none.jsonl" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "new").exists()


def test_decision_problems_name_the_line_an_editor_shows(tmp_path: Path) -> None:
    """Decision readers said ``record N`` (the record's index) where the other readers name the file's
    line: with blank lines between records the two differ, and the index sent users to the wrong line."""
    rows = read_jsonl(collect(tmp_path / "d.jsonl", tasks=2))
    bad = {**rows[1], "step": -1}
    (tmp_path / "gaps.jsonl").write_text(json.dumps(rows[0]) + "\n\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(QlassError, match=r"gaps.jsonl, line 4 \(id '.*@-1'\): field 'step' must be an integer >= 0"):
        read_decisions([tmp_path / "gaps.jsonl"])
