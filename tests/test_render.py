"""One rendering for SFT, sampling and the QNet: segments, loss mask, prefix stability, truncation."""

from __future__ import annotations

from transformers import AutoTokenizer

from qlass.policy.render import (
    default_keep_prefix,
    encode_conversation,
    ensure_chat_template,
    fit_history,
    render,
    truncate_history,
)
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
    assert trained == ("OK<|im_end|>\nThought: go.\nAction: go to greenhouse<|im_end|>\nThought: found.\n"
                       "Action: focus on pea plant<|im_end|>\n")


def test_prefix_stable_across_turns(tiny_model_dir) -> None:
    tok = ensure_chat_template(AutoTokenizer.from_pretrained(tiny_model_dir))
    earlier, _ = encode_conversation(tok, CONV[:3], add_generation_prompt=True)
    later, _ = encode_conversation(tok, CONV[:5], add_generation_prompt=True)
    assert later[: len(earlier)] == earlier and len(later) > len(earlier)
    assert tok.decode(later).endswith("<|im_start|>assistant\n")


def test_truncation_keeps_prefix_and_newest_turns() -> None:
    long = CONV + [Message("user", f"Observation: {i}") if i % 2 == 0
                   else Message("assistant", f"Thought: t\nAction: a{i}") for i in range(11)]
    keep = default_keep_prefix(long)
    assert keep == 3
    cut = truncate_history(long, keep, lambda msgs: len(msgs) <= 7)
    assert cut[:3] == long[:3] and cut[-4:] == long[-4:] and len(cut) == 7
    assert [m.role for m in cut[3:]] == ["assistant", "user", "assistant", "user"]


def test_exact_segments_with_smollm2_default_system_prompt(tiny_model_dir) -> None:
    """Consecutive ids with the same mask value, decoded: the exact ChatML pieces, system prompt included."""
    tok = ensure_chat_template(AutoTokenizer.from_pretrained(tiny_model_dir))
    ids, mask = encode_conversation(tok, CONV[:4], add_generation_prompt=True)
    pieces, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            pieces.append((tok.decode(ids[start:i]), mask[start]))
            start = i
    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    assert pieces == [
        (system + "<|im_start|>user\nInstruction: act.<|im_end|>\n<|im_start|>assistant\n", False),
        ("OK<|im_end|>\n", True),
        ("<|im_start|>user\nTask: find a plant.<|im_end|>\n<|im_start|>assistant\n", False),
        ("Thought: go.\nAction: go to greenhouse<|im_end|>\n", True),
        ("<|im_start|>assistant\n", False),
    ]


def test_segment_ids_equal_whole_string_tokenization(tiny_model_dir) -> None:
    """A server tokenizing the rendered text (the OpenAI completions backend) reads the same ids."""
    tok = ensure_chat_template(AutoTokenizer.from_pretrained(tiny_model_dir))
    for k in range(1, len(CONV) + 1):
        ids, _ = encode_conversation(tok, CONV[:k], add_generation_prompt=True)
        assert ids == tok(render(tok, CONV[:k], add_generation_prompt=True), add_special_tokens=False)["input_ids"]


def test_fit_history_matches_linear_truncation_for_token_budgets(tiny_model_dir) -> None:
    """The binary-searched cut equals truncate_history's one-turn-at-a-time cut, for every budget."""
    tok = ensure_chat_template(AutoTokenizer.from_pretrained(tiny_model_dir))
    long = CONV + [Message("user", f"Observation: room {i} " + "x " * i) if i % 2 == 0
                   else Message("assistant", f"Thought: t\nAction: a{i}") for i in range(15)]
    keep = default_keep_prefix(long)
    full = len(encode_conversation(tok, long)[0])
    for budget in range(60, full + 10, 17):
        def fits(msgs, budget=budget):
            return len(encode_conversation(tok, msgs)[0]) <= budget
        cut = fit_history(long, fits)
        assert cut == truncate_history(long, keep, fits)
        assert cut[:keep] == long[:keep] and cut[-1] == long[-1]
