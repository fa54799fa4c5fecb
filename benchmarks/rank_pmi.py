"""Policy-side rankers against a null context (pointwise mutual information) on decision records.

The likelihood ranker of the decision benchmark favours outputs the policy finds likely anywhere;
a PMI ranker scores how much more likely an output is *here* than in a context without the
episode, which removes the prior of common phrasings ("surface-form competition"). For every
candidate of every decision this teacher-forces the output (thought + action, end-of-turn token
included) after three contexts, with the policy folder's own weights in fp32:

- ``full``: the decision's history (the likelihood ranker's context);
- ``task``: the instruction turns and the task sentence alone (no observation);
- ``none``: the instruction turns and an empty observation.

Each ranker below is scored by the decision benchmark (``qlass.decision_report.score_decisions``,
in place of a QNet) against the recorded likelihood, with its paired bootstrap 95% interval, over
all decisions, by split and by reversibility. ``likelihood (recomputed)`` checks that this run
reproduces the recorded likelihood's picks. Usage::

    python benchmarks/rank_pmi.py --model runs/reference/sft --out DIR decisions.jsonl [...]
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench_args import output_folder, positive_int, run_main

from qlass.decision_files import read_decisions
from qlass.decision_report import ReportConfig, score_decisions
from qlass.errors import QlassError
from qlass.policy.loading import load_causal_lm
from qlass.policy.render import encode_conversation
from qlass.types import Message

if TYPE_CHECKING:  # torch loads once the decisions are read: a usage error is answered at once
    import torch

log = logging.getLogger("rank_pmi")
Scores = dict[str, dict[str, float]]  # context -> {"out": summed log-prob, "out_n", "act", "act_n"}


def contexts(history: Sequence[Message], where: str) -> dict[str, list[Message]]:
    """The three contexts an output is scored after (see the module docstring); ``where`` names the
    record in the error for a history not laid out as qlass's agents write it."""
    if [m.role for m in history[:3]] != ["user", "assistant", "user"]:
        raise QlassError(f"{where}: history does not start with the instruction turns and the task "
                         "(user, assistant, user); cannot build the contexts without the episode")
    head, task = list(history[:2]), history[2].content.split("\n")[0]
    return {"full": list(history), "task": head + [Message("user", task)], "none": head + [Message("user", "")]}


def reply(tokenizer: Any, output: str, end_id: int) -> tuple[list[int], int]:
    """The output's token ids (end-of-turn appended) and the index of its first action token."""
    enc = tokenizer(output, add_special_tokens=False, return_offsets_mapping=True)
    at = output.find("Action:")
    at = at + len("Action:") if at >= 0 else 0
    first = next((j for j, (_, end) in enumerate(enc["offset_mapping"]) if end > at), len(enc["input_ids"]))
    return enc["input_ids"] + [end_id], first


