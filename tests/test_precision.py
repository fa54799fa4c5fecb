"""bf16 autocast is used only where the hardware runs bf16 natively, and faster than fp32.

Whether this machine's CPU has native bf16, and whether it runs it faster, is fixed, so the other
cases are produced by replacing oneDNN's capability check and the timing of the probe (the stand-ins
here: a CPU cannot be made to lose or gain an instruction set or speed); everything downstream — the
verdict kept on disk, the warning, the policy, the QNet forward, the trainer arguments — runs for real.
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
    monkeypatch.delenv(precision.ENV_VAR, raising=False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: request.param)
    monkeypatch.setattr(precision, "cpu_bf16_is_faster", lambda: (True, "a stand-in: bf16 faster here"))
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
    with pytest.raises(QlassError, match=f"precision: '{ran}' → '{other}'.*QLASS_CPU_BF16=on or off sets the"):
        evaluate(2)
    assert precision.policy_precision("http://localhost:1/v1", {"autocast": True}) is None
    assert precision.policy_precision(str(tiny_model_dir), {"dtype": "bfloat16"}) == "bfloat16"
    # workers elsewhere (a Ray cluster, GPUs this driver lacks): nothing is worked out or recorded here
    remote = {"model": str(tiny_model_dir), "policy": {"device": "cuda", "autocast": True}}
    assert precision.with_precision(remote, here=False) == remote


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty qlass cache, no $QLASS_CPU_BF16 and a CPU with native bf16 kernels."""
    monkeypatch.setenv("QLASS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(precision.ENV_VAR, raising=False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    precision.cpu_runs_bf16.cache_clear()
    yield tmp_path / "cache" / "precision"
    precision.cpu_runs_bf16.cache_clear()


def test_the_speed_verdict_is_measured_once_per_machine_and_kept(fresh_cache: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The first call measures this CPU for real and keeps the verdict; later calls (other processes,
    other runs) read it and measure nothing."""
    fp32, bf16 = precision.measure_linear_seconds(repeats=2)
    assert fp32 > 0 and bf16 > 0
    faster, words = precision.cpu_bf16_is_faster()
    [kept] = fresh_cache.glob("*.json")
    verdict = json.loads(kept.read_text())
    assert verdict["bf16_faster"] is faster is (verdict["bf16_seconds"] < verdict["fp32_seconds"])
    assert str(kept) in words and "ms in fp32" in words

    def measure_again(repeats: int = 7) -> tuple[float, float]:
        raise AssertionError("measured again although a verdict is kept")

    monkeypatch.setattr(precision, "measure_linear_seconds", measure_again)
    assert precision.cpu_bf16_is_faster() == (faster, words)
    assert precision.cpu_runs_bf16() is faster
    assert precision.use_autocast(True, "cpu") is faster


@pytest.mark.parametrize("bf16_seconds", [0.5, 2.0], ids=["bf16-faster", "bf16-slower"])
def test_a_cpu_with_bf16_kernels_runs_fp32_where_bf16_is_slower(fresh_cache: Path, bf16_seconds: float,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Measured on an Intel Xeon with AVX512-BF16 and no AMX: a forward 1.74x slower under bf16
    autocast, which qlass used to pick there because oneDNN reports native bf16 kernels."""
    monkeypatch.setattr(precision, "measure_linear_seconds", lambda repeats=7: (1.0, bf16_seconds))
    with caplog.at_level(logging.WARNING, logger="qlass.precision"):
        assert precision.use_autocast(True, "cpu") is (bf16_seconds < 1)
        assert precision.use_autocast(True, "cpu") is (bf16_seconds < 1)
    warnings = [r.getMessage() for r in caplog.records if "runs slower than fp32" in r.getMessage()]
    assert len(warnings) == (0 if bf16_seconds < 1 else 1)
    if warnings:
        assert "1000.0 ms in fp32, 2000.0 ms under bf16" in warnings[0] and "QLASS_CPU_BF16=on" in warnings[0]
    policy_args = TrainerConfig(autocast=True, device="cpu")
    args = training_arguments(policy_args, fresh_cache.parent, epochs=1, lr=1e-4, micro_batch=1, batch_size=1,
                              seed=0, evaluate=False)
    assert args["bf16"] is (bf16_seconds < 1)


@pytest.mark.parametrize(("setting", "native", "expected"), [
    ("on", True, True), ("ON", False, True), ("1", True, True), ("off", True, False), ("0", True, False),
    ("auto", True, False), ("", True, False), ("auto", False, False)])
def test_qlass_cpu_bf16_overrides_the_verdict(fresh_cache: Path, monkeypatch: pytest.MonkeyPatch, setting: str,
                                              native: bool, expected: bool) -> None:
    """``on``/``off`` decide without measuring; ``auto`` (or empty) measures — here bf16 is made slower."""
    monkeypatch.setenv(precision.ENV_VAR, setting)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    monkeypatch.setattr(precision, "measure_linear_seconds", lambda repeats=7: (1.0, 3.0))
    assert precision.use_autocast(True, "cpu") is expected
    assert precision.use_autocast(False, "cpu") is False


def test_a_bad_qlass_cpu_bf16_is_refused_naming_it(fresh_cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                   tiny_model_dir: Path) -> None:
    from qlass.errors import QlassError

    monkeypatch.setenv(precision.ENV_VAR, "fast")
    with pytest.raises(QlassError, match=r"\$QLASS_CPU_BF16 is 'fast': use on, off or auto"):
        precision.use_autocast(True, "cpu")
    with pytest.raises(QlassError, match="QLASS_CPU_BF16"):
        HFPolicy(tiny_model_dir, max_length=256, autocast=True)


@pytest.mark.parametrize("content", ["{not json", "[]", '{"bf16_faster": "yes", "fp32_seconds": 1, "bf16_seconds": 2}',
                                     "[" * 100_000 + "]" * 100_000],
                         ids=["not-json", "not-an-object", "bad-field", "nested-too-deeply"])
def test_an_unreadable_verdict_is_measured_again_and_replaced(fresh_cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture, content: str) -> None:
    monkeypatch.setattr(precision, "measure_linear_seconds", lambda repeats=7: (1.0, 0.5))
    precision.cpu_bf16_is_faster()
    [kept] = fresh_cache.glob("*.json")
    kept.write_text(content)  # verdicts are linked into place whole, but a hand edit or a bad disk can do this
    monkeypatch.setattr(precision, "measure_linear_seconds", lambda repeats=7: (1.0, 4.0))
    with caplog.at_level(logging.WARNING, logger="qlass.precision"):
        faster, _ = precision.cpu_bf16_is_faster()
    assert any(str(kept) in r.getMessage() and "measuring bf16 against fp32 again" in r.getMessage()
               for r in caplog.records)
    assert faster is False
    assert json.loads(kept.read_text()) == {"fp32_seconds": 1.0, "bf16_seconds": 4.0, "bf16_faster": False}


def test_the_first_process_to_keep_a_verdict_decides_for_all(fresh_cache: Path) -> None:
    """Two processes measuring at once can disagree on a CPU where the two are close; the verdict linked
    into place first is the one both use."""
    path = fresh_cache / "machine.json"
    first = {"fp32_seconds": 1.0, "bf16_seconds": 0.9, "bf16_faster": True}
    assert precision._keep_verdict(path, first) == first
    second = {"fp32_seconds": 1.0, "bf16_seconds": 1.1, "bf16_faster": False}
    assert precision._keep_verdict(path, second) == first
    assert json.loads(path.read_text()) == first
    assert not [p for p in fresh_cache.iterdir() if p.name.endswith(".tmp")]
