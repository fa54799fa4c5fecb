"""Token choice for :class:`~qlass.policy.hf.HFPolicy`: top-p / min-p filters and distinct candidates.

- :func:`filter_probs`: min-p, then top-p (nucleus) filtering of a batch of next-token distributions.
- :class:`Exclusions` and :class:`DistinctGuard`: sampling one history's candidates so that their
  actions differ. Candidates are decoded in rounds. Round 1 is plain parallel sampling. Every
  candidate whose action repeats an earlier candidate's is decoded again in the next round, from its
  own generator (the stream continues), with two rules:

  1. *No repeated sequence* (sampling without replacement, as in Shi et al. 2020, "Incremental
     Sampling Without Replacement for Sequence Models"): the finished token sequences of earlier
     rounds form a trie holding, per node, the probability mass of the finished sequences below it.
     A token is drawn with weight ``q(t) * (1 - mass(prefix + t))``, so a row branches off the
     sampled sequences where the model has probability to spare, not at their end.
  2. *No repeated action*: a token that would end the row with an action already taken in an earlier
     round (reached through a different thought) is forbidden; if every token is forbidden the row
     keeps the duplicate ("where the model allows it").

  A history's rounds stop when its actions all differ, when a round adds no new action to it, or
  after ``n`` rounds; they depend on its own rows only, so a history gets the same candidates
  whichever histories share the call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)


def filter_probs(probs: torch.Tensor, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """``probs`` (``[batch, vocab]``) with the filtered-out tokens set to 0 (not renormalized).

    min-p drops tokens less likely than ``min_p`` times the most likely one; top-p then keeps the
    smallest set of most likely tokens holding ``top_p`` of the remaining mass. The most likely
    token always stays; ties are ordered by token id."""
    if min_p > 0:
        probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    if top_p < 1:
        ranked, order = probs.sort(dim=-1, descending=True, stable=True)
        above = ranked.cumsum(dim=-1) - ranked  # mass of the more likely tokens
        ranked = ranked.masked_fill(above >= top_p * ranked.sum(dim=-1, keepdim=True), 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, ranked)
    return probs


@dataclass
class Row:
    """One decoded candidate: its tokens, their summed log-probability, whether it ended on its own
    (not on the token limit), and the tokens of discarded earlier attempts (distinct sampling)."""

    tokens: list[int] = field(default_factory=list)
    logprob: float = 0.0
    ended: bool = False
    spent: int = 0


@dataclass
class Node:
    """A trie node: a prefix of generated tokens. ``q`` is the sampling probability of the edge into
    it; ``mass`` the probability, given this prefix, of continuing into an excluded sequence."""

    q: float = 1.0
    mass: float = 0.0
    children: dict[int, Node] = field(default_factory=dict)


class Exclusions:
    """The excluded (already sampled or forbidden) token sequences of one history, as a trie."""

    def __init__(self) -> None:
        self.root = Node()

    def add(self, tokens: list[int], qs: list[float]) -> None:
        """Exclude ``tokens`` (drawn with per-step sampling probabilities ``qs``)."""
        path = [self.root]
        for tok, q in zip(tokens, qs):
            path.append(path[-1].children.setdefault(tok, Node(q)))
        path[-1].mass = 1.0
        for node in reversed(path[:-1]):
            node.mass = min(1.0, sum(c.q * c.mass for c in node.children.values()))

    @staticmethod
    def weights(node: Node | None, q: torch.Tensor) -> torch.Tensor:
        """Sampling weights at ``node`` (``None``: off the trie) from the distribution ``q``."""
        if node is None or not node.children:
            return q
        w = q.clone()
        for tok, child in node.children.items():
            w[tok] *= max(0.0, 1.0 - child.mass)
        return w


class DistinctGuard:
    """Per-row state of one distinct-sampling round (see the module docstring).

    Args:
        tries: the exclusions of each history. taken: each history's actions of earlier rounds.
        row_history: the history of each row of the round. action_if_ends: the action a row's
            tokens end with, ``""`` when they end without one, ``None`` while they do not end.
    """

    def __init__(self, tries: list[Exclusions], taken: list[set[str]], row_history: list[int],
                 action_if_ends: Callable[[list[int]], str | None]) -> None:
        self.tries, self.taken, self.row_history = tries, taken, row_history
        self.action_if_ends = action_if_ends
        self.nodes: list[Node | None] = [tries[h].root for h in row_history]
        self.qs: list[list[float]] = [[] for _ in row_history]

    def pick(self, r: int, probs: torch.Tensor, gen: torch.Generator, tokens: list[int]) -> int:
        """Row ``r``'s next token from filtered ``probs`` after ``tokens``, drawn with ``gen``."""
        q = probs / probs.sum()
        w = Exclusions.weights(self.nodes[r], q)
        if not float(w.sum()) > 0:
            w = q
        first = None
        while True:
            tok = int(torch.multinomial(w, 1, generator=gen))
            action = self.action_if_ends(tokens + [tok])
            if not action or action not in self.taken[self.row_history[r]]:
                break
            first = tok if first is None else first
            self.tries[self.row_history[r]].add(tokens + [tok], self.qs[r] + [float(q[tok])])
            w = w.clone() if w is q else w
            w[tok] = 0.0
            if not float(w.sum()) > 0:
                tok = first
                break
        node = self.nodes[r]
        self.nodes[r] = node.children.get(tok) if node is not None else None
        self.qs[r].append(float(q[tok]))
        return tok


def distinct_rounds(histories: int, rows: int, decode: Callable[[list[int], DistinctGuard], list[Row]],
                    action_if_ends: Callable[[list[int]], str | None],
                    action: Callable[[Row], str | None]) -> list[Row]:
    """``rows`` candidates for each of ``histories`` histories (row ``r`` belongs to history
    ``r // rows``), their actions distinct where the model allows it (see the module docstring).

    ``decode(todo, guard)`` decodes the rows ``todo`` together under ``guard``; ``action_if_ends``
    is :class:`DistinctGuard`'s; ``action`` gives a decoded row's action (``None``: none)."""
    tries = [Exclusions() for _ in range(histories)]
    taken: list[set[str]] = [set() for _ in range(histories)]
    result = [Row() for _ in range(histories * rows)]
    spent = [0] * len(result)
    todo = list(range(len(result)))
    for _ in range(rows):
        guard = DistinctGuard(tries, taken, [r // rows for r in todo], action_if_ends)
        fresh: list[set[str]] = [set() for _ in range(histories)]
        redo = []
        for k, (r, row) in enumerate(zip(todo, decode(todo, guard))):
            h, act = r // rows, action(row)
            tries[h].add(row.tokens, guard.qs[k])
            row.spent, result[r] = spent[r], row
            if act and (act in taken[h] or act in fresh[h]):
                redo.append(r)
                spent[r] += len(row.tokens)
            elif act:
                fresh[h].add(act)
        # a history whose rows all repeated this round gains nothing from another: it keeps them
        stuck = {h for h in {r // rows for r in todo} if all(r in redo for r in todo if r // rows == h)}
        redo = [r for r in redo if r // rows not in stuck]
        if not redo:
            break
        log.debug("distinct: %d of %d rows repeat an action; decoding them again", len(redo), len(todo))
        for h, new in enumerate(fresh):
            taken[h] |= new
        todo = redo
    return result
