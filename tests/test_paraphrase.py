"""Task perturbation (paper Fig. 9): goal-constraint checks per environment on hand-written cases, the
paraphrase cache (built, resumed, refused with other settings, read with named errors), and the
paraphrase option of Q-guided search and of exploration on the toy corridor (tests/toy_envs.py).

``Paraphraser``, ``Walker`` and ``Judge`` are a user's own policies and value model (the Policy and
ValueModel protocols only): the paraphraser rewords the corridor's task description well or badly by
request, the walker answers ``go east`` to the real task turn and other actions to a paraphrased one,
so the tests can tell which conversation each candidate was sampled from.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from toy_envs import Corridor

from qlass.config import config_hash
from qlass.errors import DataError, QlassError
from qlass.explore import build_tree, explore_tasks
from qlass.explore_config import ExploreConfig, explore_digest
from qlass.jsonl import append_jsonl, read_jsonl
from qlass.paraphrase import ParaphraseConfig, build_paraphrases, clean_output, load_paraphrases
from qlass.paraphrase_goals import (
    check_paraphrase,
    goal_constraints,
    parse_house_goal,
    parse_shop_goal,
    task_text,
    template_paraphrase,
)
from qlass.perturb import paraphrase_prompt
from qlass.qdata import qdata_records
from qlass.search import QlassConfig, SearchContext, make_method_config, method_label, qlass_search
from qlass.types import Completion, History, Message, Task

TESTS = Path(__file__).resolve().parent
ENV = "toy_envs:Corridor"


def original(task: Task) -> str:
    return Corridor().reset(task)


def good(text: str) -> str:
    """A paraphrase of a corridor task that keeps its numbers."""
    n = re.search(r"goal (\d+) rooms", text).group(1)  # type: ignore[union-attr]
    return f"Head {n} rooms to the east to reach the goal; you start in room 0."


class Paraphraser:
    """Rewords the description in a paraphrase request: candidate 0 drops the numbers; candidate 1 keeps
    them, except for corridors of length 3, where every candidate drops them. Counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def sample(self, histories: Sequence[History], n: int = 1, temperature: float = 0.0, max_new_tokens: int = 128,
               seed: int | Sequence[int] | None = None) -> list[list[Completion]]:
        self.calls += 1
        out = []
        for h in histories:
            text = h[-1].content.split("Task description: ", 1)[1]
            keep = "goal 3 rooms" not in text
            out.append([Completion(f"Paraphrase: {good(text)}" if j == 1 and keep else "Walk east to the goal.", 9, 9)
                        for j in range(n)])
        return out


class Walker:
    """``go east`` for the real task turn; for a paraphrased one (``Head ...``) ``look`` and ``go west`` in
    turn. Records every request as ``(history, n)``."""

    def __init__(self) -> None:
        self.requests: list[tuple[list[Message], int]] = []

    def sample(self, histories: Sequence[History], n: int = 1, temperature: float = 0.0, max_new_tokens: int = 128,
               seed: int | Sequence[int] | None = None) -> list[list[Completion]]:
        out = []
        for h in histories:
            self.requests.append((list(h), n))
            perturbed = any(m.content.startswith("Head ") for m in h)
            actions = ["look", "go west"] if perturbed else ["go east"]
            out.append([Completion(f"Thought: t.\nAction: {actions[j % len(actions)]}", 5, 3) for j in range(n)])
        return out


class Judge:
    """Values ``go east`` 1 and anything else 0; records the histories it reads."""

    def __init__(self) -> None:
        self.histories: list[list[Message]] = []

    def score(self, history: History, candidates: Sequence[str]) -> list[float]:
        self.histories.append(list(history))
        return [1.0 if c.endswith("go east") else 0.0 for c in candidates]


def cache_for(tmp_path: Path, tasks: Sequence[Task]) -> Path:
    """A paraphrase cache of ``tasks`` written by :func:`build_paraphrases` with the paraphraser."""
    path = tmp_path / "para.jsonl"
    build_paraphrases(Corridor, tasks, path, Paraphraser(), ParaphraseConfig(samples=2))
    return path


# -- constraints per environment -------------------------------------------------------------------
SHOP = ("i need a long clip-in hair extension which is natural looking with color: black, and size: 16 inch, "
        "and price lower than 40.00 dollars")


