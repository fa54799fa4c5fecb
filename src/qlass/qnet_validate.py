"""Scoring held-out Q records: the QNet's validation metrics and the SFT policy's log-likelihood
ranker, the baseline a QNet must beat on the same sibling pairs.

The QNet is judged by its inference score (Q, or Q − V for the advantage ranks) on sibling pairs with
different targets, and by Spearman and MSE of Q (an estimate of q under every rank): per epoch
through the trainer's evaluation loop (:mod:`qlass.training.qnet`), at the end on the saved model
(:func:`qnet_outputs`). The policy's log-likelihood of an action is reported per action token (the
ranker) and summed beside it: the sum is length-biased, a longer thought losing whatever its action.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .qnet import QNet
from .qnet_data import ranking_metrics, spearman
from .qnet_forward import backbone_of, sequence_hidden
from .qnet_loss import group_key, row_outputs, scores_of
from .qnet_pack import PackedRow


def _keys(rows: Sequence[PackedRow]) -> list[tuple[str, str]]:
    return [group_key(r) for row in rows for r in row.records]


def qnet_outputs(qnet: QNet, rows: Sequence[PackedRow]) -> tuple[list[float], list[float]]:
    """Q and the ranking score (Q, or Q − V) of every record of ``rows``, in eval mode, without gradients."""
    was_training = qnet.model.training
    qnet.model.eval()
    q: list[float] = []
    score: list[float] = []
    with torch.no_grad():
        for row in rows:
            qs, vs = row_outputs(qnet, row)
            q += [float(x) for x in qs]
            score += [float(x) for x in scores_of(qs, vs)]
    qnet.model.train(was_training)
    return q, score


def outputs_metrics(rows: Sequence[PackedRow], q: Sequence[float], score: Sequence[float]) -> dict[str, Any]:
    """Sibling pair accuracy of the ranking score, Spearman and MSE of Q against the targets."""
    targets = [t for row in rows for t in row.targets]
    metrics = ranking_metrics(_keys(rows), targets, score)
    metrics["spearman"] = spearman(targets, q)
    metrics["mse"] = sum((p - t) ** 2 for p, t in zip(q, targets, strict=True)) / max(len(targets), 1)
    return metrics


def loglik_scores(sft_dir: str | Path, rows: Sequence[PackedRow], autocast: bool = False,
                  device: str = "cpu") -> tuple[list[float], list[float]]:
    """The SFT policy's log-probability of each record's action given its history: per action token
    (mean) and summed, every record of ``rows`` in order."""
    from .policy.loading import load_causal_lm

    lm, _ = load_causal_lm(sft_dir)
    lm.to(device)
    backbone = backbone_of(lm)
    head = lm.get_output_embeddings()
    sums: list[float] = []
    means: list[float] = []
    with torch.no_grad():
        for row in rows:
            hidden = sequence_hidden(backbone, row.ids, autocast)
            ids = torch.tensor(row.ids, dtype=torch.long, device=hidden.device)
            for end, n in zip(row.ends, row.action_lengths, strict=True):
                # the action is ids[end-n+1 : end+1]; token p is predicted from the hidden state at p-1
                logp = torch.log_softmax(head(hidden[end - n:end].to(head.weight.dtype)).float(), dim=-1)
                total = float(logp[torch.arange(n), ids[end - n + 1:end + 1]].sum())
                sums.append(total)
                means.append(total / n if n else 0.0)
    return means, sums


def loglik_ranker_metrics(rows: Sequence[PackedRow], means: Sequence[float], sums: Sequence[float]) -> dict[str, Any]:
    """Sibling ranking by the per-token log-likelihood, with the summed one's beside it (``sum``)."""
    targets = [t for row in rows for t in row.targets]
    return {**ranking_metrics(_keys(rows), targets, means), "per": "action token",
            "sum": ranking_metrics(_keys(rows), targets, sums)}
