"""The QNet model on a tiny random Llama: input layout, shared-prefix scoring vs. naive forwards,
truncation, token accounting, and loading the saved folder with the HF Auto class."""

from __future__ import annotations

import inspect
import random
import typing

import pytest
import torch

from qlass.errors import QlassError
from qlass.policy.render import encode_conversation, render
from qlass.qnet import QNet
from qlass.qnet_options import qnet_load_options
from qlass.types import Message

WORDS = "look at the door go to kitchen open fridge focus on plant move apple table red blue water".split()


def random_text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def random_history(rng: random.Random, turns: int) -> list[Message]:
    msgs = [Message("user", "Instruction: " + random_text(rng, 12)), Message("assistant", "OK"),
            Message("user", "Task: " + random_text(rng, 8))]
    for _ in range(turns):
        msgs += [Message("assistant", f"Thought: {random_text(rng, 5)}\nAction: {random_text(rng, 3)}"),
                 Message("user", "Observation: " + random_text(rng, rng.randint(3, 15)))]
    return msgs


@pytest.fixture(scope="module")
def qnet(tiny_model_dir) -> QNet:
    return QNet.from_sft(tiny_model_dir, max_length=1024, max_action_tokens=64, seed=1)


def test_input_is_the_policy_prompt_followed_by_the_action(qnet: QNet) -> None:
    rng = random.Random(0)
    history = random_history(rng, 2)
    action = "Thought: the plant is here.\nAction: focus on plant"
    ids = qnet.encode(history, action)
    prompt, _ = encode_conversation(qnet.tokenizer, history, add_generation_prompt=True)
    assert ids == prompt + qnet.tokenizer(action, add_special_tokens=False).input_ids
    assert qnet.tokenizer.decode(ids) == render(qnet.tokenizer, history, add_generation_prompt=True) + action


def naive_values(qnet: QNet, history: list[Message], candidates: list[str]) -> list[float]:
    """The reference way: one full forward of the HF classifier per candidate."""
    with torch.no_grad():
        return [float(qnet.model(input_ids=torch.tensor([qnet.encode(history, c)],
                                                        device=qnet.model.device)).logits[0, 0])
                for c in candidates]


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_shared_prefix_scores_match_naive_forwards(qnet: QNet, seed: int) -> None:
    rng = random.Random(seed)
    history = random_history(rng, rng.randint(0, 4))
    lengths = [1, 2, 5, 9, 17, 30][: rng.randint(2, 6)]
    candidates = [random_text(rng, n) for n in lengths]
    got = qnet.score(history, candidates)
    want = naive_values(qnet, history, candidates)
    assert len({round(v, 6) for v in want}) > 1  # the candidates really differ
    assert got == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("packed,pack_tokens", [(True, 4096), (True, 12), (False, 4096)])
def test_both_candidate_layouts_match_naive_forwards(tiny_model_dir, attn: str, packed: bool, pack_tokens: int) -> None:
    """Packed (one row, block mask; also split over several rows) and batched (expanded cache, right
    padding) layouts agree with naive forwards under each attention kernel."""
    from qlass.qnet_forward import backbone_of, last_real_hidden, shared_prefix_hidden

    qnet = QNet.from_sft(tiny_model_dir, max_length=1024, max_action_tokens=64, seed=2)
    qnet.model.set_attn_implementation(attn)
    rng = random.Random(99)
    history = random_history(rng, 2)
    candidates = [""] + [random_text(rng, n) for n in (4, 1, 11)] + ["", random_text(rng, 3)]
    prefix = qnet.encode_history(history)
    suffixes = [qnet.encode_action(c) for c in candidates]
    with torch.no_grad():
        last, hidden = shared_prefix_hidden(backbone_of(qnet.model), prefix, suffixes, packed=packed,
                                            pack_tokens=pack_tokens)
        got = qnet.model.score(last_real_hidden(last, hidden, [len(s) for s in suffixes]))[:, 0].tolist()
    assert got == pytest.approx(naive_values(qnet, history, candidates), abs=1e-4)


