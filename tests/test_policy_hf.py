"""The local HF policy on tiny real models: shapes, token accounting, greedy = full-forward argmax,
seeds, shared prefill = separate sampling, batching with padding, cache reuse, stopping, truncation."""

from __future__ import annotations

import inspect
import typing
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qlass.agent import executed_text
from qlass.candidates import mean_logprob
from qlass.envs.base import parse_action
from qlass.errors import QlassError
from qlass.policy import check_policy_options
from qlass.policy.base import SampleJob
from qlass.policy.hf import HFPolicy
from qlass.policy.option_values import hf_policy_options
from qlass.policy.outputs import complete_action, final_output
from qlass.policy.render import encode_conversation
from qlass.policy.sampling import filter_probs
from qlass.seeding import SEED_STRIDE, candidate_seed
from qlass.types import Completion, Message

HIST = [Message("user", "Instruction: act."), Message("assistant", "OK"), Message("user", "Task: find a plant.")]
LONGER = HIST + [Message("assistant", "Thought: a\nAction: look around"),
                 Message("user", "Observation: a room with a door, a table and a lamp.")]


@pytest.fixture(scope="module")
def policy(tiny_model_dir: Path) -> HFPolicy:
    return HFPolicy(tiny_model_dir, max_length=512)


def _full_forward_greedy(policy: HFPolicy, ids: list[int], steps: int) -> tuple[list[int], float]:
    """Greedy tokens and their summed log-probability, recomputing the whole sequence each step."""
    gen: list[int] = []
    total = 0.0
    with torch.no_grad():
        for _ in range(steps):
            logits = policy.model(input_ids=torch.tensor([ids + gen], device=policy.device)).logits
            logp = torch.log_softmax(logits[0, -1].float(), -1)
            gen.append(int(logp.argmax()))
            total += float(logp[gen[-1]])
    return gen, total


def test_n_candidates_per_history_and_prompt_tokens(policy: HFPolicy) -> None:
    out = policy.sample([HIST, LONGER, HIST[:1]], n=3, temperature=1.0, max_new_tokens=6, seed=0)
    assert [len(c) for c in out] == [3, 3, 3]
    for history, comps in zip([HIST, LONGER, HIST[:1]], out):
        n_prompt = len(encode_conversation(policy.tokenizer, history)[0])
        assert all(c.prompt_tokens == n_prompt for c in comps)
        assert all(1 <= c.completion_tokens <= 6 and c.logprob is not None and c.logprob < 0 for c in comps)


def test_greedy_is_full_forward_argmax_with_its_logprob(policy: HFPolicy) -> None:
    (c,) = policy.sample([LONGER], n=1, temperature=0.0, max_new_tokens=8, seed=0)[0]
    ids = encode_conversation(policy.tokenizer, LONGER)[0]
    gen, logprob = _full_forward_greedy(policy, ids, c.completion_tokens)
    text = policy.tokenizer.decode([t for t in gen if t not in policy.stop_ids])
    assert (complete_action(text + "\n") or text).strip() == c.text
    assert c.logprob == pytest.approx(logprob, abs=1e-3)
    many = policy.sample([LONGER], n=4, temperature=0.0, max_new_tokens=8, seed=9)[0]
    assert many == [c] * 4  # greedy: n identical candidates


def test_seeded_sampling_is_reproducible_and_seeds_differ(policy: HFPolicy) -> None:
    a = policy.sample([HIST], n=4, temperature=1.0, max_new_tokens=10, seed=5)
    b = policy.sample([HIST], n=4, temperature=1.0, max_new_tokens=10, seed=5)
    c = policy.sample([HIST], n=4, temperature=1.0, max_new_tokens=10, seed=6)
    assert a == b and a != c
    assert len({x.text for x in a[0]}) > 1  # candidates of one call differ from each other


def test_shared_prefill_equals_separate_calls_with_the_same_generator(policy: HFPolicy) -> None:
    """Candidate j of one n=4 call (one prefill, batch of 4) equals a lone n=1 call on its own stream."""
    before = policy.prefill_tokens
    policy.clear_cache()
    shared = policy.sample([LONGER], n=4, temperature=1.0, max_new_tokens=10, seed=11)[0]
    assert policy.prefill_tokens - before == len(encode_conversation(policy.tokenizer, LONGER)[0])
    for j, cand in enumerate(shared):
        (alone,) = policy.sample([LONGER], n=1, temperature=1.0, max_new_tokens=10, seed=[candidate_seed(11, j)])[0]
        assert (alone.text, alone.completion_tokens) == (cand.text, cand.completion_tokens)
        assert alone.logprob == pytest.approx(cand.logprob, abs=1e-3)


