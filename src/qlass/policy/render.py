"""One rendering of a conversation into model input, shared by SFT, sampling and the QNet.

SFT, policy sampling and QNet scoring all go through :func:`encode_conversation`, so the token ids a
model is trained on are exactly those it later sees. A conversation is tokenized *segment by
segment* (each new turn's text as the chat template renders it), which gives:

- an exact loss mask for SFT (the assistant turns' own tokens, end-of-turn token included);
- prefix-stable ids: the ids of a conversation extend those of any earlier prefix of it, so the KV
  cache of the previous turn can be reused.

The QNet input for a candidate is ``encode_conversation(history, add_generation_prompt=True)``
followed by the candidate's tokens — the very sequence the policy produced it from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..types import Message

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer: Any) -> Any:
    """Give a tokenizer without a chat template a plain ChatML one (for base / test models)."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _as_dicts(messages: Sequence[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def render(tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """The chat-template text of ``messages`` (with the assistant header when asked)."""
    return tokenizer.apply_chat_template(
        _as_dicts(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _segments(tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool) -> list[tuple[str, bool]]:
    """Text pieces of the rendered conversation, each flagged True if it is assistant output."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, msg in enumerate(messages):
        if msg.role == "assistant":
            head = render(tokenizer, messages[:i], add_generation_prompt=True)
            if not head.startswith(done):
                raise ValueError("chat template is not prefix-stable; cannot segment the conversation")
            if head != done:
                pieces.append((head[len(done):], False))
            done = head
        full = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not full.startswith(done):
            raise ValueError("chat template is not prefix-stable; cannot segment the conversation")
        pieces.append((full[len(done):], msg.role == "assistant"))
        done = full
    if add_generation_prompt:
        full = render(tokenizer, messages, add_generation_prompt=True)
        if full != done:
            pieces.append((full[len(done):], False))
    return pieces


def encode_conversation(
    tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool = True
) -> tuple[list[int], list[bool]]:
    """Token ids of ``messages`` and, per token, whether it belongs to an assistant turn."""
    ids: list[int] = []
    mask: list[bool] = []
    for text, is_assistant in _segments(tokenizer, messages, add_generation_prompt):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        mask.extend([is_assistant] * len(piece))
    return ids, mask


def truncate_history(
    messages: Sequence[Message], keep_prefix: int, fits: Callable[[Sequence[Message]], bool]
) -> list[Message]:
    """Drop the oldest turns after the first ``keep_prefix`` messages until ``fits`` holds.

    Turns are dropped in (observation, agent output) pairs so roles keep alternating; the newest
    turns are never dropped before older ones. If even prefix + last message does not fit, that
    minimal conversation is returned and the caller must cut tokens (from the left).
    """
    msgs = list(messages)
    head, body = msgs[:keep_prefix], msgs[keep_prefix:]
    while len(body) > 1 and not fits(head + body):
        body = body[2:] if len(body) > 2 else body[1:]
    return head + body


def default_keep_prefix(messages: Sequence[Message]) -> int:
    """Messages to keep when truncating: everything up to the task turn, i.e. the last user turn
    that is not an ``Observation:`` (the agent loop's layout)."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].role == "user" and not messages[i].content.startswith("Observation:"):
            return i + 1
    return min(1, len(messages))


def fit_history(history: Sequence[Message], fits: Callable[[Sequence[Message]], bool]) -> list[Message]:
    """``history`` itself if it ``fits``; else :func:`truncate_history` keeping the instruction prefix
    and task turn (:func:`default_keep_prefix`), the cut found by binary search.

    ``truncate_history`` tries ever shorter conversations, one ``fits`` (a full re-encoding) per
    dropped turn; the conversations it would try get shorter monotonically, so the first that fits
    is found with O(log turns) encodings and then cut by ``truncate_history`` itself."""
    if fits(history):
        return list(history)
    keep = default_keep_prefix(history)
    head, body = list(history[:keep]), list(history[keep:])
    sizes = [len(body)]  # body lengths truncate_history tries, in order
    while sizes[-1] > 1:
        sizes.append(sizes[-1] - 2 if sizes[-1] > 2 else sizes[-1] - 1)
    lo, hi = 0, len(sizes) - 1  # sizes[hi] is the answer if nothing longer fits
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(head + body[len(body) - sizes[mid]:]):
            hi = mid
        else:
            lo = mid + 1
    return truncate_history(history, keep, lambda msgs: len(msgs) <= keep + sizes[lo])
