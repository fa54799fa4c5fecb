"""`qlass sft` and `qlass dpo` under `accelerate launch --num_processes 2 --cpu` (gloo) take the same
optimizer steps as one process at the same global batch: the two processes split each step's
micro-batches, and the loss is normalised over the whole step. Tolerance: per-step train loss and
validation loss within 1e-4 relative, final weights within 1e-5 (float sums in another order)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_dpo import write_pairs
from test_sft import write_data
from transformers import AutoModelForCausalLM

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "qlass"]
ONE = [sys.executable, "-m", "qlass"]


def _run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _curve(out: Path, key: str) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in records if key in r and r.get("kind") != "summary"]


def _same_run(one: Path, two: Path, keys: tuple[str, ...]) -> None:
    for key in keys:
        a, b = _curve(one, key), _curve(two, key)
        assert a and [s for s, _ in a] == [s for s, _ in b], key
        assert all(y == pytest.approx(x, rel=1e-4) for (_, x), (_, y) in zip(a, b)), (key, a, b)
    wa = AutoModelForCausalLM.from_pretrained(one).state_dict()
    wb = AutoModelForCausalLM.from_pretrained(two).state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    assert not list(two.glob("checkpoint-*")) and (two / ".qlass-complete").exists()


@pytest.mark.slow
def test_sft_on_two_processes_matches_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    write_data(tmp_path / "data.json", n=10)  # 8 train (4 micro-batches of 2 per epoch), 2 held out
    opts = ["--data", "data.json", "--model", str(tiny_model_dir), "--set", "epochs=2", "--set", "lr=1e-3",
            "--set", "batch_size=4", "--set", "micro_batch=1", "--set", "val_fraction=0.2", "--set", "threads=1"]
    _run(ONE + ["sft", "--out", "one"] + opts, tmp_path)  # 4 micro-batches accumulated per step
    _run(LAUNCH + ["sft", "--out", "two"] + opts, tmp_path)  # 2 per process
    _same_run(tmp_path / "one", tmp_path / "two", ("train_loss", "val_loss"))
    assert len(_curve(tmp_path / "two", "train_loss")) == 4


@pytest.mark.slow
def test_dpo_on_two_processes_matches_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    write_pairs(tmp_path / "pairs.jsonl", 8)
    opts = ["--pairs", "pairs.jsonl", "--model", str(tiny_model_dir), "--set", "epochs=2", "--set", "lr=1e-3",
            "--set", "batch_size=4", "--set", "micro_batch=1", "--set", "val_fraction=0", "--set", "threads=1"]
    _run(ONE + ["dpo", "--out", "one"] + opts, tmp_path)
    _run(LAUNCH + ["dpo", "--out", "two"] + opts, tmp_path)
    _same_run(tmp_path / "one", tmp_path / "two", ("train_loss",))
    assert len(_curve(tmp_path / "two", "train_loss")) == 4