def token_logprobs(lm: Any, prompt: list[int], replies: Sequence[list[int]]) -> list[torch.Tensor]:
    """Log-probability of each reply token after ``prompt``: the prompt is run once, its cache
    shared by the right-padded replies."""
    import torch

    n, longest = len(replies), max(len(r) for r in replies)
    with torch.no_grad():
        head = lm(input_ids=torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
        cache = head.past_key_values
        key = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
        cache.batch_repeat_interleave(n)
        feed = torch.zeros((n, longest), dtype=torch.long)
        mask = torch.zeros((n, len(prompt) + longest), dtype=torch.long)
        mask[:, : len(prompt)] = 1
        for i, r in enumerate(replies):
            feed[i, : len(r)] = torch.tensor(r)
            mask[i, len(prompt): len(prompt) + len(r)] = 1
        logits = lm(input_ids=feed, attention_mask=mask, use_cache=True, **{key: cache}).logits
        logp = torch.log_softmax(torch.cat([head.logits.expand(n, 1, -1), logits[:, :-1]], 1).float(), -1)
    return [logp[i, torch.arange(len(r)), torch.tensor(r)] for i, r in enumerate(replies)]


def score_record(lm: Any, tokenizer: Any, end_id: int, rec: dict[str, Any]) -> list[Scores]:
    """Per candidate of ``rec``: summed log-probability of the whole output and of its action tokens,
    with their token counts, after each context."""
    history = [Message(m["role"], m["content"]) for m in rec["history"]]
    replies = [reply(tokenizer, c["output"], end_id) for c in rec["candidates"]]
    out: list[Scores] = [{} for _ in replies]
    for name, ctx in contexts(history, f"decision {rec['task']} step {rec['step']}").items():
        prompt = encode_conversation(tokenizer, ctx, add_generation_prompt=True)[0]
        for scores, lp, (ids, first) in zip(out, token_logprobs(lm, prompt, [ids for ids, _ in replies]), replies,
                                            strict=True):
            scores[name] = {"out": float(lp.sum()), "out_n": len(ids), "act": float(lp[first:].sum()),
                            "act_n": len(ids) - first}
    return out


def _pmi(context: str, part: str, mean: bool) -> Callable[[Scores], float]:
    def rank(s: Scores) -> float:
        gain = s["full"][part] - s[context][part]
        return gain / max(s["full"][f"{part}_n"], 1) if mean else gain
    return rank


RANKERS: dict[str, Callable[[Scores], float]] = {
    "likelihood (recomputed)": lambda s: s["full"]["out"] / s["full"]["out_n"],
    "action likelihood, mean": lambda s: s["full"]["act"] / max(s["full"]["act_n"], 1),
    "action likelihood, sum": lambda s: s["full"]["act"],
    **{f"PMI vs {ctx}, {part}, {'mean' if mean else 'sum'}": _pmi(ctx, part, mean)
       for ctx in ("task", "none") for part in ("out", "act") for mean in (True, False)},
    **{f"likelihood + {a:g} × PMI vs {ctx} (output, mean)":
       (lambda s, a=a, ctx=ctx: (s["full"]["out"] + a * (s["full"]["out"] - s[ctx]["out"])) / s["full"]["out_n"])
       for ctx in ("task", "none") for a in (0.5, 1.0)},
}


def summarise(records: Sequence[dict[str, Any]], scores: Sequence[Sequence[Scores]], resamples: int
              ) -> list[dict[str, Any]]:
    """Each ranker's accuracy per group and its paired difference from the recorded likelihood."""
    cfg, rows = ReportConfig(resamples=resamples), []
    for name, rank in RANKERS.items():
        result = score_decisions(records, [[rank(s) for s in cands] for cands in scores], cfg)
        groups = {}
        for group in result["groups"]:
            by = {r["ranker"]: r for r in group["rows"]}
            diff = by["qnet"]["vs"].get("likelihood", {}).get("accuracy") or {  # a group of one: no interval
                "mean_diff": by["qnet"]["accuracy"] - by["likelihood"]["accuracy"], "ci_low": None, "ci_high": None}
            groups[group["group"]] = {"decisions": group["decisions"], "accuracy": by["qnet"]["accuracy"],
                                      "likelihood": by["likelihood"]["accuracy"], **diff}
        rows.append({"ranker": name, "groups": groups})
    return rows


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """One table: accuracy and Δ vs the recorded likelihood [95%] per group, in points."""
    groups = list(rows[0]["groups"])
    head = ["ranker"] + [f"{g} ({rows[0]['groups'][g]['decisions']})" for g in groups]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = " | ".join(f"{100 * rows[0]['groups'][g]['likelihood']:.1f}" for g in groups)
    lines.append(f"| likelihood (recorded) | {base} |")
    for row in rows:
        cells = [f"{100 * c['accuracy']:.1f}: {100 * c['mean_diff']:+.1f} " + (
                 "—" if c["ci_low"] is None else f"[{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}]")
                 for c in row["groups"].values()]
        lines.append(f"| {row['ranker']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("decisions", nargs="+", help="decision JSONL files (from `qlass decisions collect`)")
    ap.add_argument("--model", required=True, help="the policy folder the decisions were sampled from")
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--resamples", type=positive_int, default=10000)
    ap.add_argument("--out", type=output_folder, required=True)
    args = ap.parse_args()
    try:  # the report's own range, checked before the scoring (it was a traceback after it)
        ReportConfig(resamples=args.resamples)
    except ValueError as exc:
        ap.error(f"--resamples: {exc}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    run(args)


def run(args: argparse.Namespace) -> None:
    """Score every decision, then write and print the table (see the module docstring)."""
    records = read_decisions(args.decisions)
    import torch

    torch.set_num_threads(args.threads)
    lm, tokenizer = load_causal_lm(args.model)  # fp32
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    started, scores = time.time(), []
    for k, rec in enumerate(records, 1):
        scores.append(score_record(lm, tokenizer, end_id, rec))
        if k % 20 == 0 or k == len(records):
            log.info("%d/%d decisions scored (%.0f s)", k, len(records), time.time() - started)
    rows = summarise(records, scores, args.resamples)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"args": vars(args), "rankers": rows, "scores": scores}
    (out / "rank_pmi.json").write_text(json.dumps(report, indent=1, default=str))  # default: --out is a Path
    text = markdown(rows)
    (out / "rank_pmi.md").write_text(text)
    print(text)


if __name__ == "__main__":
    run_main(main)