def test_webshop_constraints_keep_options_price_and_attributes() -> None:
    goal = parse_shop_goal(SHOP)
    assert goal.options == (("color", "black"), ("size", "16 inch")) and goal.price == "40.00"
    assert goal.body == "i need a long clip-in hair extension which is natural looking"
    cons = goal_constraints("webshop", SHOP, attributes=("natural looking", "heat resistant"))
    # an attribute the text lacks is not required
    assert [c.describe() for c in cons] == ["option 'black'", "option '16 inch'", "price '40.00'",
                                            "attribute 'natural looking'"]
    ok = "Find me a natural-looking long clip in hair extension, black, 16 inches, for under $40."
    assert check_paraphrase(cons, SHOP, ok) == []
    assert check_paraphrase(cons, SHOP, ok.replace("black", "brown")) == ["drops option 'black'"]
    assert check_paraphrase(cons, SHOP, ok.replace("$40", "$50")) == ["drops price '40.00'"]
    assert check_paraphrase(cons, SHOP, ok.replace("natural-looking ", "")) == ["drops attribute 'natural looking'"]
    assert check_paraphrase(cons, SHOP, "a hair extension") == [
        "drops option 'black'", "drops option '16 inch'", "drops price '40.00'", "drops attribute 'natural looking'"]
    # " with " inside the request is not mistaken for the options
    oil = parse_shop_goal("i want a shampoo with argan oil with scent: lavender, and price lower than 30.00 dollars")
    assert oil.body == "i want a shampoo with argan oil" and oil.options == (("scent", "lavender"),)
    # the shape of this project's WebShop goals (items_ins_v2 instruction + options + price)
    scrub = parse_shop_goal("Find me scrubs & body treatments with tea tree, natural ingredients with size: 8 oz, and "
                            "scent: mint, and price lower than 30.00 dollars")
    assert scrub.body == "Find me scrubs & body treatments with tea tree, natural ingredients"
    assert scrub.options == (("size", "8 oz"), ("scent", "mint")) and scrub.price == "30.00"
    assert parse_shop_goal("Find me easy carry refillable containers with rose gold").options == ()


BOIL = ("Your task is to boil water. For compounds without a boiling point, combusting the substance is also "
        "acceptable. First, focus on the substance. Then, take actions that will cause it to change its "
        "state of matter.")
MELT = ("Your task is to measure the melting point of tin, which is located around the kitchen. First, focus on the "
        "thermometer. Next, focus on the tin. If the melting point of tin is above 200.0 degrees, focus on the orange "
        "box. If the melting point of tin is below 200.0 degrees, focus on the yellow box.")
FIND = ("Your task is to find a(n) non-living thing. First, focus on the thing. Then, move it to the purple box in "
        "the workshop.")


def test_sciworld_constraints_keep_the_target_action_boxes_rooms_and_numbers() -> None:
    assert [c.term for c in goal_constraints("sciworld", BOIL)] == ["water", "substance", "boil"]
    assert [c.term for c in goal_constraints("sciworld", MELT)] == [
        "tin", "thermometer", "orange box", "yellow box", "kitchen", "200.0"]
    assert [c.term for c in goal_constraints("sciworld", FIND)] == ["non-living thing", "thing", "purple box",
                                                                    "workshop"]
    boil = goal_constraints("sciworld", BOIL)
    assert check_paraphrase(boil, BOIL,
                            "Bring the water to boiling: focus on the substance first, then change its state.") == []
    assert check_paraphrase(boil, BOIL, "Freeze the water after you focus on the substance.") == ["drops action 'boil'"]
    # every boil task names "a boiling point" of other compounds: that is no boil action (it kept one before)
    assert check_paraphrase(boil, BOIL, BOIL.replace("Your task is to boil", "Your task is to freeze")) == [
        "drops action 'boil'"]
    melt = goal_constraints("sciworld", MELT)
    kept = ("In the kitchen, find tin's melting point: focus on the thermometer, then on the tin; above 200 degrees "
            "focus on the orange box, below it on the yellow box.")
    assert check_paraphrase(melt, MELT, kept) == []
    assert check_paraphrase(melt, MELT, kept.replace("yellow", "green")) == ["drops target 'yellow box'"]
    assert check_paraphrase(melt, MELT, kept.replace("200", "100")) == ["drops number '200.0'"]
    find = goal_constraints("sciworld", FIND)
    assert check_paraphrase(find, FIND, "Locate a non-living thing, focus on the thing, put it in the purple box.") == [
        "drops location 'workshop'"]


