"""SFT on a tiny random model: the exact loss mask, windowing of long conversations, loss going down,
a loadable saved model (full and LoRA), the CLI, and resuming after a SIGKILL to the same weights."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import checkpoint_killer
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from qlass.data import load_trajectories
from qlass.errors import DataError, QlassError
from qlass.policy.render import ensure_chat_template, render
from qlass.training.sft import (
    SFTConfig,
    _encode_all,
    encode_windows,
    limit_trajectories,
    prefix_length,
    train_sft,
)
from qlass.training.sft_export import export_checkpoint
from qlass.types import Message, Trajectory

INSTRUCTION = "You are an agent in a house. Answer with a Thought line and an Action line."
EXAMPLE = [("user", "Your task is to find a(n) animal.\nThis room is called the hallway."),
           ("assistant", "Thought: Animals live outside.\nAction: go to outside"),
           ("user", "Observation: You move to the outside."),
           ("assistant", "Thought: The parrot is an animal.\nAction: focus on parrot")]


def record(i: int) -> dict:
    """One ETO-format conversation: instruction, OK, one-shot example, task, two Thought/Action turns."""
    room = ["kitchen", "garden", "hallway"][i % 3]
    turns = [("human", INSTRUCTION), ("gpt", "OK")]
    turns += [("human" if r == "user" else "gpt", t) for r, t in EXAMPLE]
    turns += [("human", f"Your task is to find a(n) plant {i}. This room is called the {room}."),
              ("gpt", f"Thought: The {room} may have plants.\nAction: go to {room}"),
              ("human", f"Observation: You move to the {room}."),
              ("gpt", "Thought: The fern is a plant.\nAction: focus on fern"),
              ("human", "Observation: You focus on the fern.")]
    return {"id": f"sciworld/find-plant/{i}", "conversations": [{"from": f, "value": v} for f, v in turns],
            "reward": 1.0, "success": True}


def write_data(path: Path, n: int = 12) -> Path:
    path.write_text(json.dumps([record(i) for i in range(n)]))
    return path


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return ensure_chat_template(AutoTokenizer.from_pretrained(tiny_model_dir))


def test_loss_mask_is_exactly_the_agent_turns_after_the_task(tok, tmp_path: Path) -> None:
    messages = load_trajectories(write_data(tmp_path / "d.json", n=1))[0].messages
    assert prefix_length(messages) == 7  # instruction, OK, 4 example turns, task turn
    [(ids, labels)], cut = encode_windows(tok, messages, max_length=4096)
    assert cut == 0
    trained = tok.decode([t for t in labels if t != -100])
    assert trained == ("Thought: The kitchen may have plants.\nAction: go to kitchen<|im_end|>\n"
                       "Thought: The fern is a plant.\nAction: focus on fern<|im_end|>\n")
    # the ids are exactly the rendered conversation (what the policy reads), up to the last agent turn
    assert tok.decode(ids) == render(tok, messages[:-1], add_generation_prompt=False)
    assert len(ids) == len(labels) and all(lab in (-100, t) for t, lab in zip(ids, labels))


def test_training_data_cut_below_the_task_is_reported(tok, tmp_path: Path, caplog) -> None:
    data = write_data(tmp_path / "d.json", n=3)
    trajectories = load_trajectories(data)
    with caplog.at_level("WARNING", logger="qlass.training.sft"):
        examples = _encode_all(tok, trajectories, range(3), 4096, data)
        assert not caplog.records
        examples = _encode_all(tok, trajectories, range(3), 32, data)
    assert all(len(ids) == 32 for ids, _ in examples)
    [warning] = [r.getMessage() for r in caplog.records]
    assert f"{data}: {len(examples)} of {len(examples)} training sequences are longer than max_length (32" in warning


def test_prefix_fallback_without_observation_markers() -> None:
    msgs = [Message("user", "Instructions."), Message("assistant", "OK"), Message("user", "Task: x."),
            Message("assistant", "Thought: a\nAction: look"), Message("user", "It is dark."),
            Message("assistant", "Thought: b\nAction: wait")]
    assert prefix_length(msgs) == 3


def test_long_conversation_is_windowed_newest_first_and_every_turn_trained(tok) -> None:
    messages = [Message("user", INSTRUCTION), Message("assistant", "OK"), Message("user", "Task: count to 29.")]
    for k in range(30):
        messages += [Message("assistant", f"Thought: t{k}\nAction: act {k}"),
                     Message("user", f"Observation: step {k} " + "word " * 10)]
    [(full, _)], _ = encode_windows(tok, messages, max_length=100_000)
    windows, cut = encode_windows(tok, messages, max_length=300)
    assert cut == 0  # the prefix and a turn always fit: no window lost its start
    assert len(windows) > 2 and all(len(ids) <= 300 for ids, _ in windows) and len(full) > 300
    newest = tok.decode(windows[0][0])
    assert "Task: count to 29." in newest and "Action: act 29" in newest and "Action: act 0\n" not in newest
    trained = [tok.decode([t for t in lab if t != -100]) for _, lab in windows]
    acts = [line for text in trained for line in text.splitlines() if line.startswith("Action:")]
    assert sorted(acts) == sorted(f"Action: act {k}<|im_end|>" for k in range(30))  # each turn once
    for ids, _ in windows:  # every window keeps the instruction and the task turn
        assert tok.decode(ids).count("Task: count to 29.") == 1
    # each trained turn follows its own observation (turn 0: the task turn), as at inference; a cut
    # window's oldest agent turn, whose observation was dropped, is context only there
    for ids, labels in windows:
        first = labels.index(next(lab for lab in labels if lab != -100))
        before = tok.decode(ids[:first])
        k = int(tok.decode([t for t in labels if t != -100]).split("Action: act ")[1].split("<")[0])
        last_user = before[before.rindex("<|im_start|>user"):]
        assert last_user.startswith(f"<|im_start|>user\n{f'Observation: step {k - 1} ' if k else 'Task:'}"), last_user
    # a max_length below the prefix and one turn: every window is cut from the left, and counted
    short, cut = encode_windows(tok, messages, max_length=40)
    assert cut == len(short) > 0 and all(len(ids) == 40 for ids, _ in short)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_loss_and_saves_a_loadable_model(tiny_model_dir, tok, tmp_path: Path) -> None:
    data = write_data(tmp_path / "data.json")
    cfg = SFTConfig(epochs=6, lr=1e-2, batch_size=4, micro_batch=2, val_fraction=0.25, save_every=100, threads=1)
    out = train_sft(data, tiny_model_dir, tmp_path / "sft", cfg)
    val = [m["val_loss"] for m in _metrics(out) if "val_loss" in m]
    assert len(val) == 7 and val[-1] < val[0] * 0.5  # before training + one per epoch
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, torch.nn.Module) and (out / "model.safetensors").exists()
    saved_tok = AutoTokenizer.from_pretrained(out)
    assert saved_tok.chat_template == tok.chat_template
    assert not (out / "checkpoint").exists() and (out / "sft_config.yaml").exists()
    assert train_sft(data, tiny_model_dir, out, cfg) == out  # complete: nothing redone
    with pytest.raises(QlassError, match="other settings"):
        train_sft(data, tiny_model_dir, out, SFTConfig(epochs=1))


def test_a_diverging_run_stops_with_an_error_and_the_base_model_is_never_the_output(tiny_model_dir,
                                                                                 tmp_path: Path) -> None:
    """A learning rate that makes the loss NaN stops the run at that step, naming it (transformers
    would log the NaN away and save NaN weights as a finished model); ``--out`` equal to the base
    model folder is refused before anything is written."""
    data = write_data(tmp_path / "data.json", n=4)
    cfg = SFTConfig(epochs=3, lr=1e30, batch_size=2, micro_batch=2, val_fraction=0.0, threads=1, grad_clip=0.0,
                    warmup_ratio=0.0)
    with pytest.raises(QlassError, match=r"training diverged at step \d+ \(train_loss nan|training diverged at step"):
        train_sft(data, tiny_model_dir, tmp_path / "nan", cfg)
    assert not (tmp_path / "nan" / ".qlass-complete").exists()
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    before = {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()}
    with pytest.raises(QlassError, match="is also the model this run starts from"):
        train_sft(data, base, base, SFTConfig(epochs=1, threads=1))
    assert {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_trains_the_same_weights(tiny_model_dir, tmp_path: Path, lora: bool) -> None:
    """Recomputing activations saves memory but must not change what is learnt (nor the run's hash)."""
    data = write_data(tmp_path / "data.json", n=4)
    opts = {"epochs": 1, "lr": 1e-2, "batch_size": 2, "micro_batch": 2, "val_fraction": 0.0, "threads": 1,
            "lora": lora, "lora_r": 4, "lora_dropout": 0.0}
    plain = train_sft(data, tiny_model_dir, tmp_path / "plain", SFTConfig(**opts))
    ckpt = train_sft(data, tiny_model_dir, tmp_path / "ckpt", SFTConfig(**opts, gradient_checkpointing=True))
    a = AutoModelForCausalLM.from_pretrained(plain).state_dict()
    b = AutoModelForCausalLM.from_pretrained(ckpt).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert not torch.allclose(b["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])


def test_lora_merges_into_plain_model(tiny_model_dir, tmp_path: Path) -> None:
    data = write_data(tmp_path / "data.json", n=4)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    out = train_sft(data, tiny_model_dir, tmp_path / "lora",
                    SFTConfig(epochs=1, lr=1e-2, batch_size=2, micro_batch=2, lora=True, lora_r=4, val_fraction=0.0,
                              threads=1))
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert set(merged) == set(base)
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           base["model.layers.0.self_attn.q_proj.weight"])


def test_cli_trains_and_rejects_unknown_option(tiny_model_dir, tmp_path: Path) -> None:
    data = write_data(tmp_path / "data.json", n=4)
    cfg = tmp_path / "sft.yaml"
    cfg.write_text("epochs: 1\nbatch_size: 2\nlr: 1e-3\nval_fraction: 0.25\nthreads: 1\n")
    cmd = [sys.executable, "-m", "qlass", "sft", "--data", str(data), "--model", str(tiny_model_dir),
           "--config", str(cfg)]
    bad = subprocess.run(cmd + ["--out", str(tmp_path / "x"), "--set", "epoch=2"], capture_output=True, text=True,
                         check=False)
    assert bad.returncode == 2 and "--set" in bad.stderr and "'epoch' (did you mean 'epochs'?)" in bad.stderr
    ok = subprocess.run(cmd + ["--out", str(tmp_path / "cli"), "--set", "micro_batch=1", "--set", "autocast=true"],
                        capture_output=True, text=True, check=False)  # bf16 mixed precision on the CPU
    assert ok.returncode == 0, ok.stderr
    assert "Writing model shards" not in ok.stderr and "%|" not in ok.stderr  # no transformers progress bar
    steps = [m for m in _metrics(tmp_path / "cli") if "train_loss" in m]
    assert [m["step"] for m in steps] == [1, 2]  # 3 train trajectories in batches of 2: the last one short
    AutoModelForCausalLM.from_pretrained(tmp_path / "cli")


KILLER = checkpoint_killer.script("qlass.training.sft", "SFTConfig", "train_sft")


@pytest.mark.parametrize("lora", [False, True])
def test_resume_after_sigkill_reaches_the_same_weights(tiny_model_dir, tmp_path: Path, lora: bool,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """A run killed right after its step-4 checkpoint (mid-epoch 2; LoRA dropout makes RNG state
    matter) and restarted ends with the weights and loss sequence of an uninterrupted run; a
    checkpoint the kill left half-written is not resumed from, nor a newer one whose trainer state was cut
    short (a full disk: the rerun the error asks for stopped with 'the checkpoint is damaged')."""
    data = write_data(tmp_path / "data.json", n=7)
    opts = {"epochs": 2, "lr": 1e-3, "batch_size": 2, "micro_batch": 1, "val_fraction": 0.15, "save_every": 2,
            "lora": lora, "lora_r": 4, "lora_dropout": 0.3, "threads": 1}
    full = train_sft(data, tiny_model_dir, tmp_path / "full", SFTConfig(**opts))
    out = tmp_path / "resumed"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(data), str(tiny_model_dir), str(out), "4", repr(opts)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == -9, proc.stderr
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
    step4 = export_checkpoint(out, tiny_model_dir, tmp_path / "step4")  # a mid-training model, loadable
    assert step4 == 4 and AutoModelForCausalLM.from_pretrained(tmp_path / "step4") is not None
    with (out / "metrics.jsonl").open("a") as fh:  # a step logged after the checkpoint, then lost
        fh.write(json.dumps({"step": 5, "epoch": 1, "train_loss": 99.0}) + "\n")
    (out / "checkpoint-6").mkdir()  # a checkpoint the kill cut short: no trainer_state.json
    (out / "checkpoint-6" / "model.safetensors").write_bytes(b"cut")
    shutil.copytree(out / "checkpoint-4", out / "checkpoint-8")  # one whose trainer state a full disk cut short:
    (out / "checkpoint-8" / "trainer_state.json").write_text('{"best_metric": null, "global_st')  # was 'damaged'
    with caplog.at_level(logging.WARNING, logger="qlass.training.common"):
        train_sft(data, tiny_model_dir, out, SFTConfig(**opts))
    assert "checkpoint-8: its trainer state cannot be read (a save cut short" in caplog.text
    a = AutoModelForCausalLM.from_pretrained(full).state_dict()
    b = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    losses = [(m["step"], round(m["train_loss"], 5)) for m in _metrics(out) if "train_loss" in m]
    assert losses == [(m["step"], round(m["train_loss"], 5)) for m in _metrics(full) if "train_loss" in m]
    assert [m["step"] for m in _metrics(out) if "val_loss" in m] == [0, 3, 6]


def _typed(n_per_type: dict[str, int]) -> list[Trajectory]:
    return [Trajectory(id=f"env/{t}/{i}", messages=[], reward=1.0, success=True, task=f"env/{t}/{i}")
            for t, n in n_per_type.items() for i in range(n)]


def test_limited_supervision_keeps_a_seeded_share_of_every_task_type() -> None:
    trajs = _typed({"a": 10, "b": 6, "c": 2})
    ten = limit_trajectories(trajs, 10, seed=0)
    assert len(ten) == 10 and ten == limit_trajectories(trajs, 10, seed=0)
    counts = {t: sum(x.task.split("/")[1] == t for x in ten) for t in "abc"}
    assert counts == {"a": 4, "b": 4, "c": 2}  # round-robin over types until a type runs out
    assert [trajs.index(x) for x in ten] == sorted(trajs.index(x) for x in ten)  # file order kept
    assert limit_trajectories(trajs, 10, seed=1) != ten
    assert len(limit_trajectories(trajs, 0.5, seed=0)) == 9 and len(limit_trajectories(trajs, 0.01, seed=0)) == 1
    assert limit_trajectories(trajs, 100, seed=0) == trajs and limit_trajectories(trajs, None, seed=0) == trajs
    for bad in (0, -1, 2.5, 1.0000001):
        with pytest.raises(ValueError, match="max_trajectories"):
            SFTConfig(max_trajectories=bad)


def test_limited_supervision_spreads_over_the_recorded_task_types_of_any_environment(tmp_path: Path) -> None:
    """ALFWorld ids (alfworld/split/folder/trial) and WebShop's (webshop/index) do not name the type in their
    middle part: the subset was the first folders, or a plain sample. Expert exports record task_type."""
    from toy_envs import Corridor

    from qlass.data import load_trajectories, save_trajectories, validate_file
    from qlass.expert import export_expert
    from qlass.types import Task

    shop = [Trajectory(id=f"webshop/{i}", messages=[], reward=1.0, success=True, task=f"webshop/{i}",
                       meta={"task_type": "abcde"[i % 5]}) for i in range(40)]
    kept = limit_trajectories(shop, 10, seed=0)
    assert sorted(t.meta["task_type"] for t in kept) == sorted("abcde" * 2)
    folders = [Trajectory(id=f"alfworld/train/{t}-{k}/trial", messages=[], task=f"alfworld/train/{t}-{k}/trial",
                          meta={"task_type": t}) for t in ("look", "pick", "heat") for k in range(4)]
    assert sorted(t.meta["task_type"] for t in limit_trajectories(folders, 3, seed=0)) == ["heat", "look", "pick"]

    class Typed(Corridor):  # a task type that is not in its ids
        def tasks(self, split, task_types=None):
            return [Task(t.id, t.env, t.split, "walk-far" if i % 2 else "walk-near", t.meta)
                    for i, t in enumerate(super().tasks(split, task_types))]

    save_trajectories(tmp_path / "expert.json", export_expert(Typed(), Typed().tasks("train")).trajectories)
    assert [t.meta["task_type"] for t in load_trajectories(tmp_path / "expert.json")][:2] == ["walk-near", "walk-far"]
    (tmp_path / "bad.json").write_text(json.dumps([{"id": "x", "task": 12, "task_type": "", "conversations": []}]))
    errors = validate_file(tmp_path / "bad.json").errors
    assert any("field 'task': 12 is not a non-empty string" in e for e in errors), errors
    assert any("field 'task_type': '' is not a non-empty string" in e for e in errors)


def test_sft_with_max_trajectories_trains_on_the_subset(tiny_model_dir, tmp_path: Path) -> None:
    data = write_data(tmp_path / "data.json", n=12)
    cfg = SFTConfig(epochs=1, lr=1e-3, batch_size=2, micro_batch=2, val_fraction=0.25, save_every=100, threads=1,
                    max_trajectories=4)
    out = train_sft(data, tiny_model_dir, tmp_path / "sft", cfg)
    steps = [m for m in _metrics(out) if "train_loss" in m]
    assert len(steps) == 2  # 4 trajectories, 1 held out → 3 train sequences → 2 steps of 2
    assert "max_trajectories: 4" in (out / "sft_config.yaml").read_text()


def test_an_added_option_at_its_default_keeps_earlier_runs_hash() -> None:
    """Finished SFT runs must still count as finished: the config hash of options that existed
    before (values computed by the qlass of the hand-written trainer) is unchanged, an option added
    since (max_trajectories; report_to, a runtime one) at its default is left out, and set, it
    changes the hash."""
    from qlass.config import config_hash

    assert config_hash(SFTConfig()) == "2cd7e84fb929"
    assert config_hash(SFTConfig(epochs=2, threads=1)) == "c26dbbe2895a"
    assert config_hash(SFTConfig(epochs=2, threads=1, report_to="tensorboard")) == "c26dbbe2895a"
    assert config_hash(SFTConfig(lora=True, lr=1e-4, autocast=True, max_trajectories=4)) == "8b47d86abb6f"
    assert config_hash(SFTConfig(epochs=2, threads=1, max_trajectories=4)) != "c26dbbe2895a"
    assert config_hash(SFTConfig(epochs=2, threads=1, scheduler="cosine")) == "c26dbbe2895a"  # added, at default
    assert config_hash(SFTConfig(epochs=2, threads=1, scheduler="constant")) != "c26dbbe2895a"


def test_the_scheduler_sets_the_learning_rate_after_the_warmup(tiny_model_dir, tmp_path: Path) -> None:
    """Every trainer decayed its learning rate by a cosine; ETO's script runs DPO at a constant one after
    its warmup, which ``scheduler: constant`` now gives (``linear`` decays it linearly); another name is
    refused."""
    data = write_data(tmp_path / "data.json", n=8)
    lrs = {}
    for scheduler in ("constant", "cosine"):
        cfg = SFTConfig(epochs=2, lr=1e-3, batch_size=2, micro_batch=2, val_fraction=0.0, threads=1,
                        warmup_ratio=0.0, scheduler=scheduler)
        out = train_sft(data, tiny_model_dir, tmp_path / scheduler, cfg)
        lrs[scheduler] = [m["lr"] for m in _metrics(out) if "lr" in m]
    assert len(lrs["constant"]) == 8 and set(lrs["constant"]) == {1e-3}
    cosine = lrs["cosine"]
    assert cosine[0] == 1e-3 and cosine == sorted(cosine, reverse=True) and cosine[-1] < 1e-4
    with pytest.raises(ValueError, match="scheduler must be one of cosine, linear, constant, got 'step'"):
        SFTConfig(scheduler="step")


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_trainer_refuses_a_folder_another_trainer_or_no_trainer_made(tiny_model_dir, tmp_path: Path) -> None:
    """A finished SFT folder given as another trainer's ``--out`` is refused before anything is read or
    written (before, train-qnet-head wrote its weights over the SFT model's, and dpo "resumed" an SFT
    checkpoint and marked it a finished DPO model); so are a plain model folder, another kind's or an
    empty finished mark, a model inside the folder, checkpoints no SFT run made and a folder the Trainer's
    checkpoint rotation would delete (``checkpoint-best``)."""
    from qlass.qnet_head import QNetHeadConfig, train_qnet_head
    from qlass.training.configs import DPOConfig, QNetTrainConfig
    from qlass.training.dpo import train_dpo
    from qlass.training.qnet import train_qnet

    data = write_data(tmp_path / "data.json", n=4)
    cfg = SFTConfig(epochs=1, batch_size=2, micro_batch=2, val_fraction=0.0, threads=1)
    sft = train_sft(data, tiny_model_dir, tmp_path / "sft", cfg)
    assert not (sft / "README.md").exists()  # TRL's model card, "a fine-tuned version of [None]"
    before = _files(sft)
    others = {"dpo": lambda: train_dpo(tmp_path / "pairs.jsonl", tiny_model_dir, sft, DPOConfig(threads=1)),
              "train-qnet": lambda: train_qnet(tmp_path / "q.jsonl", tiny_model_dir, sft, QNetTrainConfig(threads=1)),
              "train-qnet-head": lambda: train_qnet_head(tmp_path / "q.jsonl", tiny_model_dir, sft,
                                                         QNetHeadConfig(folds=2))}
    for name, run in others.items():
        with pytest.raises(QlassError, match=r"sft: holds an SFT run \(qlass sft\) \(sft_config.yaml\)"):
            run()
    assert _files(sft) == before
    plain = shutil.copytree(tiny_model_dir, tmp_path / "plain")
    with pytest.raises(QlassError, match=r"plain: holds a model \(config.json\) that no SFT run .* made"):
        train_sft(data, tiny_model_dir, plain, cfg)
    marked = tmp_path / "marked"
    marked.mkdir()
    (marked / ".qlass-complete").write_text("qnet\n")
    with pytest.raises(QlassError, match=r"marked: holds a QNet run \(qlass train-qnet\) \(.qlass-complete\)"):
        train_sft(data, tiny_model_dir, marked, cfg)
    (marked / ".qlass-complete").write_text("")
    with pytest.raises(QlassError, match=r"marked: holds an empty .qlass-complete"):  # was taken as finished
        train_sft(data, tiny_model_dir, marked, cfg)
    # a model inside --out, and checkpoints no SFT run made, were deleted by the partial-checkpoint sweep
    inside = shutil.copytree(tiny_model_dir, tmp_path / "par" / "checkpoint-7")
    with pytest.raises(QlassError, match=r"par: holds the model this run starts from"):
        train_sft(data, inside, tmp_path / "par", cfg)
    with pytest.raises(QlassError, match=r"par: holds checkpoints \(checkpoint-7\) that no SFT run .* made"):
        train_sft(data, tiny_model_dir, tmp_path / "par", cfg)
    assert (inside / "model.safetensors").exists()
    kept = shutil.copytree(tiny_model_dir, tmp_path / "mine" / "checkpoint-best")  # rotation would delete it
    with pytest.raises(QlassError, match=r"mine: holds checkpoint-best, which the Trainer's checkpoint rotation"):
        train_sft(data, tiny_model_dir, tmp_path / "mine", cfg)
    assert _files(kept) == _files(tiny_model_dir)
    # an evaluation folder or exploration trees: the model was written among their records
    for name, what in (("records.jsonl", "an evaluation run"), ("trees.jsonl", "exploration trees")):
        (tmp_path / name.split(".")[0]).mkdir()
        (tmp_path / name.split(".")[0] / name).write_text("")
        with pytest.raises(QlassError, match=rf"holds {what} \({re.escape(name)}\); this SFT run .* would write"):
            train_sft(data, tiny_model_dir, tmp_path / name.split(".")[0], cfg)
    # and an evaluation refuses a model or a training run as its folder
    from qlass.evaluate import run_evaluation

    for folder, made in ((sft, "config.json"), (tmp_path / "marked", "features.settings.json")):
        (tmp_path / "marked" / "features.settings.json").write_text("{}")
        with pytest.raises(QlassError, match=rf"holds a model or a training run \({made}\); an evaluation would"):
            run_evaluation(model=str(tiny_model_dir), env_spec="toy_envs:Corridor", splits=["seen"],
                           methods=[("greedy", {})], out_dir=folder, limit=1)
    assert _files(sft) == before and not (tmp_path / "marked" / "records.jsonl").exists()


def test_sft_export_writes_only_a_new_folder_or_an_earlier_export(tiny_model_dir, tmp_path: Path) -> None:
    """``sft-export`` refuses a destination it would destroy or mix into: the base model, the run folder
    or a folder inside it, and a folder holding other files; it writes through a temporary folder, and
    an earlier export is replaced."""
    run = tmp_path / "run"
    ckpt = shutil.copytree(tiny_model_dir, run / "checkpoint-2")
    (ckpt / "trainer_state.json").write_text('{"global_step": 2}\n')
    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine\n")
    kept = {p: _files(p) for p in (run, base, other)}
    for dest, why in ((base, "is the run's base model"), (run, "is inside the SFT run"),
                      (run / "export", "is inside the SFT run"), (ckpt, "is inside the SFT run"),
                      (other, "holds other files and no sft_checkpoint.json")):
        with pytest.raises(QlassError, match=why):
            export_checkpoint(run, base, dest)
    assert {p: _files(p) for p in (run, base, other)} == kept
    dest = tmp_path / "step2"
    assert export_checkpoint(ckpt, base, dest) == 2 and export_checkpoint(run, base, dest) == 2
    assert AutoModelForCausalLM.from_pretrained(dest) is not None
    assert json.loads((dest / "sft_checkpoint.json").read_text())["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".step2.lock", "base", "other", "run", "step2"]  # no .tmp
    from test_locking import hold

    holder = hold(dest, True, beside=True)  # another export to the same folder (the two shared its .tmp folder)
    try:
        with pytest.raises(QlassError, match=r"step2 is being written by another qlass process \(pid \d+"):
            export_checkpoint(run, base, dest)
    finally:
        holder.kill()
        holder.wait()
    (tmp_path / "link").symlink_to("step2")  # a link to an earlier export: written at its target
    assert export_checkpoint(run, base, tmp_path / "link") == 2 and (tmp_path / "link").is_symlink()
    assert (tmp_path / "step2" / "sft_checkpoint.json").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    cwd = os.getcwd()
    try:  # '.' (before: a ValueError traceback, PosixPath('.') has an empty name)
        os.chdir(empty)
        assert export_checkpoint(run, base, ".") == 2
    finally:
        os.chdir(cwd)
    assert (empty / "sft_checkpoint.json").exists()



@pytest.mark.parametrize("state", ["{}", "not json", '{"global_step": "x"}', '{"global_step": -5}', "[2]"])
def test_sft_export_names_a_damaged_trainer_state_before_loading_the_model(state: str, tiny_model_dir,
                                                                           tmp_path: Path, monkeypatch) -> None:
    """A damaged ``trainer_state.json`` was a KeyError, JSONDecodeError or ValueError traceback after the model had
    loaded; a negative step was exported as "step -5"."""
    import qlass.training.sft_export as sft_export

    run = tmp_path / "run"
    ckpt = shutil.copytree(tiny_model_dir, run / "checkpoint-2")
    (ckpt / "trainer_state.json").write_text(state)
    monkeypatch.setattr(sft_export, "load_causal_lm", lambda *a: pytest.fail("the model loaded first"))
    with pytest.raises(DataError, match=r"checkpoint-2/trainer_state.json: not a trainer state with a 'global_step'"):
        export_checkpoint(run, tiny_model_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("adapter", ["{}", "not json", "[1]", '{"peft_type": 3}'])
def test_sft_export_names_a_damaged_lora_adapter_config_before_loading_the_model(adapter: str, tiny_model_dir,
                                                                                 tmp_path: Path) -> None:
    """Before: peft's KeyError: 'peft_type' (or a JSON traceback) once the base model had loaded."""
    run = tmp_path / "run"
    ckpt = shutil.copytree(tiny_model_dir, run / "checkpoint-2")
    (ckpt / "trainer_state.json").write_text('{"global_step": 2}\n')
    (ckpt / "adapter_config.json").write_text(adapter)
    with pytest.raises(DataError, match=r"checkpoint-2/adapter_config.json: not a LoRA adapter config \(a JSON "
                                        r"object with a 'peft_type'\); the checkpoint is damaged"):
        export_checkpoint(run, tiny_model_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sft_with_no_agent_token_within_max_length_is_refused(tiny_model_dir, tmp_path: Path) -> None:
    """With ``max_length`` too short for any agent turn the loss was 0 at every step and the base
    model was saved as a finished SFT run; now the run is refused before training, naming the option."""
    data = write_data(tmp_path / "data.json", n=4)
    with pytest.raises(DataError, match=r"data.json: no agent-turn token to train on within max_length=1"):
        train_sft(data, tiny_model_dir, tmp_path / "sft", SFTConfig(max_length=1, epochs=1, threads=1))
    assert not (tmp_path / "sft" / ".qlass-complete").exists()


def test_sft_from_a_pipe_records_its_digest_and_names_the_pipe(tiny_model_dir, tmp_path: Path) -> None:
    """Data read from a pipe (``--data <(zcat d.gz)``) had no digest recorded, so a rerun from a pipe of
    other data was handed the finished run (or resumed its checkpoint) without a word."""
    import os
    import threading

    fifo = tmp_path / "d.fifo"
    os.mkfifo(fifo)

    def feed(content: bytes) -> None:
        threading.Thread(target=lambda: fifo.write_bytes(content), daemon=True).start()

    cfg = SFTConfig(epochs=1, batch_size=2, micro_batch=2, val_fraction=0.0, threads=1)
    feed(write_data(tmp_path / "data.json", n=4).read_bytes())
    out = train_sft(fifo, tiny_model_dir, tmp_path / "sft", cfg)
    feed(write_data(tmp_path / "other.json", n=5).read_bytes())
    with pytest.raises(QlassError, match="data_sha256"):
        train_sft(fifo, tiny_model_dir, out, cfg)
    feed(b'[{"id": "x", "conversations": "not turns", "reward": 1.0}]')
    with pytest.raises(DataError, match=r"d.fifo, record 0 \(id 'x'\)"):  # the pipe, not a temporary copy
        train_sft(fifo, tiny_model_dir, tmp_path / "sft2", cfg)


def test_a_base_model_replaced_at_the_same_path_is_refused(tiny_model_dir, tmp_path: Path) -> None:
    """Trainers recorded the base model's path only: after another model was saved there (a retrained
    agent), a rerun handed back the run made from the old one as complete (rft,
    self-train and ETO rounds alike). The base model's files are recorded now; the same files moved
    to another path are still the same model."""
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    data = write_data(tmp_path / "data.json", n=4)
    cfg = SFTConfig(epochs=1, batch_size=2, micro_batch=2, val_fraction=0.0, threads=1)
    out = train_sft(data, base, tmp_path / "sft", cfg)
    assert "model.safetensors" in yaml.safe_load((out / "sft_config.yaml").read_text())["base_model_files"]
    moved = tmp_path / "moved"
    base.rename(moved)
    assert train_sft(data, moved, out, cfg) == out  # the same files elsewhere: complete, nothing redone
    shutil.copytree(tiny_model_dir, base, copy_function=shutil.copy)  # another save at the old path
    with pytest.raises(QlassError, match=r"other settings \(base_model: another model at the same path"):
        train_sft(data, base, out, cfg)


def test_resuming_a_tied_model_does_not_warn_of_missing_weights(tiny_model_dir, tmp_path: Path) -> None:
    """Each resume of a model with tied embeddings (SmolLM2's) logged "There were missing keys in the checkpoint
    model loaded: ['lm_head.weight']", which read as a damaged checkpoint: the checkpoint holds the embeddings,
    and loading them restores the tied output weights. A key that is really missing still warns."""
    import logging

    from transformers import AutoModelForCausalLM

    from qlass.training.quiet import _NotMisleading, tied_parameter_names

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert tied_parameter_names(model) == {"lm_head.weight"}
    dropped = _NotMisleading(tied_parameter_names(model))

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("transformers.trainer", logging.WARNING, __file__, 1, message, None, None)

    assert not dropped.filter(record("There were missing keys in the checkpoint model loaded: ['lm_head.weight']."))
    assert dropped.filter(record("There were missing keys in the checkpoint model loaded: ['model.norm.weight']."))
    assert not dropped.filter(record("mtime may not be reliable on this filesystem, falling back to numerical "
                                     "ordering"))
    assert dropped.filter(record("There were unexpected keys in the checkpoint model loaded: ['x']."))


def test_sft_leaves_the_callers_process_as_it_was_and_reports_nothing(tiny_model_dir, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' Trainer seeds Python's, NumPy's and torch's generators (set_seed): after train_sft a caller's
    draws were those after the run's seed, whatever the caller had seeded; ``threads`` stayed set, transformers'
    progress bars stayed off; and TRL's trainer sent a usage report to huggingface.co."""
    import random

    import numpy as np
    import trl.trainer.base_trainer as trl_base
    from transformers.utils import logging as hf_logging

    sent: list[dict] = []
    monkeypatch.setattr(trl_base, "send_telemetry", lambda **kwargs: sent.append(kwargs))
    monkeypatch.delenv("CI", raising=False)  # TRL sends nothing under CI
    monkeypatch.delenv("HF_HUB_DISABLE_TELEMETRY", raising=False)

    def seeded_draws(call=None) -> tuple[float, float, float]:
        torch.manual_seed(11)
        random.seed(11)
        np.random.seed(11)
        if call is not None:
            call()
        return torch.rand(1).item(), random.random(), float(np.random.rand())

    cfg = SFTConfig(epochs=1, lr=1e-3, batch_size=2, micro_batch=2, val_fraction=0.0, threads=1, max_steps=1)
    data = write_data(tmp_path / "data.json")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    hf_logging.enable_progress_bar()
    try:
        assert seeded_draws(lambda: train_sft(data, tiny_model_dir, tmp_path / "sft", cfg)) == seeded_draws()
        assert torch.get_num_threads() == 2 and hf_logging.is_progress_bar_enabled()
    finally:
        torch.set_num_threads(threads)
    assert sent == []


def test_a_resume_keeps_one_summary_whose_mean_covers_every_step(tmp_path: Path) -> None:
    """A run killed after its summary (while saving the final model) kept it and logged a second, whose
    mean_train_loss was 0.0 (no step in that session); a run resumed mid-way logged the mean of the steps after
    its checkpoint alone. The QNet's sft_loglik_ranker record was kept twice the same way."""
    from types import SimpleNamespace

    from qlass.jsonl import read_jsonl, write_jsonl
    from qlass.training.common import METRICS, rewind_metrics
    from qlass.training.trainer_parts import MetricsLog

    write_jsonl(tmp_path / METRICS, [{"step": 1, "train_loss": 3.0}, {"step": 2, "train_loss": 1.0},
                                     {"step": 2, "kind": "summary", "mean_train_loss": 2.0},
                                     {"kind": "sft_loglik_ranker", "pair_accuracy": 0.5}])
    rewind_metrics(tmp_path, 2)
    assert read_jsonl(tmp_path / METRICS) == [{"step": 1, "train_loss": 3.0}, {"step": 2, "train_loss": 1.0}]
    state = SimpleNamespace(is_world_process_zero=True, global_step=2, epoch=1.0, max_steps=2)
    MetricsLog(tmp_path).on_log(None, state, None, {"train_runtime": 0.1, "train_loss": 0.0})  # a session of 0 steps
    assert read_jsonl(tmp_path / METRICS)[-1]["mean_train_loss"] == 2.0


def test_a_kill_while_checkpoints_are_dropped_leaves_a_finished_run(tiny_model_dir, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpoints were removed before the finished mark was written: a kill in between (the removal of
    gigabytes of optimizer state) left neither, and the rerun trained again from step 0."""
    import qlass.training.run_folders as run_folders
    from qlass.training.common import DONE_MARK

    def interrupted(out: Path) -> None:
        raise KeyboardInterrupt

    cfg = SFTConfig(epochs=1, lr=1e-3, batch_size=2, micro_batch=2, val_fraction=0.0, threads=1, max_steps=2,
                    save_every=1)
    data, out = write_data(tmp_path / "data.json"), tmp_path / "sft"
    monkeypatch.setattr(run_folders, "remove_checkpoints", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_sft(data, tiny_model_dir, out, cfg)
    monkeypatch.undo()
    assert (out / DONE_MARK).exists() and list(out.glob("checkpoint-*"))
    metrics = (out / "metrics.jsonl").read_text()
    assert train_sft(data, tiny_model_dir, out, cfg) == out
    assert not list(out.glob("checkpoint-*")) and (out / "metrics.jsonl").read_text() == metrics
