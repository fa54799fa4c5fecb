"""No silent mixing (issue 18, item 1) and resume bookkeeping (item 8).

Every resumable output records what produced it; a rerun with another model, QNet, seed,
environment option or policy option is refused naming the option, runtime options may change, and
an unchanged rerun resumes without duplicates. Evaluation, exploration and decision collection load
``test_explore:ScriptedPolicy`` through the CLI, as a user's own class; evaluation's QNets are real QNet
folders on the tiny model.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import checkpoint_killer
import pytest
import yaml
from test_explore import ScriptedPolicy
from test_qnet_train import CFG, synthetic_qdata
from test_sft import write_data
from transformers import Trainer
from typer.testing import CliRunner

from qlass.cli import app
from qlass.errors import QlassError
from qlass.jsonl import read_jsonl
from qlass.recorded import setting_changes
from qlass.training import sft
from qlass.training.qnet import QNetTrainConfig, train_qnet
from qlass.tree import read_trees


class OtherPolicy(ScriptedPolicy):
    """Another policy, as another model would be: sensible whenever it can be."""

    def __init__(self, **options) -> None:
        super().__init__(**{"smart": 1.0, **options})


def invoke(args: list[str]) -> None:
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"


def refused(args: list[str], named: str, *unchanged: Path) -> None:
    """The command is refused naming ``named``, and leaves every ``unchanged`` file as it was."""
    before = [p.read_bytes() for p in unchanged]
    res = CliRunner().invoke(app, args)
    assert isinstance(res.exception, QlassError), f"{res.output}\n{res.exception!r}"
    assert named in str(res.exception), str(res.exception)
    assert [p.read_bytes() for p in unchanged] == before


def options(base: dict[str, str], extra: list[str], **changed: str | None) -> list[str]:
    """``base`` options with ``changed`` ones replaced (``None``: left out), then ``extra``."""
    args = []
    for key, value in {**base, **{f"--{k.replace('_', '-')}": v for k, v in changed.items()}}.items():
        args += [key, value] if value is not None else []
    return args + extra


def test_setting_changes_name_differences_and_leave_out_runtime_and_unknown_ones() -> None:
    before = {"model": "a", "seed": 0, "policy": {"dtype": "float32", "threads": 4}, "env_args": {},
              "options": {"k": 3}, "concurrency": 8}
    now = {"model": "a", "seed": 0, "policy": {"dtype": "float32", "threads": 1, "cache_slots": 9, "top_p": 0.9},
           "env_args": {"step_limit": 5}, "options": {"k": 3, "added_since": 1}, "concurrency": 2, "new_field": 1}
    assert setting_changes(before, now) == ["policy.top_p: (unset) → 0.9", "env_args.step_limit: (unset) → 5"]
    assert setting_changes({**before, "model": "b"}, before) == ["model: 'b' → 'a'"]
    assert setting_changes(now, {**now, "env_args": {}}, ignore=("env_args",)) == []
    assert setting_changes({"model": "a"}, {"model": "a", "policy": {"autocast": True}, "env_args": {}}) == [
        "policy.autocast: (unset) → True"]  # constructor options not recorded: none were set


# -- evaluation ------------------------------------------------------------------------------------

EVAL = {"--model": "test_explore:ScriptedPolicy", "--qnet": "qnet-a", "--seed": "0", "--env-arg": "step_limit=5",
        "--limit": "2", "--concurrency": "2"}
METHODS = ["--method", "greedy:max_new_tokens=20", "--method", "qlass:m=2,max_new_tokens=20"]


def eval_args(out: Path, *extra: str, methods: list[str] = METHODS, **changed: str | None) -> list[str]:
    return ["eval", "--env", "test_explore:Rooms", "--split", "train", "--out", str(out), *methods,
            *options(EVAL, list(extra), **changed)]


@pytest.fixture
def toy_models(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two real QNet folders, ``qnet-a`` and ``qnet-b`` (fresh heads on the tiny model), in the working
    directory the commands run in; the policies are a user's classes (``module:Class``)."""
    from qlass.qnet import QNet

    for seed, name in enumerate(("qnet-a", "qnet-b")):
        QNet.from_sft(tiny_model_dir, max_length=256, max_action_tokens=32, seed=seed).save(tmp_path / "cwd" / name)
    monkeypatch.chdir(tmp_path / "cwd")