def test_alfworld_constraints_keep_object_receptacle_and_modifier() -> None:
    clean = "Your task is to: put a clean apple in fridge."
    assert parse_house_goal(clean) == parse_house_goal("clean some apple and put it in fridge.")
    assert parse_house_goal("Your task is to: look at alarmclock under the desklamp.").recep == "desklamp"
    assert parse_house_goal("Your task is to: find two pillow and put them in sofa.").kind == "two"
    cons = goal_constraints("alfworld", clean)
    assert [c.describe() for c in cons] == ["object 'apple'", "receptacle 'fridge'", "modifier 'clean'"]
    assert check_paraphrase(cons, clean, "Your task is to: wash an apple and place it in the fridge.") == []
    assert check_paraphrase(cons, clean, "Your task is to: put an apple in the fridge.") == ["drops modifier 'clean'"]
    assert check_paraphrase(cons, clean, "Your task is to: put a clean apple on the countertop.") == [
        "drops receptacle 'fridge'"]
    with pytest.raises(ValueError, match="not a known ALFWorld goal"):
        goal_constraints("alfworld", "Your task is to: dance.")


def test_other_envs_keep_numbers_and_every_env_rejects_empty_unchanged_and_rambling() -> None:
    text = "Task: reach the goal 2 rooms east. You are in room 0."
    cons = goal_constraints("corridor", text)
    assert [c.term for c in cons] == ["2", "0"]
    assert check_paraphrase(cons, text, good(text)) == []
    assert check_paraphrase(cons, text, "Walk east to the goal.") == ["drops number '2'", "drops number '0'"]
    assert check_paraphrase(cons, text, "  ") == ["empty"]
    assert check_paraphrase(cons, text, "task: reach the goal 2 rooms east.  you are in room 0.") == ["unchanged"]
    assert check_paraphrase(cons, text, good(text) * 6)[-1].startswith("too long")
    # a number with a thousands separator is one number, kept when the paraphrase keeps it
    text = "Walk 1,000 steps east to room 12."
    assert [c.term for c in goal_constraints("myenv", text)] == ["1000", "12"]
    assert check_paraphrase(goal_constraints("myenv", text), text, "Go 1,000 steps to the east, up to room 12.") == []


def test_templates_reword_and_keep_every_constraint() -> None:
    texts = {"webshop": [SHOP, "find me a men's t-shirt that is machine washable",
                         ("Find me scrubs & body treatments with tea tree, natural ingredients with size: 8 oz, and "
                          "price lower than 30.00 dollars")],
             "sciworld": [BOIL, MELT, FIND],
             "alfworld": ["Your task is to: put a clean apple in fridge.",
                          "Your task is to: heat some egg and put it in countertop.",
                          "Your task is to: look at alarmclock under the desklamp.",
                          "Your task is to: put two cellphone in bed.",
                          "Your task is to: put some spraybottle on toilet.",
                          "Your task is to: cool some lettuce and put it in diningtable."]}
    for env, cases in texts.items():
        for text in cases:
            variants = {template_paraphrase(env, text, seed) for seed in range(8)}
            assert len(variants) >= 2, (env, text)
            for variant in variants:
                assert check_paraphrase(goal_constraints(env, text), text, variant) == [], (env, text, variant)
    assert template_paraphrase("corridor", "Task: reach the goal 2 rooms east.", 0) is None


def test_task_text_is_found_in_each_envs_task_turn() -> None:
    shop = Task("webshop/3", "webshop", "seen", "beauty", {"instruction": SHOP})
    assert task_text("webshop", shop, f"WebShop [SEP] Instruction: [SEP] {SHOP} [SEP] Search") == SHOP
    assert task_text("webshop", Task("webshop/3", "webshop", "seen"),
                     f"WebShop [SEP] Instruction: [SEP] {SHOP} [SEP] Search") == SHOP
    sci = Task("sciworld/boil/0", "sciworld", "train")
    assert task_text("sciworld", sci, f"{BOIL}\nThis room is called the kitchen.") == BOIL
    alf = Task("alfworld/x", "alfworld", "train")
    first = "You are in the middle of a room.\nYour task is to: put a clean apple in fridge."
    assert task_text("alfworld", alf, first) == "Your task is to: put a clean apple in fridge."
    for env, task, text, said in (
            ("sciworld", sci, "This room is called the kitchen.", "does not start with 'Your task is to'"),
            ("alfworld", alf, "A room.", "no 'Your task is to: ...' line"),
            ("webshop", shop, "WebShop [SEP] Search", r"no 'Instruction: \[SEP\] ... \[SEP\]'")):
        with pytest.raises(ValueError, match=said):
            task_text(env, task, text)