def test_scores_do_not_depend_on_siblings_and_batch_agrees(qnet: QNet) -> None:
    rng = random.Random(5)
    h1, h2 = random_history(rng, 1), random_history(rng, 3)
    a, b, c = (random_text(rng, n) for n in (3, 12, 7))
    alone = qnet.score(h1, [a])[0]
    assert qnet.score(h1, [b, a, c])[1] == pytest.approx(alone, abs=1e-5)
    batch = qnet.score_batch([(h1, [a, b]), (h2, [c]), (h2, [])])
    assert batch[0] == pytest.approx(qnet.score(h1, [a, b]), abs=1e-6)
    assert batch[1] == pytest.approx(qnet.score(h2, [c]), abs=1e-6)
    assert batch[2] == []


@pytest.mark.parametrize("rank", ["q", "advantage"])
def test_history_caches_give_the_same_scores_and_run_only_new_tokens(tiny_model_dir, rank: str) -> None:
    """With ``cache_slots`` the turns of one episode reuse the previous turn's cache: the same values
    (fp32) as a QNet without caches, for Q and for a ranking score that reads V, while only each
    turn's new tokens are run; ``clear_cache`` forgets them."""
    plain = QNet.from_sft(tiny_model_dir, max_length=1024, max_action_tokens=64, seed=3, rank=rank)
    cached = QNet.from_sft(tiny_model_dir, max_length=1024, max_action_tokens=64, seed=3, rank=rank, cache_slots=4)
    rng = random.Random(21)
    history = random_history(rng, 4)
    cands = [random_text(rng, 4), random_text(rng, 9), ""]
    turns = [history[:k] for k in range(3, len(history) + 1, 2)]  # every prompt the episode had
    for value in (False, True):
        want = [plain.score_batch([(h, cands)], value=value)[0] for h in turns]
        got = [cached.score_batch([(h, cands)], value=value)[0] for h in turns]
        assert sum(got, []) == pytest.approx(sum(want, []), abs=1e-5)
    assert len({round(v, 5) for v in want[-1]}) > 1
    # each history token is run once, both value kinds included (a turn may re-run the one token
    # where tokenization joins two turns)
    last = len(plain.encode_history(turns[-1]))
    assert last <= cached.prefill_tokens <= last + len(turns)
    assert cached.prefill_tokens < sum(len(plain.encode_history(h)) for h in turns)
    assert cached.last_tokens == plain.last_tokens  # token accounting reports what the values read
    before = cached.prefill_tokens
    cached.clear_cache()
    cached.score(turns[-1], cands)
    assert cached.prefill_tokens - before == last


def test_token_accounting(qnet: QNet) -> None:
    rng = random.Random(7)
    history = random_history(rng, 2)
    cands = [random_text(rng, 4), random_text(rng, 10)]
    before = qnet.total_tokens
    qnet.score(history, cands)
    expected = len(qnet.encode_history(history)) + sum(len(qnet.encode_action(c)) for c in cands)
    assert qnet.last_tokens == expected
    assert qnet.total_tokens - before == expected


def test_long_history_drops_oldest_turns_and_keeps_prefix_and_newest(tiny_model_dir) -> None:
    small = QNet.from_sft(tiny_model_dir, max_length=200, max_action_tokens=40, seed=1)
    rng = random.Random(3)
    history = random_history(rng, 12)
    history[-1] = Message("user", "Observation: the newest turn is kept")
    ids = small.encode_history(history)
    assert len(ids) <= 160
    text = small.tokenizer.decode(ids)
    assert text.startswith(render(small.tokenizer, history[:3], add_generation_prompt=False))
    assert "the newest turn is kept" in text and text.endswith("<|im_start|>assistant\n")
    long_action = random_text(rng, 200)
    assert len(small.encode(history, long_action)) <= 200
    assert small.encode_action(long_action) == small.tokenizer(long_action, add_special_tokens=False).input_ids[-40:]


def test_trailing_pad_tokens_of_an_action_are_dropped(qnet: QNet) -> None:
    pad = qnet.tokenizer.convert_ids_to_tokens(qnet.pad_id)
    assert qnet.encode_action("go north" + pad) == qnet.encode_action("go north")