def test_eval_resume_with_other_model_qnet_seed_env_or_policy_option_is_refused(tmp_path: Path, toy_models) -> None:
    out = tmp_path / "eval"
    records, config = out / "records.jsonl", out / "config.yaml"
    invoke(eval_args(out))
    assert len(read_jsonl(records)) == 4
    saved = yaml.safe_load(config.read_text())
    assert (saved["model"], saved["qnet"], saved["seed"], saved["env_args"]) == ("test_explore:ScriptedPolicy",
                                                                                 "qnet-a", 0, {"step_limit": 5})
    assert saved["qnet_files"]  # the QNet folder's files, so another QNet saved at the same path is refused
    for named, changed, extra in (("model: 'test_explore:ScriptedPolicy' → 'test_no_mixing:OtherPolicy'",
                                   {"model": "test_no_mixing:OtherPolicy"}, []),
                                  ("qnet: 'qnet-a' → 'qnet-b'", {"qnet": "qnet-b"}, []),
                                  ("seed: 0 → 7", {"seed": "7"}, []),
                                  ("env_args.step_limit: 5 → 6", {"env_arg": "step_limit=6"}, []),
                                  ("offset: 0 → 1", {"offset": "1"}, []),
                                  ("policy.top_p: (unset) → 0.9", {}, ["--policy-arg", "top_p=0.9"])):
        refused(eval_args(out, *extra, **changed), named, records, config)
    shutil.move("qnet-a", "qnet-a.was")  # a QNet trained again and saved at the same path
    shutil.copytree("qnet-b", "qnet-a")
    refused(eval_args(out), "qnet: another model at the same path", records, config)
    shutil.rmtree("qnet-a")
    shutil.move("qnet-a.was", "qnet-a")
    # runtime options may change, and an unchanged rerun plays nothing again
    played = records.read_bytes()
    invoke(eval_args(out, "--policy-arg", "threads=1", "--policy-arg", "cache_slots=3", concurrency="1",
                     workers="3"))
    invoke(eval_args(out))
    assert records.read_bytes() == played
    # a run without a QNet adds to the folder (none of its records used one); the recorded QNet stays
    invoke(eval_args(out, methods=["--method", "greedy:max_new_tokens=20"], limit="3", qnet=None))
    assert yaml.safe_load(config.read_text())["qnet"] == "qnet-a"
    keys = [(r["method"], r["task"]) for r in read_jsonl(records)]
    assert len(keys) == len(set(keys)) == 5


def test_eval_config_written_before_the_check_still_resumes(tmp_path: Path, toy_models) -> None:
    out = tmp_path / "eval"
    invoke(eval_args(out))
    saved = yaml.safe_load((out / "config.yaml").read_text())
    for field in ("qnet", "seed", "workers"):  # unknown: taken as unchanged
        del saved[field]
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    invoke(eval_args(out))
    assert len(read_jsonl(out / "records.jsonl")) == 4
    refused(eval_args(out, model="test_no_mixing:OtherPolicy"), "model: 'test_explore:ScriptedPolicy' → "
            "'test_no_mixing:OtherPolicy'", out / "records.jsonl")


# -- exploration -----------------------------------------------------------------------------------

EXPLORE = {"--model": "test_explore:ScriptedPolicy", "--seed": "0", "--env-arg": "step_limit=6", "--limit": "2",
           "--set": "max_depth=2"}


def explore_args(out: Path, *extra: str, **changed: str) -> list[str]:
    return ["explore", "--env", "test_explore:Rooms", "--set", "candidates=2", "--set", "max_steps=6",
            "--no-progress", "--out", str(out), *options(EXPLORE, list(extra), **changed)]


