"""QNet training on synthetic Q data with a tiny random model: reading and validating qdata, the
split by tree, ranking metrics, train/inference input identity, learning, resume after kill -9, the CLI."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import checkpoint_killer
import pytest
import torch

from qlass.config import load_yaml, save_yaml
from qlass.errors import DataError, QlassError
from qlass.policy.render import encode_conversation, render
from qlass.qnet import QNet
from qlass.qnet_data import QRecord, make_groups, ranking_metrics, read_qdata, spearman, split_by_tree
from qlass.qnet_pack import step_batches
from qlass.training.qnet import QNetTrainConfig, train_qnet
from qlass.training.qnet_fit import pack
from qlass.types import Message

GOOD = ["north", "open", "take", "look"]
BAD = ["south", "close", "drop", "wait"]
FILLER = ["the", "red", "door", "kitchen", "plant", "table", "water", "box"]


def synthetic_qdata(path: Path, trees: int = 12, groups: int = 3, seed: int = 0) -> Path:
    """Q data whose targets are learnable: an action ending in a GOOD word is worth 0.9, BAD 0.1."""
    rng = random.Random(seed)
    lines = []
    for t in range(trees):
        messages = [{"role": "user", "content": "Instruction: act well."}, {"role": "assistant", "content": "OK"},
                    {"role": "user", "content": f"Task {t}: " + " ".join(rng.choices(FILLER, k=5))}]
        node = 0
        for g in range(groups):
            for good in (True, False):
                node += 1
                word = rng.choice(GOOD if good else BAD)
                action = f"Thought: {' '.join(rng.choices(FILLER, k=3))}\nAction: {word}"
                lines.append({"schema_version": 1, "tree_id": f"tree{t}", "task": f"toy/{t}", "node_id": node,
                              "parent_id": g, "group": f"tree{t}:{g}", "depth": g + 1, "messages": list(messages),
                              "action": action, "q": 0.9 if good else 0.1})
            messages = messages + [{"role": "assistant", "content": lines[-2]["action"]},
                                   {"role": "user", "content": "Observation: " + " ".join(rng.choices(FILLER, k=4))}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def test_reader_reports_file_record_and_field(tmp_path: Path) -> None:
    good = synthetic_qdata(tmp_path / "q.jsonl", trees=2)
    assert len(read_qdata(good)) == 2 * 3 * 2
    rows = [json.loads(x) for x in good.read_text().splitlines()]
    for field, value, match in [("q", "high", "field 'q' must be int or float"), ("group", "g0", "group"),
                                ("schema_version", 2, "schema_version"),
                                ("messages", [{"role": "bot", "content": "x"}], r"messages\[0\]"),
                                ("tree_id", None, "field 'tree_id' must be str")]:
        bad = [dict(r) for r in rows]
        bad[3][field] = value
        p = tmp_path / "bad.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in bad))
        with pytest.raises(DataError, match=match) as err:
            read_qdata(p)
        assert "bad.jsonl" in str(err.value) and "line 4" in str(err.value)
    del rows[5]["action"]
    (tmp_path / "missing.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="line 6: missing field 'action'"):
        read_qdata(tmp_path / "missing.jsonl")


def test_siblings_must_share_their_history(tmp_path: Path) -> None:
    records = read_qdata(synthetic_qdata(tmp_path / "q.jsonl", trees=1))
    assert [len(g.records) for g in make_groups(records, "q.jsonl")] == [2, 2, 2]
    from dataclasses import replace

    broken = [records[0], replace(records[1], messages=records[1].messages + (Message("user", "extra"),))]
    with pytest.raises(DataError, match="siblings must share one history"):
        make_groups(broken, "q.jsonl")


def test_split_is_by_tree_seeded_and_complete(tmp_path: Path) -> None:
    records = read_qdata(synthetic_qdata(tmp_path / "q.jsonl", trees=10))
    train, val = split_by_tree(records, 0.2, seed=3)
    assert len(train) + len(val) == len(records)
    assert not {r.tree_id for r in train} & {r.tree_id for r in val}
    assert len({r.tree_id for r in val}) == 2
    assert split_by_tree(records, 0.2, seed=3) == (train, val)
    assert split_by_tree(records, 0.2, seed=4) != (train, val)


def test_ranking_metrics_count_only_sibling_pairs_with_different_targets() -> None:
    keys = ["a", "a", "a", "b", "b", "c"]
    targets = [1.0, 0.0, 0.0, 0.5, 0.5, 0.3]
    preds = [0.2, 0.1, 0.3, 0.0, 1.0, 9.0]
    m = ranking_metrics(keys, targets, preds)
    assert m["pairs"] == 2 and m["pair_accuracy"] == 0.5  # (0,1) right, (0,2) wrong; b tied targets; c alone
    assert ranking_metrics(["a", "a"], [1.0, 0.0], [0.4, 0.4])["pair_accuracy"] == 0.5
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def test_training_input_equals_inference_input(tiny_model_dir: Path, tmp_path: Path) -> None:
    qnet = QNet.from_sft(tiny_model_dir, max_length=1024, max_action_tokens=64)
    records = read_qdata(synthetic_qdata(tmp_path / "q.jsonl", trees=2))
    rows = pack(qnet, records)
    packed = [(r, row.ids[:end + 1], n) for row in rows for r, end, n in zip(row.records, row.ends, row.action_lengths)]
    assert sorted(r.node_id for r, _, _ in packed if r.tree_id == "tree0") == list(range(1, 7))  # each once
    assert len(packed) == len(records)
    for rec, ids, n_action in packed:
        history = list(rec.messages)
        assert ids == encode_conversation(qnet.tokenizer, history, True)[0] + \
            qnet.tokenizer(rec.action, add_special_tokens=False).input_ids
        assert ids == qnet.encode(history, rec.action)
        assert n_action == len(qnet.encode_action(rec.action))
        assert qnet.tokenizer.decode(ids) == render(qnet.tokenizer, history, True) + rec.action


def test_packed_paths_give_the_values_inference_scores(tiny_model_dir: Path, tmp_path: Path) -> None:
    """One forward per packed path must equal ``QNet.score`` of each (history, action) on its own."""
    qnet = QNet.from_sft(tiny_model_dir, max_length=1024, max_action_tokens=64, seed=3)
    records = read_qdata(synthetic_qdata(tmp_path / "q.jsonl", trees=2, seed=7))
    rows = pack(qnet, records)
    assert len(rows) == 2 * 4  # per tree: 2 leaves of the last group + 1 off-path sibling in each earlier one
    assert max(len(row.records) for row in rows) == 3  # a path holds its ancestors' inputs
    for row in rows:
        packed = qnet.values_at(row.ids, row.ends).tolist()
        alone = [qnet.score(list(r.messages), [r.action])[0] for r in row.records]
        assert packed == pytest.approx(alone, abs=1e-4)


def test_packing_keeps_unrelated_inputs_apart_and_batches_cover_every_row(tiny_model_dir: Path) -> None:
    qnet = QNet.from_sft(tiny_model_dir, max_length=1024, max_action_tokens=64)
    base = (Message("user", "Task: find a plant."),)
    longer = base + (Message("assistant", "Action: look"), Message("user", "You see a plant."))
    recs = [QRecord("t", "x/1", 1, 0, "t:0", 1, base, "Action: look", 1.0),
            QRecord("t", "x/1", 2, 1, "t:1", 2, longer, "Action: take plant", 1.0),
            QRecord("t", "x/1", 3, 0, "t:0", 1, base, "Action: wait", 0.0),
            QRecord("u", "x/2", 1, 0, "u:0", 1, base, "Action: look", 0.5)]
    rows = pack(qnet, recs)
    assert [[r.node_id for r in row.records] for row in rows] == [[2, 1], [3], [1]]  # trees never share a row
    assert rows[2].records[0].tree_id == "u"
    counts = [9, 1, 4, 4, 12, 3, 2, 8]
    steps = step_batches(counts, 8, seed=0, epoch=0)
    assert sorted(i for s in steps for i in s) == list(range(len(counts)))
    assert steps == step_batches(counts, 8, seed=0, epoch=0) != step_batches(counts, 8, seed=0, epoch=1)
    sizes = [sum(counts[i] for i in s) for s in steps]
    assert min(sizes) >= 8 and sum(sizes) == sum(counts)
    for s in steps[:-1]:  # full as soon as the last row is in (only the final step takes a remainder)
        assert sum(counts[i] for i in s[:-1]) < 8
    assert step_batches([1, 2], 8, seed=0, epoch=0) in ([[0, 1]], [[1, 0]])
    trees = ["a", "a", "a", "a", "b", "b", "c", "d"]
    for seed in range(5):  # at least 3 trees per step, however many records the first rows hold
        steps = step_batches(counts, 8, seed, epoch=0, trees=trees, min_trees=3)
        assert sorted(i for s in steps for i in s) == list(range(len(counts)))
        assert all(len({trees[i] for i in s}) >= 3 for s in steps)
        assert all(len({trees[i] for i in s[:-1]}) < 3 or sum(counts[i] for i in s[:-1]) < 8 for s in steps[:-1])
    capped = step_batches(counts, 1, 0, 0, trees=["a", "b"] * 4, min_trees=10)  # 2 trees: 2 per step
    assert len(capped) > 1 and all(len({i % 2 for i in s}) == 2 for s in capped)


CFG = dict(epochs=2, lr=3e-3, batch_size=4, max_length=512, max_action_tokens=32, val_fraction=0.25,
           warmup_ratio=0.0, save_every=5, seed=0)


def val_records(out: Path) -> list[dict]:
    """The validation records of a QNet run's ``metrics.jsonl``."""
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val_mse" in r]


