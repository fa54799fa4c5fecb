"""Prompt perturbations that make a policy's samples differ (candidate diversity, paper §4.2 / Fig. 9).

The perturbed conversation is only what the policy *reads* while sampling an alternative; the tree,
the Q data and an episode's record keep the unperturbed conversation, so the QNet never sees it.

- :func:`diversity_prompt`: the last user turn also asks for a response whose action differs from
  the actions already taken or sampled in this state (the authors' code does this for every sample
  after the first, behind ``--disable_perturb``).
- :func:`paraphrase_prompt`: the task description, in every user turn that shows it, replaced by a
  paraphrase (task perturbation, paper Fig. 9; the paraphrases come from :mod:`qlass.paraphrase`).
"""

from __future__ import annotations

from collections.abc import Sequence

from .envs.base import parse_action
from .types import History, Message


def _action_of(output: str) -> str:
    """The action of an agent output (its whole stripped text when it has no ``Action:`` line)."""
    return parse_action(output) or output.strip()


def diversity_prompt(history: History, previous_outputs: Sequence[str]) -> list[Message]:
    """``history`` with its last user turn extended by a request for another reasonable response
    whose action differs from each of ``previous_outputs``' actions (in order, duplicates once).

    Returns ``history`` unchanged (as a list) when there is nothing to differ from; raises
    ``ValueError`` when ``history`` has no user turn to extend."""
    if isinstance(previous_outputs, str):  # one output, read letter by letter: "differ from 'T', 'h', ..."
        raise TypeError("diversity_prompt: argument 'previous_outputs' must be a list of outputs, got one string "
                        f"(give [{previous_outputs[:40]!r}...])")
    actions = list(dict.fromkeys(a for a in map(_action_of, previous_outputs) if a))
    if not actions:
        return list(history)
    last = max((i for i, m in enumerate(history) if m.role == "user"), default=None)
    if last is None:
        raise ValueError("diversity_prompt: the history has no user turn to extend")
    listed = ", ".join(f"'{a}'" for a in actions)
    noun = "this action" if len(actions) == 1 else "each of these actions"
    request = f"\n\nGive another reasonable response. Its action must differ from {noun}: {listed}."
    out = list(history)
    out[last] = Message("user", out[last].content + request)
    return out


def paraphrase_prompt(history: History, original: str, paraphrase: str) -> list[Message]:
    """``history`` with ``original`` (a task description) replaced by ``paraphrase`` in every user turn
    that contains it: the task turn, and observations that repeat the task (WebShop's pages).

    Raises ``ValueError`` when no user turn contains ``original``."""
    if not original or not any(m.role == "user" and original in m.content for m in history):
        raise ValueError("paraphrase_prompt: no user turn of the history contains the task description")
    return [Message("user", m.content.replace(original, paraphrase)) if m.role == "user" else m for m in history]


__all__ = ["diversity_prompt", "paraphrase_prompt"]