def test_explore_resume_with_other_model_seed_env_policy_or_explore_option_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "trees.jsonl"
    sidecar = tmp_path / "trees.config.yaml"
    invoke(explore_args(out))
    assert len(read_trees(out)) == 2
    assert yaml.safe_load(sidecar.read_text()) == {"model": "test_explore:ScriptedPolicy", "env": "test_explore:Rooms",
                                                   "env_args": {"step_limit": 6}, "policy": {}, "seed": 0}
    for named, changed, extra in (("model: 'test_explore:ScriptedPolicy' → 'test_no_mixing:OtherPolicy'",
                                   {"model": "test_no_mixing:OtherPolicy"}, []),
                                  ("seed: 0 → 7", {"seed": "7"}, []),
                                  ("env_args.step_limit: 6 → 7", {"env_arg": "step_limit=7"}, []),
                                  ("policy.smart: (unset) → 0.9", {}, ["--policy-arg", "smart=0.9"]),
                                  ("max_depth: 2 → 3", {"set": "max_depth=3"}, [])):
        refused(explore_args(out, *extra, **changed), named, out, sidecar)
    # runtime options may change; an unchanged rerun builds nothing; the limit may grow
    trees = out.read_bytes()
    invoke(explore_args(out, concurrency="1", workers="3"))
    assert out.read_bytes() == trees
    invoke(explore_args(out, limit="3"))
    ids = [t.tree_id for t in read_trees(out)]
    assert len(ids) == len(set(ids)) == 3 and out.read_bytes().startswith(trees)


def test_trees_without_a_settings_record_still_resume(tmp_path: Path) -> None:
    out = tmp_path / "trees.jsonl"
    invoke(explore_args(out))
    (tmp_path / "trees.config.yaml").unlink()  # as written before the record existed
    trees = out.read_bytes()
    invoke(explore_args(out))
    assert out.read_bytes() == trees and (tmp_path / "trees.config.yaml").exists()
    refused(explore_args(out, model="test_no_mixing:OtherPolicy"), "model:", out)


def test_trees_with_an_emptied_settings_record_are_refused(tmp_path: Path) -> None:
    """A settings record that exists but no longer names the model, env or seed (emptied or cut by
    hand) is not a file from before the record existed: resuming is refused and the record kept."""
    out, sidecar = tmp_path / "trees.jsonl", tmp_path / "trees.config.yaml"
    invoke(explore_args(out))
    for text, named in (("", "'model', 'env', 'seed'"), ("model: test_explore:ScriptedPolicy\n", "'env', 'seed'")):
        sidecar.write_text(text)
        refused(explore_args(out, model="test_no_mixing:OtherPolicy"), f"does not record {named}", out, sidecar)


# -- decision files --------------------------------------------------------------------------------

DECIDE = {"--model": "test_explore:ScriptedPolicy", "--seed": "0", "--env-arg": "step_limit=4", "--limit": "2",
          "--set": "k=1"}


def decide_args(out: Path, *extra: str, **changed: str) -> list[str]:
    return ["decisions", "collect", "--env", "test_explore:Rooms", "--split", "train", "--set", "m=3",
            "--set", "max_steps=4", "--out", str(out), *options(DECIDE, list(extra), **changed)]


def test_decision_file_resume_with_other_model_seed_env_or_policy_option_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "d.jsonl"
    done, config = tmp_path / "d.tasks.jsonl", tmp_path / "d.config.yaml"
    invoke(decide_args(out))
    assert len(read_jsonl(done)) == 2
    for named, changed, extra in (("model: 'test_explore:ScriptedPolicy' → 'test_no_mixing:OtherPolicy'",
                                   {"model": "test_no_mixing:OtherPolicy"}, []),
                                  ("seed: 0 → 7", {"seed": "7"}, []),
                                  ("env_args.step_limit: 4 → 5", {"env_arg": "step_limit=5"}, []),
                                  ("policy.smart: (unset) → 0.9", {}, ["--policy-arg", "smart=0.9"]),
                                  ("options.k: 1 → 2", {"set": "k=2"}, []),
                                  ("offset: 0 → 1", {"offset": "1"}, [])):
        refused(decide_args(out, *extra, **changed), named, done, config)
    decisions = out.read_bytes() if out.exists() else b""
    invoke(decide_args(out, concurrency="1"))
    invoke(decide_args(out, limit="3"))
    assert [(r["split"], r["task"]) for r in read_jsonl(done)] == [("train", f"rooms/{i}") for i in range(3)]
    assert (out.read_bytes() if out.exists() else b"").startswith(decisions)