def test_histories_of_different_lengths_batch_like_single_calls(tiny_model_dir: Path) -> None:
    """Left-padded batching of several histories changes nothing, also when split in small batches."""
    hists = [LONGER, HIST, HIST[:1]]
    together = HFPolicy(tiny_model_dir, max_length=512).sample(hists, n=2, temperature=1.0, max_new_tokens=8, seed=3)
    small = HFPolicy(tiny_model_dir, max_length=512, max_batch_rows=2)
    split = small.sample(hists, n=2, temperature=1.0, max_new_tokens=8, seed=3)
    for i, h in enumerate(hists):
        alone = small.sample([h], n=2, temperature=1.0, max_new_tokens=8, seed=3 + i * SEED_STRIDE)[0]
        for a, b, c in zip(together[i], split[i], alone):
            assert a.text == b.text == c.text and a.completion_tokens == c.completion_tokens
            assert a.logprob == pytest.approx(c.logprob, abs=1e-3)


def test_cache_reuse_is_exact_and_prefills_only_new_tokens(tiny_model_dir: Path) -> None:
    reuse = HFPolicy(tiny_model_dir, max_length=512)
    fresh = HFPolicy(tiny_model_dir, max_length=512, cache_slots=0)
    sibling = HIST + [Message("assistant", "Thought: b\nAction: go to kitchen"), Message("user", "Observation: ok.")]
    for h in (HIST, LONGER, sibling):
        for temperature in (0.0, 0.8):
            a = reuse.sample([h], 2, temperature, 10, seed=3)[0]
            b = fresh.sample([h], 2, temperature, 10, seed=3)[0]
            assert [c.text for c in a] == [c.text for c in b]
            assert [c.logprob for c in a] == pytest.approx([c.logprob for c in b], abs=1e-3)
    ids = [encode_conversation(reuse.tokenizer, h)[0] for h in (HIST, LONGER, sibling)]
    shared = next(i for i, (x, y) in enumerate(zip(ids[1], ids[2])) if x != y)  # sibling diverges here
    assert reuse.prefill_tokens == len(ids[0]) + (len(ids[1]) - len(ids[0])) + (len(ids[2]) - shared)
    assert fresh.prefill_tokens == 2 * sum(len(x) for x in ids)


def test_autocast_stores_the_cache_in_bf16_with_the_same_answers(tiny_model_dir: Path, native_bf16: None) -> None:
    """Under bf16 autocast the cache holds bf16 keys/values (attention reads them in bf16 anyway):
    completions and log-probabilities equal those of a cache kept as computed (fp32 keys)."""
    bf16 = HFPolicy(tiny_model_dir, max_length=512, autocast=True)
    as_computed = HFPolicy(tiny_model_dir, max_length=512, autocast=True)
    as_computed.kv_dtype = None
    for h in (HIST, LONGER):
        for temperature in (0.0, 1.0):
            a = bf16.sample([h, LONGER], 3, temperature, 10, seed=5)
            b = as_computed.sample([h, LONGER], 3, temperature, 10, seed=5)
            assert [[c.text for c in r] for r in a] == [[c.text for c in r] for r in b]
            assert [c.logprob for r in a for c in r] == pytest.approx([c.logprob for r in b for c in r], abs=1e-4)
    assert {k.dtype for k, v in bf16._prefill(bf16.encode(LONGER)).kv} == {torch.bfloat16}
    assert {k.dtype for k, v in as_computed._prefill(as_computed.encode(LONGER)).kv} == {torch.float32}
    assert HFPolicy(tiny_model_dir, max_length=512).kv_dtype is None  # fp32 runs keep fp32 caches


