"""SFT on a tiny random model: the exact loss mask, loss going down, saving, resuming."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qlass.config import build
from qlass.errors import QlassError
from qlass.sft import SFTConfig, encode_example, train_sft
from qlass.types import Message

PREFIX = [Message("user", "Instruction: act."), Message("assistant", "OK"),
          Message("user", "Example task."), Message("assistant", "Thought: ex.\nAction: example")]


def conversation(i: int) -> list[Message]:
    room = ["kitchen", "garden", "hallway"][i % 3]
    return PREFIX + [
        Message("user", f"Task {i}: go to the {room}."),
        Message("assistant", f"Thought: The {room} is next.\nAction: go to {room}"),
        Message("user", f"Observation: You are in the {room}."),
        Message("assistant", "Thought: Done.\nAction: stop"),
    ]


def write_data(path: Path, n: int = 12) -> Path:
    recs = [{"id": f"c{i}", "conversations": [{"from": "human" if m.role == "user" else "gpt", "value": m.content}
                                              for m in conversation(i)]} for i in range(n)]
    path.write_text(json.dumps(recs))
    return path


def test_loss_mask_is_exactly_the_agent_turns_after_the_task(tiny_model_dir) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids, labels = encode_example(tok, conversation(0), max_length=4096)
    trained = tok.decode([t for t in labels if t != -100])
    assert trained == ("Thought: The kitchen is next.\nAction: go to kitchen<|im_end|>\n"
                       "Thought: Done.\nAction: stop<|im_end|>\n")
    assert len(ids) == len(labels)


def test_truncation_drops_oldest_turns_keeps_task_and_newest(tiny_model_dir) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    conv = conversation(0)
    for k in range(30):
        conv += [Message("user", f"Observation: step {k} " + "word " * 10),
                 Message("assistant", f"Thought: t{k}\nAction: act {k}")]
    full, _ = encode_example(tok, conv, max_length=100_000)
    ids, labels = encode_example(tok, conv, max_length=400)
    assert len(ids) <= 400 < len(full)
    text = tok.decode(ids)
    assert "Task 0: go to the kitchen." in text and "Action: act 29" in text and "Action: act 0\n" not in text


def test_training_lowers_loss_and_saves_a_loadable_model(tiny_model_dir, tmp_path: Path) -> None:
    data = write_data(tmp_path / "data.json")
    cfg = SFTConfig(epochs=6, lr=1e-2, batch_size=4, micro_batch=2, val_fraction=0.25, save_every=100)
    out = train_sft(data, tiny_model_dir, tmp_path / "sft", cfg)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert len(val) == 6 and val[-1] < val[0] * 0.7
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, torch.nn.Module) and (out / "model.safetensors").exists()
    assert not (out / "checkpoint").exists() and (out / "sft_config.yaml").exists()


def test_lora_merges_into_plain_model(tiny_model_dir, tmp_path: Path) -> None:
    data = write_data(tmp_path / "data.json", n=4)
    out = train_sft(data, tiny_model_dir, tmp_path / "lora",
                    SFTConfig(epochs=1, lr=1e-3, batch_size=2, micro_batch=2, lora=True, lora_r=4, val_fraction=0.0))
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and not (out / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(out)


def test_resume_after_interruption_matches_uninterrupted(tiny_model_dir, tmp_path: Path) -> None:
    data = write_data(tmp_path / "data.json")
    base = dict(epochs=2, lr=1e-3, batch_size=2, micro_batch=1, val_fraction=0.0, save_every=1)
    full = train_sft(data, tiny_model_dir, tmp_path / "full", SFTConfig(**base))
    # run the same config in a subprocess and kill it hard after a few checkpoints
    out = tmp_path / "resumed"
    script = (f"from qlass.sft import SFTConfig, train_sft; import os, qlass.train_utils as tu\n"
              f"orig = tu.save_checkpoint\n"
              f"def stop(out_dir, model, opt, sched, step, h):\n"
              f"    orig(out_dir, model, opt, sched, step, h)\n"
              f"    if step == 5: os.kill(os.getpid(), 9)\n"
              f"tu.save_checkpoint = stop\nimport qlass.sft as s; s.save_checkpoint = stop\n"
              f"train_sft({str(data)!r}, {str(tiny_model_dir)!r}, {str(out)!r}, SFTConfig(**{base!r}))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 5
    train_sft(data, tiny_model_dir, out, SFTConfig(**base))
    a = AutoModelForCausalLM.from_pretrained(full).state_dict()
    b = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if "train_loss" in x]
    assert steps == list(range(1, 13))
    with pytest.raises(QlassError, match="unknown option"):
        build(SFTConfig, {"epoch": 1}, "sft.yaml")