@pytest.mark.slow
def test_training_learns_to_rank_and_saves_a_loadable_qnet(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    data = synthetic_qdata(tmp_path / "q.jsonl", trees=16)
    out = tmp_path / "qnet"
    result = train_qnet(data, tiny_model_dir, out, QNetTrainConfig(**CFG))
    epochs = val_records(out)
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    before, after = epochs[0], epochs[-1]
    assert after["val_pairs"] == 4 * 3 and after["val_pair_accuracy"] >= 0.9
    assert after["val_pair_accuracy"] >= before["val_pair_accuracy"] + 0.25
    assert after["val_mse"] < before["val_mse"] / 2
    assert result["qnet"]["pair_accuracy"] == after["val_pair_accuracy"] and result["qnet"]["epoch"] == 2
    assert result["qnet"]["mse"] == after["val_mse"] and result["qnet"]["n"] == after["val_records"] == 24
    assert result["sft_loglik"]["pairs"] == after["val_pairs"] and 0.0 <= result["sft_loglik"]["pair_accuracy"] <= 1.0
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "train_loss" in r]
    assert all(r["records"] >= CFG["batch_size"] and r["trees"] >= 4 for r in steps)  # min_trees_per_step's default
    second = [r for r in steps if r["step"] > epochs[1]["step"]]  # the kept epoch's steps
    assert result["qnet"]["train_mse"] == pytest.approx(sum(r["train_mse"] * r["records"] for r in second)
                                                        / sum(r["records"] for r in second))
    assert not [p.name for p in out.iterdir() if p.name.startswith(("checkpoint", "best_epoch", "trained", ".trained"))]
    AutoModelForSequenceClassification.from_pretrained(out)  # loads with the Auto class
    qnet = QNet.load(out)
    history = list(read_qdata(data)[0].messages)
    good, bad = qnet.score(history, ["Thought: the box\nAction: open", "Thought: the box\nAction: close"])
    assert good > bad
    # finished: not redone (a runtime option may differ), but not handed back for other settings or data
    assert train_qnet(data, tiny_model_dir, out, QNetTrainConfig(**CFG, threads=1)) == result
    with pytest.raises(QlassError, match=r"other settings \(lr: 0\.003 → 0\.001\)"):
        train_qnet(data, tiny_model_dir, out, QNetTrainConfig(**{**CFG, "lr": 1e-3}))
    other = synthetic_qdata(tmp_path / "other.jsonl", trees=12)
    with pytest.raises(QlassError, match="other Q data than"):
        train_qnet(other, tiny_model_dir, out, QNetTrainConfig(**CFG))
    with pytest.raises(QlassError, match=r"other settings \(pair_weight: 0\.0 → 0\.5\)"):
        train_qnet(data, tiny_model_dir, out, QNetTrainConfig(**CFG, pair_weight=0.5))
    saved = load_yaml(out / "qnet_config.yaml")
    del saved["min_trees_per_step"]  # a QNet finished before the option existed took one path per step
    save_yaml(out / "qnet_config.yaml", saved)
    with pytest.raises(QlassError, match=r"other settings \(min_trees_per_step: 1 → 4\)"):
        train_qnet(data, tiny_model_dir, out, QNetTrainConfig(**CFG))
    assert train_qnet(data, tiny_model_dir, out, QNetTrainConfig(**CFG, min_trees_per_step=1)) == result
    # the record of its settings emptied or deleted: not handed back for whatever is asked
    for emptied in (True, False):
        if emptied:
            save_yaml(out / "qnet_config.yaml", {})
        else:
            (out / "qnet_config.yaml").unlink()
        with pytest.raises(QlassError, match="is missing" if not emptied else "does not record its Q data"):
            train_qnet(data, tiny_model_dir, out, QNetTrainConfig(**{**CFG, "epochs": 5}))


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_trains_the_same_qnet(tiny_model_dir: Path, tmp_path: Path, lora: bool) -> None:
    """Recomputing activations saves memory but must not change what is learnt (nor the run's settings)."""
    from transformers import AutoModelForSequenceClassification

    data = synthetic_qdata(tmp_path / "q.jsonl", trees=6)
    opts = {**CFG, "epochs": 1, "rank": "dueling", "pair_weight": 0.5, "eval_before": False, "baseline": False,
            "threads": 1, "lora": lora, "lora_r": 4, "lora_dropout": 0.0}
    plain = train_qnet(data, tiny_model_dir, tmp_path / "plain", QNetTrainConfig(**opts))
    recomputed = train_qnet(data, tiny_model_dir, tmp_path / "ckpt",
                            QNetTrainConfig(**opts, gradient_checkpointing=True))
    assert recomputed["qnet"]["mse"] == pytest.approx(plain["qnet"]["mse"], rel=1e-4)
    a = AutoModelForSequenceClassification.from_pretrained(tmp_path / "plain").state_dict()
    b = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ckpt").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).state_dict()
    assert not torch.allclose(b["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])


KILLER = checkpoint_killer.script("qlass.training.qnet", "QNetTrainConfig", "train_qnet")


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{}, {"rank": "dueling", "pair_weight": 0.5, "select_best": True, "lr": 3e-2,
                                        "min_trees_per_step": 2, "epochs": 3, "lora": True,
                                        "lora_r": 4, "lora_dropout": 0.3, "head_lr": 1e-2}])
