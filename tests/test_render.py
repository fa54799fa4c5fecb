"""One rendering for SFT, sampling and the QNet: segments, loss mask, prefix stability, truncation."""

from __future__ import annotations

from transformers import AutoTokenizer

from qlass.policy.hf import default_keep_prefix
from qlass.policy.render import encode_conversation, ensure_chat_template, render, truncate_history
from qlass.types import Message

CONV = [
    Message("user", "Instruction: act."),
    Message("assistant", "OK"),
    Message("user", "Task: find a plant."),
    Message("assistant", "Thought: go.\nAction: go to greenhouse"),
    Message("user", "Observation: You move to the greenhouse."),
    Message("assistant", "Thought: found.\nAction: focus on pea plant"),
]


def test_ids_equal_whole_string_and_mask_covers_assistant_turns(tiny_model_dir) -> None:
    tok = ensure_chat_template(AutoTokenizer.from_pretrained(tiny_model_dir))
    ids, mask = encode_conversation(tok, CONV, add_generation_prompt=False)
    assert tok.decode(ids) == render(tok, CONV, add_generation_prompt=False)
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "OK<|im_end|>\nThought: go.\nAction: go to greenhouse<|im_end|>\nThought: found.\nAction: focus on pea plant<|im_end|>\n"


def test_prefix_stable_across_turns(tiny_model_dir) -> None:
    tok = ensure_chat_template(AutoTokenizer.from_pretrained(tiny_model_dir))
    earlier, _ = encode_conversation(tok, CONV[:3], add_generation_prompt=True)
    later, _ = encode_conversation(tok, CONV[:5], add_generation_prompt=True)
    assert later[: len(earlier)] == earlier and len(later) > len(earlier)
    assert tok.decode(later).endswith("<|im_start|>assistant\n")


def test_truncation_keeps_prefix_and_newest_turns() -> None:
    long = CONV + [Message("user", f"Observation: {i}") if i % 2 == 0 else Message("assistant", f"Thought: t\nAction: a{i}")
                   for i in range(11)]
    keep = default_keep_prefix(long)
    assert keep == 3
    cut = truncate_history(long, keep, lambda msgs: len(msgs) <= 7)
    assert cut[:3] == long[:3] and cut[-4:] == long[-4:] and len(cut) == 7
    assert [m.role for m in cut[3:]] == ["assistant", "user", "assistant", "user"]