def test_paraphrase_prompt_replaces_the_task_in_every_user_turn_only() -> None:
    history = [Message("user", "Walk."), Message("assistant", "the goal 2"), Message("user", "Task: the goal 2 east."),
               Message("assistant", "Thought: t.\nAction: look"),
               Message("user", "Observation: Task: the goal 2 east.")]
    out = paraphrase_prompt(history, "the goal 2 east", "two rooms east")
    assert [m.content for m in out] == ["Walk.", "the goal 2", "Task: two rooms east.", "Thought: t.\nAction: look",
                                        "Observation: Task: two rooms east."]
    with pytest.raises(ValueError, match="no user turn"):
        paraphrase_prompt(history, "the goal 9 west", "x")


def test_clean_output_strips_labels_quotes_and_later_paragraphs() -> None:
    assert clean_output('Paraphrase: "Head 2 rooms east."\n\nI kept the numbers.') == "Head 2 rooms east."
    assert clean_output("  Rewritten task description:  go\n east  ") == "go east"


# -- the cache -------------------------------------------------------------------------------------
def test_cache_keeps_checked_paraphrases_falls_back_and_resumes(tmp_path: Path) -> None:
    tasks = Corridor().tasks("train")
    path = tmp_path / "para.jsonl"
    policy = Paraphraser()
    counts = build_paraphrases(Corridor, tasks[:4], path, policy, ParaphraseConfig(samples=2, batch=3), seed=5,
                               settings={"env": ENV})
    # corridor/2 has length 3: both samples drop its numbers and there are no templates: the original stays
    assert counts == {"tasks": 4, "model": 3, "template": 0, "original": 1, "rejected": 5}
    assert policy.calls == 2  # 4 tasks, 3 per call
    head, *records = read_jsonl(path)
    assert head["kind"] == "qlass-paraphrases" and head["settings"]["sampling"]["samples"] == 2
    assert "batch" not in head["settings"]["sampling"] and head["settings"]["seed"] == 5
    by_task = {r["task"]: r for r in records}
    one = by_task["corridor/1"]
    assert one["original"] == original(tasks[1]) and one["paraphrase"] == good(one["original"])
    assert one["source"] == "model" and one["rejected"] == [
        {"text": "Walk east to the goal.", "source": "model", "reasons": ["drops number '2'", "drops number '0'"]}]
    assert by_task["corridor/2"]["source"] == "original" and len(by_task["corridor/2"]["rejected"]) == 2
    # resume: only the new tasks are paraphrased
    again = build_paraphrases(Corridor, tasks, path, policy, ParaphraseConfig(samples=2, batch=8), seed=5,
                              settings={"env": ENV})
    assert again["tasks"] == 2 and policy.calls == 3
    assert [r["task"] for r in read_jsonl(path)[1:]] == [t.id for t in tasks]
    # other settings are refused, naming them
    with pytest.raises(QlassError, match=r"sampling\.temperature: 0\.9 → 0\.5.*use a new output file"):
        build_paraphrases(Corridor, tasks, path, policy, ParaphraseConfig(samples=2, temperature=0.5), seed=5,
                          settings={"env": ENV})
    with pytest.raises(QlassError, match="seed: 5 → 6"):
        build_paraphrases(Corridor, tasks, path, policy, ParaphraseConfig(samples=2), seed=6, settings={"env": ENV})
    # templates exist only for webshop, sciworld and alfworld
    with pytest.raises(QlassError, match="corridor: no paraphrase templates"):
        build_paraphrases(Corridor, tasks, tmp_path / "t.jsonl", None)
    table = load_paraphrases(path)
    assert table.entries["train", "corridor/1"].paraphrase == good(original(tasks[1]))
    assert table.missing([Task("corridor/9", ENV, "train", "walk"), tasks[1]]) == ["corridor/9"]


