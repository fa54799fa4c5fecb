"""Result tables and budget curves computed from hand-made evaluation records."""

from __future__ import annotations

import json

import pytest

from qlass.compare import bootstrap_interval, paired_rows
from qlass.report import budget_points, summarise, write_report


def rec(method, name, task, reward, tokens, config=None, **extra):
    return {"method": method, "method_name": name, "config": config or {}, "env": "e", "split": "seen",
            "task": task, "reward": reward, "success": reward == 1.0, "prompt_tokens": 100,
            "completion_tokens": tokens, "qnet_tokens": 0, "env_steps": 3, "wall_time": 1.0,
            "oracle": False, **extra}


def cand(reward, score, tokens):
    return {"reward": reward, "score": score, "completion_tokens": tokens}


RECORDS = [
    rec("greedy", "greedy", "t1", 1.0, 10),
    rec("greedy", "greedy", "t2", 0.0, 30),
    rec("qlass(m=2)", "qlass", "t1", 1.0, 40, {"m": 2}, qnet_choices=1),
    rec("qlass(m=2)", "qlass", "t2", 0.5, 60, {"m": 2}, qnet_choices=4),
    rec("best-of-n(n=2,qnet)", "best-of-n", "t1", 0.0, 50, {"n": 2}, qnet_tokens=80,
        candidates=[cand(0.0, 0.9, 20), cand(1.0, 0.1, 30)], oracle_pass_at_n=1.0),
    rec("best-of-n(n=2,qnet)", "best-of-n", "t2", 1.0, 70, {"n": 2}, qnet_tokens=100,
        candidates=[cand(0.5, 0.1, 40), cand(1.0, 0.7, 30)], oracle_pass_at_n=1.0),
]


def test_summary_rows_average_over_tasks_and_label_oracle() -> None:
    rows = {r["method"]: r for r in summarise(RECORDS)}
    assert rows["greedy"]["avg_reward"] == 0.5 and rows["greedy"]["success_rate"] == 0.5
    assert rows["greedy"]["completion_tokens"] == 20
    assert rows["qlass(m=2)"]["avg_reward"] == 0.75
    assert rows["qlass(m=2)"]["qnet_choices"] == 2.5 and "qnet_choices" not in rows["greedy"]
    oracle = rows["best-of-n(n=2,qnet) pass@N [oracle]"]
    assert oracle["avg_reward"] == 1.0 and oracle["oracle"] is True
    assert rows["best-of-n(n=2,qnet)"]["qnet_tokens"] == 90 and oracle["qnet_tokens"] == 0  # the reward picked
    assert oracle["completion_tokens"] == 60  # all N samples were drawn


def test_budget_curve_reads_best_of_n_prefixes() -> None:
    pts = {(p["curve"], p["budget_param"]): p for p in budget_points(RECORDS)}
    # N=1: first candidate of each task: rewards 0.0 and 0.5, tokens 20 and 40
    assert pts[("best-of-n", 1)]["avg_reward"] == 0.25 and pts[("best-of-n", 1)]["completion_tokens"] == 30
    # N=2: argmax score: t1 → cand 0 (0.0), t2 → cand 1 (1.0); tokens 50 and 70
    assert pts[("best-of-n", 2)]["avg_reward"] == 0.5 and pts[("best-of-n", 2)]["completion_tokens"] == 60
    assert ("best-of-n", 4) not in pts
    assert pts[("qlass", 2)]["avg_reward"] == 0.75