def test_conversations_played_side_by_side_keep_their_caches_with_one_slot_each(tiny_model_dir: Path) -> None:
    """Best-of-n extends N conversations in lockstep: a prompt's cache supersedes the one it extends,
    so N slots hold them all and each turn prefills only its new tokens."""
    n = 3
    policy = HFPolicy(tiny_model_dir, max_length=512, cache_slots=n)
    convs = [list(HIST) + [Message("assistant", f"Thought: {k}\nAction: look"), Message("user", f"Observation: {k}")]
             for k in range(n)]
    policy.sample(convs, 1, 0.7, 6, seed=1)
    for turn in range(3):
        convs = [c + [Message("assistant", f"Thought: t{turn}\nAction: wait"), Message("user", f"Observation: {turn}")]
                 for c in convs]
        before = [encode_conversation(policy.tokenizer, c[:-2])[0] for c in convs]
        after = [encode_conversation(policy.tokenizer, c)[0] for c in convs]
        start = policy.prefill_tokens
        policy.sample(convs, 1, 0.7, 6, seed=2 + turn)
        assert policy.prefill_tokens - start == sum(len(a) - len(b) for a, b in zip(after, before))
        assert len(policy.store) == n


def test_truncation_keeps_task_and_newest_turns(policy: HFPolicy) -> None:
    turns = [Message("assistant", f"Thought: t{i}\nAction: a{i}") if i % 2 == 0
             else Message("user", f"Observation: o{i}") for i in range(60)]
    long = HIST + turns
    small = HFPolicy(policy.model_dir, max_length=160)
    ids = small.encode(long, reserve=40)
    text = small.tokenizer.decode(ids)
    assert len(ids) <= 120 and "Task: find a plant." in text and "Instruction: act." in text
    assert text.endswith("Observation: o59<|im_end|>\n<|im_start|>assistant\n") and "o1<" not in text
    out = small.sample([long], n=2, temperature=1.0, max_new_tokens=40, seed=0)[0]
    assert all(c.prompt_tokens == len(ids) for c in out)


def test_action_line_completion_rule() -> None:
    assert complete_action("Thought: x\nAction: go north") is None
    assert complete_action("Thought: x\nAction:\n") is None
    assert complete_action("Thought: x\nAction:go north\nThought: more") == "Thought: x\nAction: go north"
    # an "Action:" inside the thought is no action line (parse_action reads one at the start of a line only):
    # the output goes on to its action line, and a cut one is sent without that line, thought kept whole
    thought = "Thought: my next Action: is clear.\n"
    assert complete_action(thought) is None
    assert complete_action(thought + "  Action: go east\nmore") == thought + "Action: go east"
    assert parse_action(final_output(thought + "Action: go east", cut=False)[0]) == "go east"
    assert executed_text(Completion(thought + "Action: go ea", 1, 1, truncated=True)) == thought.strip()


# -- stopping, on a tiny model taught two scripted answers ------------------------------------------
SCRIPTS = {
    "Task: find a plant.": "Thought: go.\nAction: go to greenhouse\nThought: and then some more words",
    "Task: find an animal.": "Thought: look.\nAction: look around<|im_end|>",
}