def test_a_real_model_source_records_only_checked_paraphrases(tmp_path: Path, tiny_model_dir: Path) -> None:
    from qlass.policy import load_policy

    tasks = Corridor().tasks("train")[:2]
    path = tmp_path / "para.jsonl"
    counts = build_paraphrases(Corridor, tasks, path, load_policy(str(tiny_model_dir), threads=1),
                               ParaphraseConfig(samples=2, max_new_tokens=12), seed=1)
    assert counts["tasks"] == 2 and counts["model"] + counts["original"] == 2
    for rec in read_jsonl(path)[1:]:
        cons = goal_constraints("corridor", rec["original"])
        assert (rec["source"] == "original") == (len(rec["rejected"]) == 2)
        assert rec["source"] == "original" or check_paraphrase(cons, rec["original"], rec["paraphrase"]) == []


def test_another_model_at_the_same_path_is_refused(tmp_path: Path) -> None:
    """The header recorded the model's path only: a model replaced there (a retrained agent) added its
    paraphrases to the cache of the first, as if one model had made them all."""
    model = tmp_path / "agent"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(b"first")
    tasks = Corridor().tasks("train")
    path = tmp_path / "para.jsonl"
    settings = {"env": ENV, "model": str(model)}
    build_paraphrases(Corridor, tasks[:2], path, Paraphraser(), ParaphraseConfig(samples=2), settings=settings)
    assert read_jsonl(path)[0]["settings"]["model_files"]["model.safetensors"][0] == 5
    (model / "model.safetensors").write_bytes(b"the second model")
    with pytest.raises(QlassError, match=r"model: another model at the same path"):
        build_paraphrases(Corridor, tasks[:4], path, Paraphraser(), ParaphraseConfig(samples=2), settings=settings)
    assert len(read_jsonl(path)) == 3  # the header and the first model's two tasks


def test_bad_caches_are_named_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="paraphrase cache not found"):
        load_paraphrases(tmp_path / "none.jsonl")
    plain = tmp_path / "plain.jsonl"
    append_jsonl(plain, {"task": "corridor/0"})
    with pytest.raises(DataError, match="not a paraphrase cache"):
        load_paraphrases(plain)
    with pytest.raises(DataError, match="not a paraphrase cache"):
        build_paraphrases(Corridor, Corridor().tasks("train"), plain, Paraphraser())
    head = {"kind": "qlass-paraphrases", "version": 1, "settings": {}}
    rec = {"task": "corridor/0", "split": "train", "original": "a 1", "paraphrase": "b 1", "source": "model"}
    for bad, message in (({**rec, "paraphrase": ""}, r"line 2 \(id 'corridor/0'\): field 'paraphrase'"),
                         ({**rec, "source": "guess"}, "field 'source': expected one of model, template, original"),
                         ({**rec, "split": None}, r"line 2 \(id 'corridor/0'\): field 'split'"),
                         ({"original": "a"}, "line 2: field 'task'")):
        path = tmp_path / f"bad{len(message)}.jsonl"
        path.write_text(json.dumps(head) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(DataError, match=message):
            load_paraphrases(path)
    twice = tmp_path / "twice.jsonl"
    twice.write_text(json.dumps(head) + "\n" + json.dumps(rec) + "\n\n" + json.dumps(rec) + "\n")
    # the file's line, blank lines counted (before: "record 2", the record's index)
    with pytest.raises(DataError, match=r"line 4 \(id 'corridor/0'\): task given twice in split 'train'"):
        load_paraphrases(twice)
    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps({**head, "version": 9}) + "\n")
    with pytest.raises(DataError, match="version 9"):
        load_paraphrases(old)


def test_a_run_that_fails_before_its_first_paraphrase_leaves_no_settings(tmp_path: Path) -> None:
    """The header (settings) was written before the policy loaded: a first run with a mistyped source
    pinned its settings, and the corrected rerun was refused as 'other settings'."""
    path = tmp_path / "para.jsonl"

    def no_model() -> Paraphraser:
        raise QlassError("no such model: typo")

    tasks = Corridor().tasks("train")[:2]
    with pytest.raises(QlassError, match="no such model"):
        build_paraphrases(Corridor, tasks, path, no_model, settings={"env": ENV, "model": "typo"})
    counts = build_paraphrases(Corridor, tasks, path, Paraphraser(), ParaphraseConfig(samples=2),
                               settings={"env": ENV, "model": "right"})
    assert counts["tasks"] == 2 and read_jsonl(path)[0]["settings"]["model"] == "right"


