"""QNet training speed: packed paths (what ``qlass train-qnet`` does) vs one shared-prefix forward per
sibling group (how it trained before, and how inference scores).

Both ways run forward + backward of the MSE loss over the same Q records with the same model and
encoding; their summed losses are checked to agree. The optimizer step, the same for both, is left
out. Records come from a real ``qdata.jsonl`` (``--qdata``, e.g. ``runs/reference/qdata.jsonl``;
its first ``--trees`` trees) or, by default, from synthetic ScienceWorld-like trees shaped like
exploration's: a main path of ``--depth`` turns and, at each of its first three steps, a sampled
sibling whose rollout runs ``--rollout`` turns. Usage::

    python benchmarks/bench_qnet_train.py [--qdata FILE] [--trees 3] [--repeats 3] [--autocast] [--threads 2]

The two ways run interleaved ``--repeats`` times; the report gives each one's median (this machine is shared).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).parent))
from bench_args import json_and_table_file, positive_int, run_main  # noqa: E402
from bench_qnet import ACTIONS, WORDS, make_history  # noqa: E402

from qlass.models import default_model_dir, resolve_device  # noqa: E402
from qlass.qnet_data import QRecord, make_groups, read_qdata  # noqa: E402
from qlass.qnet_pack import pack_records  # noqa: E402
from qlass.types import Message  # noqa: E402

if TYPE_CHECKING:  # torch loads after the arguments are read: a usage error or --help is answered at once
    from qlass.qnet import QNet


def _action(rng: random.Random) -> str:
    return f"Thought: {' '.join(rng.choices(WORDS, k=rng.randint(8, 30)))}\nAction: {rng.choice(ACTIONS)}"


def synthetic_tree(qnet: QNet, t: int, depth: int, rollout: int, rng: random.Random) -> list[QRecord]:
    """One exploration-shaped tree of Q records (values are random: only the shapes matter here)."""
    records: list[QRecord] = []
    root = tuple(make_history(qnet, 300, rng)[:3])

    def chain(history: tuple[Message, ...], steps: int, first_id: int, parent: int, d: int) -> tuple[Message, ...]:
        for k in range(steps):
            node = first_id + k
            action = _action(rng)
            records.append(QRecord(f"tree{t}", f"toy/{t}", node, parent, f"tree{t}:{parent}", d + k, history,
                                   action, rng.random()))
            obs = "Observation: " + " ".join(rng.choices(WORDS, k=rng.randint(20, 60)))
            history = history + (Message("assistant", action), Message("user", obs))
            parent = node
        return history

    chain(root, depth, 1, 0, 1)
    for d in range(3):  # a sampled sibling of main-path node d+1, then its rollout
        main = [r for r in records if r.node_id == d + 1][0]
        chain(main.messages, rollout, 1000 * (d + 1), main.parent_id, d + 1)
    return records


def grouped_loss(qnet: QNet, records: list[QRecord]) -> tuple[float, int]:
    """Forward + backward per sibling group (shared prefix once); returns (sum of squared errors, tokens)."""
    import torch

    total, tokens = 0.0, 0
    for g in make_groups(records, "bench"):
        prefix = qnet.encode_history(g.messages)
        suffixes = [qnet.encode_action(r.action) for r in g.records]
        values = qnet.values(prefix, suffixes)
        loss = ((values - torch.tensor([r.q for r in g.records], device=values.device)) ** 2).sum()
        loss.backward()
        total += float(loss.detach())
        tokens += len(prefix) + sum(map(len, suffixes))
    return total, tokens


def packed_loss(qnet: QNet, records: list[QRecord]) -> tuple[float, int]:
    """Forward + backward per packed path; returns (sum of squared errors, tokens)."""
    import torch

    total, tokens = 0.0, 0
    for row in pack_records(qnet.encode_history, qnet.encode_action, records):
        values = qnet.values_at(row.ids, row.ends)
        loss = ((values - torch.tensor(row.targets, device=values.device)) ** 2).sum()
        loss.backward()
        total += float(loss.detach())
        tokens += len(row.ids)
    return total, tokens


def timed(fn, qnet: QNet, records: list[QRecord]) -> tuple[float, float, float, int]:
    """Wall and process-CPU seconds of one pass, its summed loss and its token count."""
    import torch

    qnet.model.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start, start_cpu = time.perf_counter(), time.process_time()
    loss, tokens = fn(qnet, records)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - start_cpu, loss, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qdata", type=Path, default=None, help="real Q data (default: synthetic trees)")
    ap.add_argument("--trees", type=positive_int, default=3, help="trees to train on")
    ap.add_argument("--repeats", type=positive_int, default=3, help="timed passes of each way (median reported)")
    ap.add_argument("--depth", type=positive_int, default=10, help="synthetic: main-path length in turns")
    ap.add_argument("--rollout", type=positive_int, default=6, help="synthetic: rollout length under each sibling")
    ap.add_argument("--max-length", type=positive_int, default=2048)
    ap.add_argument("--max-action-tokens", type=positive_int, default=96)
    ap.add_argument("--autocast", action="store_true", help="bf16 autocast for both ways")
    ap.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    ap.add_argument("--device", default="auto", help="torch device (auto: cuda when a GPU is visible, else cpu)")
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: the default model)")
    ap.add_argument("--out", type=json_and_table_file, default=Path("benchmarks/results/bench_qnet_train.json"))
    args = ap.parse_args()
    if args.depth < 3 and not args.qdata:  # a sibling is sampled at each of the main path's first three steps
        ap.error(f"--depth {args.depth}: at least 3 (synthetic trees branch at the main path's first three steps)")
    import torch

    from qlass.qnet import QNet

    args.device = resolve_device(args.device)  # torch's own error was a traceback after the model loaded
    if args.threads:
        torch.set_num_threads(args.threads)

    model = args.model or default_model_dir()
    qnet = QNet.from_sft(model, args.max_length, args.max_action_tokens, autocast=args.autocast, seed=0)
    qnet.model.to(args.device).train()
    rng = random.Random(0)
    if args.qdata:
        records = read_qdata(args.qdata)
        keep = list(dict.fromkeys(r.tree_id for r in records))[: args.trees]
        records = [r for r in records if r.tree_id in keep]
        trees = len(keep)  # --trees is at most: the file may hold fewer
    else:
        trees = args.trees
        records = [r for t in range(args.trees) for r in synthetic_tree(qnet, t, args.depth, args.rollout, rng)]
    timed(packed_loss, qnet, records[:4])  # warm-up
    passes: dict[str, list[tuple[float, float, float, int]]] = {"grouped": [], "packed": []}
    for _ in range(args.repeats):  # interleaved: a slow spell of this shared machine hits both ways
        passes["grouped"].append(timed(grouped_loss, qnet, records))
        passes["packed"].append(timed(packed_loss, qnet, records))
    g_wall, g_cpu = (statistics.median(p[i] for p in passes["grouped"]) for i in (0, 1))
    p_wall, p_cpu = (statistics.median(p[i] for p in passes["packed"]) for i in (0, 1))
    (*_, g_loss, g_tokens), (*_, p_loss, p_tokens) = passes["grouped"][0], passes["packed"][0]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    report = {"model": str(model), "device": device, "autocast": args.autocast, "repeats": args.repeats,
              "data": str(args.qdata or "synthetic"), "trees": trees, "records": len(records),
              "grouped": {"seconds": g_wall, "cpu_seconds": g_cpu, "tokens": g_tokens, "loss": g_loss,
                          "records_per_s": len(records) / g_wall},
              "packed": {"seconds": p_wall, "cpu_seconds": p_cpu, "tokens": p_tokens, "loss": p_loss,
                         "records_per_s": len(records) / p_wall},
              "ratio": g_wall / p_wall, "cpu_ratio": g_cpu / p_cpu, "loss_rel_diff": abs(g_loss - p_loss) / g_loss}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"QNet training, forward + backward, {device}, autocast={args.autocast}, "
             f"{len(records)} records from {report['data']} ({trees} trees), median of {args.repeats} passes", "",
             "| way | records/s | tokens | seconds (wall) | seconds (CPU) |", "|---|---|---|---|---|",
             f"| one forward per sibling group | {report['grouped']['records_per_s']:.2f} | {g_tokens} | "
             f"{g_wall:.1f} | {g_cpu:.1f} |",
             f"| packed paths | {report['packed']['records_per_s']:.2f} | {p_tokens} | {p_wall:.1f} | {p_cpu:.1f} |",
             "", f"packed vs grouped: {report['ratio']:.2f}x wall, {report['cpu_ratio']:.2f}x CPU time, "
             f"{g_tokens / p_tokens:.2f}x fewer tokens; summed losses differ by {report['loss_rel_diff']:.1e} "
             "(relative)"]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    run_main(main)
