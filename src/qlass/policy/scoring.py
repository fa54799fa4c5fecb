"""Teacher-forced scoring for :class:`~qlass.policy.hf.HFPolicy`: how likely the policy finds given outputs.

The tokens scored for an output are those of the assistant turn the chat template renders for it,
up to and including its end-of-turn token (``<|im_end|>`` in ChatML): the reply exactly as the
policy would have sampled it had it ended the turn itself, so the score equals the ``logprob`` and
the count equals the ``completion_tokens`` that sampling reports for such a reply (an output that
sampling ended at the newline after its action line scores its end-of-turn token instead of that
newline). Outputs are tokenized from their text: a sampled output whose tokens differ from the
canonical tokenization of its text scores its canonical tokens.

Prompts go through the policy's prefix cache (a history's prompt is prefilled once and reused
by every output scored after it, as in sampling); the outputs of several histories are fed in one
right-padded batch on the left-padded prompt caches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..errors import QlassError
from ..types import History, Message
from . import kv
from .render import encode_conversation

if TYPE_CHECKING:
    from .hf import HFPolicy

MAX_BATCH_POSITIONS = 1024
"""Output positions scored in one forward (bounds the ``[positions, vocab]`` logits held at once)."""

Item = tuple[list[int], list[int]]
"""A prompt's ids and the reply ids scored after it."""


def reply_ids(tokenizer: Any, history: History, output: str, stop_ids: set[int]) -> Item:
    """The prompt ids of ``history`` and the ids of ``output`` as its assistant reply, through the
    first end-of-turn token."""
    prompt = encode_conversation(tokenizer, history, True)[0]
    full = encode_conversation(tokenizer, list(history) + [Message("assistant", output)], False)[0]
    if full[: len(prompt)] != prompt:
        raise QlassError("the chat template does not continue the generation prompt with the reply; cannot score")
    reply = full[len(prompt):]
    end = next((k for k, t in enumerate(reply) if t in stop_ids), len(reply) - 1)
    if end < 0:
        raise QlassError(f"output {output[:60]!r} renders to no tokens; nothing to score")
    return prompt, reply[: end + 1]


def score_outputs(policy: HFPolicy, histories: Sequence[History], outputs: Sequence[str]) -> list[tuple[float, int]]:
    """Summed log-probability and token count of each ``outputs[i]`` after ``histories[i]``
    (see the module docstring); a history too long for ``max_length`` loses its oldest turns."""
    if len(histories) != len(outputs):
        raise ValueError(f"got {len(outputs)} outputs for {len(histories)} histories")
    items = []
    for history, output in zip(histories, outputs):
        prompt, reply = reply_ids(policy.tokenizer, history, output, policy.stop_ids)
        if len(prompt) + len(reply) > policy.max_length:
            prompt = policy.encode(list(history), reserve=len(reply))
        items.append((prompt, reply))
    out: list[tuple[float, int]] = []
    batch: list[Item] = []
    for item in items:
        rows = policy.max_batch_rows if policy.plain else 1
        longest = max([len(item[1])] + [len(r) for _, r in batch])
        if batch and (len(batch) >= rows or (len(batch) + 1) * longest > MAX_BATCH_POSITIONS):
            out.extend(_teacher_force(policy, batch))
            batch = []
        batch.append(item)
    if batch:
        out.extend(_teacher_force(policy, batch))
    return out


def _teacher_force(policy: HFPolicy, items: list[Item]) -> list[tuple[float, int]]:
    """Scores of one batch: the first reply token from the prompt's cached logits, the others from
    one forward of the replies (all but their last token) on the prompts' caches."""
    longest = max(len(r) for _, r in items)
    if policy.plain:
        entries = [policy._prefill(p) for p, _ in items]
        first = torch.stack([e.logits for e in entries])
        cache, mask = kv.batch_cache([e.kv for e in entries], 1, longest)
    else:  # generic cache classes: one item at a time, prefilled fresh
        from transformers import DynamicCache

        ((prompt, _),) = items
        cache, mask = DynamicCache(config=policy.model.config), None
        first = policy._forward(torch.tensor([prompt], device=policy.device), cache)
        policy.prefill_tokens += len(prompt)
    logp = torch.log_softmax(first, dim=-1)
    totals = [float(logp[b, r[0]]) for b, (_, r) in enumerate(items)]
    if longest > 1:
        feed = torch.tensor([r[:-1] + [r[-1]] * (longest - len(r)) for _, r in items], device=policy.device)
        lengths = torch.tensor([len(p) for p, _ in items], device=policy.device)
        positions = lengths[:, None] + torch.arange(longest - 1, device=policy.device)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(len(items), longest - 1)], dim=1)
        logp = torch.log_softmax(policy._run(feed, cache, mask, positions, keep=longest - 1), dim=-1)
        for b, (_, r) in enumerate(items):
            totals[b] += float(logp[b, torch.arange(len(r) - 1), torch.tensor(r[1:])].sum())
    return [(total, len(r)) for total, (_, r) in zip(totals, items)]