def test_saved_folder_loads_with_auto_class_and_gives_same_scores(qnet: QNet, tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification

    qnet.save(tmp_path / "q")
    assert (tmp_path / "q" / "model.safetensors").exists()
    auto = AutoModelForSequenceClassification.from_pretrained(tmp_path / "q").eval()
    assert auto.config.num_labels == 1 and auto.config.problem_type == "regression"
    assert auto.config.pad_token_id == qnet.pad_id
    rng = random.Random(21)
    history = random_history(rng, 2)
    cands = [random_text(rng, n) for n in (2, 6, 14)]
    rows = [qnet.encode(history, c) for c in cands]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [qnet.pad_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        hf = auto(input_ids=ids, attention_mask=mask).logits[:, 0].tolist()
    loaded = QNet.load(tmp_path / "q")
    assert (loaded.max_length, loaded.max_action_tokens) == (1024, 64)
    assert loaded.score(history, cands) == pytest.approx(hf, abs=1e-4)
    assert qnet.score(history, cands) == pytest.approx(hf, abs=1e-4)


def test_loading_a_non_qnet_folder_is_a_clear_error(tiny_model_dir, tmp_path) -> None:
    with pytest.raises(QlassError, match="no config.json"):
        QNet.load(tmp_path)
    with pytest.raises(QlassError, match="num_labels"):
        QNet.load(tiny_model_dir)  # a causal LM: the Auto class gives it the default 2 labels


def test_value_requests_read_q_whatever_the_rank(tiny_model_dir) -> None:
    """A dueling QNet ranks candidates by Q − V, but a trajectory judge (best-of-n, ``Score(value=True)``)
    gets Q itself: the same numbers a plain-rank QNet with the same weights gives."""
    from qlass.lockstep import Score, run_one

    dueling = QNet.from_sft(tiny_model_dir, max_length=1024, max_action_tokens=64, seed=3, rank="dueling")
    plain = QNet.from_sft(tiny_model_dir, max_length=1024, max_action_tokens=64, seed=3)
    history = [Message("user", "You are in a kitchen."), Message("assistant", "Thought: go.\nAction: look"),
               Message("user", "Observation: a fridge.")]
    outputs = ["Thought: open it.\nAction: open fridge", "Thought: leave.\nAction: go north"]
    q = plain.score(history, outputs)
    assert dueling.score_batch([(history, outputs)], value=True)[0] == pytest.approx(q, abs=1e-5)
    assert dueling.score(history, outputs) != pytest.approx(q, abs=1e-3)

    def judge():
        ranked, valued = yield [Score(history, outputs), Score(history, outputs, value=True)]
        return ranked.values, valued.values

    ranked, valued = run_one(judge(), policy=None, qnet=dueling)
    assert valued == pytest.approx(q, abs=1e-5) and ranked == pytest.approx(dueling.score(history, outputs), abs=1e-5)


@pytest.mark.parametrize(("option", "value"), [("max_length", 0), ("max_length", 1), ("cache_slots", -1),
                                               ("threads", 0), ("cache_slots", True)])
def test_load_options_are_checked_before_the_model_loads(tmp_path, option: str, value) -> None:
    """``--qnet-arg max_length=0`` fell back to the stored length and ``cache_slots=-1`` was kept."""
    (tmp_path / "config.json").write_text("{}")  # no weights: the options are refused before any are looked for
    with pytest.raises(QlassError, match=rf"QNet option {option} must be an integer >= \d, got {value!r}"):
        QNet.load(tmp_path, **{option: value})


def test_load_options_copy_is_the_methods_own() -> None:
    """``decisions report --qnet-arg`` is checked against a copy of QNet.load's parameters that needs no torch: it
    must stay the method's (names, order, defaults and types), or a real option would be refused or a wrong one let
    by."""
    own = inspect.signature(QNet.load).parameters
    copy = inspect.signature(qnet_load_options).parameters
    assert [(p.name, p.default, p.annotation) for p in own.values()] == \
        [(p.name, p.default, p.annotation) for p in copy.values()]
    returns = {"return": None}  # the copy returns nothing
    assert {**typing.get_type_hints(QNet.load), **returns} == {**typing.get_type_hints(qnet_load_options), **returns}
