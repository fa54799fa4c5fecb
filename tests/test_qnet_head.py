"""The head-only QNet: features from the frozen SFT model, a ridge head picked by cross-validation by
tree, saved as an ordinary QNet folder; resumes from its feature file; named errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_qnet_train import synthetic_qdata

from qlass.errors import DataError, QlassError
from qlass.evaluate import run_evaluation
from qlass.policy.loading import load_causal_lm
from qlass.qnet import QNet
from qlass.qnet_data import read_qdata
from qlass.qnet_forward import backbone_of, sequence_hidden
from qlass.qnet_head import FEATURES_FILE, QNetHeadConfig, fit_head, train_qnet_head
from qlass.qnet_options import qnet_calibrated

CFG = {"folds": 4, "l2": [0.01, 1.0], "max_length": 256, "max_action_tokens": 32, "autocast": False}


def test_contrast_fit_ranks_siblings_and_ignores_what_they_share() -> None:
    """Siblings share a large per-group offset in feature 0; only feature 1 tells them apart."""
    rng = np.random.default_rng(0)
    groups = [f"g{i // 2}" for i in range(40)]
    offset = np.repeat(rng.normal(0, 10, 20), 2)
    good = np.tile([1.0, 0.0], 20)
    x = np.stack([offset, good + rng.normal(0, 0.01, 40)], axis=1)
    y = 0.5 * good + 0.01 * offset  # the group offset moves the targets a little too
    w = fit_head(x, y, groups, l2=1e-3, contrast=True)
    assert w[1] == pytest.approx(0.5, abs=0.02) and abs(w[0]) < 0.02
    with pytest.raises(QlassError, match="no sibling group has two records"):
        fit_head(x[::2], y[::2], groups[::2], 1.0, contrast=True)


def test_a_head_fitted_on_plain_records_ranks_but_leaves_the_offset_out() -> None:
    """The head has no bias, so the plain-records fit is centred: its values order the records as the
    targets do, around 0 rather than around the targets' mean (qnet.json says calibrated: false)."""
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (60, 3))
    y = 0.5 + 0.2 * x[:, 0]
    w = fit_head(x, y, [f"g{i}" for i in range(60)], l2=1e-6, contrast=False)
    assert np.corrcoef(x @ w, y)[0, 1] > 0.99 and abs(float(np.mean(x @ w - y)) + 0.5) < 0.05