@pytest.fixture(scope="module")
def scripted(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model trained (a few hundred steps, seconds) to answer each task with its script."""
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    batch = []
    for task, answer in SCRIPTS.items():
        prompt = encode_conversation(tok, [Message("user", task)])[0]
        target = tok(answer, add_special_tokens=False)["input_ids"]
        batch.append((torch.tensor([prompt + target]), torch.tensor([[-100] * len(prompt) + target])))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        loss = sum(model(input_ids=x, labels=y).loss for x, y in batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.05:
            break
    out = tmp_path_factory.mktemp("scripted") / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_generation_stops_after_the_action_line_and_at_the_end_token(scripted: Path) -> None:
    policy = HFPolicy(scripted, max_length=256)
    tok = policy.tokenizer
    plant, animal = ([Message("user", task)] for task in SCRIPTS)
    (a,) = policy.sample([plant], 1, 0.0, 40, seed=0)[0]
    assert a.text == "Thought: go.\nAction: go to greenhouse"
    ids = tok(SCRIPTS[plant[0].content], add_special_tokens=False)["input_ids"]
    newline_at = next(i for i in range(len(ids)) if complete_action(tok.decode(ids[: i + 1])))
    assert a.completion_tokens == newline_at + 1  # stopped right after the action line's newline
    (b,) = policy.sample([animal], 1, 0.0, 40, seed=0)[0]
    assert b.text == "Thought: look.\nAction: look around"
    assert b.completion_tokens == len(tok(SCRIPTS[animal[0].content], add_special_tokens=False)["input_ids"])
    both = policy.sample([plant, animal], 3, 0.3, 40, seed=1)  # batched rows stop independently
    assert [c.text for c in both[0]] == [a.text] * 3 and [c.text for c in both[1]] == [b.text] * 3
    for options in ({"autocast": True}, {"dtype": "bfloat16"}):  # bf16 paths give the same answers here
        fast = HFPolicy(scripted, max_length=256, **options)
        assert [c[0].text for c in fast.sample([plant, animal], 1, 0.0, 40)] == [a.text, b.text]


def test_sliding_window_models_take_the_generic_path(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A cache that is not plain full attention: no reuse or cross-history padding, same results."""
    from transformers import MistralConfig, MistralForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                           eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    policy = HFPolicy(tmp_path / "m", max_length=256)
    assert not policy.plain
    (c,) = policy.sample([LONGER], 1, 0.0, 6)[0]
    _, logprob = _full_forward_greedy(policy, encode_conversation(tok, LONGER)[0], c.completion_tokens)
    assert c.logprob == pytest.approx(logprob, abs=1e-3)
    out = policy.sample([HIST, LONGER], 3, 1.0, 6, seed=2)
    assert [len(x) for x in out] == [3, 3]
    assert out[1] == policy.sample([LONGER], 3, 1.0, 6, seed=2 + SEED_STRIDE)[0]


def test_consecutive_seeds_share_no_candidate_stream(policy: HFPolicy) -> None:
    """Bug B1: with seed + j per candidate, candidate 1 of a call seeded s drew from the same stream as
    candidate 0 of the next step's call seeded s + 1; now each candidate's stream is hashed."""
    same = 0
    for s in range(6):
        later = policy.sample([LONGER], n=2, temperature=1.0, max_new_tokens=10, seed=s)[0][1]
        next_step = policy.sample([LONGER], n=2, temperature=1.0, max_new_tokens=10, seed=s + 1)[0][0]
        same += later.text == next_step.text
    assert same < 3


def test_per_history_seeds_do_not_depend_on_the_batch(policy: HFPolicy) -> None:
    """A list of seeds gives each history its own stream: a history samples the same completions
    alone and in a call with other histories, in any position (what lockstep waves rely on)."""
    alone = policy.sample([LONGER], n=2, temperature=1.0, max_new_tokens=10, seed=[77])[0]
    mixed = policy.sample([HIST, LONGER, HIST[:1]], n=2, temperature=1.0, max_new_tokens=10, seed=[5, 77, 9])
    for a, b in zip(mixed[1], alone, strict=True):
        assert (a.text, a.completion_tokens) == (b.text, b.completion_tokens)
        assert a.logprob == pytest.approx(b.logprob, abs=1e-3)
    with pytest.raises(ValueError, match="2 seeds for 3 histories"):
        policy.sample([HIST, LONGER, HIST], n=1, temperature=1.0, max_new_tokens=4, seed=[1, 2])



def test_jobs_of_mixed_settings_in_one_batch_match_separate_calls(tiny_model_dir: Path) -> None:
    """``sample_jobs`` decodes histories with different n, temperature and token limit together (what a
    lockstep wave of greedy, best-of-n and qlass episodes asks); each job gets what ``sample`` gives
    its history alone, also when ``max_batch_rows`` splits the wave."""
    jobs = [SampleJob(HIST, 1, 0.0, 12, 3), SampleJob(LONGER, 3, 1.0, 10, 77), SampleJob(HIST[:1], 2, 0.7, 5, 9),
            SampleJob(LONGER, 2, 0.0, 7, 4)]
    for rows in (32, 3):
        policy = HFPolicy(tiny_model_dir, max_length=512, max_batch_rows=rows)
        together = policy.sample_jobs(jobs)
        for job, got in zip(jobs, together, strict=True):
            alone = policy.sample([job.history], job.n, job.temperature, job.max_new_tokens, seed=[job.seed])[0]
            assert len(got) == job.n
            for a, b in zip(got, alone, strict=True):
                assert (a.text, a.completion_tokens, a.truncated) == (b.text, b.completion_tokens, b.truncated)
                assert a.logprob == pytest.approx(b.logprob, abs=1e-3)
        assert all(c.completion_tokens <= 5 for c in together[2])
    with pytest.raises(ValueError, match="temperature >= 0"):
        policy.sample_jobs([SampleJob(HIST, 1, -1.0, 4, 0)])

# -- truncation (bug B3) ---------------------------------------------------------------------------
def test_output_cut_by_the_token_limit_is_flagged_truncated_not_completed(scripted: Path) -> None:
    """Bug B3: an output cut inside its action line ("Action: go to") came back as if complete."""
    policy = HFPolicy(scripted, max_length=256)
    tok = policy.tokenizer
    plant, animal = ([Message("user", task)] for task in SCRIPTS)
    ids = tok(SCRIPTS[plant[0].content], add_special_tokens=False)["input_ids"]
    newline_at = next(i for i in range(len(ids)) if complete_action(tok.decode(ids[: i + 1])))
    (cut,) = policy.sample([plant], 1, 0.0, newline_at, seed=0)[0]  # one token short of the newline
    assert cut.truncated and cut.text == tok.decode(ids[:newline_at]).strip()
    assert cut.text.startswith("Thought: go.\nAction: go to") and cut.completion_tokens == newline_at
    (whole,) = policy.sample([plant], 1, 0.0, newline_at + 1, seed=0)[0]  # the newline is the last token
    assert not whole.truncated and whole.text == "Thought: go.\nAction: go to greenhouse"
    end = len(tok(SCRIPTS[animal[0].content], add_special_tokens=False)["input_ids"])
    (ended,) = policy.sample([animal], 1, 0.0, end, seed=0)[0]  # the end token is the last token
    assert not ended.truncated and ended.text == "Thought: look.\nAction: look around"
    (unclosed,) = policy.sample([animal], 1, 0.0, end - 1, seed=0)[0]  # "Action: look around", not closed
    assert unclosed.truncated and unclosed.text == "Thought: look.\nAction: look around"


# -- top-p / min-p ---------------------------------------------------------------------------------
def test_filter_probs_keeps_the_nucleus_and_the_min_p_share() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]])

    def kept(**kw: float) -> list[list[bool]]:
        return (filter_probs(probs, **kw) > 0).tolist()

    assert kept(top_p=0.7) == [[True, True, False, False], [False, False, True, True]]
    assert kept(top_p=0.8)[0] == [True, True, False, False] and kept(top_p=0.81)[0] == [True, True, True, False]
    assert kept(top_p=1e-9)[0] == [True, False, False, False]
    assert kept(min_p=0.5)[0] == [True, True, False, False] and kept(min_p=0.2)[0] == [True, True, True, False]
    assert kept(min_p=0.2, top_p=0.9)[0] == [True, True, True, False]  # top-p of what min-p left (0.95)
    assert torch.equal(filter_probs(probs, top_p=0.7)[0], torch.tensor([0.5, 0.3, 0.0, 0.0]))