def test_a_header_emptied_by_hand_records_no_settings(tmp_path: Path) -> None:
    """``settings: {}`` in the header let a run with any settings add to the cache."""
    path = cache_for(tmp_path, Corridor().tasks("train")[:1])
    rows = read_jsonl(path)
    for settings in ({}, {k: v for k, v in rows[0]["settings"].items() if k != "seed"}):
        path.write_text("".join(json.dumps(r) + "\n" for r in [{**rows[0], "settings": settings}, *rows[1:]]))
        with pytest.raises(QlassError, match=r"para.jsonl does not record .*'seed'"):
            build_paraphrases(Corridor, Corridor().tasks("train")[:2], path, Paraphraser(), ParaphraseConfig(samples=2),
                              seed=3)


class SameIds(Corridor):
    """A corridor whose task ids repeat across splits (the splits' tasks differ)."""

    def tasks(self, split: str, task_types: Sequence[str] | None = None) -> list[Task]:
        shift = 0 if split == "train" else 1
        return [Task(f"corridor/{i}", self.name, split, "walk", {"length": 1 + (i + shift) % 3})
                for i in range(self.tasks_per_split)]


def test_tasks_are_known_by_split_and_id(tmp_path: Path) -> None:
    """The cache was keyed by task id: a second split whose ids repeat the first's was skipped as
    done, and its tasks were given the other split's paraphrases."""
    path = tmp_path / "para.jsonl"
    train, seen = SameIds().tasks("train")[:2], SameIds().tasks("seen")[:2]
    build_paraphrases(SameIds, train, path, Paraphraser(), ParaphraseConfig(samples=2))
    assert build_paraphrases(SameIds, seen, path, Paraphraser(), ParaphraseConfig(samples=2))["tasks"] == 2
    table = load_paraphrases(path)
    for task in train + seen:
        history = [Message("user", "Walk."), Message("user", SameIds().reset(task))]
        assert table.perturb(history, task)[1].content == table.entries[task.split, task.id].paraphrase
    assert table.entries["train", "corridor/0"].original != table.entries["seen", "corridor/0"].original
    assert table.missing(SameIds().tasks("seen")[:3]) == ["corridor/2"]


class LongCorridor(Corridor):
    """Another environment with Corridor's task ids."""

    name = "longcorridor"


class OneShort(Paraphraser):
    """Answers one completion too few for the last history."""

    def sample(self, histories, n=1, temperature=0.0, max_new_tokens=128, seed=None):
        out = super().sample(histories, n, temperature, max_new_tokens, seed)
        return out[:-1] + [out[-1][:-1]]


def test_a_task_twice_another_environment_and_a_short_answer_are_refused(tmp_path: Path) -> None:
    """A task listed twice wrote two records, and every later read refused the cache; another environment's tasks
    with the same ids were taken as done and read this one's text; a policy answering too few completions was
    accepted (too few lists: a zip() error after some records were written)."""
    path, cfg = tmp_path / "para.jsonl", ParaphraseConfig(samples=2)
    tasks = Corridor().tasks("train")[:2]
    with pytest.raises(QlassError, match="build_paraphrases: task 'corridor/0' of split 'train' is given twice"):
        build_paraphrases(Corridor, [tasks[0], tasks[0]], path, Paraphraser(), cfg)
    assert not path.exists()
    with pytest.raises(QlassError, match=r"OneShort\.sample returned 1 items for history 1; it must return 2"):
        build_paraphrases(Corridor, tasks, path, OneShort(), cfg)
    build_paraphrases(Corridor, tasks, path, Paraphraser(), cfg)
    with pytest.raises(QlassError, match="env_name: 'corridor' → 'longcorridor'"):
        build_paraphrases(LongCorridor, tasks, path, Paraphraser(), cfg)
    with pytest.raises(TypeError, match="build_paraphrases: argument 'cfg' must be an instance of ParaphraseConfig"):
        build_paraphrases(Corridor, tasks, path, Paraphraser(), {"samples": 2})  # type: ignore[arg-type]


