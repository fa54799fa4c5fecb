"""Value heads from decision states: decisions as Q data, and the nested cross-validation by task
whose held-out values go through the decision benchmark's report."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from test_qnet_train import BAD, FILLER, GOOD

from qlass.decision_files import read_decisions
from qlass.decision_head import cross_validate_on_decisions
from qlass.decision_qdata import write_decision_qdata
from qlass.errors import QlassError
from qlass.qnet_data import make_groups, read_qdata
from qlass.qnet_head import QNetHeadConfig

CFG = {"folds": 4, "l2": [0.01, 1.0], "max_length": 256, "max_action_tokens": 32, "autocast": False}


def candidate(word: str, value: float, mean_logprob: float, anchor: bool) -> dict:
    return {"output": f"Thought: go on\nAction: {word}", "action": word, "logprob": 4 * mean_logprob,
            "completion_tokens": 4, "mean_logprob": mean_logprob, "anchor": anchor, "count": 1, "terminal": False,
            "reward": 0.0, "rollout_rewards": [value], "rollout_lengths": [1], "mean": value, "std": 0.0}


def decision_file(path: Path, tasks: int, split: str = "seen", first: int = 0, seed: int = 0) -> Path:
    """Two decisions per task; the candidate whose action is a GOOD word is worth 0.9, a BAD one 0.1,
    and the policy (anchor, higher likelihood) always prefers the BAD one."""
    rng = random.Random(seed)
    rows = []
    for t in range(first, first + tasks):
        history = [{"role": "user", "content": "Instruction: act well."}, {"role": "assistant", "content": "OK"},
                   {"role": "user", "content": f"Task {t}: " + " ".join(rng.choices(FILLER, k=5))}]
        for step in (0, 3):
            cands = [candidate(rng.choice(BAD), 0.1, -0.2, True), candidate(rng.choice(GOOD), 0.9, -0.8, False)]
            rows.append({"schema_version": 1, "env": "toy", "split": split, "task": f"toy/{t}", "task_type": "toy",
                         "step": step, "prefix": ["Thought: go on\nAction: wait"] * step, "history": history,
                         "played": 0, "samples": 2, "truncated": 0,
                         "candidates": cands})
            history = history + [{"role": "assistant", "content": cands[0]["output"]},
                                 {"role": "user", "content": "Observation: " + " ".join(rng.choices(FILLER, k=4))}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_decisions_become_one_sibling_group_each(tmp_path: Path) -> None:
    decisions = decision_file(tmp_path / "d.jsonl", tasks=3)
    n = write_decision_qdata([decisions], tmp_path / "q.jsonl")
    records = read_qdata(tmp_path / "q.jsonl")  # the ordinary Q data reader accepts the file
    assert n == len(records) == 3 * 2 * 2
    groups = make_groups(records, "q")
    assert len(groups) == 6 and all(len(g.records) == 2 for g in groups)
    assert len({r.tree_id for r in records}) == 3  # the task is the "tree": folds split by task
    raw = read_decisions([decisions])
    first = [r for r in records if r.group == groups[0].group]
    assert [r.q for r in first] == [c["mean"] for c in raw[0]["candidates"]]
    assert [r.action for r in first] == [c["output"] for c in raw[0]["candidates"]]
    assert [m.content for m in first[0].messages] == [m["content"] for m in raw[0]["history"]]


def test_cross_validated_head_beats_the_likelihood_and_never_scores_a_fitted_task(tiny_model_dir: Path,
                                                                                    tmp_path: Path) -> None:
    decisions = decision_file(tmp_path / "d.jsonl", tasks=12)
    extra = decision_file(tmp_path / "train.jsonl", tasks=4, split="train", first=100, seed=1)
    out = tmp_path / "cv"
    result = cross_validate_on_decisions([decisions], tiny_model_dir, out, QNetHeadConfig(**CFG), extra=[extra])
    rows = {r["ranker"]: r for r in result["groups"][0]["rows"]}
    assert result["groups"][0]["decisions"] == 24 and result["extra_decisions"] == 8
    assert rows["likelihood"]["accuracy"] == 0.0 and rows["anchor"]["accuracy"] == 0.0
    assert rows["qnet"]["accuracy"] >= 0.9
    assert rows["qnet"]["vs"]["likelihood"]["accuracy"]["ci_low"] > 0
    assert [f["fold"] for f in result["folds"]] == [1, 2, 3, 4] and sum(f["tasks"] for f in result["folds"]) == 12
    # each fold's head is fitted on the other folds' tasks and the extra ones, never on a task it scores
    assert all(f["fitted_on"] == 12 - f["tasks"] + 4 for f in result["folds"]), result["folds"]
    assert "cross-validated by task" in (out / "decisions.md").read_text()
    assert json.loads((out / "decision_cv.json").read_text())["extra"] == [str(extra)]
    features = (out / "features.jsonl").read_text()
    # a rerun reads its features back instead of recomputing them
    again = cross_validate_on_decisions([decisions], tiny_model_dir, out, QNetHeadConfig(**CFG), extra=[extra])
    assert (out / "features.jsonl").read_text() == features
    assert again["groups"] == result["groups"]
    with pytest.raises(QlassError, match="both in the scored decisions and in the extra ones"):
        cross_validate_on_decisions([decisions], tiny_model_dir, tmp_path / "cv2", QNetHeadConfig(**CFG),
                                    extra=[decision_file(tmp_path / "same.jsonl", tasks=2)])


def test_cli_names_a_bad_decision_record(tmp_path: Path) -> None:
    decisions = decision_file(tmp_path / "d.jsonl", tasks=1)
    rows = [json.loads(x) for x in decisions.read_text().splitlines()]
    rows[1]["candidates"][1]["mean"] = "high"
    decisions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = subprocess.run([sys.executable, "-m", "qlass", "decisions", "to-qdata", str(decisions), "--out",
                          str(tmp_path / "q.jsonl")], capture_output=True, text=True)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert "d.jsonl" in run.stderr and "candidates[1].mean" in run.stderr
    assert not (tmp_path / "q.jsonl").exists()


def test_candidate_limit_is_checked_when_read(tmp_path: Path) -> None:
    rec = json.loads(decision_file(tmp_path / "d.jsonl", tasks=1).read_text().splitlines()[0])
    rec["candidates"] = [candidate("north", 0.5, -0.1, False)] * 1000  # node ids hold at most 999 a step
    (tmp_path / "big.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(QlassError, match=r"big.jsonl, line 1 .*'candidates': a decision needs 2 to 999, got 1000"):
        read_decisions([tmp_path / "big.jsonl"])


def test_cross_validation_refuses_extra_decisions_of_another_environment(tmp_path: Path) -> None:
    scored = decision_file(tmp_path / "d.jsonl", tasks=2)
    other = decision_file(tmp_path / "e.jsonl", tasks=2, first=5)
    other.write_text(other.read_text().replace('"env": "toy"', '"env": "alfworld"'))
    with pytest.raises(QlassError, match=r"scored decisions are from 'toy' \(.*d.jsonl\), the extra ones from "
                                         r"'alfworld' \(.*e.jsonl\)"):
        cross_validate_on_decisions([scored], "unused-model", tmp_path / "cv", QNetHeadConfig(), extra=[other])
