"""DPO on a tiny random model: pair validation with named errors, the agent-turn mask, training that
prefers the chosen side, a plain saved model, the CLI, and resuming after a SIGKILL to the same weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import checkpoint_killer
import pytest
import torch
from test_sft import record, write_data
from transformers import AutoModelForCausalLM, AutoTokenizer

from qlass.errors import DataError, QlassError
from qlass.policy.render import ensure_chat_template
from qlass.training.dpo import DPOConfig, encode_pair, load_pairs, train_dpo
from qlass.training.sft import SFTConfig, train_sft


def failed(i: int) -> dict:
    """The same task as ``record(i)``, played wrongly: another room, another object, reward 0."""
    rec = record(i)
    turns = rec["conversations"]
    turns[-4]["value"] = "Thought: Plants grow in the bathroom.\nAction: go to bathroom"
    turns[-2]["value"] = "Thought: A rock will do.\nAction: focus on rock"
    return {**rec, "reward": 0.0, "success": False}


def pair(i: int) -> dict:
    chosen, rejected = record(i), failed(i)
    for side in (chosen, rejected):
        del side["id"]
    return {"id": f"pair-{i}", "chosen": chosen, "rejected": rejected}


def write_pairs(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps(pair(i)) + "\n" for i in range(n)))
    return path


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_bad_pairs_are_named_by_record_and_field(tmp_path: Path) -> None:
    good = pair(0)
    other_task = pair(1)
    other_task["rejected"] = pair(2)["rejected"]
    same = pair(3)
    same["rejected"] = same["chosen"]
    upside_down = pair(4)
    upside_down["chosen"], upside_down["rejected"] = upside_down["rejected"], upside_down["chosen"]
    no_action = pair(5)  # the side to imitate must act; the rejected side is a failure, which may not
    no_action["chosen"]["conversations"][-2]["value"] = "I give up."
    last_seen = pair(8)  # the same agent turns, only the last observation differs: DPO scores nothing apart
    last_seen["rejected"] = {**json.loads(json.dumps(last_seen["chosen"])), "reward": 0.0, "success": False}
    assert last_seen["rejected"]["conversations"][-1]["from"] == "human"
    last_seen["rejected"]["conversations"][-1]["value"] = "Observation: something else."
    records = [good, {"id": "pair-x", "chosen": good["chosen"]}, other_task, same, upside_down, no_action,
               {**pair(6), "id": "pair-0"}, {**pair(7), "score": 1}, last_seen]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(DataError) as err:
        load_pairs(path)
    text = str(err.value)
    for expected in (f"{path}, line 2 (id 'pair-x'): field 'rejected': missing",
                     "line 3 (id 'pair-1'): fields 'chosen' and 'rejected': the prompts "
                     "(instruction and task turns) differ",
                     "line 4 (id 'pair-3'): fields 'chosen' and 'rejected': the same conversation",
                     "line 5 (id 'pair-4'): field 'chosen.reward': 0.0 is below the rejected one's 1.0",
                     "line 6 (id 'pair-5'): field 'chosen': conversations[",
                     "line 7 (id 'pair-0'): field 'id': duplicate of line 1",
                     "line 8 (id 'pair-7'): unknown field(s) 'score'",
                     "line 9 (id 'pair-8'): fields 'chosen' and 'rejected': the same conversation up to the last "
                     "agent turn"):
        assert expected in text, text
    assert "line 1 (" not in text and "8 invalid record(s)" in text
    gave_up = pair(5)  # ETO's failures that broke the format were left out as "unusable": they are failures too
    gave_up["rejected"]["conversations"][-2]["value"] = "I give up."
    path.write_text(json.dumps(gave_up) + "\n")
    assert [p.id for p in load_pairs(path)] == ["pair-5"]
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(DataError, match="no preference pairs"):
        load_pairs(empty)


def test_pairs_in_json_lines_are_named_by_line_in_a_list_by_index(tmp_path: Path) -> None:
    """A bad pair of a JSON Lines file is named by its line, blank lines counted (before: ``record 1``,
    its index among the pairs); one of a JSON list keeps its index."""
    records = [pair(0), {**pair(1), "id": "pair-0"}]
    lines = tmp_path / "pairs.jsonl"
    lines.write_text(f"{json.dumps(records[0])}\n\n{json.dumps(records[1])}\n")
    listed = tmp_path / "pairs.json"
    listed.write_text(json.dumps(records))
    for path, want in ((lines, "line 3 (id 'pair-0'): field 'id': duplicate of line 1"),
                       (listed, "record 1 (id 'pair-0'): field 'id': duplicate of record 0")):
        with pytest.raises(DataError) as err:
            load_pairs(path)
        assert str(err.value).endswith(f"\n{path}, {want}"), str(err.value)


def test_pair_masks_cover_exactly_the_agent_turns_after_the_task(tiny_model_dir, tmp_path: Path) -> None:
    tok = ensure_chat_template(AutoTokenizer.from_pretrained(tiny_model_dir))
    [p] = load_pairs(write_pairs(tmp_path / "p.jsonl", 1))
    row = encode_pair(tok, p)
    prompt = tok.decode(row["prompt_ids"])
    assert prompt.count("Your task is to find a(n) plant 0.") == 1 and "go to kitchen" not in prompt

    def trained(side: str) -> str:
        return tok.decode([t for t, m in zip(row[f"{side}_ids"], row[f"{side}_mask"]) if m])

    assert trained("chosen") == ("Thought: The kitchen may have plants.\nAction: go to kitchen<|im_end|>\n"
                                 "Thought: The fern is a plant.\nAction: focus on fern<|im_end|>\n")
    assert trained("rejected") == ("Thought: Plants grow in the bathroom.\nAction: go to bathroom<|im_end|>\n"
                                   "Thought: A rock will do.\nAction: focus on rock<|im_end|>\n")
    assert "Observation: You move to the kitchen." in tok.decode(row["chosen_ids"])  # context, not a target


def test_dpo_prefers_the_chosen_side_and_saves_a_plain_model(tiny_model_dir, tmp_path: Path) -> None:
    data = write_pairs(tmp_path / "pairs.jsonl", 10)
    cfg = DPOConfig(epochs=3, lr=5e-3, batch_size=4, micro_batch=2, val_fraction=0.2, save_every=100, threads=1)
    out = train_dpo(data, tiny_model_dir, tmp_path / "dpo", cfg)
    evals = [m for m in _metrics(out) if "val_loss" in m]
    assert [m["step"] for m in evals] == [0, 2, 4, 6]
    assert evals[0]["val_loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference: log 2
    assert evals[-1]["val_loss"] < 0.5 and evals[-1]["rewards/accuracies"] == 1.0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and not list(out.glob("checkpoint-*"))
    assert not (out / "README.md").exists()  # TRL's model card, "a fine-tuned version of [None]"
    AutoModelForCausalLM.from_pretrained(out)
    assert train_dpo(data, tiny_model_dir, out, cfg) == out  # finished: handed back
    with pytest.raises(QlassError, match=r"beta: 0\.1 → 0\.2"):
        train_dpo(data, tiny_model_dir, out, DPOConfig(**{**cfg.__dict__, "beta": 0.2}))


@pytest.mark.parametrize("trainer", ["sft", "dpo"])
def test_a_run_of_one_optimizer_step_changes_the_weights(trainer: str, tiny_model_dir, tmp_path: Path) -> None:
    """A one-step run took transformers' warmup step at learning rate 0 and saved the base weights."""
    opts = dict(epochs=1, batch_size=2, micro_batch=2, save_every=100, threads=1, max_steps=1)
    if trainer == "sft":
        cfg = SFTConfig(lr=1e-3, val_fraction=0.25, **opts)
        out = train_sft(write_data(tmp_path / "data.json"), tiny_model_dir, tmp_path / "sft", cfg)
    else:
        out = train_dpo(write_pairs(tmp_path / "pairs.jsonl", 6), tiny_model_dir, tmp_path / "dpo",
                        DPOConfig(lr=5e-3, val_fraction=0.0, **opts))
    assert len([m for m in _metrics(out) if "train_loss" in m]) == 1
    key = "model.layers.0.mlp.up_proj.weight"
    trained = AutoModelForCausalLM.from_pretrained(out).state_dict()[key]
    assert not torch.allclose(trained, AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()[key])