# -- the option in Q-guided search and in exploration -----------------------------------------------
def test_qlass_option_is_validated_labelled_and_leaves_old_hashes(tmp_path: Path) -> None:
    assert config_hash(QlassConfig()) == "38dd1d930a83"  # the hash before the option existed
    path = cache_for(tmp_path, Corridor().tasks("train")[:2])
    cfg = make_method_config("qlass", {"m": 3, "paraphrase": str(path)})
    assert method_label("qlass", cfg) == "qlass(m=3,paraphrase=para)" and cfg.paraphrases is not None
    assert config_hash(cfg) != config_hash(QlassConfig(m=3))
    with pytest.raises(QlassError, match="paraphrase perturbs candidates 2..m; it needs m >= 2"):
        make_method_config("qlass", {"m": 1, "paraphrase": str(path)})
    with pytest.raises(DataError, match="paraphrase cache not found"):
        make_method_config("qlass", {"m": 2, "paraphrase": str(tmp_path / "missing.jsonl")})


def test_qlass_candidates_after_the_first_see_the_paraphrase_and_the_episode_keeps_the_task(tmp_path: Path) -> None:
    env = Corridor()
    task = env.tasks("train")[1]  # two rooms
    path = cache_for(tmp_path, [task])
    para = load_paraphrases(path).entries[task.split, task.id].paraphrase
    policy, judge = Walker(), Judge()
    traj = qlass_search(task, SearchContext(env=env, policy=policy, qnet=judge, seed=3),
                        QlassConfig(m=3, paraphrase=str(path)))
    assert traj.reward == 1.0 and [s.action for s in traj.steps] == ["go east", "go east"]
    assert len(policy.requests) == 4  # per step: candidate 0 on the task, candidates 1..2 on the paraphrase
    for (plain, n0), (perturbed, n1) in zip(policy.requests[::2], policy.requests[1::2]):
        assert (n0, n1) == (1, 2)
        assert plain[2].content == original(task) and perturbed[2].content == para
        assert perturbed[:2] == plain[:2] and perturbed[3:] == plain[3:]
    assert len(judge.histories) == 2 and all(h[2].content == original(task) for h in judge.histories)
    assert traj.messages[2].content == original(task) and not any(para in m.content for m in traj.messages)
    # with diverse too, each perturbed candidate reads the paraphrase and the request to differ
    policy = Walker()
    qlass_search(task, SearchContext(env=Corridor(), policy=policy, qnet=Judge(), seed=3),
                 QlassConfig(m=3, paraphrase=str(path), diverse=True, max_steps=1))
    (plain, _), (second, _), (third, _) = policy.requests
    assert plain[2].content == original(task)
    assert second[2].content == (f"{para}\n\nGive another reasonable response. Its action must differ from this "
                                 "action: 'go east'.")
    assert third[2].content.startswith(para) and third[2].content.endswith("'go east', 'look'.")
    # a task missing from the cache is named
    with pytest.raises(QlassError, match="no paraphrase of task 'corridor/0'"):
        qlass_search(env.tasks("train")[0], SearchContext(env=Corridor(), policy=Walker(), qnet=Judge()),
                     QlassConfig(m=2, paraphrase=str(path)))


