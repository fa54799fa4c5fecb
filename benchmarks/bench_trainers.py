"""The trainers on transformers' Trainer / TRL (this tree) vs the hand-written loops they replaced (an
older source tree): quality and wall time at the same settings, seed and data, in one run.

Each trainer runs in its own process (``python -c`` with that tree's ``src`` first on the path),
timed from start to exit (imports, model load, encoding, training, validation, save). Then both
results are scored by one function here:

- ``--kind sft``: the final models' mean next-token loss per labelled token over the held-out
  trajectories' windows (the same seeded split and windows both trainers use);
- ``--kind qnet``: the held-out records' predictions each trainer wrote with its final QNet
  (``val_predictions.jsonl``; the same seeded split by tree): MSE of Q, sibling pair accuracy of the
  ranking score, Spearman of Q, the largest per-record difference of Q between the two, and the SFT
  log-likelihood ranker each run reported (it does not depend on the trainer).

Usage::

    mkdir -p /tmp/qlass-old && git archive 40747b3 src | tar -x -C /tmp/qlass-old    # the hand-written SFT trainer
    OMP_NUM_THREADS=1 python benchmarks/bench_trainers.py --data runs/reference/expert.json \\
        --old-src /tmp/qlass-old/src --out /tmp/bench-trainers --set max_steps=5
    mkdir -p /tmp/oldq && git archive 3b65330 src | tar -x -C /tmp/oldq              # the hand-written QNet trainer
    OMP_NUM_THREADS=1 python benchmarks/bench_trainers.py --kind qnet --data runs/guidance/qdata-16.jsonl \\
        --model runs/reference/sft --old-src /tmp/oldq/src --out /tmp/bench-qnet --set max_steps=6

Settings: the ``sft`` or ``qnet`` section of ``configs/reference.yaml``, then ``--set`` overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))
from bench_args import output_folder, run_main

from qlass.config import build, parse_kv
from qlass.data import load_trajectories
from qlass.errors import QlassError
from qlass.jsonl import read_jsonl
from qlass.models import default_model_dir
from qlass.policy.loading import load_causal_lm
from qlass.qnet_data import ranking_metrics, read_qdata, spearman
from qlass.training.configs import QNetTrainConfig, SFTConfig

RUN = {"sft": {"old": "from qlass.sft import SFTConfig as Config, train_sft as train",
               "new": "from qlass.training.sft import SFTConfig as Config, train_sft as train"},
       "qnet": {"old": "from qlass.qnet_train import QNetTrainConfig as Config, train_qnet as train",
                "new": "from qlass.training.qnet import QNetTrainConfig as Config, train_qnet as train"}}


def train(kind: str, which: str, src: Path, data: Path, model: Path, out: Path, opts: dict) -> float:
    """Seconds one trainer takes, in a fresh process, from start to exit."""
    code = f"{RUN[kind][which]}\ntrain({str(data)!r}, {str(model)!r}, {str(out)!r}, Config(**{opts!r}))"
    env = {**os.environ, "PYTHONPATH": str(src)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], env=env, check=False)
    if done.returncode:
        raise QlassError(f"the {which} {kind} trainer ({src}) exited with status {done.returncode}; its error is above")
    return time.perf_counter() - started


def held_out_loss(model_dir: Path, data: Path, cfg: SFTConfig) -> float:
    """Mean loss per labelled token over the held-out windows (fp32, no autocast)."""
    import torch  # here, not at the top: a usage error is answered before torch loads

    from qlass.training.sft import encode_windows, split_indices

    model, tokenizer = load_causal_lm(model_dir)
    trajectories = load_trajectories(data)
    _, val_idx = split_indices(len(trajectories), cfg.val_fraction, cfg.seed)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in val_idx:
            windows, _ = encode_windows(tokenizer, trajectories[i].messages, cfg.max_length)  # and the cut count
            for ids, labels in windows:
                out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
                n = sum(1 for x in labels[1:] if x != -100)
                total, count = total + float(out.loss) * n, count + n
    return total / count


def qnet_validation(out: Path) -> dict:
    """MSE, sibling pair accuracy and Spearman of a QNet run's held-out predictions, and the SFT
    log-likelihood ranker it reported."""
    rows = read_jsonl(out / "val_predictions.jsonl")
    targets = [r["q"] for r in rows]
    ranking = ranking_metrics([(r["tree_id"], r["group"]) for r in rows], targets, [r["qnet_score"] for r in rows])
    result = json.loads((out / "qnet_result.json").read_text())
    loglik = result.get("sft_loglik") or {}
    return {"records": len(rows), "mse": sum((r["qnet_q"] - r["q"]) ** 2 for r in rows) / len(rows),
            "pair_accuracy": ranking["pair_accuracy"], "pairs": ranking["pairs"],
            "spearman": spearman(targets, [r["qnet_q"] for r in rows]), "kept_epoch": result.get("kept_epoch"),
            "sft_loglik_pair_accuracy": loglik.get("pair_accuracy"), "sft_loglik_spearman": loglik.get("spearman")}


def compare_qnets(old: Path, new: Path) -> dict:
    """The two runs' differences on the same held-out records."""
    a = {(r["tree_id"], r["node_id"]): r for r in read_jsonl(old / "val_predictions.jsonl")}
    b = {(r["tree_id"], r["node_id"]): r for r in read_jsonl(new / "val_predictions.jsonl")}
    assert a.keys() == b.keys(), "the two trainers held out different records"
    diffs = [abs(a[k]["qnet_q"] - b[k]["qnet_q"]) for k in a]
    return {"max_abs_q_difference": max(diffs), "mean_abs_q_difference": sum(diffs) / len(diffs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", choices=sorted(RUN), default="sft")
    ap.add_argument("--data", type=Path, required=True, help="SFT trajectories, or Q data for --kind qnet")
    ap.add_argument("--old-src", type=Path, required=True, help="src/ of a qlass with the hand-written loop")
    ap.add_argument("--model", type=Path, default=None,
                    help="base model (default: SmolLM2-135M-Instruct); for --kind qnet the SFT model")
    ap.add_argument("--out", type=output_folder, required=True,
                    help="folder for the two runs (OUT/old, OUT/new) and result.json; the runs must not exist yet")
    ap.add_argument("--set", dest="set_", action="append", default=[], help="config override key=value")
    ap.add_argument("--only", choices=("old", "new"), default=None, help="run one trainer (ratios then left out)")
    args = ap.parse_args()
    reference = Path(__file__).resolve().parents[1] / "configs" / "reference.yaml"
    opts = {**yaml.safe_load(reference.read_text())[args.kind], **parse_kv(args.set_, "--set")}
    # Checked before any training: a trainer's child process failing on them was a traceback, then the parent's
    finished = [args.out / which for which in ("old", "new")
                if args.only in (None, which) and (args.out / which).exists()]
    if finished:  # a trainer hands back a finished run: the timing would be of a no-op
        ap.error(f"--out {args.out}: {finished[0]} exists, and a trainer would resume it rather than train; give a new "
                 "--out (or remove it)")
    if args.only != "new" and not (args.old_src / "qlass").is_dir():
        ap.error(f"--old-src {args.old_src}: holds no qlass package (the src/ folder of an older qlass is expected)")
    if args.only != "old":
        build(SFTConfig if args.kind == "sft" else QNetTrainConfig, opts, f"{reference.name} [{args.kind}] with --set")
    if args.kind == "sft":
        load_trajectories(args.data)
    else:
        read_qdata(args.data)
    model = args.model or default_model_dir()
    result: dict = {"kind": args.kind, "settings": opts, "data": str(args.data), "model": str(model),
                    "machine": platform.processor() or platform.machine(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "load_before": os.getloadavg()}
    for which, src in (("old", args.old_src), ("new", SRC)):
        if args.only not in (None, which):
            continue
        out = args.out / which
        seconds = train(args.kind, which, src, args.data, model, out, opts)
        quality = qnet_validation(out) if args.kind == "qnet" else \
            {"held_out_loss": held_out_loss(out, args.data, SFTConfig(**opts))}
        result[which] = {"wall_s": round(seconds, 1), **quality}
        print(which, result[which], flush=True)
    result["load_after"] = os.getloadavg()
    if args.only:
        print(json.dumps(result, indent=2))
        return
    result["time_ratio"] = result["new"]["wall_s"] / result["old"]["wall_s"]
    if args.kind == "qnet":
        result.update(compare_qnets(args.out / "old", args.out / "new"))
    else:
        result["loss_ratio"] = result["new"]["held_out_loss"] / result["old"]["held_out_loss"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    run_main(main)
