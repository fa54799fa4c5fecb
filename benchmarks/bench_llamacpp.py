"""Sampling speed on a CPU: llama.cpp's server (the model exported by ``qlass model export-gguf``)
vs the local HF policy (:class:`qlass.policy.hf.HFPolicy`), on the same prompts.

The prompts are the turns of ScienceWorld-like episodes (``bench_policy.episode``: the real
instruction and worked example, then synthetic observations), asked in episode order, one call per
turn, as an evaluation asks them. Each backend keeps its own prompt reuse as deployed: the HF policy
its prefix caches, llama.cpp's server its previous context's common prefix. Each episode after the
first has another task text, so its turns share only the instruction prefix with earlier calls.

For ``n`` = 1 and 8 candidates per call (temperature 0.7): completion tokens per second of wall
time (prefill included) per call, the median over all calls, and the ratio llama.cpp / HF. The
two backends alternate call by call, so load from other jobs on the machine hits both alike.
llama.cpp's server answers one candidate per request (it ignores ``n``), so its ``n`` = 8 is eight
requests decoded one after another; the HF policy prefills once and decodes the eight rows as one
batch. Requests carry ``LLAMA_CPP_PLAIN`` (no top-k / top-p / min-p filter, no repeat penalty), so
both sample from the same distribution. Prints a table and writes a JSON report. Usage::

    python benchmarks/bench_llamacpp.py [--threads 1] [--dtype f16] [--turns 3] [--episodes 2] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench_args import nonnegative_float, output_file, positive_int, positive_ints, run_main
from bench_policy import episode, timed

from qlass.errors import MissingFileError
from qlass.gguf_export import export_gguf
from qlass.models import default_model_dir
from qlass.policy.base import Policy
from qlass.policy.openai import LLAMA_CPP_PLAIN, OpenAIPolicy
from qlass.types import Message

THINGS = ["living thing", "animal", "plant", "non-living thing", "electrical conductor", "insulator"]
BOXES = ["purple box in the workshop", "red box in the kitchen", "green box in the bathroom",
         "orange box in the hallway"]


def task_text(k: int) -> str:
    """The ``k``-th distinct ScienceWorld-like task sentence."""
    return (f"Your task is to find a(n) {THINGS[k % len(THINGS)]}. First, focus on the thing. Then, move it to the "
            f"{BOXES[k // len(THINGS) % len(BOXES)]}.")


def histories(episodes: int, turns: int, first_task: int) -> list[list[Message]]:
    """Turns 1..``turns`` of ``episodes`` episodes, episode ``e`` with task ``first_task + e``."""
    base = episode(turns)
    at = len(base[0]) - 1  # the task turn: task sentence, then the first room description
    room = base[0][at].content.split("\n", 1)[1]
    return [[*history[:at], Message("user", task_text(first_task + e) + "\n" + room), *history[at + 1:]]
            for e in range(episodes) for history in base]


@contextmanager
def llama_server(gguf: Path, threads: int, log_path: Path) -> Iterator[str]:
    """llama.cpp's server (``llama_cpp.server``) on a free loopback port; yields its ``/v1`` URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "--n_ctx", "4096", "--n_threads", str(threads), "--n_threads_batch", str(threads)]
    with open(log_path, "w") as log_file:  # a file, not a pipe: a full pipe would block the server
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"llama.cpp server exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                with no_proxy.open(url + "/models", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"llama.cpp server did not start: {log_path.read_text()[-2000:]}") from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run(policies: dict[str, Policy], ns: list[int], episodes: int, turns: int, temperature: float,
        max_new: int) -> list[dict[str, Any]]:
    """One call per (n, prompt, backend), backends alternating; one row per call. Each ``n`` gets
    episodes of its own tasks, so no backend finds a whole prompt cached from an earlier ``n``."""
    rows = []
    for k, n in enumerate(ns):
        for i, history in enumerate(histories(episodes, turns, k * episodes)):
            for name, policy in policies.items():
                out, secs = timed(policy.sample, [history], n, temperature, max_new, 1000 * n + i)
                tokens = sum(c.completion_tokens for c in out[0])
                rows.append({"backend": name, "n": n, "prompt": i, "prompt_tokens": out[0][0].prompt_tokens,
                             "completion_tokens": tokens, "seconds": secs, "tok_per_s": tokens / secs})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="HF causal-LM folder (default: the default model)")
    ap.add_argument("--gguf", type=Path, default=None, help="its GGUF export (default: exported now, to a temp folder)")
    ap.add_argument("--dtype", default="f16", help="GGUF weight type when exporting (f16, f32, bf16)")
    ap.add_argument("--threads", type=positive_int, default=1,
                    help="threads for each backend (torch; llama.cpp decode and prefill); 1 by default, for a "
                         "machine shared with other jobs")
    ap.add_argument("--episodes", type=positive_int, default=2)
    ap.add_argument("--turns", type=positive_int, default=3, help="turns per episode (one call each)")
    ap.add_argument("--ns", type=positive_ints, default="1,8", help="candidates per call")
    ap.add_argument("--temperature", type=nonnegative_float, default=0.7)
    ap.add_argument("--max-new-tokens", type=positive_int, default=32)
    ap.add_argument("--out", type=output_file, default=Path("benchmarks/results/bench_llamacpp.json"))
    args = ap.parse_args()

    if args.gguf is not None and not args.gguf.is_file():  # was the server's traceback, after torch and its start
        raise MissingFileError(str(args.gguf))
    from qlass.policy.hf import HFPolicy  # torch, after the arguments: a usage error is answered at once

    model = args.model or default_model_dir()
    ns = args.ns
    with tempfile.TemporaryDirectory() as tmp:
        gguf = args.gguf or export_gguf(model, Path(tmp) / f"model-{args.dtype}.gguf", args.dtype)
        with llama_server(gguf, args.threads, Path(tmp) / "server.log") as url:
            policies: dict[str, Policy] = {
                "hf": HFPolicy(model, threads=args.threads),
                "llama.cpp": OpenAIPolicy(url, tokenizer=model, extra_body=LLAMA_CPP_PLAIN, api_key_env="QLASS_NO_KEY"),
            }
            for policy in policies.values():  # warm-up: first-call costs (allocation, thread pools)
                policy.sample([[Message("user", "Hello.")]], 1, 0.0, 4)
            rows = run(policies, ns, args.episodes, args.turns, args.temperature, args.max_new_tokens)

    summary = []
    for n in ns:
        med = {name: statistics.median(r["tok_per_s"] for r in rows if r["backend"] == name and r["n"] == n)
               for name in policies}
        secs = {name: statistics.median(r["seconds"] for r in rows if r["backend"] == name and r["n"] == n)
                for name in policies}
        summary.append({"n": n, "hf_tok_per_s": med["hf"], "llamacpp_tok_per_s": med["llama.cpp"],
                        "hf_call_s": secs["hf"], "llamacpp_call_s": secs["llama.cpp"],
                        "ratio_llamacpp_over_hf": med["llama.cpp"] / med["hf"]})
    report = {"model": str(model), "gguf_dtype": args.dtype if args.gguf is None else str(args.gguf),
              "threads": args.threads, "temperature": args.temperature, "max_new_tokens": args.max_new_tokens,
              "prompt_tokens": sorted({r["prompt_tokens"] for r in rows}), "summary": summary, "calls": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")

    print(f"model {model.name}, GGUF {report['gguf_dtype']} vs HF float32, threads {args.threads}, temperature "
          f"{args.temperature}, max_new_tokens {args.max_new_tokens}, {args.episodes} x {args.turns} prompts of "
          f"{min(report['prompt_tokens'])}-{max(report['prompt_tokens'])} tokens")
    print("   n  HF tok/s  llama.cpp tok/s  ratio (llama.cpp/HF)  HF s/call  llama.cpp s/call")
    for s in summary:
        print(f"{s['n']:4d}  {s['hf_tok_per_s']:8.1f}  {s['llamacpp_tok_per_s']:15.1f}  "
              f"{s['ratio_llamacpp_over_hf']:19.2f}x"
              f"  {s['hf_call_s']:9.2f}  {s['llamacpp_call_s']:16.2f}")


if __name__ == "__main__":
    run_main(main)
