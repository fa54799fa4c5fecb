"""QNet scoring speed: shared-prefix batch (``QNet.score``) vs one full forward per candidate.

The baseline is the reference code's way of scoring (one candidate per forward, the whole history
recomputed each time), here without its padding to 4,096 tokens, so the baseline is if anything
faster than the original. Both paths tokenize the same (history, candidate) pairs with the same
encoding, and their scores are checked to agree. The model is the default architecture
(SmolLM2-135M, from ``qlass.models.default_model_dir()``) turned into a sequence classifier with a
fresh head. Prints candidates scored per second for M candidates and history lengths, with ratios,
and writes JSON + markdown. Usage::

    python benchmarks/bench_qnet.py [--m 2,4,8] [--history 512,1024,2048] [--repeats 2] [--threads 1] [--autocast]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bench_args import json_and_table_file, positive_int, positive_ints, run_main

from qlass.models import default_model_dir, resolve_device
from qlass.policy.render import encode_conversation
from qlass.types import Message

if TYPE_CHECKING:  # torch loads after the arguments are read: a usage error or --help is answered at once
    from qlass.qnet import QNet

WORDS = ("you see a door to the kitchen hallway greenhouse art studio workshop outside foundry bedroom "
         "living room bathroom a table with a cup of water an orange a banana a thermometer a sink a fridge "
         "a stove a lighter a flower pot containing a plant soil seeds a bee hive the door is open closed").split()
ACTIONS = ["look around", "open door to kitchen", "go to kitchen", "focus on banana", "pick up thermometer",
           "move plant to flower pot 2", "activate stove", "wait1", "teleport to greenhouse"]


def make_history(qnet: QNet, target: int, rng: random.Random) -> list[Message]:
    """A ScienceWorld-like conversation whose prompt encodes to about ``target`` tokens."""
    msgs = [Message("user", "You are a helpful assistant to do some scientific experiment in an environment. "
                    "Reply with one thought and one action.\n" + " ".join(rng.choices(WORDS, k=60))),
            Message("assistant", "OK"),
            Message("user", "Your task is to find a(n) living thing. First, focus on the thing. Then, move it "
                    "to the red box in the kitchen.")]
    while len(encode_conversation(qnet.tokenizer, msgs)[0]) < target:
        msgs += [Message("assistant", f"Thought: {' '.join(rng.choices(WORDS, k=8))}\nAction: {rng.choice(ACTIONS)}"),
                 Message("user", "Observation: " + " ".join(rng.choices(WORDS, k=rng.randint(20, 60))))]
    return msgs


def make_candidates(m: int, rng: random.Random) -> list[str]:
    """``m`` agent outputs of 20-60 tokens, like sampled ``Thought/Action`` candidates."""
    return [f"Thought: {' '.join(rng.choices(WORDS, k=rng.randint(12, 45)))}\nAction: {rng.choice(ACTIONS)}"
            for _ in range(m)]


def naive_scores(qnet: QNet, history: list[Message], candidates: list[str]) -> list[float]:
    """One full forward of the HF classifier per candidate (the baseline)."""
    import torch

    out = []
    device = qnet.model.device
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=qnet.autocast):
        for c in candidates:
            ids = torch.tensor([qnet.encode(history, c)], device=device)
            out.append(float(qnet.model(input_ids=ids).logits[0, 0].float()))
    return out


def best_time(fn, repeats: int) -> tuple[float, float, object]:
    """Best wall-clock and best process-CPU seconds over ``repeats`` runs, and the last result.
    CPU time is robust to other processes sharing the machine; wall time is what a user sees."""
    import torch

    wall, cpu, result = float("inf"), float("inf"), None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall, cpu = min(wall, time.perf_counter() - start), min(cpu, time.process_time() - start_cpu)
    return wall, cpu, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=positive_ints, default="2,4,8", help="candidate counts")
    ap.add_argument("--history", type=positive_ints, default="512,1024,2048", help="history lengths in tokens")
    ap.add_argument("--repeats", type=positive_int, default=2, help="timed runs per cell (the best is kept)")
    ap.add_argument("--autocast", action="store_true", help="bf16 autocast for both paths")
    ap.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (1 makes CPU time exact "
                    "on a busy machine: no spinning worker threads)")
    ap.add_argument("--device", default="auto", help="torch device (auto: cuda when a GPU is visible, else cpu)")
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: the default model)")
    ap.add_argument("--out", type=json_and_table_file, default=Path("benchmarks/results/bench_qnet.json"))
    args = ap.parse_args()
    import torch

    from qlass.qnet import QNet

    args.device = resolve_device(args.device)  # torch's own error was a traceback after the model loaded
    if args.threads:
        torch.set_num_threads(args.threads)

    qnet = QNet.from_sft(args.model or default_model_dir(), max_length=8192, max_action_tokens=256,
                         autocast=args.autocast, seed=0)
    qnet.model.to(args.device).eval()
    rng = random.Random(0)
    warm = make_history(qnet, 128, rng)
    qnet.score(warm, make_candidates(2, rng))
    naive_scores(qnet, warm, make_candidates(2, rng))
    rows = []
    for h in args.history:
        history = make_history(qnet, h, rng)
        h_tokens = len(qnet.encode_history(history))
        for m in args.m:
            cands = make_candidates(m, rng)
            t_shared, cpu_shared, shared = best_time(lambda h=history, c=cands: qnet.score(h, c), args.repeats)
            shared_tokens = qnet.last_tokens
            t_naive, cpu_naive, naive = best_time(lambda h=history, c=cands: naive_scores(qnet, h, c), args.repeats)
            naive_tokens = sum(len(qnet.encode(history, c)) for c in cands)
            diff = max(abs(a - b) for a, b in zip(shared, naive, strict=True))
            row = {"m": m, "history_tokens": h_tokens, "shared_cand_per_s": m / t_shared,
                   "naive_cand_per_s": m / t_naive, "ratio": t_naive / t_shared,
                   "cpu_ratio": cpu_naive / cpu_shared, "shared_tokens": shared_tokens,
                   "naive_tokens": naive_tokens, "max_abs_score_diff": diff}
            rows.append(row)
            print(f"M={m} history={h_tokens:5d}: shared {row['shared_cand_per_s']:8.2f} cand/s, "
                  f"naive {row['naive_cand_per_s']:8.2f} cand/s, ratio {row['ratio']:5.2f}x "
                  f"(CPU time {row['cpu_ratio']:5.2f}x), "
                  f"tokens {shared_tokens}/{naive_tokens}, max |diff| {diff:.1e}", flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    report = {"model": str(args.model or default_model_dir()), "device": device, "autocast": args.autocast,
              "repeats": args.repeats, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"QNet scoring, {Path(report['model']).name}, {device}, autocast={args.autocast}", "",
             "| M | history tokens | shared-prefix cand/s | one forward per cand, cand/s | ratio (wall) "
             "| ratio (CPU time) | tokens shared / naive |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['m']} | {r['history_tokens']} | {r['shared_cand_per_s']:.2f} | {r['naive_cand_per_s']:.2f} | "
              f"{r['ratio']:.2f}x | {r['cpu_ratio']:.2f}x | {r['shared_tokens']} / {r['naive_tokens']} |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    run_main(main)
