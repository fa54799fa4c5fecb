"""Local HF policy speed: shared prefill vs separate calls, and per-turn latency with cache reuse.

In one run, on the default model (SmolLM2-135M-Instruct) and a ScienceWorld-like conversation (the
real ScienceWorld instruction prefix, then synthetic ~60-token observations and ~25-token agent
turns):

1. tokens/s for M = 2, 4, 8 candidates: one ``sample(n=M)`` call (one prefill, M rows decoded
   together) vs M separate ``sample(n=1)`` calls (M prefills, one row each) — with no cache reuse in
   either, and per-candidate seeds that make both produce the very same tokens;
2. latency of turns 1, 5, 10, 15 of an episode (greedy) with cache reuse (each turn prefills only
   its new tokens) and without (each turn prefills its whole history).

Prints a table with ratios and writes a JSON report. Targets: shared prefill >= 2x at M = 4;
turn-15 latency within 1.5x of turn 1 with reuse. Usage::

    python benchmarks/bench_policy.py [--threads 1] [--autocast] [--max-new-tokens 24] [--repeats 2] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench_args import output_file, positive_int, positive_ints, run_main

from qlass.models import default_model_dir
from qlass.policy.render import encode_conversation
from qlass.seeding import candidate_seed
from qlass.types import Completion, Message

if TYPE_CHECKING:  # torch loads after the arguments are read: a usage error or --help is answered at once
    from qlass.policy.hf import HFPolicy

ROOMS = ["kitchen", "hallway", "bathroom", "workshop", "greenhouse", "art studio", "living room", "bedroom", "foundry"]
THINGS = ["a table", "a chair", "a cupboard", "a sink", "a lighter", "a glass cup", "a flower pot", "a thermometer",
          "a painting", "a stove", "a freezer", "a bookshelf", "a drawer", "a metal pot", "a seed jar", "a blue box"]


def sciworld_prefix() -> list[Message]:
    """The ScienceWorld instruction + one-shot example (the env's prompt file) and a task turn."""
    text = resources.files("qlass.envs.prompts").joinpath("sciworld.txt").read_text(encoding="utf-8")
    instruction, _, example = text.partition("\n=== EXAMPLE ===\n")
    msgs = [Message("user", instruction.strip()), Message("assistant", "OK")]
    turns = [t.strip() for t in example.split("\n---\n") if t.strip()]
    msgs += [Message("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(turns)]
    msgs.append(Message("user", "Your task is to find a(n) living thing. First, focus on the thing. Then, move it to "
                                "the purple box in the workshop.\n" + observation(0)))
    return msgs


def observation(t: int) -> str:
    """A ScienceWorld-like room description of about 60 tokens, different at every turn."""
    room = ROOMS[t % len(ROOMS)]
    seen = "\n\t".join(THINGS[(t * 3 + k) % len(THINGS)] for k in range(4))
    doors = "\n\t".join(f"A door to the {ROOMS[(t + k) % len(ROOMS)]} (that is open)" for k in (1, 2))
    return f"This room is called the {room}. In it, you see:\n\tthe agent\n\t{seen}\nYou also see:\n\t{doors}"


def episode(turns: int) -> list[list[Message]]:
    """The history the agent reads at each turn 1..turns (turn t has t - 1 earlier exchanges)."""
    msgs = sciworld_prefix()
    out = [list(msgs)]
    for t in range(1, turns):
        room = ROOMS[t % len(ROOMS)]  # a door of the previous room leads here
        msgs += [Message("assistant", f"Thought: The {room} may have what I need, so I will go there next.\n"
                                      f"Action: go to {room}"),
                 Message("user", f"Observation: You move to the {room}.\n" + observation(t))]
        out.append(list(msgs))
    return out


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """``fn(*args)`` and the seconds it took."""
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def bench_candidates(policy: HFPolicy, history: list[Message], ms: list[int], max_new: int,
                     repeats: int) -> list[dict]:
    """Shared prefill (one call, n=M) vs M separate calls, producing identical completions."""

    def separate(m: int) -> list[Completion]:
        # candidate j of a call seeded 7 draws from candidate_seed(7, j): the same stream alone
        return [policy.sample([history], 1, 0.7, max_new, seed=candidate_seed(7, j))[0][0] for j in range(m)]

    rows = []
    for m in ms:
        t_shared = t_sep = float("inf")
        for _ in range(repeats):  # alternate the two, keep each one's best (the machine is shared)
            shared, secs = timed(policy.sample, [history], m, 0.7, max_new, 7)
            t_shared = min(t_shared, secs)
            alone, secs = timed(separate, m)
            t_sep = min(t_sep, secs)
        tokens = sum(c.completion_tokens for c in shared[0])
        alone_tokens = sum(c.completion_tokens for c in alone)  # each side's own work, should the outputs differ
        same = [(c.text, c.completion_tokens) for c in shared[0]] == [(c.text, c.completion_tokens) for c in alone]
        rows.append({"M": m, "completion_tokens": tokens, "same_outputs": same,
                     "shared_s": t_shared, "separate_s": t_sep,
                     "shared_tok_per_s": tokens / t_shared, "separate_tok_per_s": alone_tokens / t_sep,
                     "speedup": t_sep / t_shared})
    return rows


def bench_turns(model: Path, kw: dict, histories: list[list[Message]], marks: list[int], max_new: int) -> list[dict]:
    """Greedy turn latency through one episode with reuse, and at the marked turns without."""
    from qlass.policy.hf import HFPolicy

    reuse = HFPolicy(model, **kw)
    fresh = HFPolicy(model, **kw, cache_slots=0)
    ids = [len(encode_conversation(reuse.tokenizer, h)[0]) for h in histories]
    rows: dict[int, dict] = {}
    for t, history in enumerate(histories, start=1):  # reuse: the whole episode, turn after turn
        before = reuse.prefill_tokens
        out, secs = timed(reuse.sample, [history], 1, 0.0, max_new, 0)
        if t in marks:
            rows[t] = {"turn": t, "prompt_tokens": ids[t - 1], "completion_tokens": out[0][0].completion_tokens,
                       "reuse_prefilled": reuse.prefill_tokens - before, "reuse_s": secs}
    for t in marks:
        _, secs = timed(fresh.sample, [histories[t - 1]], 1, 0.0, max_new, 0)
        rows[t].update(fresh_s=secs, speedup=secs / rows[t]["reuse_s"],
                       vs_turn1=rows[t]["reuse_s"] / rows[1]["reuse_s"])
    # Turn 1 of a second episode: the instruction prefix is still cached, only the task turn is new.
    other = sciworld_prefix()[:-1] + [Message("user", "Your task is to find a(n) animal.\n" + observation(3))]
    before = reuse.prefill_tokens
    _, secs = timed(reuse.sample, [other], 1, 0.0, max_new, 0)
    rows[1]["warm_reuse_s"], rows[1]["warm_prefilled"] = secs, reuse.prefill_tokens - before
    return [rows[t] for t in marks]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="causal-LM folder (default: the default model)")
    ap.add_argument("--threads", type=positive_int, default=1,
                    help="torch threads (1 by default: on a machine shared with other jobs, more threads than free "
                         "cores make every batched op wait for descheduled threads)")
    ap.add_argument("--repeats", type=positive_int, default=2, help="repeats of the M-candidate timings (best kept)")
    ap.add_argument("--autocast", action="store_true", help="bf16 autocast")
    ap.add_argument("--device", default="auto", help="torch device (auto: a CUDA GPU when visible, else cpu)")
    ap.add_argument("--max-new-tokens", type=positive_int, default=24)
    ap.add_argument("--ms", type=positive_ints, default="2,4,8")
    ap.add_argument("--candidates-turn", type=int, default=5, help="history (turn) used for the M-candidate test")
    ap.add_argument("--out", type=output_file, default=Path("benchmarks/results/bench_policy.json"))
    args = ap.parse_args()
    marks = [1, 5, 10, 15]
    if not 1 <= args.candidates_turn <= max(marks):  # 0 was turn 15 (index -1), silently
        ap.error(f"--candidates-turn {args.candidates_turn}: the episode has turns 1 to {max(marks)}")

    from qlass.policy.hf import HFPolicy

    model = args.model or default_model_dir()
    kw = {"threads": args.threads, "autocast": args.autocast, "device": args.device}
    histories = episode(max(marks))
    policy = HFPolicy(model, **kw, cache_slots=0)
    policy.sample([histories[0]], 1, 0.0, 4)  # warm-up
    cand_hist = histories[args.candidates_turn - 1]
    n_prompt = len(encode_conversation(policy.tokenizer, cand_hist)[0])
    candidates = bench_candidates(policy, cand_hist, args.ms, args.max_new_tokens,
                                  args.repeats)
    turns = bench_turns(model, kw, histories, marks, args.max_new_tokens)

    report = {"model": str(model), "device": str(policy.device), "threads": args.threads, "repeats": args.repeats,
              "autocast": args.autocast,
              "max_new_tokens": args.max_new_tokens, "candidates_prompt_tokens": n_prompt,
              "candidates": candidates, "turns": turns}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")

    print(f"model {model.name}, device {policy.device}, threads {args.threads}, autocast {args.autocast}, "
          f"max_new_tokens {args.max_new_tokens}")
    print(f"\nM candidates at a {n_prompt}-token prompt (temperature 0.7; best of {args.repeats}):")
    print("   M  tokens  shared tok/s  separate tok/s  speedup  same")
    for r in candidates:
        print(f"{r['M']:4d}  {r['completion_tokens']:6d}  {r['shared_tok_per_s']:12.1f}  "
              f"{r['separate_tok_per_s']:14.1f}"
              f"  {r['speedup']:6.2f}x  {r['same_outputs']}")
    print("\nPer-turn latency (greedy), with cache reuse vs full prefill each turn:")
    print(" turn  prompt  new(prefilled)  completion  reuse s  no-reuse s  speedup  reuse vs turn 1")
    for r in turns:
        print(f"{r['turn']:5d}  {r['prompt_tokens']:6d}  {r['reuse_prefilled']:14d}  {r['completion_tokens']:10d}"
              f"  {r['reuse_s']:7.2f}  {r['fresh_s']:10.2f}  {r['speedup']:6.2f}x  {r['vs_turn1']:6.2f}x")
    t1 = turns[0]
    print(f"\nturn 1 of a later episode (instruction prefix cached, {t1['warm_prefilled']} tokens prefilled): "
          f"{t1['warm_reuse_s']:.2f} s; turn {turns[-1]['turn']} / that = "
          f"{turns[-1]['reuse_s'] / t1['warm_reuse_s']:.2f}x")
    m4 = next((r for r in candidates if r["M"] == 4), None)
    if m4:
        print(f"target shared prefill >= 2x at M=4: {m4['speedup']:.2f}x")
    print(f"target turn-{turns[-1]['turn']} within 1.5x of turn 1 with reuse: {turns[-1]['vs_turn1']:.2f}x")


if __name__ == "__main__":
    run_main(main)