def test_killed_training_resumes_to_the_same_model(tiny_model_dir: Path, tmp_path: Path, extra: dict) -> None:
    """A run killed (SIGKILL) right after a mid-run checkpoint and rerun ends with the weights, losses and
    validation of an uninterrupted run (also with the sibling objectives, LoRA with dropout, whose RNG
    state matters, and best-epoch selection: the kill comes after the first epoch's snapshot)."""
    data = synthetic_qdata(tmp_path / "q.jsonl", trees=8)
    opts = {**CFG, "epochs": 2, "save_every": 2, "eval_before": False, "baseline": False, "threads": 1, **extra}
    cfg = QNetTrainConfig(**opts)
    whole = train_qnet(data, tiny_model_dir, tmp_path / "whole", cfg)
    first_end = val_records(tmp_path / "whole")[0]["step"]
    kill_at = next(s for s in range(cfg.save_every, 1000, cfg.save_every) if s > first_end)  # mid-epoch 2
    out = tmp_path / "resumed"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(data), str(tiny_model_dir), str(out), str(kill_at),
                           repr(opts)], capture_output=True, text=True, check=False)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert json.loads((out / f"checkpoint-{kill_at}" / "trainer_state.json").read_text())["global_step"] == kill_at
    assert (out / "best_epoch").exists() == cfg.select_best
    (out / "best_epoch.tmp").mkdir()  # what a snapshot cut by a kill leaves (its rerun snapshots no better epoch)
    resumed = train_qnet(data, tiny_model_dir, out, cfg)
    assert not (out / "best_epoch.tmp").exists()
    assert resumed["qnet"]["mse"] == pytest.approx(whole["qnet"]["mse"], rel=1e-4)
    assert resumed["qnet"]["train_mse"] == pytest.approx(whole["qnet"]["train_mse"], rel=1e-5)
    assert resumed["kept_epoch"] == whole["kept_epoch"] and resumed["kept_by"] == whole["kept_by"]

    def losses(run: Path) -> list[tuple[int, float]]:
        return [(r["step"], round(r["train_loss"], 5)) for r in map(json.loads, (run / "metrics.jsonl").read_text()
                                                                    .splitlines()) if "train_loss" in r]

    assert losses(out) == losses(tmp_path / "whole")
    assert [r["step"] for r in val_records(out)] == [r["step"] for r in val_records(tmp_path / "whole")]
    history = list(read_qdata(data)[0].messages)
    cands = ["Action: open", "Action: drop"]
    assert QNet.load(out).score(history, cands) == pytest.approx(QNet.load(tmp_path / "whole").score(history, cands),
                                                                 abs=1e-5)


