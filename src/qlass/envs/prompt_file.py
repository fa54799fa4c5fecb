"""Prompt files: an environment's instruction and one-shot example as a plain text file.

Format (``qlass/envs/prompts/<env>.txt``)::

    <instruction>
    === EXAMPLE ===
    <first observation of the example task>
    ---
    Thought: ...
    Action: ...
    ---
    Observation: ...
    ---
    ...

The instruction becomes a user turn answered by ``OK``; the example's turns alternate user /
assistant, starting with the user.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import QlassError
from ..types import Message

EXAMPLE_MARK = "\n=== EXAMPLE ===\n"
TURN_MARK = "\n---\n"


def parse_prompt(text: str) -> list[Message]:
    """The conversation prefix a prompt file's text describes (see the module docstring)."""
    instruction, _, example = text.partition(EXAMPLE_MARK)
    messages = [Message("user", instruction.strip()), Message("assistant", "OK")]
    turns = [t.strip() for t in example.split(TURN_MARK) if t.strip()]
    messages += [Message("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(turns)]
    return messages


def load_prompt(name_or_path: str) -> list[Message]:
    """A built-in prompt by environment name (``alfworld``, ``sciworld``, ...) or a prompt file path."""
    builtin = resources.files("qlass.envs.prompts").joinpath(f"{name_or_path}.txt")
    if "/" not in name_or_path and "\\" not in name_or_path and builtin.is_file():
        return parse_prompt(builtin.read_text(encoding="utf-8"))
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise QlassError(f"prompt {name_or_path!r} is neither a built-in prompt nor a readable file")
    return parse_prompt(path.read_text(encoding="utf-8-sig"))