def test_tiny_top_p_samples_the_greedy_output(tiny_model_dir: Path, policy: HFPolicy) -> None:
    greedy = policy.sample([LONGER], 1, 0.0, 8)[0][0]
    nucleus = HFPolicy(tiny_model_dir, max_length=512, top_p=1e-6).sample([LONGER], 3, 1.0, 8, seed=4)[0]
    assert [c.text for c in nucleus] == [greedy.text] * 3
    assert [c.logprob for c in nucleus] == pytest.approx([greedy.logprob] * 3, abs=1e-3)
    assert len({c.text for c in policy.sample([LONGER], 3, 1.0, 8, seed=4)[0]}) > 1  # unfiltered: they differ


def test_a_tiny_temperature_samples_the_greedy_output(policy: HFPolicy) -> None:
    """A temperature so small that the logits divided by it overflow gave NaN probabilities and a
    RuntimeError from torch.multinomial; it now samples the most likely token, as its limit does."""
    greedy = policy.sample([LONGER], 1, 0.0, 8)[0][0]
    assert [c.text for c in policy.sample([LONGER], 2, 1e-45, 8, seed=4)[0]] == [greedy.text] * 2


def test_min_p_draws_only_tokens_near_the_most_likely(tiny_model_dir: Path, policy: HFPolicy) -> None:
    """The random tiny model is nearly flat: 14 first tokens hold at least half the top probability
    (0.06% of the mass). With min_p = 0.5 every draw is one of them; unfiltered, almost none is."""
    probs = torch.softmax(policy._prefill(policy.encode(HIST)).logits, dim=-1)
    near = set(torch.nonzero(probs >= 0.5 * probs.max()).flatten().tolist())
    assert 1 < len(near) < 100
    near_texts = {policy.tokenizer.decode([t]).strip() for t in near}
    drawn = [c.text for c in HFPolicy(tiny_model_dir, max_length=512, min_p=0.5).sample([HIST], 24, 1.0, 1, seed=1)[0]]
    assert set(drawn) <= near_texts and len(set(drawn)) > 1
    assert sum(c.text in near_texts for c in policy.sample([HIST], 24, 1.0, 1, seed=1)[0]) < 4
    with pytest.raises(QlassError, match="top_p must be in"):
        HFPolicy(tiny_model_dir, top_p=0.0)
    with pytest.raises(QlassError, match="min_p must be in"):
        HFPolicy(tiny_model_dir, min_p=1.5)
    check_policy_options(str(tiny_model_dir), {"top_p": 0.9, "min_p": 0.05, "distinct": True})


