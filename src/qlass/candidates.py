"""A step's candidate actions: comparison keys, merging, and the rule that picks one to execute.

Candidates are raw agent outputs (``Thought: ...\\nAction: ...``); two are the same action when
their parsed actions agree after lower-casing and collapsing whitespace. Selection is
deterministic: the largest score wins, the earliest candidate wins ties.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .envs.base import parse_action
from .errors import QlassError
from .types import Completion


def normalise_action(output: str) -> str:
    """The comparison key of an output: its parsed action, lower-cased, whitespace collapsed."""
    action = parse_action(output)
    text = action if action is not None else output
    return re.sub(r"\s+", " ", text.strip().lower())


def unique_candidates(completions: Sequence[Completion]) -> list[int]:
    """Indices of the first completion of each distinct action, in order."""
    seen: set[str] = set()
    keep = []
    for i, c in enumerate(completions):
        key = normalise_action(c.text)
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return keep


def executable(completions: Sequence[Completion]) -> list[int]:
    """Indices of the completions that may be executed as actions: the complete ones, or the first
    one when every completion was cut off by the token limit (it is then executed as an invalid
    action, see :func:`qlass.agent.executed_text`)."""
    whole = [i for i, c in enumerate(completions) if not c.truncated]
    return whole or [0]


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the earliest one wins ties (deterministic)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def mean_logprob(completion: Completion) -> float:
    """The policy's mean log-probability per token of the output (needs a backend that reports logprobs)."""
    if completion.logprob is None:
        raise QlassError("selection with beta != 0 needs a policy backend that reports logprobs")
    return completion.logprob / max(logprob_tokens(completion), 1)


def logprob_tokens(completion: Completion) -> int:
    """The tokens ``completion.logprob`` sums over: its own output's, not a redrawn output's discarded ones."""
    return completion.completion_tokens if completion.logprob_tokens is None else completion.logprob_tokens


def selection_scores(values: Sequence[float], completions: Sequence[Completion], beta: float) -> list[float]:
    """``value + beta * mean log-prob per token`` for each candidate (the values alone when ``beta`` is 0)."""
    if beta == 0:
        return [float(v) for v in values]
    return [float(v) + beta * mean_logprob(c) for v, c in zip(values, completions, strict=True)]


def choose(scores: Sequence[float], margin: float = 0.0) -> int:
    """The candidate to execute: the best score, but candidate 0 unless the best exceeds candidate 0's
    score by more than ``margin`` (``margin`` 0: the plain argmax)."""
    best = argmax(scores)
    return best if scores[best] - scores[0] > margin else 0
