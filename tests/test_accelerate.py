"""`qlass sft`, `qlass dpo` and `qlass train-qnet` on two CPU processes (gloo; `accelerate launch --multi_gpu
--num_processes 2` with no GPU visible: accelerate's `--cpu` starts one process whatever `--num_processes` says)
take the same optimizer steps as one process at the same global batch: the two processes split each
step's micro-batches (the QNet: each step's packed rows), and the loss is normalised over the whole
step. Each test trains once on one process, and once on two whose rank 1 is killed mid-epoch and which
resume under the same command: the second run must end with the first's losses and weights, per-step
train loss and validation metrics within 1e-4 relative, final weights within 1e-5 (float sums in another
order)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_dpo import write_pairs
from test_qnet_train import synthetic_qdata
from test_sft import write_data
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
          "-m", "qlass"]
ONE = [sys.executable, "-m", "qlass"]


def _run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"training on {'2 processes' if cmd[:3] == LAUNCH[:3] else '1 process'}" in proc.stderr


def _curve(out: Path, key: str) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in records if key in r and r.get("kind") != "summary"]


def _same_run(one: Path, two: Path, keys: tuple[str, ...], auto: type = AutoModelForCausalLM) -> None:
    for key in keys:
        a, b = _curve(one, key), _curve(two, key)
        assert a and [s for s, _ in a] == [s for s, _ in b], key
        assert all(y == pytest.approx(x, rel=1e-4) for (_, x), (_, y) in zip(a, b)), (key, a, b)
    wa = auto.from_pretrained(one).state_dict()
    wb = auto.from_pretrained(two).state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    assert not list(two.glob("checkpoint-*")) and (two / ".qlass-complete").exists()


def _mixed_qdata(path: Path) -> Path:
    """Trees of 4 sibling groups (8 records) and of 1 (2 records): with pairs, each tree is one unit, so
    a step of batch_size 4 is one big tree (the second process holds no row: blank passes) or several small
    ones (dealt to both processes)."""
    big = synthetic_qdata(path.with_name("big.jsonl"), trees=4, groups=4, seed=0).read_text().splitlines()
    small = [json.loads(line) for line in synthetic_qdata(path.with_name("small.jsonl"), trees=6, groups=1,
                                                          seed=1).read_text().splitlines()]
    for r in small:
        r["tree_id"], r["group"] = "s" + r["tree_id"], "s" + r["group"]
    path.write_text("\n".join(big + [json.dumps(r) for r in small]) + "\n")
    return path


def _killed_runs_resume_to_the_run_of_one(command: str, opts: list[str], checkpoint: str, cwd: Path,
                                           keys: tuple[str, ...], auto: type = AutoModelForCausalLM,
                                           killed: tuple[list[str], ...] = (LAUNCH,)) -> list[Path]:
    """``qlass COMMAND`` on one process into ``one``; then, for each way of starting in ``killed`` (two processes,
    or one), a run into its own folder, killed (rank 1 of two) after ``checkpoint`` and resumed on two processes:
    each ends with ``one``'s ``keys`` curves and weights. Returns the resumed runs' folders."""
    _run(ONE + [command, "--out", "one"] + opts, cwd)
    resumed = []
    for i, start in enumerate(killed):
        out = cwd / f"killed-{i}"
        _kill_after(checkpoint, start + [command, "--out", out.name] + opts, cwd, out)
        _run(LAUNCH + [command, "--out", out.name] + opts, cwd)
        _same_run(cwd / "one", out, keys, auto)
        resumed.append(out)
    return resumed


def _kill_after(checkpoint: str, cmd: list[str], cwd: Path, out: Path) -> None:
    """Start `cmd`, SIGKILL its rank 1 (under two processes) or itself once `checkpoint` is written, and check it
    failed before the next checkpoint."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    launch = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (out / checkpoint / "trainer_state.json").exists():
            assert time.monotonic() < deadline and launch.poll() is None
            time.sleep(0.05)
        victim = launch.pid
        if cmd[:3] == LAUNCH[:3]:
            ranks = [p for p in Path("/proc").glob("[0-9]*") if _parent(p) == launch.pid]
            [victim] = [int(p.name) for p in ranks if b"\0RANK=1\0" in b"\0" + (p / "environ").read_bytes()]
        os.kill(victim, signal.SIGKILL)
        assert launch.wait(timeout=120) != 0
    finally:
        if launch.poll() is None:
            launch.kill()
            launch.wait()
    done = sorted(int(c.name.split("-")[1]) for c in out.glob("checkpoint-*"))
    assert done[-1] == int(checkpoint.split("-")[1]), f"killed too late: resumes from checkpoint-{done[-1]}"


