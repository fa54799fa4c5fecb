"""Where an agent output ends: the complete ``Action:`` line rule shared by every backend."""

from __future__ import annotations

from ..envs.base import ACTION_RE


def complete_action(text: str) -> str | None:
    """``text`` cut after its first complete ``Action:`` line (one :func:`~qlass.envs.base.parse_action`
    reads: at the start of a line, non-empty, and here also ended by a newline), or ``None`` while no
    such line exists."""
    for line in ACTION_RE.finditer(text):
        if line.group(1) and "\n" in text[line.end(1):]:  # the first newline after the action ends its line
            return f"{text[:line.start()]}Action: {line.group(1)}"
    return None


def final_output(text: str, cut: bool) -> tuple[str, bool]:
    """The text a policy returns for a raw output, and whether it is truncated.

    An output that stopped on its own (end token, stop sequence, newline after the action) is cut
    after its ``Action:`` line, a last line without a newline counting as complete. An output
    ``cut`` by the token limit counts only an action line that its newline closed; without one it
    is returned as generated (stripped) and flagged truncated: it must not be executed as an action.
    """
    action = complete_action(text) if cut else complete_action(text + "\n")
    return (action or text).strip(), cut and action is None
