"""SFT on TRL's SFTTrainer (this tree) vs the hand-written loop it replaced (an older source tree):
held-out loss and wall time at the same settings, seed and data, in one run.

Each trainer runs in its own process (``python -c`` with that tree's ``src`` first on the path),
timed from start to exit (imports, model load, encoding, training, validation, save). Then both final
models are scored by one function here: the mean next-token loss per labelled token over the
held-out trajectories' windows (the same seeded split and windows both trainers use). Usage::

    git archive 40747b3 src | tar -x -C /tmp/qlass-old      # the hand-written trainer
    OMP_NUM_THREADS=1 python benchmarks/bench_trainers.py --data runs/reference/expert.json \\
        --old-src /tmp/qlass-old/src --out /tmp/bench-trainers --set max_steps=5

Settings: the ``sft`` section of ``configs/reference.yaml``, then ``--set`` overrides.
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

import torch
import yaml

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))
from qlass.config import parse_kv
from qlass.data import load_trajectories
from qlass.models import default_model_dir
from qlass.policy.hf import load_causal_lm
from qlass.training.sft import SFTConfig, encode_windows, split_indices

RUN = {"old": "from qlass.sft import SFTConfig, train_sft",
       "new": "from qlass.training.sft import SFTConfig, train_sft"}


def train(which: str, src: Path, data: Path, model: Path, out: Path, opts: dict) -> float:
    """Seconds one trainer takes, in a fresh process, from start to exit."""
    code = f"{RUN[which]}\ntrain_sft({str(data)!r}, {str(model)!r}, {str(out)!r}, SFTConfig(**{opts!r}))"
    env = {**os.environ, "PYTHONPATH": str(src)}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    return time.perf_counter() - started


def held_out_loss(model_dir: Path, data: Path, cfg: SFTConfig) -> float:
    """Mean loss per labelled token over the held-out windows (fp32, no autocast)."""
    model, tokenizer = load_causal_lm(model_dir)
    trajectories = load_trajectories(data)
    _, val_idx = split_indices(len(trajectories), cfg.val_fraction, cfg.seed)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in val_idx:
            for ids, labels in encode_windows(tokenizer, trajectories[i].messages, cfg.max_length):
                out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
                n = sum(1 for x in labels[1:] if x != -100)
                total, count = total + float(out.loss) * n, count + n
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--old-src", type=Path, required=True, help="src/ of a qlass with the hand-written SFT loop")
    ap.add_argument("--model", type=Path, default=None, help="base model (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--set", dest="set_", action="append", default=[], help="SFTConfig override key=value")
    ap.add_argument("--only", choices=sorted(RUN), default=None, help="run one trainer (ratios then left out)")
    args = ap.parse_args()
    reference = Path(__file__).resolve().parents[1] / "configs" / "reference.yaml"
    opts = {**yaml.safe_load(reference.read_text())["sft"], **parse_kv(args.set_, "--set")}
    cfg = SFTConfig(**opts)
    model = args.model or default_model_dir()
    result: dict = {"settings": opts, "data": str(args.data), "machine": platform.processor() or platform.machine(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "load_before": os.getloadavg()}
    for which, src in (("old", args.old_src), ("new", SRC)):
        if args.only not in (None, which):
            continue
        out = args.out / which
        seconds = train(which, src, args.data, model, out, opts)
        result[which] = {"wall_s": round(seconds, 1), "held_out_loss": held_out_loss(out, args.data, cfg)}
        print(which, result[which], flush=True)
    result["load_after"] = os.getloadavg()
    if args.only:
        print(json.dumps(result, indent=2))
        return
    result["loss_ratio"] = result["new"]["held_out_loss"] / result["old"]["held_out_loss"]
    result["time_ratio"] = result["new"]["wall_s"] / result["old"]["wall_s"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