def test_eval_offset_takes_the_tasks_after_a_limit_and_a_folder_without_it_still_resumes(
        tmp_path: Path, toy_models) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    invoke(eval_args(first, methods=["--method", "greedy:max_new_tokens=20"], limit="2", qnet=None))
    invoke(eval_args(second, "--offset", "2", methods=["--method", "greedy:max_new_tokens=20"], limit="2", qnet=None))
    tasks = [[r["task"] for r in read_jsonl(d / "records.jsonl")] for d in (first, second)]
    assert tasks == [["rooms/0", "rooms/1"], ["rooms/2", "rooms/3"]]
    assert yaml.safe_load((second / "config.yaml").read_text())["offset"] == 2
    # a folder recorded before the option (no offset key) resumes without playing anything again
    saved = yaml.safe_load((first / "config.yaml").read_text())
    del saved["offset"]
    (first / "config.yaml").write_text(yaml.safe_dump(saved))
    played = (first / "records.jsonl").read_bytes()
    invoke(eval_args(first, methods=["--method", "greedy:max_new_tokens=20"], limit="2", qnet=None))
    assert (first / "records.jsonl").read_bytes() == played


# -- qlass run folders -----------------------------------------------------------------------------

def test_run_folder_refuses_other_seed_policy_or_server_once_the_policy_made_outputs(tmp_path: Path) -> None:
    from qlass.pipeline_config import resolve, save_resolved

    base = {"run_dir": str(tmp_path / "run"), "model": "m", "env": "test_explore:Rooms", "policy": {"threads": 1}}
    save_resolved(resolve(base, "p.yaml"))
    save_resolved(resolve({**base, "seed": 3}, "p.yaml"))  # nothing made by the policy yet
    (tmp_path / "run" / "trees.jsonl").write_text("")
    for named, changed in (("policy.dtype: (unset) → 'bfloat16'", {"policy": {"threads": 1, "dtype": "bfloat16"}}),
                           ("seed: 3 → 0", {}),
                           ("policy_server: None → 'http://127.0.0.1:9/v1'",
                            {"seed": 3, "policy": {}, "policy_server": "http://127.0.0.1:9/v1"})):
        with pytest.raises(QlassError, match="other settings") as err:
            save_resolved(resolve({**base, **changed}, "p.yaml"))
        assert named in str(err.value)
    save_resolved(resolve({**base, "seed": 3, "policy": {"threads": 4, "cache_slots": 20}}, "p.yaml"))  # runtime


# -- SFT and QNet runs, and their resume bookkeeping -----------------------------------------------

def _val_steps(out: Path) -> list[int]:
    return [m["step"] for m in read_jsonl(out / "metrics.jsonl") if "val_loss" in m]


def _killed(module: str, config: str, train: str, args: list[str], step: int, opts: dict, before: bool) -> None:
    """``train`` run in a process of its own that SIGKILLs itself at checkpoint ``step`` (see checkpoint_killer)."""
    proc = subprocess.run([sys.executable, "-c", checkpoint_killer.script(module, config, train, before), *args,
                           str(step), repr(opts)], capture_output=True, text=True, check=False)
    assert proc.returncode == -9, proc.stderr[-3000:]