def test_a_curve_takes_each_budget_from_one_run() -> None:
    """best-of-n(n=2) and best-of-n(n=3) share the curve best-of-n: N' = 1 and 2 came from both runs, two
    points at one budget (a zig-zag in budget.png); the larger run gives them, and the smaller its own N'."""
    wider = [rec("best-of-n(n=3,qnet)", "best-of-n", t, 1.0, 90, {"n": 3},
                 candidates=[cand(1.0, 0.9, 30), cand(0.0, 0.1, 30), cand(1.0, 0.5, 30)]) for t in ("t1", "t2")]
    more = [rec("qlass(m=3)", "qlass", t, 0.0, 30, {"m": 3}) for t in ("t1", "t2")]
    pts = [(p["curve"], p["budget_param"], p["avg_reward"]) for p in budget_points(RECORDS + wider + more)]
    assert [p for p in pts if p[0] == "best-of-n"] == [("best-of-n", 1, 1.0), ("best-of-n", 2, 1.0),
                                                       ("best-of-n", 3, 1.0)]
    assert [p for p in pts if p[0] == "qlass"] == [("qlass", 2, 0.75), ("qlass", 3, 0.0)]  # one point per run


def test_write_report_files(tmp_path) -> None:
    write_report(RECORDS, tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["schema_version"] == 1 and len(data["rows"]) == 4
    md = (tmp_path / "results.md").read_text()
    assert "| e | seen | qlass(m=2) | 2 | 75.0 | 50.0 | 50 | 100 | 0 | 2.5 | 3.0 |" in md
    assert "| e | seen | greedy | 2 | 50.0 | 50.0 | 20 | 100 | 0 | – | 3.0 |" in md
    assert "[oracle]" in md
    assert "## Paired differences" in md
    assert "| e | seen | qlass(m=2) | greedy | 2 | +25.0 | [+0.0, +50.0] | 1 / 1 / 0 |" in md
    assert len(data["paired"]) == 2
    assert (tmp_path / "budget.csv").read_text().startswith("env,split,curve,budget_param")
    assert (tmp_path / "budget.png").stat().st_size > 1000


def test_paired_differences_use_common_tasks_and_a_seeded_bootstrap() -> None:
    rows = {r["method"]: r for r in paired_rows(RECORDS)}
    assert set(rows) == {"qlass(m=2)", "best-of-n(n=2,qnet)"}  # the baseline itself is not compared
    q = rows["qlass(m=2)"]  # t1: 1.0 - 1.0, t2: 0.5 - 0.0
    assert (q["tasks"], q["mean_diff"], q["wins"], q["ties"], q["losses"]) == (2, 0.25, 1, 1, 0)
    assert q["ci_low"] == 0.0 and q["ci_high"] == 0.5
    b = rows["best-of-n(n=2,qnet)"]  # t1: 0.0 - 1.0, t2: 1.0 - 0.0
    assert (b["mean_diff"], b["wins"], b["losses"]) == (0.0, 1, 1) and b["ci_low"] == -1.0 and b["ci_high"] == 1.0
    assert paired_rows(RECORDS) == paired_rows(RECORDS)
    # only tasks both played count; oracle methods and a missing baseline give no rows
    extra = [*RECORDS, rec("qlass(m=2)", "qlass", "t3", 1.0, 10, {"m": 2}),
             rec("qlass(m=2)[oracle]", "qlass", "t1", 1.0, 10, {"m": 2}, oracle=True)]
    assert {r["method"]: r["tasks"] for r in paired_rows(extra)} == {"qlass(m=2)": 2, "best-of-n(n=2,qnet)": 2}
    assert paired_rows(RECORDS, baseline="sample") == []
    constant = [rec("greedy", "greedy", f"t{i}", 0.0, 1) for i in range(5)] + \
               [rec("qlass(m=2)", "qlass", f"t{i}", 0.5, 1) for i in range(5)]
    (row,) = paired_rows(constant)
    assert row["ci_low"] == row["ci_high"] == row["mean_diff"] == 0.5 and row["wins"] == 5


def test_swapping_method_and_baseline_negates_the_interval() -> None:
    """B − A's interval is A − B's negated, at any level: the ends lie as many places from each end of
    the sorted resampled means (the upper end was one place lower, so an interval read from the reversed
    row, negated, could differ in its last digit from the row computed directly)."""
    greedy = [0.03, 0.24, 0.8, 0.41, 0.17, 0.55, 0.7, 0.67]
    qlass = [0.83, 0.67, 0.3, 0.59, 0.88, 0.85, 0.51, 0.59]
    records = [rec("greedy", "greedy", f"t{i}", r, 10) for i, r in enumerate(greedy)] + \
              [rec("qlass(m=2)", "qlass", f"t{i}", r, 10, {"m": 2}) for i, r in enumerate(qlass)]
    for confidence in (0.95, 0.975, 0.9):
        (ahead,) = paired_rows(records, baseline="greedy", confidence=confidence)
        (behind,) = paired_rows(records, baseline="qlass(m=2)", confidence=confidence)
        assert (behind["ci_low"], behind["ci_high"]) == (-ahead["ci_high"], -ahead["ci_low"]), confidence
        assert ahead["ci_low"] < ahead["mean_diff"] < ahead["ci_high"]


def test_paired_rows_pool_the_splits_of_an_environment() -> None:
    # the same task id in two splits is two tasks; a method seen on one split only gets no pooled row
    unseen = [{**r, "split": "unseen"} for r in RECORDS if r["method"] in ("greedy", "qlass(m=2)")]
    unseen[2]["reward"] = 0.0  # qlass on unseen t1: 0.0 - 1.0
    rows = {(r["split"], r["method"]): r for r in paired_rows([*RECORDS, *unseen])}
    assert ("all", "best-of-n(n=2,qnet)") not in rows
    pooled = rows[("all", "qlass(m=2)")]  # seen: 0, +0.5; unseen: -1.0, +0.5
    assert (pooled["tasks"], pooled["mean_diff"], pooled["wins"], pooled["ties"], pooled["losses"]) == (4, 0.0, 2, 1, 1)
    assert (pooled["ci_low"], pooled["ci_high"]) == bootstrap_interval([0.0, 0.5, -1.0, 0.5], 10_000, 0)
    assert rows[("unseen", "qlass(m=2)")]["mean_diff"] == -0.25


def test_a_one_task_row_has_no_interval_and_a_split_named_all_keeps_its_row() -> None:
    """Resampling one difference gives it back: a zero-width "interval" at +50.0 read as a result. And a
    recorded split named ``all`` gave two rows keyed (env, all, method, baseline), one of them the pooled row."""
    from qlass.compare import paired_table

    one = [rec("greedy", "greedy", "t1", 0.0, 10), rec("qlass(m=2)", "qlass", "t1", 0.5, 10, {"m": 2})]
    (row,) = paired_rows(one)
    assert (row["tasks"], row["mean_diff"], row["ci_low"], row["ci_high"]) == (1, 0.5, None, None)
    assert "| e | seen | qlass(m=2) | greedy | 1 | +50.0 | — | 1 / 0 / 0 |" in paired_table([row])
    named = [{**r, "split": "all"} for r in RECORDS if r["method"] in ("greedy", "qlass(m=2)")]
    rows = {(r["split"], r["method"]) for r in paired_rows([*RECORDS, *named])}
    assert {("all", "qlass(m=2)"), ("all (pooled)", "qlass(m=2)"), ("seen", "qlass(m=2)")} <= rows


def _full(r: dict) -> dict:
    return {"schema_version": 1, "task_type": "x", "steps": 3, "trajectory": {}, **r}


def test_report_command_combines_shards_on_common_tasks(tmp_path) -> None:
    from typer.testing import CliRunner

    from qlass.cli import app
    from qlass.jsonl import write_jsonl

    shard_a, shard_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_jsonl(shard_a, [_full(r) for r in RECORDS[:4]])
    write_jsonl(shard_b, [_full(r) for r in RECORDS[4:]] + [_full(rec("greedy", "greedy", "t3", 1.0, 10))])
    res = CliRunner().invoke(app, ["report", str(shard_a), str(shard_b), "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert "| e | seen | greedy | 2 | 50.0 |" in res.output  # t3: only greedy played it
    res = CliRunner().invoke(app, ["report", str(shard_a), str(shard_b), "--out", str(tmp_path / "r"), "--all-tasks"])
    assert "| e | seen | greedy | 3 | 66.7 |" in res.output
    assert json.loads((tmp_path / "r" / "results.json").read_text())["rows"][2]["tasks"] == 3


def test_report_reader_names_file_line_and_field(tmp_path) -> None:
    import pytest

    from qlass.errors import DataError, QlassError
    from qlass.eval_records import read_records
    from qlass.jsonl import write_jsonl

    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [_full(RECORDS[0]), {**_full(RECORDS[1]), "reward": "high"}])
    with pytest.raises(DataError, match=r"bad\.jsonl.*line 2: field 'reward' must be int or float, got 'high'"):
        read_records([bad])
    twice, copy = tmp_path / "twice.jsonl", tmp_path / "copy.jsonl"
    write_jsonl(twice, [_full(RECORDS[0])])
    write_jsonl(copy, [_full(RECORDS[0])])
    with pytest.raises(DataError, match=r"line 1: greedy on seen t1 is also recorded at .*twice\.jsonl line 1"):
        read_records([twice, copy])
    # one file given twice named one place twice ("also recorded at twice.jsonl line 1" for its own line 1)
    with pytest.raises(QlassError, match=r"twice\.jsonl: given twice; give each file once"):
        read_records([twice, twice])
    # lines are the file's: blank lines count (records were counted, so an editor showed another line)
    spaced = tmp_path / "spaced.jsonl"
    spaced.write_text("\n" + json.dumps(_full(RECORDS[0])) + "\n\n\n\n" + json.dumps({**_full(RECORDS[1]), "reward": 2})
                      + "\n")
    with pytest.raises(DataError, match=r"spaced\.jsonl: line 6: field 'reward' must be in \[0, 1\], got 2"):
        read_records([spaced])
    # a NaN setting: NaN differs from itself, so the record was refused as run with other settings than itself
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps(_full({**RECORDS[0], "config": {"sampling": {"temperature": float("nan")}}})) + "\n")
    with pytest.raises(DataError, match=r"odd\.jsonl: line 1: field 'config\.sampling\.temperature' must be a finite "
                                        r"number, got nan"):
        read_records([odd])
    # a paraphrase cache is named as one
    cache = tmp_path / "para.jsonl"
    write_jsonl(cache, [{"kind": "qlass-paraphrases", "version": 1, "settings": {}}])
    with pytest.raises(DataError, match=r"para\.jsonl: line 1: this is a paraphrase cache \(qlass paraphrase\)"):
        read_records([cache])


def test_report_outputs_are_checked_before_any_is_written(tmp_path) -> None:
    """A folder at budget.png failed the report after results.json, .md and budget.csv were written:
    new files beside an old plot."""
    import pytest

    from qlass.errors import QlassError

    (tmp_path / "r" / "budget.png").mkdir(parents=True)
    with pytest.raises(QlassError, match=r"budget\.png: is a folder"):
        write_report([_full(r) for r in RECORDS], tmp_path / "r")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["budget.png"]


def test_qnet_choices_of_records_written_before_the_field() -> None:
    steps = [{"qnet_tokens": 0}, {"qnet_tokens": 12}, {"qnet_tokens": 7}]
    old = [rec("qlass(m=2)", "qlass", "t1", 1.0, 40, {"m": 2}, trajectory={"steps": steps})]
    assert summarise(old)[0]["qnet_choices"] == 2


def test_side_by_side_pairs_each_setting_with_the_first_on_common_tasks(tmp_path) -> None:
    from typer.testing import CliRunner

    from qlass.cli import app
    from qlass.jsonl import write_jsonl

    full = [rec("greedy", "greedy", t, r, 10) for t, r in (("t1", 1.0), ("t2", 1.0), ("t3", 0.5))]
    full += [rec("qlass(m=2)", "qlass", t, 1.0, 40, {"m": 2}) for t in ("t1", "t2", "t3")]
    limited = [rec("greedy", "greedy", t, r, 10) for t, r in (("t1", 0.0), ("t2", 1.0))]  # t3 not played
    limited += [rec("qlass(m=2)", "qlass", t, 1.0, 40, {"m": 2}) for t in ("t1", "t2")]
    limited += [rec("sample", "sample", "t1", 1.0, 10)]  # only one side ran it: no row
    a, b = tmp_path / "full.jsonl", tmp_path / "limited.jsonl"
    write_jsonl(a, [_full(r) for r in full])
    write_jsonl(b, [_full(r) for r in limited])
    out = tmp_path / "t3"
    res = CliRunner().invoke(app, ["report", "--side", f"full={a}", "--side", f"limited={b}", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = {r["method"]: r for r in json.loads((out / "sides.json").read_text())["rows"]}
    assert set(rows) == {"greedy", "qlass(m=2)"}
    g = rows["greedy"]
    assert g["tasks"] == 2 and g["sides"]["full"]["avg_reward"] == 1.0 and g["sides"]["limited"]["avg_reward"] == 0.5
    assert g["sides"]["limited"]["vs_first"]["mean_diff"] == -0.5
    assert g["sides"]["limited"]["vs_first"]["ci_low"] == -1.0 and g["sides"]["limited"]["vs_first"]["ci_high"] == 0.0
    assert "| e | seen | greedy | 2 | 100.0 | 50.0 | -50.0 [-100.0, +0.0] |" in (out / "sides.md").read_text()
    for bad, message in ((["--side", f"full={a}"], "at least two"),
                         (["--side", f"x{a}", "--side", f"y={b}"], "LABEL=RECORDS"),
                         (["--side", f"full={a}", "--side", f"full={b}"], "given twice"),
                         ([str(a), "--side", f"full={a}", "--side", f"y={b}"], "not both")):
        res = CliRunner().invoke(app, ["report", *bad, "--out", str(tmp_path / "bad")])
        assert res.exit_code != 0 and message in res.output + str(res.exception)


def test_report_pairs_against_each_baseline_asked_for(tmp_path) -> None:
    from typer.testing import CliRunner

    from qlass.cli import app
    from qlass.jsonl import write_jsonl

    path = tmp_path / "r.jsonl"
    write_jsonl(path, [_full(r) for r in RECORDS])
    res = CliRunner().invoke(app, ["report", str(path), "--out", str(tmp_path / "r"),
                                   "--baseline", "greedy", "--baseline", "best-of-n(n=2,qnet)"])
    assert res.exit_code == 0, res.output
    paired = json.loads((tmp_path / "r" / "results.json").read_text())["paired"]
    pairs = {(p["method"], p["baseline"]): round(p["mean_diff"], 3) for p in paired}
    # qlass 1.0, 0.5 vs greedy 1.0, 0.0 and best-of-n 0.0, 1.0
    assert pairs == {("qlass(m=2)", "greedy"): 0.25, ("best-of-n(n=2,qnet)", "greedy"): 0.0,
                     ("greedy", "best-of-n(n=2,qnet)"): 0.0, ("qlass(m=2)", "best-of-n(n=2,qnet)"): 0.25}
    assert "| qlass(m=2) | best-of-n(n=2,qnet) | 2 | +25.0 |" in (tmp_path / "r" / "results.md").read_text()
    res = CliRunner().invoke(app, ["report", str(path), "--out", str(tmp_path / "r"), "--baseline", "beam"])
    assert res.exit_code != 0 and "--baseline 'beam': no such method" in str(res.exception)


def test_report_confidence_level_widens_the_interval_and_is_named(tmp_path) -> None:
    from typer.testing import CliRunner

    from qlass.cli import app
    from qlass.errors import QlassError
    from qlass.jsonl import write_jsonl

    diffs = [0.1 * i - 0.3 for i in range(12)]
    low95, high95 = bootstrap_interval(diffs, 10_000, 0)
    low50, high50 = bootstrap_interval(diffs, 10_000, 0, confidence=0.5)
    low99, high99 = bootstrap_interval(diffs, 10_000, 0, confidence=0.99)
    assert low99 < low95 < low50 < sum(diffs) / len(diffs) < high50 < high95 < high99
    for bad in (0.0, 1.0, 95.0):
        try:
            bootstrap_interval(diffs, 100, 0, confidence=bad)
        except QlassError as err:
            assert "between 0 and 1" in str(err)
        else:
            raise AssertionError(f"confidence {bad} accepted")

    path = tmp_path / "r.jsonl"
    write_jsonl(path, [_full(r) for r in RECORDS])
    res = CliRunner().invoke(app, ["report", str(path), "--out", str(tmp_path / "r"), "--confidence", "0.975"])
    assert res.exit_code == 0, res.output
    paired = json.loads((tmp_path / "r" / "results.json").read_text())["paired"]
    assert {p["confidence"] for p in paired} == {0.975}
    assert "| 97.5% CI (bootstrap) |" in (tmp_path / "r" / "results.md").read_text()
    same = CliRunner().invoke(app,
                              ["report", "--side", f"a={path}", "--side", f"b={path}", "--out", str(tmp_path / "s")])
    assert same.exit_code != 0 and "is also side a's file" in str(same.exception)  # every difference would be 0
    other = tmp_path / "b.jsonl"
    other.write_text(path.read_text())
    sides = ["--side", f"a={path}", "--side", f"b={other}"]
    res = CliRunner().invoke(app, ["report", *sides, "--out", str(tmp_path / "s"), "--confidence", "0.9"])
    assert res.exit_code == 0, res.output
    assert "b − a [90%]" in (tmp_path / "s" / "sides.md").read_text()
    res = CliRunner().invoke(app, ["report", str(path), "--out", str(tmp_path / "x"), "--confidence", "95"])
    assert res.exit_code != 0 and "confidence must be between 0 and 1" in str(res.exception)
    assert not (tmp_path / "x").exists()


def test_report_reads_gzipped_records_like_plain_ones_and_escapes_bars_in_labels(tmp_path) -> None:
    """Shipped reference records are gzipped: the report reads them as they are. A ``|`` in a label
    (a paraphrase cache's name) stays inside its cell of the markdown tables."""
    import gzip

    from typer.testing import CliRunner

    from qlass.cli import app
    from qlass.jsonl import write_jsonl

    plain, packed = tmp_path / "records.jsonl", tmp_path / "packed" / "records.jsonl.gz"
    bar = [_full(rec("qlass(m=2,paraphrase=a|b)", "qlass", t, 1.0, 9, {"m": 2})) for t in ("t1", "t2")]
    write_jsonl(plain, [_full(r) for r in RECORDS[:2]] + bar)
    packed.parent.mkdir()
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    for src, out in ((plain, tmp_path / "r1"), (packed, tmp_path / "r2")):
        res = CliRunner().invoke(app, ["report", str(src), "--out", str(out)])
        assert res.exit_code == 0, res.output
    assert (tmp_path / "r1" / "results.md").read_text() == (tmp_path / "r2" / "results.md").read_text()
    md = (tmp_path / "r1" / "results.md").read_text()
    lines = md.splitlines()
    heads = [line for line in lines if line.startswith("| env | split | method |")]
    rows = [line for line in lines if "paraphrase=a" in line]
    assert len(heads) == len(rows) == 2 and all(r"a\|b" in line for line in rows)
    assert [line.replace(r"\|", "").count("|") for line in rows] == [line.count("|") for line in heads]


# the Best-of-4 tables (fifteenth and sixteenth sessions) are reported against Best-of-4, then greedy
BESTOF4_THEN_GREEDY = ["--baseline", "best-of-n(n=4,qnet,anchor=greedy,beta=1)", "--baseline", "greedy"]
SHIPPED_TABLES = {
    "episodes180": (["episodes60/records.jsonl.gz", "ablations60/records.jsonl.gz", "episodes120/records-more.jsonl.gz",
                     "episodes180/records-third.jsonl.gz"],
                    ["--all-tasks", "--baseline", "qlass(m=4,anchor=greedy,select=random)", "--baseline", "greedy",
                     "--confidence", "0.975"]),
    "bestofn60": (["bestofn60/records.jsonl.gz"], BESTOF4_THEN_GREEDY),
    "backbones60/B0": (["backbones60/B0/records.jsonl.gz"], BESTOF4_THEN_GREEDY),
    "backbones60/B2": (["backbones60/B2/records.jsonl.gz"], BESTOF4_THEN_GREEDY),
}


@pytest.mark.parametrize("table", sorted(SHIPPED_TABLES))
def test_the_shipped_reference_records_rebuild_their_published_tables(tmp_path, table: str) -> None:
    """docs/results.md's 180-task table (docs/reference/guidance/episodes180), the fifteenth session's
    Best-of-4 table (bestofn60) and the sixteenth's backbones' (backbones60/B0, B2) come from the gzipped
    reference records by the commands written there; this qlass must still read them and rebuild
    results.json and results.md byte for byte."""
    from pathlib import Path

    from typer.testing import CliRunner

    from qlass.cli import app

    ref = Path(__file__).resolve().parents[1] / "docs" / "reference" / "guidance"
    records, options = SHIPPED_TABLES[table]
    res = CliRunner().invoke(app, ["report", *(str(ref / r) for r in records), *options, "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    for name in ("results.json", "results.md"):
        assert (tmp_path / name).read_bytes() == (ref / table / name).read_bytes(), name


def test_report_refuses_runs_of_other_settings_unless_allowed(tmp_path) -> None:
    """Two evaluation runs' records (another model, each run's config.yaml beside them) were pooled into
    one row without a word; shards of one run (other tasks, offset, machine) still pool."""
    from typer.testing import CliRunner

    from qlass.cli import app
    from qlass.config import save_yaml
    from qlass.jsonl import write_jsonl

    def run(name: str, model: str, records: list, **extra) -> str:
        folder = tmp_path / name
        write_jsonl(folder / "records.jsonl", [_full(r) for r in records])
        save_yaml(folder / "config.yaml", {"model": model, "qnet": None, "env": "e", "env_args": {}, "seed": 0,
                                           "policy": {}, "offset": 0, "limit": 1, "methods": [], **extra})
        return str(folder / "records.jsonl")

    a = run("a", "models/sft", RECORDS[:4:2])  # t1 of greedy and qlass
    b = run("b", "models/other", RECORDS[1:4:2])  # t2 of both
    res = CliRunner().invoke(app, ["report", a, b, "--out", str(tmp_path / "r")])
    assert "b/records.jsonl was evaluated with other settings than" in str(res.exception)
    assert "model: 'models/sft' → 'models/other'" in str(res.exception) and not (tmp_path / "r").exists()
    res = CliRunner().invoke(app, ["report", a, b, "--out", str(tmp_path / "r"), "--allow-mixed-settings"])
    assert res.exit_code == 0, res.output
    assert "| e | seen | greedy | 2 | 50.0 |" in res.output
    # shards of one run: other tasks, offset and model files (another machine's copy) pool; a QNet only one used too
    shard = run("c", "models/sft", RECORDS[1:4:2], offset=1, model_files={"config.json": [1, 2]}, qnet="q")
    res = CliRunner().invoke(app, ["report", a, shard, "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    seeded = run("d", "models/sft", RECORDS[1:4:2], seed=1)
    res = CliRunner().invoke(app, ["report", a, seeded, "--out", str(tmp_path / "s")])
    assert "seed: 0 → 1" in str(res.exception)
    # two runs with different QNets behind a first that used none: compared with each other, in any order
    other_qnet = run("e", "models/sft", [{**r, "task": "t3"} for r in RECORDS[1:4:2]], offset=2, qnet="q2")
    for files in ([a, shard, other_qnet], [shard, a, other_qnet]):
        res = CliRunner().invoke(app, ["report", *files, "--all-tasks", "--out", str(tmp_path / "q")])
        assert "e/records.jsonl was evaluated with other settings than" in str(res.exception), res.output
        assert "c/records.jsonl (qnet: 'q' → 'q2'" in str(res.exception)


def test_report_keeps_off_another_evaluation_folders_results(tmp_path) -> None:
    """--out ev2 with ev1's records replaced ev2's results.md/json: ev2 then showed ev1's table beside its own
    records (qlass view shows both). A report into the folder of the records it reads is still written."""
    from typer.testing import CliRunner

    from qlass.cli import app
    from qlass.jsonl import write_jsonl

    for name, records in (("ev1", RECORDS[:2]), ("ev2", RECORDS[2:4])):
        write_jsonl(tmp_path / name / "records.jsonl", [_full(r) for r in records])
        write_report(records, tmp_path / name)
    before = (tmp_path / "ev2" / "results.json").read_bytes()
    res = CliRunner().invoke(app, ["report", str(tmp_path / "ev1" / "records.jsonl"), "--out", str(tmp_path / "ev2")])
    assert "ev2: holds another run's records" in str(res.exception)
    assert (tmp_path / "ev2" / "results.json").read_bytes() == before
    res = CliRunner().invoke(app, ["report", str(tmp_path / "ev2" / "records.jsonl"), "--out", str(tmp_path / "ev2"),
                                   "--all-tasks"])
    assert res.exit_code == 0, res.output


def test_report_names_a_title_or_label_that_is_not_utf8(tmp_path) -> None:
    """Bytes that are not UTF-8 (held by Python as lone surrogates) were a UnicodeEncodeError traceback;
    with --side, after sides.json was written."""
    import os

    from typer.testing import CliRunner

    from qlass.cli import app
    from qlass.jsonl import write_jsonl

    records = tmp_path / "records.jsonl"
    write_jsonl(records, [_full(r) for r in RECORDS])
    res = CliRunner().invoke(app, ["report", str(records), "--out", str(tmp_path / "r"), "--title",
                                   os.fsdecode(b"T\xff")])
    assert "--title 'T\\udcff': not valid UTF-8 text" in str(res.exception)
    label = os.fsdecode(b"a\xff")
    res = CliRunner().invoke(app, ["report", "--side", f"{label}={records}", "--side", f"b={records}.gz",
                                   "--out", str(tmp_path / "s")])
    assert "--side 'a\\udcff': not valid UTF-8 text" in str(res.exception)
    assert not (tmp_path / "r").exists() and not (tmp_path / "s").exists()


def test_killed_report_keeps_the_earlier_budget_curve(tmp_path) -> None:
    """budget.png was written in place: a ``qlass report`` killed (SIGKILL) while drawing it, over a folder
    holding a complete report, left an empty budget.png (the earlier curve lost, no whole one until a rerun)."""
    import signal
    import subprocess
    import sys

    from qlass.jsonl import write_jsonl

    records = tmp_path / "records.jsonl"
    write_jsonl(records, [_full(r) for r in RECORDS])
    out = tmp_path / "r"
    write_report(RECORDS, out)
    png = out / "budget.png"
    before, stamp = png.read_bytes(), png.stat().st_mtime_ns
    proc = subprocess.Popen([sys.executable, "-m", "qlass", "report", str(records), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and png.stat().st_mtime_ns == stamp:  # killed as soon as budget.png changes
        pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert png.read_bytes() == before  # the same records draw the same curve
    # no temporary file left behind (the killed command's writer lock stays, and blocks no one)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".qlass.lock"]


def test_a_report_into_a_folder_another_command_writes_is_refused(tmp_path) -> None:
    """qlass report took no writer lock: it wrote results.* into a folder a running evaluation held."""
    import subprocess
    import sys

    from qlass.jsonl import write_jsonl

    records = tmp_path / "records.jsonl"
    write_jsonl(records, [_full(r) for r in RECORDS])
    out = tmp_path / "r"
    out.mkdir()
    hold = ("import sys, time; from qlass.locking import writer_lock\n"
            "with writer_lock(sys.argv[1], True):\n    print('held', flush=True); time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        done = subprocess.run([sys.executable, "-m", "qlass", "report", str(records), "--out", str(out)],
                              capture_output=True, text=True)
        assert done.returncode == 2 and "is being written by another qlass process" in done.stderr, done.stderr
        assert not (out / "results.md").exists()
    finally:
        holder.kill()
        holder.wait()
