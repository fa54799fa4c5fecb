"""Golden trees with hand-computed Q values, the trees.jsonl and qdata.jsonl formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlass.errors import DataError, QlassError
from qlass.jsonl import append_jsonl, write_jsonl
from qlass.qdata import export_qdata, qdata_records, read_qdata
from qlass.tree import (
    BackupConfig,
    Node,
    Tree,
    assign_q,
    compute_q,
    contrast_pairs,
    read_trees,
    tree_from_dict,
    tree_summary,
)
from qlass.types import Message


def make_tree(spec: list[tuple[int, float]] | list[tuple[int, float, bool]], tree_id: str = "t/0") -> Tree:
    """A tree from (parent, reward[, done]) per non-root node; node i+1 is spec[i]."""
    nodes = [Node(0, None, 0, "", None, "start", 0.0, False, "root")]
    for i, item in enumerate(spec, start=1):
        parent, reward = item[0], item[1]
        done = item[2] if len(item) > 2 else False
        nodes.append(Node(i, parent, nodes[parent].depth + 1, f"Thought: t{i}\nAction: a{i}", f"a{i}", f"obs {i}",
                          reward, done, "sample" if parent == 0 else "rollout"))
    return Tree(tree_id, tree_id, "toy", "train", "x", [Message("system", "sys"), Message("user", "rules")], nodes)


def test_single_node_and_single_edge() -> None:
    assert compute_q(make_tree([])) == {}
    assert compute_q(make_tree([(0, 1.0, True)])) == {1: 1.0}
    assert compute_q(make_tree([(0, 0.4)])) == {1: 0.4}  # a leaf's Q is its outcome, done or not


def test_deep_chain_discounts_by_depth() -> None:
    q = compute_q(make_tree([(0, 0.0), (1, 0.0), (2, 1.0, True)]))
    assert q == pytest.approx({1: 0.81, 2: 0.9, 3: 1.0})
    n = 3000  # far deeper than Python's recursion limit
    q = compute_q(make_tree([(i, 1.0 if i == n - 1 else 0.0) for i in range(n)]))
    assert q[n] == 1.0 and q[1] == pytest.approx(0.9 ** (n - 1))


def test_ties_take_the_shared_max() -> None:
    q = compute_q(make_tree([(0, 0.0), (1, 1.0, True), (1, 1.0, True), (0, 1.0, True)]))
    assert q == pytest.approx({1: 0.9, 2: 1.0, 3: 1.0, 4: 1.0})


def test_all_zero_tree() -> None:
    tree = make_tree([(0, 0.0), (1, 0.0, True), (0, 0.0), (3, 0.0), (4, 0.0, True)])
    assert compute_q(tree) == {1: 0.0, 2: 0.0, 3: 0.0, 4: 0.0, 5: 0.0}
    assert compute_q(tree, BackupConfig(normalize=True)) == {1: 0.0, 2: 0.0, 3: 0.0, 4: 0.0, 5: 0.0}


MIXED = [(0, 0.2), (1, 0.5, True), (1, 0.2), (3, 1.0, True), (0, 0.0, True)]
"""root ─ 1 (0.2) ─┬ 2 leaf 0.5
                   └ 3 (0.2) ─ 4 leaf 1.0
   root ─ 5 leaf 0.0"""


def test_mixed_rewards_zeroed_intermediate() -> None:
    q = compute_q(make_tree(MIXED))
    assert q == pytest.approx({1: 0.81, 2: 0.5, 3: 0.9, 4: 1.0, 5: 0.0})


def test_gamma_is_configurable() -> None:
    q = compute_q(make_tree(MIXED), BackupConfig(gamma=0.5))
    assert q == pytest.approx({1: 0.5 * max(0.5, 0.5), 2: 0.5, 3: 0.5, 4: 1.0, 5: 0.0})
    assert compute_q(make_tree(MIXED), BackupConfig(gamma=1.0))[1] == 1.0
    with pytest.raises(ValueError, match="gamma"):
        BackupConfig(gamma=1.5)


def test_keep_intermediate_rewards_as_increments() -> None:
    chain = make_tree([(0, 0.25), (1, 0.5), (2, 1.0, True)])
    q = compute_q(chain, BackupConfig(keep_intermediate=True))
    # r = 0.25, 0.25, 0.5:  Q3 = 0.5, Q2 = 0.25 + 0.9 * 0.5, Q1 = 0.25 + 0.9 * 0.7
    assert q == pytest.approx({1: 0.88, 2: 0.7, 3: 0.5})
    assert compute_q(chain, BackupConfig(gamma=1.0, keep_intermediate=True))[1] == pytest.approx(1.0)
    q = compute_q(make_tree(MIXED), BackupConfig(keep_intermediate=True))
    # r1 = 0.2, r2 = 0.3, r3 = 0, r4 = 0.8, r5 = 0
    assert q == pytest.approx({2: 0.3, 4: 0.8, 3: 0.72, 1: 0.2 + 0.9 * 0.72, 5: 0.0})


def test_a_score_that_falls_gives_negative_q_that_the_q_data_keeps(tmp_path: Path) -> None:
    """With increments, a step whose score drops (ScienceWorld's score falls to 0 on failure) has a
    negative Q; Q values lie in [-1, 1], so the export reads back."""
    tree = make_tree([(0, 0.5), (1, 0.0, True)])
    cfg = BackupConfig(keep_intermediate=True)
    assert compute_q(tree, cfg)[2] == pytest.approx(-0.5)
    trees, qdata = tmp_path / "trees.jsonl", tmp_path / "qdata.jsonl"
    write_jsonl(trees, [tree.to_dict()])
    export_qdata(trees, qdata, cfg)
    assert sorted(r["q"] for r in read_qdata(qdata)) == pytest.approx([-0.5, 0.5 - 0.9 * 0.5])


def test_min_max_normalisation_per_tree() -> None:
    tree = make_tree([(0, 0.0), (1, 1.0, True), (0, 0.5, True)])
    assert compute_q(tree) == pytest.approx({1: 0.9, 2: 1.0, 3: 0.5})
    assert compute_q(tree, BackupConfig(normalize=True)) == pytest.approx({1: 0.8, 2: 1.0, 3: 0.0})
    same = make_tree([(0, 0.7, True), (0, 0.7, True)])
    assert compute_q(same, BackupConfig(normalize=True)) == {1: 0.7, 2: 0.7}  # all equal: unchanged


# -- trees.jsonl ------------------------------------------------------------------------------
def test_tree_round_trip_and_history(tmp_path: Path) -> None:
    tree = make_tree(MIXED)
    path = tmp_path / "trees.jsonl"
    append_jsonl(path, tree.to_dict())
    append_jsonl(path, make_tree([(0, 1.0, True)], "t/1").to_dict())
    back = read_trees(path)
    assert [t.tree_id for t in back] == ["t/0", "t/1"]
    assert back[0].to_dict() == tree.to_dict()
    assert back[0].history(4) == [Message("system", "sys"), Message("user", "rules"), Message("user", "start"),
                                  Message("assistant", "Thought: t1\nAction: a1"),
                                  Message("user", "Observation: obs 1"),
                                  Message("assistant", "Thought: t3\nAction: a3"),
                                  Message("user", "Observation: obs 3"),
                                  Message("assistant", "Thought: t4\nAction: a4"),
                                  Message("user", "Observation: obs 4")]


@pytest.mark.parametrize("mutate,message", [
    (lambda r: r.pop("nodes"), "line 1: missing field 'nodes'"),
    (lambda r: r.update(schema_version=9), "field 'schema_version' is 9"),
    (lambda r: r["nodes"][2].update(parent=7), "nodes[2]: field 'parent' must be the id of an earlier node"),
    (lambda r: r["nodes"][3].update(depth=5), "nodes[3]: field 'depth' is 5, expected parent depth + 1"),
    (lambda r: r["nodes"][1].update(reward="high"), "nodes[1]: field 'reward' must be int or float, got str"),
    (lambda r: r["nodes"][1].update(source="oracle"), "nodes[1]: field 'source' must be one of"),
    (lambda r: r["prefix"].append({"role": "bot", "content": "x"}), "field 'prefix[2]'"),
])
def test_tree_validation_names_file_line_and_field(tmp_path: Path, mutate, message: str) -> None:
    rec = make_tree(MIXED).to_dict()
    mutate(rec)
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, [rec])
    with pytest.raises(DataError, match="bad.jsonl") as err:
        read_trees(path)
    assert message in str(err.value)


def test_missing_files_are_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        read_trees(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        read_qdata(tmp_path / "nope.jsonl")


def test_duplicate_tree_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "dup.jsonl"
    write_jsonl(path, [make_tree(MIXED).to_dict()] * 2)
    with pytest.raises(DataError, match="line 2: tree 't/0' appears twice"):
        read_trees(path)


def test_trees_of_two_exploration_runs_in_one_file_are_refused(tmp_path: Path) -> None:
    """Trees of two exploration runs joined by hand (other candidates, say) were exported to one Q dataset
    and self-trained on without a word. Trees with another ``config_hash`` than the file's first are
    refused, naming both trees and the setting; trees that record no settings (older files) pass."""
    import dataclasses

    from qlass.self_train import SelfTrainConfig, select_trajectories

    def run_tree(tree_id: str, candidates: int) -> dict:
        tree = dataclasses.replace(make_tree(MIXED, tree_id), config={"candidates": candidates, "gamma": 0.9},
                                   config_hash=f"hash{candidates}")
        return tree.to_dict()

    path = tmp_path / "joined.jsonl"
    write_jsonl(path, [make_tree(MIXED, "t/old").to_dict(), run_tree("t/0", 5), run_tree("t/1", 5),
                       run_tree("t/2", 3)])
    want = r"joined.jsonl: line 4: tree 't/2' was explored with other settings than tree 't/0' \(line 2\): " \
           r"candidates: 5 → 3; one file would mix them"
    with pytest.raises(DataError, match=want):
        export_qdata(path, tmp_path / "q.jsonl")
    with pytest.raises(DataError, match=want):
        select_trajectories(path, "q", SelfTrainConfig())
    assert not (tmp_path / "q.jsonl").exists()
    write_jsonl(path, [make_tree(MIXED, "t/old").to_dict(), run_tree("t/0", 5), run_tree("t/1", 5)])
    assert export_qdata(path, tmp_path / "q.jsonl")["trees"] == 3


def test_another_stages_file_read_as_trees_or_q_data_is_named_as_what_it_is(tmp_path: Path) -> None:
    """Q data read as trees said "missing field 'env'" (and trees read as Q data "missing field 'node_id'"):
    each reader now says what the file is, as the trajectory, records and decision readers do."""
    trees, qdata = tmp_path / "trees.jsonl", tmp_path / "q.jsonl"
    write_jsonl(trees, [make_tree(MIXED).to_dict()])
    export_qdata(trees, qdata)
    with pytest.raises(DataError, match=r"q\.jsonl: line 1: this is a Q-data file \(qlass qdata or decisions "
                                        r"to-qdata\), not a trees file \(qlass explore\)"):
        read_trees(qdata)
    with pytest.raises(DataError, match=r"trees\.jsonl: line 1: this is a trees file \(qlass explore\), not a "
                                        r"Q-data file"):
        read_qdata(trees)


# -- qdata.jsonl ------------------------------------------------------------------------------
def test_qdata_records_follow_the_fixed_format(tmp_path: Path) -> None:
    trees = tmp_path / "trees.jsonl"
    append_jsonl(trees, make_tree(MIXED, "t/b").to_dict())
    append_jsonl(trees, make_tree([(0, 1.0, True)], "t/a").to_dict())
    out = tmp_path / "qdata.jsonl"
    counts = export_qdata(trees, out)
    assert counts["records"] == 6 and counts["trees"] == 2
    recs = read_qdata(out)
    assert [(r["tree_id"], r["node_id"]) for r in recs] == [("t/a", 1)] + [("t/b", i) for i in range(1, 6)]
    first = json.loads(out.read_text().splitlines()[0])
    assert list(first) == ["schema_version", "tree_id", "task", "node_id", "parent_id", "group", "depth",
                           "messages", "action", "q"]
    r4 = recs[4]
    assert r4["group"] == "t/b:3" and r4["parent_id"] == 3 and r4["depth"] == 3 and r4["q"] == pytest.approx(1.0)
    assert r4["action"] == "Thought: t4\nAction: a4"
    assert r4["messages"][-1] == {"role": "user", "content": "Observation: obs 3"}
    assert r4["messages"][2] == {"role": "user", "content": "start"}
    assert [r["q"] for r in recs[1:]] == pytest.approx([0.81, 0.5, 0.9, 1.0, 0.0])
    from qlass.qnet_data import read_qdata as qnet_reader  # the QNet's own reader accepts it

    assert len(qnet_reader(out)) == 6


def test_qdata_cap_keeps_sibling_groups_first_deterministically() -> None:
    # root has 3 children (a group); a long chain hangs below child 1 (singleton groups)
    spec = [(0, 0.0), (0, 0.0, True), (0, 1.0, True)] + [(1 if i == 0 else 3 + i, 0.0) for i in range(20)]
    tree = make_tree(spec)
    recs = qdata_records(tree, max_per_tree=5)
    ids = [r["node_id"] for r in recs]
    assert ids == sorted(ids) and len(ids) == 5
    assert {1, 2, 3} <= set(ids)
    assert ids == [r["node_id"] for r in qdata_records(tree, max_per_tree=5)]
    assert len(qdata_records(tree, max_per_tree=None)) == len(spec)


@pytest.mark.parametrize("mutate,message", [
    (lambda r: r.pop("q"), "line 2: missing field 'q'"),
    (lambda r: r.update(q=float("nan")), "line 2: field 'q' must be a number in [-1, 1], got nan"),
    (lambda r: r.update(q=1e300), "line 2: field 'q' must be a number in [-1, 1], got 1e+300"),
    (lambda r: r.update(q=-5), "line 2: field 'q' must be a number in [-1, 1], got -5"),
    (lambda r: r.update(node_id="3"), "line 2: field 'node_id' must be int, got str"),
    (lambda r: r.update(group="t/b:9"), "line 2: field 'group' must be '<tree_id>:<parent_id>'"),
    (lambda r: r.update(messages=[]), "line 2: field 'messages' is empty"),
    (lambda r: r["messages"].append({"role": "tool"}), "line 2: field 'messages[5]'"),
    (lambda r: r.update(schema_version=2), "line 2: field 'schema_version' is 2"),
    # passed data validate (train-qnet refused the sibling histories; the rest it trained on)
    (lambda r: r.update(node_id=-1), "line 2: field 'node_id' must be >= 1, got -1"),
    (lambda r: r.update(depth=-5), "line 2: field 'depth' must be >= 1, got -5"),
    (lambda r: r.update(parent_id=2, group="t/b:2"), "line 2: field 'parent_id' is the node's own id 2"),
    (lambda r: r.update(action=" "), "line 2: field 'action' is empty"),
    (lambda r: r["messages"].append({"role": "assistant", "content": "x"}), "line 2: field 'messages' must end with "
                                                                            "the observation the action answers"),
    (lambda r: r.update(messages=[*r["messages"][:-1], {"role": "user", "content": "another"}]),
     "line 3: field 'messages' differs from its sibling's at line 2 (group 't/b:1')"),
])
def test_read_qdata_names_file_line_and_field(tmp_path: Path, mutate, message: str) -> None:
    recs = qdata_records(make_tree(MIXED, "t/b"))
    mutate(recs[2] if "sibling" in message else recs[1])
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r, allow_nan=True) + "\n" for r in recs))
    with pytest.raises(DataError, match="q.jsonl") as err:
        read_qdata(path)
    assert message in str(err.value)


def test_tree_from_dict_accepts_what_to_dict_writes() -> None:
    tree = make_tree(MIXED)
    tree.stats = {"env_steps": 9}
    assert tree_from_dict(json.loads(json.dumps(tree.to_dict()))).to_dict() == tree.to_dict()


def test_data_validate_command_reads_trees_and_qdata(tmp_path: Path) -> None:
    """``qlass data validate`` tells the file kinds apart and checks their schemas (exit 1 on a bad record)."""
    import subprocess
    import sys

    trees = tmp_path / "trees.jsonl"
    write_jsonl(trees, [make_tree(MIXED, "t/b").to_dict(), make_tree([(0, 1.0, True)], "t/a").to_dict()])
    qdata = tmp_path / "qdata.jsonl"
    export_qdata(trees, qdata)
    ok = subprocess.run([sys.executable, "-m", "qlass", "data", "validate", str(trees), str(qdata)],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "2 trees, 8 nodes, all valid" in ok.stdout and "6 Q records from 2 trees, all valid" in ok.stdout
    lines = qdata.read_text().splitlines()
    bad = json.loads(lines[2])
    bad["q"] = "high"
    (tmp_path / "bad.jsonl").write_text("\n".join(lines[:2] + [json.dumps(bad)] + lines[3:]) + "\n")
    done = subprocess.run([sys.executable, "-m", "qlass", "data", "validate", str(tmp_path / "bad.jsonl")],
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert "bad.jsonl: line 3: field 'q' must be int or float, got str" in done.stderr
    # a file that cannot be read as the kind asked for exits 2 whatever the kind (only trajectories did)
    (tmp_path / "c.yaml").write_text("a: 1\n")
    for kind, path in [(k, tmp_path / "c.yaml") for k in ("trees", "qdata", "records", "trajectories")] + [
            ("trees", qdata), ("records", trees)]:
        done = subprocess.run([sys.executable, "-m", "qlass", "data", "validate", "--kind", kind, str(path)],
                              capture_output=True, text=True)
        assert done.returncode == 2, (kind, path, done.stderr)
    assert "line 1: this is a trees file (qlass explore), not evaluation records" in done.stderr


# -- K rollout chains per branch (schema_version 2) ------------------------------------------------
def k_rollout_tree() -> Tree:
    """root ─ 1 sample ─┬ 2 rollout#0 leaf 1.0
                        ├ 3 rollout#1 leaf 0.0
                        ├ 4 rollout#2 ─ 5 rollout#2 leaf 1.0
                        └ 6 sample leaf 0.5
       root ─ 7 sample leaf 0.3 (a sibling of 1)"""
    tree = make_tree([(0, 0.0), (1, 1.0, True), (1, 0.0, True), (1, 0.0), (4, 1.0, True), (1, 0.5, True),
                      (0, 0.3, True)])
    for i, k in ((2, 0), (3, 1), (4, 2), (5, 2)):
        tree.nodes[i].rollout = k
    tree.nodes[6].source = "sample"
    return tree


def test_k_rollout_chains_back_up_as_their_mean() -> None:
    q = compute_q(k_rollout_tree())
    mean = (1.0 + 0.0 + 0.9) / 3  # the three chains' Q; the sample child 6 (0.5) is below that mean
    assert q == pytest.approx({1: 0.9 * mean, 2: 1.0, 3: 0.0, 4: 0.9, 5: 1.0, 6: 0.5, 7: 0.3})
    lone = k_rollout_tree()
    lone.nodes[6].reward = 0.8  # an alternative better than the rollouts' mean wins the max
    assert compute_q(lone)[1] == pytest.approx(0.9 * 0.8)


def test_qdata_leaves_out_the_extra_rollout_chains_and_contrast_counts_exported_siblings() -> None:
    tree = assign_q(k_rollout_tree())
    recs = qdata_records(tree)
    assert [r["node_id"] for r in recs] == [1, 2, 6, 7]
    assert recs[0]["q"] == pytest.approx(0.9 * 1.9 / 3)
    assert contrast_pairs(tree) == 2  # (1, 7) under the root and (2, 6) under node 1; chains 1 and 2 are not records
    assert tree_summary([tree])["contrast_pairs"] == 2


def test_schema_1_trees_read_with_rollout_0_and_schema_2_round_trips(tmp_path: Path) -> None:
    tree = k_rollout_tree()
    rec = json.loads(json.dumps(tree.to_dict()))
    assert rec["schema_version"] == 2 and [n["rollout"] for n in rec["nodes"]][:6] == [0, 0, 0, 1, 2, 2]
    assert tree_from_dict(rec).to_dict() == tree.to_dict()
    old = make_tree(MIXED).to_dict()
    old["schema_version"] = 1
    for node in old["nodes"]:
        del node["rollout"]
    back = tree_from_dict(old)
    assert all(n.rollout == 0 for n in back.nodes) and compute_q(back) == compute_q(make_tree(MIXED))
    for mutate, message in [(lambda r: r["nodes"][6].update(rollout=1),
                             "field 'rollout' must be 0, or >= 1 on a 'rollout' node"),
                            (lambda r: r["nodes"][3].update(rollout=-1), "field 'rollout' must be 0"),
                            (lambda r: r["nodes"][3].pop("rollout"), "nodes[3]: missing field 'rollout'")]:
        bad = json.loads(json.dumps(tree.to_dict()))
        mutate(bad)
        with pytest.raises(DataError, match="nodes\\[") as err:
            tree_from_dict(bad, "t.jsonl", 1)
        assert message in str(err.value)


@pytest.mark.parametrize("cap", [0, -1, True, 2.5, "3"])
def test_a_cap_on_records_per_tree_below_one_is_refused(cap: object, tmp_path: Path) -> None:
    """0 wrote an empty Q-data file, -1 silently dropped each tree's last record."""
    trees, qdata = tmp_path / "trees.jsonl", tmp_path / "qdata.jsonl"
    write_jsonl(trees, [make_tree(MIXED).to_dict()])
    with pytest.raises(QlassError, match="max_per_tree"):
        export_qdata(trees, qdata, max_per_tree=cap)  # type: ignore[arg-type]
    assert not qdata.exists()
    with pytest.raises(QlassError, match="max_per_tree"):
        qdata_records(make_tree(MIXED), max_per_tree=cap)  # type: ignore[arg-type]


def test_qdata_command_backs_up_with_the_trees_gamma_unless_told(tmp_path: Path) -> None:
    """Trees explored with gamma 0.5 (their stored q, and qlass run's Q data, use it) got Q data discounted
    by 0.9 from ``qlass qdata`` as the README runs it, without --gamma."""
    import subprocess
    import sys

    trees = tmp_path / "trees.jsonl"
    tree = make_tree([(0, 0.0), (1, 1.0, True)], "t/a")
    tree.config = {"gamma": 0.5}
    write_jsonl(trees, [tree.to_dict()])

    def q_values(*options: str) -> list[float]:
        out = tmp_path / "qdata.jsonl"
        done = subprocess.run([sys.executable, "-m", "qlass", "qdata", str(trees), "--out", str(out), *options],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return [r["q"] for r in read_qdata(out)]

    assert q_values() == pytest.approx([0.5, 1.0])
    assert q_values("--gamma", "0.9") == pytest.approx([0.9, 1.0])
    other = make_tree([(0, 0.0), (1, 1.0, True)], "t/b")
    other.config = {"gamma": 0.9}
    write_jsonl(trees, [tree.to_dict(), other.to_dict()])  # two discounts in one file: which one is meant?
    mixed = subprocess.run([sys.executable, "-m", "qlass", "qdata", str(trees), "--out", str(tmp_path / "m.jsonl")],
                           capture_output=True, text=True)
    assert mixed.returncode == 2 and "explored with different gammas ([0.5, 0.9]); give --gamma" in mixed.stderr
    assert q_values("--gamma", "0.5") == pytest.approx([0.5, 1.0, 0.5, 1.0])


def test_export_qdata_without_a_config_backs_up_with_the_trees_gamma(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """The library's export_qdata discounted by 0.9 whatever the trees were explored with, while ``qlass qdata``
    (and the trees' stored q) used their own gamma: the same trees gave two sets of targets, silently."""
    trees = tmp_path / "trees.jsonl"
    tree = make_tree([(0, 0.0), (1, 1.0, True)], "t/a")
    tree.config = {"gamma": 0.5}
    write_jsonl(trees, [tree.to_dict()])
    export_qdata(trees, tmp_path / "own.jsonl")
    assert [r["q"] for r in read_qdata(tmp_path / "own.jsonl")] == pytest.approx([0.5, 1.0])
    assert [r["q"] for r in qdata_records(tree)] == pytest.approx([0.5, 1.0])
    with caplog.at_level("WARNING", logger="qlass.qdata"):
        export_qdata(trees, tmp_path / "told.jsonl", BackupConfig(gamma=0.9))
    assert [r["q"] for r in read_qdata(tmp_path / "told.jsonl")] == pytest.approx([0.9, 1.0])
    assert "backing up with gamma 0.9; trees in it were explored with 0.5" in caplog.text