def test_too_long_pairs_are_refused_before_training(tiny_model_dir, tmp_path: Path) -> None:
    data = write_pairs(tmp_path / "pairs.jsonl", 3)
    with pytest.raises(DataError, match=r"pair 'pair-0': \d+ tokens > max_length 64"):
        train_dpo(data, tiny_model_dir, tmp_path / "dpo", DPOConfig(max_length=64, threads=1))
    assert not (tmp_path / "dpo" / "metrics.jsonl").exists()


def test_cli_lora_run(tiny_model_dir, tmp_path: Path) -> None:
    data = write_pairs(tmp_path / "pairs.jsonl", 4)
    cmd = [sys.executable, "-m", "qlass", "dpo", "--pairs", str(data), "--model", str(tiny_model_dir),
           "--out", str(tmp_path / "cli"), "--set", "epochs=1", "--set", "batch_size=2", "--set", "lora=true",
           "--set", "lora_r=4", "--set", "val_fraction=0", "--set", "threads=1"]
    ok = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    assert not (tmp_path / "cli" / "adapter_config.json").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "cli").state_dict()
    assert set(merged) == set(base)
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           base["model.layers.0.self_attn.q_proj.weight"])
    bad = subprocess.run(cmd[:-2] + ["--set", "beta=0"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "beta must be > 0" in bad.stderr


KILLER = checkpoint_killer.script("qlass.training.dpo", "DPOConfig", "train_dpo")


def test_resume_after_sigkill_reaches_the_same_weights(tiny_model_dir, tmp_path: Path) -> None:
    data = write_pairs(tmp_path / "pairs.jsonl", 6)
    opts = {"epochs": 2, "lr": 1e-3, "batch_size": 2, "micro_batch": 1, "val_fraction": 0.0, "save_every": 2,
            "threads": 1}
    full = train_dpo(data, tiny_model_dir, tmp_path / "full", DPOConfig(**opts))
    out = tmp_path / "resumed"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(data), str(tiny_model_dir), str(out), "4", repr(opts)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == -9, proc.stderr
    assert (out / "checkpoint-4" / "trainer_state.json").exists()
    train_dpo(data, tiny_model_dir, out, DPOConfig(**opts))
    a = AutoModelForCausalLM.from_pretrained(full).state_dict()
    b = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    losses = [(m["step"], round(m["train_loss"], 5)) for m in _metrics(out) if "train_loss" in m]
    assert losses == [(m["step"], round(m["train_loss"], 5)) for m in _metrics(full) if "train_loss" in m]
    assert len(losses) == 6
