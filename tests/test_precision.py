"""bf16 autocast is used only where the hardware runs bf16 natively.

Whether this machine's CPU has native bf16 is fixed, so the other case is produced by replacing
oneDNN's capability check (the one stand-in here: a CPU cannot be made to lose or gain an
instruction set); everything downstream — the warning, the policy, the QNet forward, the trainer
arguments — runs for real.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from qlass import precision
from qlass.policy.hf import HFPolicy
from qlass.qnet import QNet
from qlass.training.configs import TrainerConfig
from qlass.training.trainer_parts import training_arguments
from qlass.types import Message


@pytest.fixture(params=[False, True], ids=["no-native-bf16", "native-bf16"])
def cpu_bf16(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[bool]:
    """This CPU as one without (False) or with (True) native bf16 kernels."""
    precision.cpu_runs_bf16.cache_clear()
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: request.param)
    yield request.param
    precision.cpu_runs_bf16.cache_clear()


def test_autocast_follows_the_cpu_and_warns_once_without_bf16(cpu_bf16: bool, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="qlass.precision"):
        assert precision.use_autocast(True, "cpu") is cpu_bf16
        assert precision.use_autocast(True, torch.device("cpu")) is cpu_bf16
        assert precision.use_autocast(False, "cpu") is False
    warnings = [r for r in caplog.records if "no native bf16" in r.getMessage()]
    assert len(warnings) == (0 if cpu_bf16 else 1)
    with precision.bf16_autocast("cpu", True):
        assert torch.is_autocast_enabled("cpu") is cpu_bf16
    with precision.bf16_autocast("cpu", False):
        assert not torch.is_autocast_enabled("cpu")


def test_policy_and_qnet_run_fp32_on_a_cpu_without_bf16(cpu_bf16: bool, tiny_model_dir: Path) -> None:
    policy = HFPolicy(tiny_model_dir, max_length=256, autocast=True)
    assert policy.autocast is cpu_bf16
    assert policy.kv_dtype == (torch.bfloat16 if cpu_bf16 else None)
    history = [Message("user", "Task: look around.")]
    out = policy.sample([history], n=2, temperature=1.0, max_new_tokens=6, seed=1)
    assert len(out[0]) == 2
    qnet = QNet.from_sft(tiny_model_dir, max_length=256, max_action_tokens=32, autocast=True)
    scored = qnet.score_batch([(history, ["Action: look around", "Action: inventory"])])
    assert len(scored[0]) == 2 and all(torch.isfinite(torch.tensor(scored[0])))
    if not cpu_bf16:  # fp32 throughout: the same values as a QNet built without autocast
        plain = QNet(qnet.model, qnet.tokenizer, 256, 32, autocast=False)
        assert scored == plain.score_batch([(history, ["Action: look around", "Action: inventory"])])


def test_trainer_bf16_only_where_it_runs_natively(cpu_bf16: bool, tmp_path: Path) -> None:
    cfg = TrainerConfig(autocast=True, device="cpu")
    args = training_arguments(cfg, tmp_path, epochs=1, lr=1e-4, micro_batch=1, batch_size=1, seed=0, evaluate=False)
    assert args["bf16"] is cpu_bf16 and args["use_cpu"] is True
    off = training_arguments(TrainerConfig(autocast=False, device="cpu"), tmp_path, epochs=1, lr=1e-4,
                             micro_batch=1, batch_size=1, seed=0, evaluate=False)
    assert off["bf16"] is False


def test_a_saved_qnet_records_the_precision_it_ran_in(cpu_bf16: bool, tiny_model_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 asked for on a CPU without native bf16 runs fp32, and ``qnet.json`` says fp32: loaded on a
    machine with bf16 it still scores in fp32, as it was trained (not in the bf16 it never ran in)."""
    qnet = QNet.from_sft(tiny_model_dir, max_length=256, max_action_tokens=32, autocast=True)
    qnet.save(tmp_path / "qnet")
    assert json.loads((tmp_path / "qnet" / "qnet.json").read_text())["autocast"] is cpu_bf16
    precision.cpu_runs_bf16.cache_clear()
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)  # the other machine
    loaded = QNet.load(tmp_path / "qnet")
    assert loaded.autocast is cpu_bf16
    history = [Message("user", "Task: look around.")]
    scored = loaded.score(history, ["Action: look around", "Action: inventory"])
    if not cpu_bf16:
        assert scored == QNet(loaded.model, loaded.tokenizer, 256, 32, autocast=False).score(
            history, ["Action: look around", "Action: inventory"])


def test_an_evaluation_records_the_precision_its_policy_ran_in(cpu_bf16: bool, tiny_model_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``autocast: true`` says what was asked; ``precision`` in config.yaml says what ran, and resuming
    the folder on a machine where the policy would compute in the other precision is refused."""
    import yaml

    from qlass.errors import QlassError
    from qlass.evaluate import run_evaluation

    def evaluate(limit: int) -> None:
        run_evaluation(model=str(tiny_model_dir), env_spec="toy_envs:Corridor", env_kwargs={"step_limit": 1},
                       splits=["seen"], methods=[("greedy", {"max_steps": 1, "max_new_tokens": 4})], limit=limit,
                       policy_kwargs={"autocast": True, "threads": 1}, out_dir=tmp_path / "eval")

    evaluate(1)
    ran = "bf16" if cpu_bf16 else "fp32"
    assert yaml.safe_load((tmp_path / "eval" / "config.yaml").read_text())["precision"] == ran
    precision.cpu_runs_bf16.cache_clear()
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: not cpu_bf16)  # the other machine
    other = "fp32" if cpu_bf16 else "bf16"
    with pytest.raises(QlassError, match=f"precision: '{ran}' → '{other}'"):
        evaluate(2)
    assert precision.policy_precision("http://localhost:1/v1", {"autocast": True}) is None
    assert precision.policy_precision(str(tiny_model_dir), {"dtype": "bfloat16"}) == "bfloat16"
    # workers elsewhere (a Ray cluster, GPUs this driver lacks): nothing is worked out or recorded here
    remote = {"model": str(tiny_model_dir), "policy": {"device": "cuda", "autocast": True}}
    assert precision.with_precision(remote, here=False) == remote