def test_exploration_alternatives_see_the_paraphrase_and_the_tree_keeps_the_task(tmp_path: Path) -> None:
    assert explore_digest(ExploreConfig()) == "b08d6633affc"  # the digest before the option existed
    env = Corridor()
    task = env.tasks("train")[1]
    path = cache_for(tmp_path, [task])
    para = load_paraphrases(path).entries[task.split, task.id].paraphrase
    cfg = ExploreConfig(max_depth=1, candidates=3, max_steps=4, expert_graft=False, paraphrase=str(path))
    assert explore_digest(cfg) != explore_digest(ExploreConfig(max_depth=1, candidates=3, max_steps=4,
                                                               expert_graft=False))
    policy = Walker()
    tree = build_tree(env, policy, task, cfg, seed=0)
    (plain, n0), (perturbed, n1), *rollouts = policy.requests
    assert (n0, n1) == (1, 2) and plain[-1].content == original(task) and perturbed[-1].content == para
    assert rollouts and all(h[2].content == original(task) and n == 1 for h, n in rollouts)
    assert sorted(n.action for n in tree.nodes[1:] if n.source == "sample") == ["go east", "go west", "look"]
    assert tree.nodes[0].observation == original(task)
    assert para not in json.dumps(tree.to_dict()) and para not in json.dumps(qdata_records(tree))
    # a node that has a child already (the expert's) gets every alternative from the paraphrase
    policy = Walker()
    build_tree(Corridor(), policy, task, ExploreConfig(max_depth=1, candidates=2, max_steps=4, paraphrase=str(path)), 0)
    first, n = policy.requests[0]
    assert n == 2 and first[2].content == para
    # every task to explore must be in the cache
    with pytest.raises(QlassError, match=r"no paraphrase of 1 task\(s\) to explore \(first: 'corridor/0'\)"):
        explore_tasks(Corridor, env.tasks("train")[:2], Walker(), cfg, tmp_path / "trees.jsonl", progress=False)


def test_an_evaluation_checks_its_caches_up_front_and_refuses_another_at_the_same_path(tmp_path: Path) -> None:
    """A task missing from a method's cache was found only when its turn came (in a pipeline: after SFT,
    exploration and the QNet), and a cache replaced at the same path by one made otherwise was mixed into
    the same row on resume: the folder recorded only the path."""
    from qlass.evaluate import run_evaluation

    seen = Corridor().tasks("seen")
    path = tmp_path / "para.jsonl"
    build_paraphrases(Corridor, seen[:1], path, Paraphraser(), ParaphraseConfig(samples=2))
    method = [("qlass", {"m": 2, "select": "random", "paraphrase": str(path), "max_steps": 2})]

    def evaluate(limit: int) -> list[dict]:
        return run_evaluation("test_paraphrase:Walker", ENV, ["seen"], method, tmp_path / "ev", limit=limit)

    with pytest.raises(QlassError, match=r"para\.jsonl: no paraphrase of 1 task\(s\) of this evaluation \(first: "
                                         r"'corridor/101'\), which qlass\(m=2,paraphrase=para,select=random\) needs"):
        evaluate(2)
    assert not (tmp_path / "ev" / "records.jsonl").exists()
    assert evaluate(1)[0]["tasks"] == 1
    path.unlink()
    build_paraphrases(Corridor, seen[:1], path, Paraphraser(), ParaphraseConfig(samples=3))
    with pytest.raises(QlassError, match="paraphrases"):
        evaluate(1)
    # exploration records the cache's settings beside its trees in the same way
    def explore() -> None:  # a config of its own each time, as each run reads the cache anew
        cfg = ExploreConfig(max_depth=1, candidates=2, max_steps=2, expert_graft=False, paraphrase=str(path))
        settings = {"model": "walker", "env": ENV, "env_args": {}, "policy": {}}
        explore_tasks(Corridor, seen[:1], Walker(), cfg, tmp_path / "trees.jsonl", settings=settings, progress=False)

    explore()
    path.unlink()
    build_paraphrases(Corridor, seen[:1], path, Paraphraser(), ParaphraseConfig(samples=2))
    with pytest.raises(QlassError, match="paraphrases"):
        explore()


# -- the command -----------------------------------------------------------------------------------
def test_cli_builds_resumes_and_refuses(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = tmp_path / "para.jsonl"
    cmd = [sys.executable, "-m", "qlass", "paraphrase", "--env", ENV, "--split", "train", "--limit", "3",
           "--source", "test_paraphrase:Paraphraser", "--out", str(out), "--set", "samples=2"]
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "3 tasks paraphrased this run: 2 by the model, 0 from templates, 1 left as they were" in done.stdout
    assert len(read_jsonl(out)) == 4
    refused = subprocess.run(cmd[:-1] + ["samples=3"], check=False, env=env, capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 2 and "sampling.samples: 2 → 3" in refused.stderr and "Traceback" not in refused.stderr
    template = subprocess.run(cmd[:10] + ["--source", "template", "--out", str(tmp_path / "t.jsonl")], check=False,
                              env=env, capture_output=True, text=True, timeout=300)
    assert template.returncode == 2 and "no paraphrase templates" in template.stderr
