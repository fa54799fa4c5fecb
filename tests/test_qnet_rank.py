"""QNet objectives that rank siblings (tiny random model): step units that keep sibling pairs
together, the exact two-pass pairwise gradient, the advantage/dueling targets, a synthetic task
whose lone records carry a depth shortcut, best-epoch selection and k-fold cross-validation by tree."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_qnet_train import synthetic_qdata

from qlass import precision
from qlass.config import load_yaml
from qlass.errors import QlassError
from qlass.qnet import QNet
from qlass.qnet_data import read_qdata
from qlass.qnet_loss import (
    contrast_groups,
    group_key,
    record_losses,
    row_outputs,
    scores_of,
    sibling_pairs,
    state_targets,
)
from qlass.qnet_pack import batch_units
from qlass.training.qnet import QNetTrainConfig, train_qnet
from qlass.training.qnet_fit import pack
from qlass.training.qnet_trainer import QNetTrainer, StepShares, schedule

EARLY = ["go", "teleport", "walk"]
LATE = ["focus", "move", "pick"]
FILLER = ["the", "red", "door", "kitchen", "plant", "table", "water", "box"]


def shortcut_qdata(path: Path, trees: int, depth: int = 10, seed: int = 0, gamma: float = 0.9) -> Path:
    """Chains of ``depth`` steps with q = γ^(steps to go). The actions up to one decision (at a random
    depth 2-6) end in an EARLY verb, later ones in a LATE verb, so lone records say "a LATE verb is
    worth a lot". At the decision a sibling takes a LATE verb too early and gets 0: the sibling
    contrast (LATE is wrong here) contradicts the shortcut."""
    rng = random.Random(seed)
    lines = []
    for t in range(trees):
        messages = [{"role": "user", "content": "Instruction: act well."}, {"role": "assistant", "content": "OK"},
                    {"role": "user", "content": f"Task {t}: " + " ".join(rng.choices(FILLER, k=4))}]
        decision, node, parent = rng.randint(2, 6), 0, 0
        for d in range(1, depth + 1):
            node += 1
            main = {"schema_version": 1, "tree_id": f"tree{t}", "task": f"toy/{t}", "node_id": node,
                    "parent_id": parent, "group": f"tree{t}:{parent}", "depth": d, "messages": list(messages),
                    "action": f"Thought: {' '.join(rng.choices(FILLER, k=2))}\nAction: "
                              f"{rng.choice(EARLY if d <= decision else LATE)}", "q": gamma ** (depth - d)}
            lines.append(main)
            if d == decision:
                node += 1
                lines.append({**main, "node_id": node, "q": 0.0,
                              "action": f"Thought: {' '.join(rng.choices(FILLER, k=2))}\nAction: {rng.choice(LATE)}"})
            parent = main["node_id"]
            messages = messages + [{"role": "assistant", "content": main["action"]},
                                   {"role": "user", "content": "Observation: " + " ".join(rng.choices(FILLER, k=3))}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


CFG = {"epochs": 2, "lr": 3e-3, "batch_size": 8, "max_length": 512, "max_action_tokens": 32, "warmup_ratio": 0.0,
       "save_every": 1000, "seed": 0}


def test_units_keep_every_contrast_pair_in_one_step(tiny_model_dir: Path, tmp_path: Path) -> None:
    qnet = QNet.from_sft(tiny_model_dir, max_length=512, max_action_tokens=32)
    records = read_qdata(synthetic_qdata(tmp_path / "q.jsonl", trees=3, seed=1))
    rows = pack(qnet, records)
    contrast = contrast_groups(records)
    assert len(contrast) == 3 * 3  # every group holds a 0.9 and a 0.1 sibling
    alone = batch_units(rows, lambda r: False)
    assert alone == [[i] for i in range(len(rows))]
    units = batch_units(rows, lambda r: group_key(r) in contrast)
    assert sorted(i for u in units for i in u) == list(range(len(rows)))
    assert len(units) == 3 and all(len({rows[i].records[0].tree_id for i in u}) == 1 for u in units)
    for u in units:  # pairs formed within a unit are all the pairs of its tree
        tree = rows[u[0]].records[0].tree_id
        inside = [r for i in u for r in rows[i].records]
        assert len(sibling_pairs(inside)) == len(sibling_pairs([r for r in records if r.tree_id == tree])) == 3


@pytest.mark.parametrize("rank,processes", [("q", 1), ("advantage", 2), ("dueling", 3)])
def test_trainer_step_gradient_equals_the_joint_loss(tiny_model_dir: Path, tmp_path: Path, rank: str,
                                                     processes: int) -> None:
    """QNetTrainer.training_step backpropagates row by row with pair coefficients from a no-grad pass;
    the gradients of all the shares a step is dealt into (one per process; here summed in one process)
    must equal those of the whole step's loss written out with every row's graph at once."""
    from transformers import TrainingArguments

    qnet = QNet.from_sft(tiny_model_dir, max_length=512, max_action_tokens=32, seed=4, rank=rank)
    records = read_qdata(synthetic_qdata(tmp_path / "q.jsonl", trees=2, seed=2))
    rows = pack(qnet, records)
    weight = 0.7
    cfg = QNetTrainConfig(epochs=1, batch_size=len(records), min_trees_per_step=2, rank=rank, pair_weight=weight)
    shares, ends = schedule(rows, cfg, processes)
    assert ends == [1] and len(shares) == processes  # one step: both trees' units, dealt to the processes
    assert sorted(i for s in shares for i in s.rows) == list(range(len(rows)))
    assert all(s.passes == max(len(t.rows) for t in shares) for s in shares)
    base = state_targets(records)
    trainer = QNetTrainer(model=qnet.model, args=TrainingArguments(output_dir=str(tmp_path / "t"), use_cpu=True,
                                                                   report_to=[]),
                          rank=rank, pair_weight=weight, head_lr=1e-3, epoch_ends=ends)
    batches = StepShares(rows, shares, base)
    loss = sum(float(trainer.training_step(qnet.model, batches[i])) for i in range(processes))
    two_pass = {n: p.grad.clone() for n, p in qnet.model.named_parameters() if p.grad is not None}
    qnet.model.zero_grad(set_to_none=True)

    outs = [row_outputs(qnet, row) for row in rows]
    flat = [r for row in rows for r in row.records]
    per_record = torch.cat([record_losses(rank, q, v, torch.tensor(row.targets),
                                          torch.tensor([base[group_key(r)] for r in row.records]))
                            for (q, v), row in zip(outs, rows)])
    scores = torch.cat([scores_of(q, v) for q, v in outs])
    pairs = sibling_pairs(flat)
    hi, lo = (torch.tensor(x) for x in zip(*pairs))
    bt = F.softplus(scores[lo] - scores[hi]).mean()
    (per_record.mean() + weight * bt).backward()
    assert shares[0].pairs == len(pairs) == 6 and shares[0].records == len(flat)
    assert loss == pytest.approx(float((per_record.mean() + weight * bt).detach()), rel=1e-5)
    assert two_pass.keys() == {n for n, p in qnet.model.named_parameters() if p.grad is not None}
    for name, grad in two_pass.items():
        torch.testing.assert_close(grad, dict(qnet.model.named_parameters())[name].grad, rtol=1e-4, atol=1e-6)


def test_dueling_targets_teach_a_lone_record_no_advantage() -> None:
    q, v = torch.tensor([0.9, 0.8, 0.2]), torch.tensor([0.5, 0.5, 0.5])
    targets, base = torch.tensor([0.9, 0.8, 0.2]), torch.tensor([0.9, 0.5, 0.5])  # record 0 alone, 1-2 siblings
    duel = record_losses("dueling", q, v, targets, base)
    # lone record: its score Q - V = 0.4 is pulled to 0 and V to its own target; siblings: Q - V to ±0.3
    assert duel.tolist() == pytest.approx([0.4 ** 2 + 0.4 ** 2, 0.0, 0.0], abs=1e-6)
    assert record_losses("advantage", q, v, targets, base).tolist() == pytest.approx([0.16, 0.0, 0.0], abs=1e-6)
    assert record_losses("q", q, None, targets, base).tolist() == pytest.approx([0.0, 0.0, 0.0])


@pytest.mark.slow
def test_sibling_objectives_beat_plain_mse_when_lone_records_carry_a_depth_shortcut(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    """Plain regression learns "a LATE verb is worth a lot" from the lone records and ranks the held-out
    decisions backwards; the dueling target and the pairwise loss learn the sibling contrast."""
    data = shortcut_qdata(tmp_path / "q.jsonl", trees=30)
    cfg = {**CFG, "val_fraction": 0.4, "baseline": False, "eval_before": False}
    acc = {}
    for name, extra in {"q": {}, "pairwise": {"pair_weight": 0.3}, "dueling": {"rank": "dueling"}}.items():
        result = train_qnet(data, tiny_model_dir, tmp_path / name, QNetTrainConfig(**cfg, **extra))
        assert result["qnet"]["pairs"] == 12
        acc[name] = result["qnet"]["pair_accuracy"]
    assert acc["q"] <= 0.25, acc
    assert acc["pairwise"] >= 0.75 and acc["dueling"] >= 0.75, acc


@pytest.mark.slow
def test_dueling_qnet_saves_its_rank_and_scores_q_minus_v(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    data = synthetic_qdata(tmp_path / "q.jsonl", trees=6)
    out = tmp_path / "qnet"
    train_qnet(data, tiny_model_dir, out, QNetTrainConfig(**{**CFG, "epochs": 1, "val_fraction": 0.34},
                                                          rank="dueling", autocast=True))
    meta = json.loads((out / "qnet.json").read_text())
    assert meta["rank"] == "dueling" and meta["autocast"] is precision.use_autocast(True, "cpu")
    qnet = QNet.load(out)
    assert qnet.rank == "dueling" and qnet.autocast is meta["autocast"]  # scored as trained (B5)
    assert QNet.load(out, autocast=False).autocast is False
    auto = AutoModelForSequenceClassification.from_pretrained(out).eval()
    fp32 = QNet.load(out, autocast=False)
    history = list(read_qdata(data)[0].messages)
    cands = ["Thought: the box\nAction: open", "Thought: the box\nAction: close"]
    with torch.no_grad():
        v = float(auto(input_ids=torch.tensor([fp32.encode_history(history)])).logits[0, 0])
        q = [float(auto(input_ids=torch.tensor([fp32.encode(history, c)])).logits[0, 0]) for c in cands]
    assert fp32.score(history, cands) == pytest.approx([x - v for x in q], abs=1e-4)
    with pytest.raises(QlassError, match=r"other settings \(rank: 'dueling' → 'q'\)"):
        train_qnet(data, tiny_model_dir, out, QNetTrainConfig(**{**CFG, "epochs": 1, "val_fraction": 0.34},
                                                              autocast=True))


@pytest.mark.slow
def test_select_best_keeps_the_best_validation_epoch(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = synthetic_qdata(tmp_path / "q.jsonl", trees=8)
    out = tmp_path / "qnet"
    cfg = QNetTrainConfig(**{**CFG, "epochs": 4, "lr": 3e-2, "val_fraction": 0.25}, select_best=True)
    result = train_qnet(data, tiny_model_dir, out, cfg)
    trained = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
               if "val_mse" in r and r["epoch"] >= 1]
    best = max(trained, key=lambda e: (e["val_pair_accuracy"], -e["val_mse"]))
    assert best is not trained[-1]  # this lr overshoots after the best epoch, so keeping it matters
    saved = json.loads((out / "qnet_result.json").read_text())
    assert saved["kept_epoch"] == best["epoch"] and saved["kept_by"] == "best validation pair accuracy"
    assert saved["qnet"] == result["qnet"]
    assert {k: saved["qnet"][k] for k in ("epoch", "step", "mse", "pair_accuracy", "pairs", "n")} == {
        "epoch": best["epoch"], "step": best["step"], "mse": best["val_mse"],
        "pair_accuracy": best["val_pair_accuracy"],
        "pairs": best["val_pairs"], "n": best["val_records"]}
    best = saved["qnet"]
    preds = [json.loads(x) for x in (out / "val_predictions.jsonl").read_text().splitlines()]
    assert len(preds) == best["n"]
    mse = sum((p["qnet_q"] - p["q"]) ** 2 for p in preds) / len(preds)
    assert mse == pytest.approx(best["mse"], rel=1e-4)  # the saved model is the best epoch's
    qnet = QNet.load(out)
    rec = read_qdata(data)
    by_id = {(r.tree_id, r.node_id): r for r in rec}
    p = preds[0]
    r = by_id[(p["tree_id"], p["node_id"])]
    assert qnet.score(list(r.messages), [r.action])[0] == pytest.approx(p["qnet_score"], abs=1e-4)
    assert not (out / "best_epoch").exists()
    for p in preds:  # B6: the per-token log-likelihood beside the sum
        n = len(qnet.encode_action(by_id[(p["tree_id"], p["node_id"])].action))
        assert p["loglik_mean"] == pytest.approx(p["loglik_sum"] / n)
    assert saved["sft_loglik"]["per"] == "action token" and saved["sft_loglik"]["sum"]["pairs"] == best["pairs"]


@pytest.mark.slow
def test_cross_validation_pools_every_tree_once(tiny_model_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from qlass.cli import app

    data = synthetic_qdata(tmp_path / "q.jsonl", trees=6)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("epochs: 1\nbatch_size: 8\nmax_length: 512\nmax_action_tokens: 32\nlr: 3.0e-3\nwarmup_ratio: 0\n")
    args = ["train-qnet", str(data), "--model", str(tiny_model_dir), "--out", str(tmp_path / "cv"), "--config",
            str(cfg), "--folds", "3"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "cv" / "cv_summary.json").read_text())
    trees = [{json.loads(x)["tree_id"] for x in (tmp_path / "cv" / f"fold-{k}" / "val_predictions.jsonl").read_text()
              .splitlines()} for k in (1, 2, 3)]
    assert [len(t) for t in trees] == [2, 2, 2] and len(set.union(*trees)) == 6  # every tree held out once
    for k, held in enumerate(trees, 1):
        assert set(load_yaml(tmp_path / "cv" / f"fold-{k}" / "qnet_config.yaml")["held_out_trees"]) == held
    qnet, ll = summary["rankers"]["qnet"], summary["rankers"]["sft_loglik"]
    assert summary["records"] == 6 * 6 and qnet["pairs"] == ll["pairs"] == 6 * 3
    assert qnet["ci95"][0] <= qnet["pair_accuracy"] <= qnet["ci95"][1]
    assert summary["rankers"]["sft_loglik_sum"]["pairs"] == 18 and "mse" in qnet
    lo, hi = summary["qnet_minus_sft_loglik"]["ci95"]
    assert lo <= summary["qnet_minus_sft_loglik"]["difference"] <= hi
    assert "| qnet |" in (tmp_path / "cv" / "cv_summary.md").read_text() and "| qnet |" in res.output
    again = CliRunner().invoke(app, args)  # finished folds are not retrained
    assert again.exit_code == 0 and json.loads((tmp_path / "cv" / "cv_summary.json").read_text()) == summary
    # the same Q data from a pipe (<(zcat q.jsonl.gz)): read once, every fold trains on (here: finds) its copy;
    # before, the folds found the pipe read and empty
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    threading.Thread(target=fifo.write_text, args=(data.read_text(),), daemon=True).start()
    piped = subprocess.run([sys.executable, "-m", "qlass", *args[:1], str(fifo), *args[2:]], capture_output=True,
                           text=True, timeout=300)
    assert piped.returncode == 0, piped.stderr
    assert json.loads((tmp_path / "cv" / "cv_summary.json").read_text()) == {**summary, "qdata": str(fifo)}
    # select_best would keep each fold's epoch by the accuracy the fold then reports: refused, nothing trained
    chosen = CliRunner().invoke(app, [*args[:5], str(tmp_path / "best"), *args[6:], "--set", "select_best=true"])
    assert "select_best would keep each fold's epoch" in str(chosen.exception) and not (tmp_path / "best").exists()
    bad = CliRunner().invoke(app, args[:-1] + ["7"])
    assert bad.exit_code != 0 and "6 tree(s) cannot be dealt into 7 folds" in str(bad.exception or bad.output)
    one = CliRunner().invoke(app, args[:-1] + ["1"])  # it said "lower folds or add trees"
    assert one.exit_code != 0 and "cross-validation by tree needs at least 2 folds, got 1" in str(one.exception or
                                                                                                  one.output)