@pytest.mark.slow
def test_cli_reports_qnet_and_sft_ranker(tiny_model_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from qlass.cli import app

    data = synthetic_qdata(tmp_path / "q.jsonl", trees=6)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("epochs: 1\nbatch_size: 4\nmax_length: 512\nmax_action_tokens: 32\nval_fraction: 0.34\n")
    res = CliRunner().invoke(app, ["train-qnet", str(data), "--model", str(tiny_model_dir), "--out",
                                   str(tmp_path / "q"), "--config", str(cfg), "--set", "lora=true", "--set", "lr=1e-3",
                                   "--set", "head_lr=0.01"])
    assert res.exit_code == 0, res.output
    assert "QNet (epoch 1, last epoch): sibling pair accuracy" in res.output
    assert "SFT log-likelihood ranker (per token): sibling pair accuracy" in res.output
    assert not any(k.startswith("base_model") or "lora" in k
                   for k in _safetensors_keys(tmp_path / "q" / "model.safetensors"))  # LoRA merged
    bad = CliRunner().invoke(app, ["train-qnet", str(data), "--model", str(tiny_model_dir), "--out",
                                   str(tmp_path / "q2"), "--set", "epochs=0"])
    assert bad.exit_code != 0 and "epochs" in str(bad.exception or bad.output)


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def test_a_qnet_trained_from_a_pipe_records_what_it_read(tiny_model_dir: Path, tmp_path: Path) -> None:
    """``train-qnet <(zcat q.gz)``: the digest was taken after the pipe had been read (the digest of
    nothing), so the same command was then refused; and without a digest a resume from a pipe of other
    Q data mixed them. The pipe is now copied once and the digest of what was read is recorded."""
    import hashlib
    import os
    import threading

    data = synthetic_qdata(tmp_path / "q.jsonl", trees=4, groups=2)
    fifo = tmp_path / "q.fifo"
    os.mkfifo(fifo)

    def feed(content: bytes) -> None:
        threading.Thread(target=lambda: fifo.write_bytes(content), daemon=True).start()

    cfg = QNetTrainConfig(**{**CFG, "epochs": 1, "threads": 1})
    feed(data.read_bytes())
    first = train_qnet(fifo, tiny_model_dir, tmp_path / "qnet", cfg)
    recorded = load_yaml(tmp_path / "qnet" / "qnet_config.yaml")
    assert recorded["qdata_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest() and recorded["qdata"] == str(fifo)
    feed(data.read_bytes())
    assert train_qnet(fifo, tiny_model_dir, tmp_path / "qnet", cfg) == first
    other = synthetic_qdata(tmp_path / "other.jsonl", trees=4, groups=2, seed=5)
    feed(other.read_bytes())
    with pytest.raises(QlassError, match=r"trained on other Q data than .*q.fifo"):
        train_qnet(fifo, tiny_model_dir, tmp_path / "qnet", cfg)


def test_a_run_of_one_optimizer_step_changes_the_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    """transformers' warmup starts at learning rate 0 and ``warmup_ratio`` rounds up to one step, so a
    one-step run (``--max-steps 1``, a fold of ``--folds`` on little data) trained at 0 and kept the base
    model's weights. Such a run now has no warmup."""
    from transformers import AutoModelForSequenceClassification

    data = synthetic_qdata(tmp_path / "q.jsonl", trees=6)
    opts = {**CFG, "epochs": 1, "max_steps": 1, "warmup_ratio": 0.03, "eval_before": False, "baseline": False,
            "threads": 1}
    train_qnet(data, tiny_model_dir, tmp_path / "qnet", QNetTrainConfig(**opts))
    steps = [r for r in map(json.loads, (tmp_path / "qnet" / "metrics.jsonl").read_text().splitlines())
             if "train_loss" in r]
    assert len(steps) == 1
    trained = AutoModelForSequenceClassification.from_pretrained(tmp_path / "qnet").state_dict()
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).state_dict()
    key = "model.layers.0.mlp.up_proj.weight"
    assert not torch.allclose(trained[key], base[key])


def _draws() -> tuple[float, float, float]:
    import random

    import numpy as np

    return torch.rand(1).item(), random.random(), float(np.random.rand())


def _seed_all(seed: int) -> None:
    import random

    import numpy as np

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def test_training_leaves_the_callers_random_generators_as_they_were(tiny_model_dir: Path, tmp_path: Path) -> None:
    """transformers' Trainer seeds Python's, NumPy's and torch's generators, so after a train_qnet call a caller's
    draws were those after seed 0 whatever it had seeded: a seed sweep drew the same numbers every time."""
    _seed_all(11)
    expected = _draws()
    _seed_all(11)
    opts = {**CFG, "epochs": 1, "max_steps": 1, "eval_before": False, "baseline": False, "threads": 1}
    train_qnet(synthetic_qdata(tmp_path / "q.jsonl", trees=6), tiny_model_dir, tmp_path / "qnet",
               QNetTrainConfig(**opts))
    assert _draws() == expected


def test_a_qnet_given_as_the_sft_model_is_refused_before_training(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A QNet folder loads as a sequence classifier too: train_qnet trained to the end, failed on its validation
    scoring, and left a folder that then refused the corrected rerun as made with another SFT model."""
    import shutil

    qnet_like = tmp_path / "qnet_a"
    shutil.copytree(tiny_model_dir, qnet_like)
    config = json.loads((qnet_like / "config.json").read_text())
    (qnet_like / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForSequenceClassification"]}))
    out = tmp_path / "qnet_b"
    with pytest.raises(QlassError, match=r"qnet_a: is a QNet \(a sequence classifier\), not a causal LM"):
        train_qnet(synthetic_qdata(tmp_path / "q.jsonl", trees=6), qnet_like, out, QNetTrainConfig(**CFG))
    assert not out.exists()
