"""Paired differences pooled over replicates (several agents of one recipe), from hand-made records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qlass.cli import app
from qlass.compare import paired_interval
from qlass.errors import QlassError
from qlass.jsonl import write_jsonl
from qlass.replicates import replicate_rows, write_replicates


def rec(method: str, task: str, reward: float, split: str = "seen", oracle: bool = False) -> dict:
    name = method.partition("(")[0]
    config = {"m": 4} if name == "qlass" else {}
    return {"schema_version": 1, "method": method, "method_name": name, "config": config, "env": "e", "split": split,
            "task": task, "task_type": "x", "reward": reward, "success": reward == 1.0, "prompt_tokens": 100,
            "completion_tokens": 10, "qnet_tokens": 0, "env_steps": 3, "wall_time": 1.0, "steps": 3,
            "trajectory": {}, "oracle": oracle}


def played(method: str, rewards: dict[str, float], split: str = "seen") -> list[dict]:
    return [rec(method, task, reward, split) for task, reward in rewards.items()]


# B0 pairs qlass with greedy on t1, t2, t3 (differences +1, 0, 0); B1 never finished greedy on t3, so
# only t1 and t2 count (B0: +1, 0; B1: 0, +1); per task the averages are +0.5 and +0.5.
B0 = (played("greedy", {"t1": 0.0, "t2": 1.0, "t3": 0.5}) + played("qlass(m=4)", {"t1": 1.0, "t2": 1.0, "t3": 0.5})
      + played("greedy", {"u1": 0.0, "u2": 0.0}, "unseen") + played("qlass(m=4)", {"u1": 0.0, "u2": 1.0}, "unseen")
      + played("sample", {"t1": 1.0}) + [rec("qlass(m=4)[oracle]", "t1", 1.0, oracle=True)])
B1 = (played("greedy", {"t1": 0.0, "t2": 0.0}) + played("qlass(m=4)", {"t1": 0.0, "t2": 1.0, "t3": 1.0})
      + played("greedy", {"u1": 0.5, "u2": 0.0}, "unseen") + played("qlass(m=4)", {"u1": 0.0, "u2": 0.0}, "unseen")
      + [rec("qlass(m=4)[oracle]", "t1", 1.0, oracle=True)])


def test_differences_are_paired_within_each_replicate_then_averaged_per_task() -> None:
    rows = {(r["split"], r["method"]): r for r in replicate_rows({"B0": B0, "B1": B1})}
    assert set(rows) == {("seen", "qlass(m=4)"), ("unseen", "qlass(m=4)"), ("all", "qlass(m=4)")}  # no sample, oracle
    seen = rows[("seen", "qlass(m=4)")]
    assert seen["tasks"] == 2 and seen["mean_diff"] == 0.5 and (seen["ci_low"], seen["ci_high"]) == (0.5, 0.5)
    assert seen["replicates"]["B0"] == {"avg_reward": 1.0, "baseline_avg_reward": 0.5, "mean_diff": 0.5}
    assert seen["replicates"]["B1"] == {"avg_reward": 0.5, "baseline_avg_reward": 0.0, "mean_diff": 0.5}
    assert (seen["wins"], seen["ties"], seen["losses"]) == (2, 0, 0)
    unseen = rows[("unseen", "qlass(m=4)")]  # u1: (0 − 0.5) / 2 = −0.25; u2: (1 + 0) / 2 = +0.5
    assert unseen["mean_diff"] == pytest.approx(0.125) and (unseen["wins"], unseen["losses"]) == (1, 1)
    pooled = rows[("all", "qlass(m=4)")]  # four (split, task) units, each averaged over both replicates
    units = [0.5, 0.5, -0.25, 0.5]  # (seen, t1), (seen, t2), (unseen, u1), (unseen, u2)
    assert pooled["tasks"] == 4 and pooled["mean_diff"] == pytest.approx(sum(units) / 4)
    assert (pooled["ci_low"], pooled["ci_high"]) == paired_interval(units, 10_000, 0, 0.95)
    assert pooled["ci_low"] < pooled["mean_diff"] < pooled["ci_high"]
    assert pooled["replicates"]["B1"]["mean_diff"] == pytest.approx((0 + 1 - 0.5 + 0) / 4)


def test_an_oracle_baseline_or_a_single_replicate_is_refused(tmp_path: Path) -> None:
    with pytest.raises(QlassError, match="oracle"):
        replicate_rows({"B0": B0, "B1": B1}, baseline="qlass(m=4)[oracle]")
    with pytest.raises(QlassError, match="at least two"):
        write_replicates({"B0": B0}, tmp_path)
    with pytest.raises(QlassError, match="replicate B1 has no record of it"):
        write_replicates({"B0": B0, "B1": B1}, tmp_path, baselines=["sample"])


def test_report_replicate_writes_the_pooled_table(tmp_path: Path) -> None:
    a, b = tmp_path / "b0.jsonl", tmp_path / "b1.jsonl"
    write_jsonl(a, B0)
    write_jsonl(b, B1)
    out = tmp_path / "rep"
    res = CliRunner().invoke(app, ["report", "--replicate", f"B0={a}", "--replicate", f"B1={b}", "--out", str(out)])
    assert res.exit_code == 0, res.output
    saved = json.loads((out / "replicates.json").read_text())
    assert saved["replicates"] == ["B0", "B1"] and len(saved["rows"]) == 3
    md = (out / "replicates.md").read_text()
    assert "| e | seen | qlass(m=4) | greedy | 2 | 100.0 / 50.0, +50.0 | 50.0 / 0.0, +50.0 | +50.0 " in md
    assert "95% interval" in md and "replicates are held fixed" in md
    for bad, message in ((["--replicate", f"B0={a}"], "at least two"),
                         (["--replicate", f"B0={a}", "--replicate", f"B1={a}"], "is also replicate B0's file"),
                         (["--replicate", f"B0={a}", "--replicate", f"B0={b}"], "given twice"),
                         ([str(a), "--replicate", f"B0={a}", "--replicate", f"B1={b}"], "not both"),
                         (["--side", f"B0={a}", "--side", f"B1={b}", "--replicate", f"B0={a}",
                           "--replicate", f"B1={b}"], "--side or --replicate"),
                         (["--replicate", f"B0={a}", "--replicate", f"B1={b}", "--all-tasks"], "--all-tasks"),
                         (["--replicate", f"B0={a}", "--replicate", f"B1={b}", "--baseline", "sample"],
                          "replicate B1 has no record of it")):
        res = CliRunner().invoke(app, ["report", *bad, "--out", str(tmp_path / "bad")])
        assert res.exit_code != 0 and message in res.output + str(res.exception), (bad, res.output)
