"""What a QNet optimizer step minimises: a regression per record (by ``rank``) plus an optional
Bradley–Terry loss over sibling pairs.

Notation: for a record (history s, action a, target q) Q is the head read at the action's last token
and V the same head read at the history's last token (the end of the generation prompt, position
``end − action_length`` of a packed row). ``b`` is the state's value target: the mean target of the
record's sibling group (the record's own target when it has no siblings). The mean, not the max of
Eq. 7, because the group holds only the sampled actions, and one noisy rollout should not set the
state's value alone.

- ``q``: ``(Q − q)²``; the score is Q. Between states the target varies with how far the state is
  from the end (γ^steps-to-go), and in exploration trees most records are lone rollout steps, so
  this loss is dominated by "how late does this look", which says nothing about which action to take.
- ``advantage``: ``(Q − q)² + (V − b)²``; the score is Q − V. Siblings share V, so within a decision
  the order is Q's; what changes is that V soaks up the state's value, which matters whenever scores
  of different states are compared (or mixed with a likelihood).
- ``dueling``: ``((Q − V) − (q − b))² + (V − b)²``; the score is Q − V. The score itself is regressed
  on the centred target, so a lone record teaches it 0 (a lone action carries no evidence about
  which action is better) and only sibling contrast moves it: the state-level "progress" signal is
  confined to V. Q = V + (Q − V) still estimates q (its target is b + q − b), so the saved folder's
  Auto-class logit stays a Q value.

Pairwise term (``pair_weight`` > 0): for every pair of siblings in the step whose targets differ by
more than :data:`PAIR_EPS`, ``softplus(score_lo − score_hi)`` (Bradley–Terry, −log σ of the margin),
averaged over the step's pairs and added with weight ``pair_weight`` to the per-record mean above.
Siblings sit on different packed rows; their rows share a step (:func:`qlass.qnet_pack.batch_units`),
and the pair term's gradient with respect to each score depends only on the step's scores, so a
first pass without gradients computes those coefficients (:func:`pair_coefficients`) and every row
is then backpropagated on its own with ``coefficient × score`` added to its loss (exact for a
deterministic forward; a step keeps one row's graph at a time, as without pairs). The trainer is
:class:`qlass.training.qnet_trainer.QNetTrainer`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .qnet import QNet
from .qnet_data import QRecord
from .qnet_pack import PackedRow

PAIR_EPS = 1e-6
"""Sibling targets closer than this form no pair (in training and in the validation metrics)."""


def group_key(r: QRecord) -> tuple[str, str]:
    """The sibling group a record belongs to."""
    return (r.tree_id, r.group)


def state_targets(records: Sequence[QRecord]) -> dict[tuple[str, str], float]:
    """Per sibling group, the state's value target ``b``: the mean target of its records."""
    sums: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in records:
        sums[group_key(r)].append(r.q)
    return {k: sum(v) / len(v) for k, v in sums.items()}


def contrast_groups(records: Sequence[QRecord]) -> set[tuple[str, str]]:
    """Sibling groups holding at least one pair whose targets differ by more than :data:`PAIR_EPS`."""
    span: dict[tuple[str, str], list[float]] = {}
    for r in records:
        lo_hi = span.setdefault(group_key(r), [r.q, r.q])
        lo_hi[0], lo_hi[1] = min(lo_hi[0], r.q), max(lo_hi[1], r.q)
    return {k for k, (lo, hi) in span.items() if hi - lo > PAIR_EPS}


def sibling_pairs(records: Sequence[QRecord]) -> list[tuple[int, int]]:
    """``(better, worse)`` index pairs of siblings among ``records`` whose targets differ by more than
    :data:`PAIR_EPS`."""
    by_group: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_group[group_key(r)].append(i)
    pairs = []
    for idx in by_group.values():
        for a in range(len(idx)):
            for b in range(a + 1, len(idx)):
                i, j = idx[a], idx[b]
                if abs(records[i].q - records[j].q) > PAIR_EPS:
                    pairs.append((i, j) if records[i].q > records[j].q else (j, i))
    return pairs


def row_outputs(qnet: QNet, row: PackedRow) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Q ``[K]`` of every record of ``row`` and, for the advantage ranks, V ``[K]`` (differentiable)."""
    if qnet.rank == "q":
        return qnet.values_at(row.ids, row.ends), None
    starts = [end - n for end, n in zip(row.ends, row.action_lengths, strict=True)]
    q, v = qnet.heads_at(row.ids, [row.ends, starts])
    return q, v


def scores_of(q: torch.Tensor, v: torch.Tensor | None) -> torch.Tensor:
    """The ranking score: Q, or Q − V."""
    return q if v is None else q - v


def record_losses(rank: str, q: torch.Tensor, v: torch.Tensor | None, targets: torch.Tensor,
                  baselines: torch.Tensor) -> torch.Tensor:
    """Per-record regression loss ``[K]`` of ``rank`` (see the module docstring)."""
    if rank == "q" or v is None:
        return (q - targets) ** 2
    state = (v - baselines) ** 2
    if rank == "advantage":
        return (q - targets) ** 2 + state
    return ((q - v) - (targets - baselines)) ** 2 + state


def pair_coefficients(scores: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor,
                      step_pairs: int) -> tuple[torch.Tensor, float]:
    """``(d bt / d scores, bt)`` for ``bt = Σ softplus(scores[lo] − scores[hi]) / step_pairs``: the
    Bradley–Terry term of the pairs ``(hi[i], lo[i])`` (indices into ``scores``, better first) as
    their share of the mean over the ``step_pairs`` pairs of the whole optimizer step (under several
    processes each holds some of them). Adding ``pair_weight × (coefficient × score).sum()`` to a row's
    loss gives the row its exact share of the pair term's gradient."""
    scores = scores.detach().requires_grad_(True)
    bt = F.softplus(scores[lo] - scores[hi]).sum() / step_pairs
    (coeff,) = torch.autograd.grad(bt, scores)
    return coeff, float(bt.detach())