def test_head_learns_to_rank_resumes_and_saves_a_loadable_qnet(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = synthetic_qdata(tmp_path / "q.jsonl", trees=16)
    out = tmp_path / "head"
    result = train_qnet_head(data, tiny_model_dir, out, QNetHeadConfig(**CFG))
    best = result["cross_validation"][0]
    assert (result["kept"]["l2"], result["kept"]["contrast"]) == (best["l2"], best["contrast"])
    assert len(result["cross_validation"]) == 4  # 2 strengths x contrasts / plain records
    assert best["rankers"]["qnet"]["pair_accuracy"] >= 0.9 and best["rankers"]["qnet"]["pairs"] == 16 * 3
    assert "sft_loglik" in best["rankers"] and best["qnet_minus_sft_loglik"]["ci95"] is not None
    # the saved folder is a QNet whose backbone is the SFT model and whose scores rank the siblings
    qnet = QNet.load(out)
    meta = json.loads((out / "qnet.json").read_text())
    assert meta["head_only"] is True and meta["calibrated"] is False  # no offset: values rank, they do not estimate
    # so the reference code's shortcut, which puts true rewards beside the values, is refused with it up front
    assert not qnet_calibrated(out) and qnet_calibrated(tmp_path)  # a folder without qnet.json: train-qnet's old
    with pytest.raises(QlassError, match=r"calibrated: false.*qlass\(m=2\)\[oracle\]"):
        run_evaluation(str(tiny_model_dir), "toy_envs:Corridor", ["seen"],
                       [("qlass", {"m": 2, "oracle_terminal": True})], tmp_path / "oracle", qnet_dir=out)
    assert not (tmp_path / "oracle").exists()
    history = list(read_qdata(data)[0].messages)
    good, bad = qnet.score(history, ["Thought: the box\nAction: open", "Thought: the box\nAction: close"])
    assert good > bad
    # features are what the SFT backbone computes at the action's last token
    lm, _ = load_causal_lm(tiny_model_dir)
    rec = read_qdata(data)[0]
    ids = qnet.encode(list(rec.messages), rec.action)
    with torch.no_grad():
        direct = sequence_hidden(backbone_of(lm), ids)[-1]
    row = json.loads((out / FEATURES_FILE).read_text().splitlines()[0])
    key = f"{rec.tree_id}/{rec.node_id}"
    assert np.allclose(row["features"][row["keys"].index(key)], direct.numpy(), atol=1e-3)
    # a rerun reads the features back instead of recomputing them (a killed run resumes from them), and
    # fits the very same head (before, in-process features were used unrounded and read-back ones rounded)
    weights = (out / "model.safetensors").read_bytes()
    lines = (out / FEATURES_FILE).read_text()
    (out / FEATURES_FILE).write_text(lines + lines.splitlines()[0][:40])  # a torn last line, as after kill -9
    again = train_qnet_head(data, tiny_model_dir, out, QNetHeadConfig(**CFG))
    assert again == result and (out / "model.safetensors").read_bytes() == weights
    assert (out / FEATURES_FILE).read_text().count("\n") == lines.count("\n")
    with pytest.raises(QlassError, match=r"holds a head-only QNet fitted with other settings \(l2: \[.*\] → \[5.0\]"):
        train_qnet_head(data, tiny_model_dir, out, QNetHeadConfig(**{**CFG, "l2": [5.0]}))
    assert (out / "model.safetensors").read_bytes() == weights
    with pytest.raises(QlassError, match="features were computed with .*max_action_tokens: 32 → 16"):
        train_qnet_head(data, tiny_model_dir, out, QNetHeadConfig(**{**CFG, "max_action_tokens": 16}))


def test_features_resumed_part_way_through_a_tree_are_those_of_an_uninterrupted_run(tiny_model_dir: Path,
                                                                                    tmp_path: Path) -> None:
    """A resumed run skipped the finished groups, so later groups of their tree started from a cold prefix cache
    and got features differing in the fifth decimal (31 of 163 records in the review), and the head fitted on
    them other results. Each tree now starts from an empty cache, and a resume replays its finished groups."""
    import shutil

    from qlass.qnet_head import features_of

    data = synthetic_qdata(tmp_path / "q.jsonl", trees=4)
    records, cfg = read_qdata(data), QNetHeadConfig(**{**CFG, "autocast": True})
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    whole.mkdir()
    features_of(records, tiny_model_dir, whole, cfg, str(data), "d")
    lines = (whole / FEATURES_FILE).read_text().splitlines(keepends=True)
    trees = [json.loads(line)["keys"][0].rsplit("/", 1)[0] for line in lines]
    at = next(i for i in range(1, len(lines)) if trees[i] == trees[i - 1] == trees[0] and i + 1 < len(lines)
              and trees[i + 1] == trees[i])  # stopped inside the first tree, after two of its groups
    shutil.copytree(whole, cut)
    (cut / FEATURES_FILE).write_text("".join(lines[:at + 1]))
    features_of(records, tiny_model_dir, cut, cfg, str(data), "d")
    assert (cut / FEATURES_FILE).read_text() == (whole / FEATURES_FILE).read_text()


def test_features_resume_from_the_same_inputs_named_another_way(tiny_model_dir: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The stamp compared the paths of the Q data and the SFT model as strings: the same files named
    another way (a relative path, a trailing slash, a copy of the same Q data) were refused with the
    stamp's JSON. They resume now; other Q data, or another model, is refused naming the setting."""
    import shutil

    data = synthetic_qdata(tmp_path / "q.jsonl", trees=4)
    out = tmp_path / "head"
    cfg = QNetHeadConfig(**{**CFG, "l2": [1.0]})
    first = train_qnet_head(data, tiny_model_dir, out, cfg)
    monkeypatch.chdir(tmp_path)
    shutil.copy(data, tmp_path / "copy.jsonl")
    for qdata in ("q.jsonl", "./copy.jsonl"):
        assert train_qnet_head(qdata, f"{tiny_model_dir}/", out, cfg) == first
    other = synthetic_qdata(tmp_path / "other.jsonl", trees=5)
    with pytest.raises(QlassError, match=r"features were computed with other inputs .*\(qdata: '.*copy.jsonl' → "
                                         r"'.*other.jsonl'\; see .*features.settings.json\)"):
        train_qnet_head(other, tiny_model_dir, out, cfg)
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model, copy_function=shutil.copy)  # new file times: another model
    with pytest.raises(QlassError, match=r"features were computed with other inputs .*\(sft_model: '.*' → '.*model'"):
        train_qnet_head(data, model, out, cfg)


def test_features_are_not_resumed_in_another_precision(tiny_model_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Features computed in fp32 (bf16 asked for, on a CPU without native bf16) are refused where this
    machine would compute the rest in bf16, naming the precision; a stamp from before the precision
    was recorded is checked on the rest. Only the CPU's bf16 capability check and speed verdict are
    replaced (a CPU cannot be given an instruction set)."""
    from qlass import precision

    def cpu_with_bf16(native: bool) -> None:
        precision.cpu_runs_bf16.cache_clear()
        monkeypatch.delenv(precision.ENV_VAR, raising=False)
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
        monkeypatch.setattr(precision, "cpu_bf16_is_faster", lambda: (True, "a stand-in: bf16 faster"))

    data = synthetic_qdata(tmp_path / "q.jsonl", trees=4)
    out = tmp_path / "head"
    cfg = QNetHeadConfig(**{**CFG, "autocast": True, "l2": [1.0]})
    try:
        cpu_with_bf16(False)
        train_qnet_head(data, tiny_model_dir, out, cfg)
        stamp = out / "features.settings.json"
        assert json.loads(stamp.read_text())["precision"] == "fp32"
        cpu_with_bf16(True)
        with pytest.raises(QlassError, match="features were computed with .*precision: 'fp32' → 'bf16'"):
            train_qnet_head(data, tiny_model_dir, out, cfg)
        legacy = json.loads(stamp.read_text())
        del legacy["precision"]
        stamp.write_text(json.dumps(legacy) + "\n")
        cpu_with_bf16(False)
        train_qnet_head(data, tiny_model_dir, out, cfg)  # an older stamp: accepted, and now records it
        assert json.loads(stamp.read_text())["precision"] == "fp32"
    finally:
        precision.cpu_runs_bf16.cache_clear()


def test_features_are_not_resumed_after_the_input_or_the_model_changed_at_the_same_path(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    """The feature folder recorded only the paths of its Q data and model: rewritten or replaced there,
    a rerun reused the old features for other histories and actions, or another model's, silently.
    Each record's features now carry a digest of its history and action, and the stamp the model
    files' sizes and times."""
    import shutil

    data = synthetic_qdata(tmp_path / "q.jsonl", trees=4)
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    out = tmp_path / "head"
    cfg = QNetHeadConfig(**{**CFG, "l2": [1.0]})
    train_qnet_head(data, model, out, cfg)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    changed = [{**r, "action": r["action"] + " now"} if i == 0 else r for i, r in enumerate(rows)]
    data.write_text("".join(json.dumps(r) + "\n" for r in changed))
    with pytest.raises(QlassError, match=r"features of record .* were computed from another history or action"):
        train_qnet_head(data, model, out, cfg)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_qnet_head(data, model, out, cfg)  # the same input again: resumed
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes())  # the model replaced at the same path (here: rewritten)
    with pytest.raises(QlassError, match="features were computed with .*sft_model: another model at the same path"):
        train_qnet_head(data, model, out, cfg)


def test_bad_settings_and_too_few_trees_are_named_errors(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = synthetic_qdata(tmp_path / "q.jsonl", trees=3)
    with pytest.raises(DataError, match="3 trees cannot be split into 4 folds"):
        train_qnet_head(data, tiny_model_dir, tmp_path / "out", QNetHeadConfig(**CFG))
    with pytest.raises(QlassError, match="positive strengths"):
        QNetHeadConfig(l2=[0.0])
    with pytest.raises(QlassError, match="folds must be >= 2"):
        QNetHeadConfig(folds=1)
    with pytest.raises(QlassError, match="seed must be >= 0"):  # numpy refused it only after every feature
        QNetHeadConfig(seed=-3)


@pytest.mark.parametrize("damage,message", [
    (lambda out: (out / "features.settings.json").write_text("[1, 2]\n"), "expected a JSON object"),
    (lambda out: (out / "features.settings.json").write_text("{not json\n"), "not valid JSON"),
    (lambda out: (out / FEATURES_FILE).write_text('{"a": 1}\n'), "line 1: a feature row holds the lists"),
    (lambda out: (out / FEATURES_FILE).write_text(
        json.dumps({**json.loads((out / FEATURES_FILE).read_text().splitlines()[0]), "loglik_sum": [0.0]}) + "\n"),
     "line 1: its lists differ in length"),
])
def test_a_damaged_feature_folder_is_named_not_a_traceback(tiny_model_dir: Path, tmp_path: Path, damage: Any,
                                                            message: str) -> None:
    """A damaged features.settings.json or features.jsonl was a JSONDecodeError, TypeError or KeyError
    traceback (a feature of the wrong width a matmul error after the whole cross-validation)."""
    data = synthetic_qdata(tmp_path / "q.jsonl", trees=4)
    out = tmp_path / "head"
    cfg = QNetHeadConfig(**{**CFG, "l2": [1.0]})
    train_qnet_head(data, tiny_model_dir, out, cfg)
    damage(out)
    with pytest.raises(QlassError, match=message):
        train_qnet_head(data, tiny_model_dir, out, cfg)


def test_features_from_a_pipe_are_stamped_with_the_bytes_read(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The feature stamp's digest reopened the Q data after it was read: a pipe (``<(zcat q.jsonl.gz)``) then
    gave no bytes, so the stamp recorded the digest of an empty file (a mkfifo pipe hung on the reopen)."""
    import hashlib
    import os
    import threading

    data = synthetic_qdata(tmp_path / "q.jsonl", trees=4)
    read, write = os.pipe()
    feeder = threading.Thread(target=lambda: (os.write(write, data.read_bytes()), os.close(write)), daemon=True)
    feeder.start()  # Q data of 4 trees fits a pipe's buffer, so the write does not wait on the reader
    try:
        train_qnet_head(f"/dev/fd/{read}", tiny_model_dir, tmp_path / "head", QNetHeadConfig(**{**CFG, "l2": [1.0]}))
    finally:
        feeder.join(timeout=10)
        os.close(read)
    stamp = json.loads((tmp_path / "head" / "features.settings.json").read_text())
    assert stamp["qdata_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