def _sft_with_checkpoint_10(model: Path, cwd: Path) -> list[str]:
    """SFT options for 3 epochs of 9 steps (36 train records of 40), a checkpoint at step 10 (epoch 2, step 1)."""
    write_data(cwd / "data.json", n=40)
    return ["--data", "data.json", "--model", str(model), "--set", "epochs=3", "--set", "lr=1e-3", "--set",
            "batch_size=4", "--set", "micro_batch=1", "--set", "val_fraction=0.1", "--set", "threads=1", "--set",
            "save_every=10"]


@pytest.mark.slow
def test_sft_killed_mid_epoch_resumes_on_two_processes_to_the_run_of_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Killed (SIGKILL; rank 1 of two) after the checkpoint at step 10 (epoch 2, step 1): the launch fails, the same
    command resumes from checkpoint-10 and ends with the losses and weights of an uninterrupted run. The resumed
    epoch drew the first epoch's batch order (the Trainer's set_epoch did not reach the sampler under two
    processes), so every step after the checkpoint trained on other batches. A run started on one process (as
    the README's earlier ``--cpu`` command did, whatever --num_processes said) resumes on two to the same run:
    rank 1 finds no RNG state of its own, and the batch order depends on the seed and epoch only."""
    opts = _sft_with_checkpoint_10(tiny_model_dir, tmp_path)
    _killed_runs_resume_to_the_run_of_one("sft", opts, "checkpoint-10", tmp_path, ("train_loss", "val_loss"),
                                          killed=(LAUNCH, ONE))
    assert len(_curve(tmp_path / "one", "train_loss")) == 27


@pytest.mark.slow
def test_dpo_killed_mid_epoch_resumes_on_two_processes_to_the_run_of_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    """As for SFT, with TRL's sampler: 8 pairs, 4 steps of 2 per epoch (one pair per process and step); killed
    after step 6 (epoch 2, step 2)."""
    write_pairs(tmp_path / "pairs.jsonl", 8)
    opts = ["--pairs", "pairs.jsonl", "--model", str(tiny_model_dir), "--set", "epochs=2", "--set", "lr=1e-3",
            "--set", "batch_size=2", "--set", "micro_batch=1", "--set", "val_fraction=0", "--set", "threads=1",
            "--set", "save_every=2"]
    _killed_runs_resume_to_the_run_of_one("dpo", opts, "checkpoint-6", tmp_path, ("train_loss",))
    assert len(_curve(tmp_path / "one", "train_loss")) == 8


@pytest.mark.slow
def test_qnet_killed_mid_epoch_resumes_on_two_processes_to_the_run_of_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    """As for SFT, with the QNet trainer's own step schedule (sibling units dealt to the processes per step):
    4 steps per epoch, killed after step 6 (epoch 2, step 2). Its steps include both kinds: one big tree (the
    second process holds no row and makes blank passes) and several small trees dealt to both processes."""
    _mixed_qdata(tmp_path / "q.jsonl")
    opts = ["q.jsonl", "--model", str(tiny_model_dir)] + [
        x for kv in ("epochs=3", "lr=3e-3", "batch_size=4", "min_trees_per_step=1", "pair_weight=0.5",
                     "rank=dueling", "max_length=512", "max_action_tokens=32", "val_fraction=0.3", "warmup_ratio=0",
                     "threads=1", "save_every=3") for x in ("--set", kv)]
    [two] = _killed_runs_resume_to_the_run_of_one("train-qnet", opts, "checkpoint-6", tmp_path, (
        "train_loss", "train_mse", "pair_loss", "val_mse", "val_pair_accuracy"), AutoModelForSequenceClassification)
    steps = [r for r in map(json.loads, (two / "metrics.jsonl").read_text().splitlines()) if "train_loss" in r]
    assert len(steps) == 12  # 4 steps per epoch: checkpoint-6 is mid-epoch 2
    assert {r["trees"] == 1 for r in steps} == {True, False} and sum(r["pairs"] for r in steps) > 0
    one, two = (json.loads((run / "qnet_result.json").read_text()) for run in (tmp_path / "one", two))
    assert two["qnet"]["pair_accuracy"] == one["qnet"]["pair_accuracy"]
    assert two["sft_loglik"] == one["sft_loglik"]


def _parent(proc: Path) -> int:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return -1