def test_options_are_checked_against_the_constructors_own_parameters() -> None:
    """check_policy_options reads HFPolicy's parameters from a copy that needs no torch: it must stay the
    constructor's (names, order, defaults and types), or a real option would be refused or a wrong one let by."""
    own = inspect.signature(HFPolicy.__init__).parameters
    copy = inspect.signature(hf_policy_options).parameters
    assert [(p.name, p.default, p.annotation) for p in list(own.values())[1:]] == \
        [(p.name, p.default, p.annotation) for p in copy.values()]
    assert typing.get_type_hints(HFPolicy.__init__) == typing.get_type_hints(hf_policy_options)


# -- distinct candidates, on a tiny model taught a skewed choice -------------------------------------
COLOURS = {"red": 5, "blue": 1, "green": 1, "white": 1}
PICK = [Message("user", "Task: pick a colour.")]


@pytest.fixture(scope="module")
def colours(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model trained to answer PICK with "pick <colour>", red five times as often as each other."""
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompt = encode_conversation(tok, PICK)[0]
    seqs = [tok(f"Thought: pick one.\nAction: pick {c}<|im_end|>", add_special_tokens=False)["input_ids"]
            for c, k in COLOURS.items() for _ in range(k)]
    width = max(map(len, seqs))
    x = torch.tensor([prompt + s + [tok.eos_token_id] * (width - len(s)) for s in seqs])
    y = torch.tensor([[-100] * len(prompt) + s + [-100] * (width - len(s)) for s in seqs])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):  # logits (49k wide) only where there are labels: the same loss, 3x faster
        loss = model(input_ids=x, labels=y[:, -(width + 1):], logits_to_keep=width + 1).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("colours") / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_distinct_candidates_have_distinct_actions(colours: Path) -> None:
    """Plain sampling repeats "pick red"; distinct sampling gives the four colours, branching where
    the model has probability left (min_p keeps the 0.1% junk tokens out, as in practice)."""
    plain = HFPolicy(colours, max_length=256, min_p=0.05)
    distinct = HFPolicy(colours, max_length=256, min_p=0.05, distinct=True)
    repeats = 0
    for seed in range(4):
        base = plain.sample([PICK], 4, 1.0, 30, seed=seed)[0]
        repeats += len({parse_action(c.text) for c in base}) < 4
        cands = distinct.sample([PICK], 4, 1.0, 30, seed=seed)[0]
        assert sorted(parse_action(c.text) for c in cands) == sorted(f"pick {c}" for c in COLOURS)
        assert all(not c.truncated for c in cands)
        assert sum(c.completion_tokens for c in cands) >= sum(c.completion_tokens for c in base)
        assert distinct.sample([PICK], 4, 1.0, 30, seed=seed)[0] == cands  # reproducible
        assert distinct.sample([HIST, PICK], 4, 1.0, 30, seed=[9, seed])[1] == cands  # whatever shares the call
    assert repeats == 4  # plain sampling repeats "pick red" every time
    assert distinct.sample([PICK], 3, 0.0, 30)[0] == plain.sample([PICK], 3, 0.0, 30)[0]  # greedy: unchanged
    # a redrawn candidate's tokens count its discarded draws, its log-probability only its own output:
    # the mean per token that select=likelihood and beta compare divides by the output's own tokens
    redrawn = [c for c in cands if c.logprob_tokens is not None]
    assert redrawn and all(c.logprob_tokens < c.completion_tokens for c in redrawn)
    for c, (_, own) in zip(cands, plain.score_outputs([PICK] * 4, [c.text for c in cands]), strict=True):
        assert (c.completion_tokens if c.logprob_tokens is None else c.logprob_tokens) == own
        assert mean_logprob(c) == pytest.approx(c.logprob / own)


# -- teacher-forced scoring ------------------------------------------------------------------------
def test_scores_equal_the_logprob_of_sampled_outputs(colours: Path, scripted: Path) -> None:
    policy = HFPolicy(colours, max_length=256)
    sampled = policy.sample([PICK, HIST], 4, 1.0, 30, seed=2)
    ended = [c for c in sampled[0] if not c.truncated]  # ended with the end-of-turn token
    assert len(ended) == 4
    scores = policy.score_outputs([PICK] * 4, [c.text for c in ended])
    assert [n for _, n in scores] == [c.completion_tokens for c in ended]
    assert [s for s, _ in scores] == pytest.approx([c.logprob for c in ended], abs=1e-3)
    mixed = policy.score_outputs([HIST, PICK, LONGER], ["Thought: x\nAction: y", ended[0].text, "Action: look"])
    alone = [policy.score_outputs([h], [o])[0] for h, o in
             [(HIST, "Thought: x\nAction: y"), (PICK, ended[0].text), (LONGER, "Action: look")]]
    assert [n for _, n in mixed] == [n for _, n in alone]
    assert [s for s, _ in mixed] == pytest.approx([s for s, _ in alone], abs=1e-3)  # batching changes nothing
    animal = [Message("user", "Task: find an animal.")]
    scripted_policy = HFPolicy(scripted, max_length=256)
    (c,) = scripted_policy.sample([animal], 1, 0.0, 40)[0]
    ((score, count),) = scripted_policy.score_outputs([animal], [c.text])
    assert count == c.completion_tokens and score == pytest.approx(c.logprob, abs=1e-3) and score > -1
    ((wrong, _),) = scripted_policy.score_outputs([animal], ["Thought: look.\nAction: go to greenhouse"])
    assert wrong < score - 5


def test_a_prompt_longer_than_the_fine_tuning_length_is_warned_once(tiny_model_dir: Path, tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    import shutil

    model = tmp_path / "sft"
    shutil.copytree(tiny_model_dir, model)
    (model / "sft_config.yaml").write_text("epochs: 2\nmax_length: 60\n")
    policy = HFPolicy(model, max_length=512)
    assert policy.trained_length == 60
    with caplog.at_level("WARNING", logger="qlass.policy.hf"):
        short = policy.encode(HIST[:1], reserve=8)
        assert len(short) <= 60 and not caplog.records
        policy.encode(LONGER, reserve=8)
        policy.encode(LONGER, reserve=8)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "longer than the 60 tokens this model was fine-tuned at" in warning and "max_length=60" in warning
    # a folder without the record (a base model) or with a malformed one: no fine-tuning length, no warning
    (model / "sft_config.yaml").write_text("max_length: [")
    assert HFPolicy(model).trained_length is None and HFPolicy(tiny_model_dir).trained_length is None


def test_a_qnet_or_classifier_folder_is_refused_as_the_policy(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A QNet folder given as ``--model`` (or ``sft_model:``) loaded as a causal LM whose head is its tied
    embeddings, and played without a word; it, and any sequence-classifier folder, is now refused."""
    from transformers import AutoModelForSequenceClassification

    from qlass.qnet import QNet

    QNet.from_sft(tiny_model_dir, max_length=64, max_action_tokens=16).save(tmp_path / "qnet")
    with pytest.raises(QlassError, match=r"qnet: is a QNet \(a sequence classifier\), not a causal LM"):
        HFPolicy(tmp_path / "qnet", max_length=64)
    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).save_pretrained(tmp_path / "cls")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "cls")
    with pytest.raises(QlassError, match=r"cls: is a QNet \(a sequence classifier\)"):
        HFPolicy(tmp_path / "cls", max_length=64)


def test_a_config_without_cache_layers_is_not_plain_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    """plain_attention swallowed DynamicCache's error without a word (the slower generic path was taken silently)."""
    from qlass.policy import kv

    with caplog.at_level("DEBUG", logger="qlass.policy.kv"):
        assert kv.plain_attention(object()) is False
    assert any("without cache reuse" in r.getMessage() and "AttributeError" in r.getMessage() for r in caplog.records)