def test_sft_killed_before_its_first_checkpoint_logs_step_0_once_and_refuses_other_data_or_base(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_data(tmp_path / "data.json", n=5)
    opts = dict(epochs=1, lr=1e-3, batch_size=1, micro_batch=1, val_fraction=0.2, save_every=2, threads=1)
    cfg = sft.SFTConfig(**opts)
    out = tmp_path / "sft"
    _killed("qlass.training.sft", "SFTConfig", "train_sft", [str(data), str(tiny_model_dir), str(out)], 2, opts,
            before=True)
    assert not list(out.glob("checkpoint-*")) and _val_steps(out) == [0]
    sft.train_sft(data, tiny_model_dir, out, cfg)
    assert _val_steps(out) == [0, 4]
    recorded = yaml.safe_load((out / "sft_config.yaml").read_text())
    assert recorded["base_model"] == str(tiny_model_dir) and len(recorded["data_sha256"]) == 64
    # a finished run: handed back for a moved copy of its data or a runtime change, refused otherwise
    shutil.copy(data, tmp_path / "moved.json")
    assert sft.train_sft(tmp_path / "moved.json", tiny_model_dir, out,
                         replace(cfg, gradient_checkpointing=True, threads=2)) == out
    other = write_data(tmp_path / "other.json", n=6)
    with pytest.raises(QlassError, match="data_sha256"):
        sft.train_sft(other, tiny_model_dir, out, cfg)
    (tmp_path / "link").symlink_to(tiny_model_dir)  # the same folder by another path: the same base model
    assert sft.train_sft(data, tmp_path / "link", out, cfg) == out
    shutil.copytree(tiny_model_dir, tmp_path / "copy")  # the same files (sizes and times) moved: the same model
    assert sft.train_sft(data, tmp_path / "copy", out, cfg) == out
    shutil.copytree(tiny_model_dir, tmp_path / "base", copy_function=shutil.copy)  # new file times: another model
    with pytest.raises(QlassError, match="base_model"):
        sft.train_sft(data, tmp_path / "base", out, cfg)
    with pytest.raises(QlassError, match=r"lr: 0\.001 → 0\.002"):
        sft.train_sft(data, tiny_model_dir, out, replace(cfg, lr=2e-3))


def test_resumed_qnet_epoch_reports_the_whole_epochs_train_mse_and_refuses_another_sft_model(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    data = synthetic_qdata(tmp_path / "q.jsonl", trees=8)
    opts = {**CFG, "eval_before": False, "baseline": False, "threads": 1, "save_every": 3}
    cfg = QNetTrainConfig(**opts)
    whole = train_qnet(data, tiny_model_dir, tmp_path / "whole", cfg)
    out = tmp_path / "resumed"
    _killed("qlass.training.qnet", "QNetTrainConfig", "train_qnet", [str(data), str(tiny_model_dir), str(out)], 3,
            opts, before=False)
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "train_loss" in r] == [1, 2, 3]
    assert not [r for r in read_jsonl(out / "metrics.jsonl") if "val_mse" in r], "killed mid-epoch"
    shutil.copytree(tiny_model_dir, tmp_path / "copy", copy_function=shutil.copy)  # new file times: another model
    with pytest.raises(QlassError, match="a QNet in training trained with other settings .*sft_model: '.*' → '.*copy'"):
        train_qnet(data, tmp_path / "copy", out, cfg)
    with pytest.raises(QlassError, match="other Q data"):
        train_qnet(synthetic_qdata(tmp_path / "other.jsonl", trees=8, seed=1), tiny_model_dir, out, cfg)
    (tmp_path / "link").symlink_to(tiny_model_dir)  # the same folder named another way (before: refused)
    resumed = train_qnet(data, tmp_path / "link", out, cfg)

    def validations(run: Path) -> list[tuple[int, float]]:
        return [(r["step"], r["val_mse"]) for r in read_jsonl(run / "metrics.jsonl") if "val_mse" in r]

    assert validations(out) == validations(tmp_path / "whole")
    assert resumed["qnet"]["train_mse"] == whole["qnet"]["train_mse"]  # the epoch's steps before the crash count
    assert json.loads((out / "qnet_result.json").read_text())["kept_epoch"] == whole["kept_epoch"]


@pytest.mark.parametrize("trainer", ["sft", "qnet"])
def test_a_checkpoint_is_not_resumed_where_it_would_compute_in_another_precision(
        trainer: str, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16-autocast run checkpointed on a CPU with native bf16 is refused on one where qlass would
    continue it in fp32 (qlass.precision), naming the precision; finished, it is handed back anywhere.
    Only the CPU's bf16 capability check and speed verdict are replaced (a CPU cannot be given an
    instruction set)."""
    import torch

    from qlass import precision

    monkeypatch.delenv(precision.ENV_VAR, raising=False)
    monkeypatch.setattr(precision, "cpu_bf16_is_faster", lambda: (True, "a stand-in: bf16 faster"))

    def cpu_with_bf16(native: bool) -> None:
        precision.cpu_runs_bf16.cache_clear()
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)

    if trainer == "sft":
        data = write_data(tmp_path / "data.json", n=5)
        cfg = sft.SFTConfig(epochs=1, lr=1e-3, batch_size=1, micro_batch=1, val_fraction=0.2, save_every=2,
                            threads=1, autocast=True)
        run = sft.train_sft
    else:
        data = synthetic_qdata(tmp_path / "q.jsonl", trees=8)
        cfg = QNetTrainConfig(**{**CFG, "eval_before": False, "baseline": False, "threads": 1, "save_every": 3,
                                 "autocast": True})
        run = train_qnet
    out = tmp_path / "run"
    real = Trainer._save_checkpoint

    def crash_after_first_save(self, *args, **kwargs) -> None:
        real(self, *args, **kwargs)
        raise RuntimeError("simulated crash")

    try:
        cpu_with_bf16(True)
        with monkeypatch.context() as patch:
            patch.setattr(Trainer, "_save_checkpoint", crash_after_first_save)
            with pytest.raises(RuntimeError, match="simulated crash"):
                run(data, tiny_model_dir, out, cfg)
        cpu_with_bf16(False)
        with pytest.raises(QlassError, match="precision: 'bf16' → 'fp32'"):
            run(data, tiny_model_dir, out, cfg)
        cpu_with_bf16(True)
        run(data, tiny_model_dir, out, cfg)
        cpu_with_bf16(False)
        run(data, tiny_model_dir, out, cfg)  # finished: handed back, not refused
    finally:
        precision.cpu_runs_bf16.cache_clear()


def test_eval_and_pipeline_refuse_each_others_folder(tmp_path: Path, toy_models) -> None:
    """``qlass eval --out RUN_DIR`` would replace the pipeline's ``config.yaml`` with its own (the run
    could no longer resume), and ``qlass run`` into an evaluation folder the other way round: both
    are refused, naming what the folder is, and leave its ``config.yaml`` as it was."""
    from qlass.pipeline_config import resolve, save_resolved

    run = tmp_path / "run"
    save_resolved(resolve({"run_dir": str(run), "model": "m", "env": "test_explore:Rooms"}, "p.yaml"))
    refused(eval_args(run), "is a qlass run folder", run / "config.yaml")
    out = tmp_path / "eval"
    invoke(eval_args(out))
    before = (out / "config.yaml").read_bytes()
    with pytest.raises(QlassError, match="is an evaluation folder"):
        save_resolved(resolve({"run_dir": str(out), "model": "m", "env": "test_explore:Rooms"}, "p.yaml"))
    assert (out / "config.yaml").read_bytes() == before


def test_eval_resume_knows_a_model_folder_by_its_files_not_its_spelling(tmp_path: Path, tiny_model_dir: Path,
                                                                       toy_models) -> None:
    """The model was compared by its path string: another model saved at the same path was mixed into
    the run without a word, while the same folder spelled ``m/`` or ``x/../m`` was refused. Now the
    folder's config and weight files are recorded (``model_files``) and the path compared as a folder."""
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "m"))
    out = tmp_path / "eval"
    records, config = out / "records.jsonl", out / "config.yaml"
    invoke(eval_args(out, model=str(model)))
    assert set(yaml.safe_load(config.read_text())["model_files"]) == {"config.json", "model.safetensors"}
    played = records.read_bytes()
    for spelling in (f"{model}/", str(tmp_path / "x" / ".." / "m")):
        (tmp_path / "x").mkdir(exist_ok=True)
        invoke(eval_args(out, model=spelling))
    assert records.read_bytes() == played
    moved = model.rename(tmp_path / "moved")  # a moved folder keeps its files' times: the same model
    invoke(eval_args(out, model=str(moved)))
    assert records.read_bytes() == played
    moved.rename(model)
    invoke(eval_args(out, model=str(model)))  # and back
    (model / "model.safetensors").write_bytes(b"weights-b, retrained")
    refused(eval_args(out, model=str(model)), "model: another model at the same path", records, config)
    other = shutil.copytree(model, tmp_path / "other")
    (other / "model.safetensors").write_bytes(b"weights-c")
    res = CliRunner().invoke(app, eval_args(out, model=str(other)))
    assert "model: " in str(res.exception) and "another model at the same path" not in str(res.exception)


def test_eval_resume_names_a_records_line_as_the_file_shows_it(tmp_path: Path, toy_models) -> None:
    """The evaluation's own resume check counted records and called the count a line: with a blank line
    in a hand-edited records.jsonl it sent users to the wrong line."""
    out = tmp_path / "eval"
    invoke(eval_args(out))
    records = out / "records.jsonl"
    first = records.read_text().splitlines()[0]
    records.write_text(first + "\n\n" + first + "\n")
    refused(eval_args(out), "records.jsonl: line 3: ", records)
    assert "is also recorded at line 1" in str(CliRunner().invoke(app, eval_args(out)).exception)
