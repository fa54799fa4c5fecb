"""Config dataclasses: YAML load/save round trip, strict keys and types, errors naming file and key."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qlass.config import build, describe, help_text, load_config, option, save_config
from qlass.decisions import DecisionConfig
from qlass.errors import DataError, QlassError
from qlass.explore_config import ExploreConfig
from qlass.search import BestOfNConfig, GreedyConfig, SampleConfig
from qlass.search_qlass import QlassConfig
from qlass.training.configs import QNetTrainConfig
from qlass.training.sft import SFTConfig


@dataclass(frozen=True)
class Demo:
    """A config with one field of each supported kind."""

    lr: float = option(1e-5, "learning rate")
    epochs: int = option(3, "passes")
    lora: bool = option(False, "use LoRA")
    name: str = option("run", "run name")
    max_steps: int | None = option(None, "step cap")
    splits: list[str] = option(["seen"], "splits")
    env_args: dict = option({}, "env options")

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_yaml_then_overrides_and_round_trip(tmp_path: Path) -> None:
    path = write(tmp_path, "lr: 1e-4\nepochs: 2\nsplits: [seen, unseen]\nmax_steps: 7\n")
    cfg = load_config(path, Demo, overrides={"epochs": 5, "max_steps": None})
    # YAML 1.1 reads ``1e-4`` as a string; a float field converts it
    assert cfg == Demo(lr=1e-4, epochs=5, splits=["seen", "unseen"], max_steps=None)
    assert isinstance(cfg.lr, float)
    save_config(tmp_path / "saved.yaml", cfg)
    assert load_config(tmp_path / "saved.yaml", Demo) == cfg
    assert load_config(None, Demo) == Demo()
    assert load_config(write(tmp_path, ""), Demo) == Demo()


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "lr: 0.1\nepoch: 2\n")
    with pytest.raises(QlassError) as err:
        load_config(path, Demo)
    assert str(path) in str(err.value) and "'epoch' (did you mean 'epochs'?)" in str(err.value)
    with pytest.raises(QlassError, match=r"^--set: unknown option\(s\) 'zzz' for Demo"):
        load_config(write(tmp_path, "lr: 0.1\n"), Demo, overrides={"zzz": 1})


@pytest.mark.parametrize(("text", "key"), [
    ("epochs: three\n", "epochs"), ("epochs: 2.5\n", "epochs"), ("lora: 1\n", "lora"), ("lr: fast\n", "lr"),
    ("name: 3\n", "name"), ("splits: seen\n", "splits"), ("env_args: [1]\n", "env_args"), ("epochs: null\n", "epochs"),
    ("epochs: true\n", "epochs"),
])
def test_wrong_types_name_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(QlassError, match=rf"^{re.escape(str(path))}: option '{key}' "):
        load_config(path, Demo)


def test_rejected_values_and_bad_files_name_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "epochs: 0\n")
    with pytest.raises(QlassError, match=rf"^{re.escape(str(path))}: epochs must be >= 1, got 0"):
        load_config(path, Demo)
    with pytest.raises(QlassError, match=r"with --set: epochs must be >= 1"):
        load_config(write(tmp_path, "lr: 0.1\n"), Demo, overrides={"epochs": 0})
    with pytest.raises(DataError, match="invalid YAML"):
        load_config(write(tmp_path, "lr: [1\n"), Demo)
    # one line saying where and what (PyYAML's own message took four or five, quoting the source under carets)
    for text, where in (("lr: [1, 2\nepochs: 3\n", r"line 2, column 7: expected ',' or ']', but got ':' \(while "
                                                     r"parsing a flow sequence at line 1, column 5\)"),
                        ("lr: 1\n\tepochs: 2\n", r"line 2, column 1: found character '\\t' that cannot start")):
        with pytest.raises(DataError) as err:
            load_config(write(tmp_path, text), Demo)
        assert "\n" not in str(err.value) and re.search(rf"invalid YAML: {where}", str(err.value)), str(err.value)
    with pytest.raises(DataError, match="expected a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"), Demo)
    with pytest.raises(DataError, match="file not found"):
        load_config(tmp_path / "missing.yaml", Demo)
    with pytest.raises(QlassError, match="val_fraction must be in"):
        build(SFTConfig, {"val_fraction": 1.5}, "sft.yaml")


def test_sft_defaults_are_the_paper_table5_and_cpu_config_loads() -> None:
    cfg = SFTConfig()
    assert (cfg.batch_size, cfg.epochs, cfg.lr, cfg.warmup_ratio, cfg.weight_decay, cfg.max_length) == \
        (64, 3, 1e-5, 0.03, 0.0, 4096)
    assert all(help_text(SFTConfig).values()), "every option needs a help string"
    cpu = load_config(Path(__file__).parent.parent / "configs" / "sft-cpu.yaml", SFTConfig)
    assert cpu.autocast and cpu.batch_size < cfg.batch_size
    assert "batch_size (default 64): effective batch size" in describe(SFTConfig)
    assert {f.name for f in dataclasses.fields(SFTConfig)} == set(help_text(SFTConfig))


def test_pipeline_config_checks_every_section_before_any_work(tmp_path: Path) -> None:
    """``qlass run`` resolves the whole file first: a bad backend or a bad stage option names the
    file and the field; shipped configs resolve."""
    from qlass.pipeline_config import resolve

    with pytest.raises(QlassError, match=r"p\.yaml: field 'backend' must be one of local, process, ray"):
        resolve({"backend": "threads"}, "p.yaml")
    with pytest.raises(QlassError, match=r"p\.yaml: sft.*micro_bach"):
        resolve({"sft": {"micro_bach": 2}}, "p.yaml")
    with pytest.raises(QlassError, match=r"p\.yaml: eval\.methods: method 'greedy' is listed twice with different "
                                         r"settings \(max_new_tokens"):  # before: refused at stage 4, after 1-3 ran
        resolve({"eval": {"methods": ["greedy", "greedy:max_new_tokens=64"]}}, "p.yaml")
    root = Path(__file__).resolve().parents[1] / "configs"
    from qlass.config import load_extended_yaml

    pipelines = [p for p in sorted(root.glob("*.yaml")) if not p.name.endswith("-cpu.yaml")]  # not stage configs
    assert len(pipelines) >= 7
    for path in pipelines:
        resolve(load_extended_yaml(path), path.name)
    reduced = resolve(load_extended_yaml(root / "limited-supervision-reduced.yaml"), "reduced")
    full = resolve(load_extended_yaml(root / "limited-supervision.yaml"), "full")
    assert reduced.sft.max_trajectories == 20 and full.sft.max_trajectories is None
    assert (reduced.expert, reduced.explore, reduced.eval) == (full.expert, full.explore, full.eval)


def test_run_folder_accepts_older_config_files_but_not_changed_settings(tmp_path: Path) -> None:
    """A finished SFT stage is reused when config.yaml differs only by options added later (at their
    defaults) or runtime options; a changed training setting is refused."""
    import yaml

    from qlass.pipeline_config import resolve, save_resolved

    run = tmp_path / "run"
    data = {"run_dir": str(run), "sft": {"epochs": 1, "lr": 1.0e-4}}
    save_resolved(resolve(data, "p.yaml"))
    (run / "sft").mkdir()
    (run / "sft" / ".qlass-complete").write_text("sft x\n")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["sft"]["gradient_checkpointing"], saved["sft_model"]  # as written by an older qlass
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    save_resolved(resolve({**data, "sft": {**data["sft"], "threads": 1}, "workers": 2}, "p.yaml"))
    with pytest.raises(QlassError, match=r"other settings \(sft\.lr: 0\.0001 → 0\.0002\)"):
        save_resolved(resolve({**data, "sft": {"epochs": 1, "lr": 2.0e-4}}, "p.yaml"))


def test_run_folder_refuses_changed_settings_of_every_stage_with_outputs(tmp_path: Path) -> None:
    """Exploration, Q data and QNet settings are checked once their outputs exist (also when stage 1
    is an existing checkpoint); task limits may grow; a refused run leaves config.yaml as it was."""
    from qlass.pipeline_config import resolve, save_resolved

    run = tmp_path / "run"
    data = {"run_dir": str(run), "sft_model": "sft-a", "explore": {"limit": 4, "candidates": 2},
            "qnet": {"lr": 1.0e-4}}
    save_resolved(resolve(data, "p.yaml"))
    saved = (run / "config.yaml").read_text()
    # nothing done yet: any change is accepted
    save_resolved(resolve({**data, "explore": {"limit": 4, "candidates": 3}}, "p.yaml"))
    save_resolved(resolve(data, "p.yaml"))
    (run / "trees.jsonl").write_text("")
    save_resolved(resolve({**data, "explore": {"limit": 8, "candidates": 2}}, "p.yaml"))
    for changed, message in (({"explore": {"limit": 4, "candidates": 3}}, "explore.candidates: 2 → 3"),
                             ({"sft_model": "sft-b"}, "sft_model: 'sft-a' → 'sft-b'")):
        with pytest.raises(QlassError, match=re.escape(message)):
            save_resolved(resolve({**data, **changed}, "p.yaml"))
    save_resolved(resolve({**data, "qnet": {"lr": 2.0e-5}}, "p.yaml"))  # no QNet yet
    save_resolved(resolve(data, "p.yaml"))
    (run / "qnet").mkdir()
    for changed, message in (({"qnet": {"lr": 2.0e-5}}, "qnet.lr: 0.0001 → 2e-05"),
                             ({"qdata": {"normalize": True}}, "qdata.normalize: False → True")):
        with pytest.raises(QlassError, match=re.escape(message)):
            save_resolved(resolve({**data, **changed}, "p.yaml"))
    assert (run / "config.yaml").read_text() == saved


@pytest.mark.parametrize("section, folder, changed", [
    ("rft", "rft", {"samples": 3}), ("self_train", "self-train", {"prefer_agent": False}),
    ("eto", "eto", {"temperature": 0.9})])
def test_a_retrain_section_left_out_for_a_run_keeps_its_settings_to_compare(tmp_path: Path, section: str,
                                                                             folder: str, changed: dict) -> None:
    """Before: a rerun without the rft/self_train/eto section dropped its settings from config.yaml, so adding
    the section back with other settings was not compared, and the pipeline reused the folder made by the old."""
    import yaml

    from qlass.pipeline_config import resolve, save_resolved

    run = tmp_path / "run"
    data = {"run_dir": str(run), "sft_model": "sft-a", section: {}}
    save_resolved(resolve(data, "p.yaml"))
    (run / folder).mkdir()
    recorded = yaml.safe_load((run / "config.yaml").read_text())[section]
    without = {k: v for k, v in data.items() if k != section}
    save_resolved(resolve(without, "p.yaml"))
    assert yaml.safe_load((run / "config.yaml").read_text())[section] == recorded
    key = next(iter(changed))
    with pytest.raises(QlassError, match=re.escape(f"{section}.{key}: ")):
        save_resolved(resolve({**without, section: changed}, "p.yaml"))
    save_resolved(resolve(data, "p.yaml"))


def test_run_folder_refuses_a_reused_expert_export_of_other_settings_or_unknown_settings(tmp_path: Path) -> None:
    """expert.json is reused once written, so changing the expert settings is refused from then on
    (not only once SFT finished); a run folder holding outputs whose config.yaml is gone or emptied is
    refused rather than resumed under whatever settings come; a missing expert.data is an error, not
    a file to export into."""
    from qlass.pipeline import _expert_and_sft
    from qlass.pipeline_config import resolve, save_resolved

    run = tmp_path / "run"
    data = {"run_dir": str(run), "env": "toy_envs:Corridor"}
    save_resolved(resolve(data, "p.yaml"))
    (run / "expert.json").write_text("[]")
    with pytest.raises(QlassError, match=re.escape("expert.per_task: 10 → 2")):
        save_resolved(resolve({**data, "expert": {"per_task": 2}}, "p.yaml"))
    # the expert trajectories do not depend on the model (before: a changed model or sft_model was refused)
    save_resolved(resolve({**data, "model": str(tmp_path)}, "p.yaml"))
    save_resolved(resolve({**data, "model": str(tmp_path), "sft_model": "sft-a"}, "p.yaml"))
    (run / "sft").mkdir()  # from here the model counts
    for changed, message in (({"model": "default"}, f"model: {str(tmp_path)!r} → 'default'"),
                             ({"sft_model": "sft-b"}, "sft_model: 'sft-a' → 'sft-b'")):
        with pytest.raises(QlassError, match=re.escape(message)):
            save_resolved(resolve({**data, "model": str(tmp_path), "sft_model": "sft-a", **changed}, "p.yaml"))
    (run / "sft").rmdir()
    (run / "config.yaml").write_text("{}\n")
    with pytest.raises(QlassError, match=r"holds expert\.json but .*config\.yaml does not record 'model', 'env'"):
        save_resolved(resolve(data, "p.yaml"))
    (run / "config.yaml").unlink()
    (run / "trees.jsonl").write_text("")
    with pytest.raises(QlassError, match=r"holds trees\.jsonl but .*config\.yaml is missing"):
        save_resolved(resolve(data, "p.yaml"))
    assert not (run / "config.yaml").exists()
    (run / "trees.jsonl").unlink()  # an expert file put in a new run folder by hand is used, not refused
    save_resolved(resolve({**data, "expert": {"data": str(run / "expert.json")}}, "p.yaml"))
    gone = tmp_path / "nowhere" / "expert.json"
    with pytest.raises(QlassError, match=r"expert\.data: .*nowhere/expert\.json not found"):
        _expert_and_sft(resolve({**data, "run_dir": str(tmp_path / "r2"), "expert": {"data": str(gone)}}, "p.yaml"),
                        tmp_path / "base")
    assert not gone.exists()


def test_pipeline_checks_methods_policy_and_env_options_before_any_work() -> None:
    from qlass.pipeline_config import resolve

    with pytest.raises(QlassError, match=r"p\.yaml: eval\.methods: method 'qlass': unknown option\(s\) 'mm'"):
        resolve({"eval": {"methods": ["greedy", "qlass:mm=2"]}}, "p.yaml")
    with pytest.raises(QlassError, match=r"p\.yaml: eval\.methods: method 'best-of-n': option 'n' expects int"):
        resolve({"eval": {"methods": ["best-of-n:n=2.5"]}}, "p.yaml")
    with pytest.raises(QlassError, match=r"p\.yaml: field 'policy': HFPolicy has no option 'autocats'"):
        resolve({"policy": {"autocats": True}}, "p.yaml")
    with pytest.raises(QlassError, match=r"p\.yaml: field 'env_args': environment 'sciworld' has no option 'step_limt' "
                                         r"\(did you mean 'step_limit'\?\)"):
        resolve({"env_args": {"step_limt": 3}}, "p.yaml")
    with pytest.raises(QlassError, match=r"p\.yaml: field 'env_args': unknown environment 'nosuch'"):
        resolve({"env": "nosuch"}, "p.yaml")
    for section, message in (({"eval": {"methods": []}}, "splits and methods must each name at least one"),
                             ({"eval": {"splits": []}}, "splits and methods must each name at least one"),
                             ({"workers": 0}, "field 'workers' must be >= 1, got 0"),
                             # qlass qdata --max-per-tree 0 is no limit; the config's is null, which it did not say
                             ({"qdata": {"max_per_tree": 0}}, "qdata: max_per_tree must be >= 1 (or null: no limit)"),
                             ({"explore": {"concurrency": 0}}, "explore: concurrency must be >= 1, got 0")):
        with pytest.raises(QlassError, match=re.escape(message)):
            resolve(section, "p.yaml")


def test_list_options_document_pipeline_keys_and_method_options() -> None:
    from typer.testing import CliRunner

    from qlass.cli import app

    run = CliRunner().invoke(app, ["run", "--list-options"])
    assert run.exit_code == 0, run.output
    assert "run_dir (default 'runs/qlass')" in run.output
    assert "\nqdata:\n  keep_intermediate (default False)" in run.output
    assert "\nexplore:\n  split (default 'train')" in run.output and "  gamma (default 0.9)" in run.output
    methods = CliRunner().invoke(app, ["eval", "--list-options"])
    assert methods.exit_code == 0, methods.output
    assert "\nqlass: Q-guided stepwise search" in methods.output
    assert "  m (default 2): candidate actions sampled per step" in methods.output
    assert "  select (default 'qnet')" in methods.output


@pytest.mark.parametrize("command, expected", [
    (["sft"], ["lr (default "]),
    (["dpo"], ["beta (default "]),
    (["explore"], ["candidates (default "]),
    (["train-qnet"], ["pair_weight (default "]),
    (["train-qnet-head"], ["l2 (default "]),
    (["decisions", "collect"], ["k (default 4): rollouts per candidate"]),
    (["decisions", "cv-head"], ["l2 (default ", "folds (default "]),
    (["rft"], ["--rft (RFT options):\nsamples (default 4)", "--set / --config (SFTConfig):\n", "lr (default "]),
    (["eto"], ["--eto (ETO options):\niterations (default 1)", "--set / --config (DPOConfig):\n", "beta (default "]),
    (["self-train"], ["lr (default "]),
    (["paraphrase"], ["samples (default 4)", "temperature (default 0.9)"]),
])
def test_every_command_with_set_options_lists_them(command: list[str], expected: list[str]) -> None:
    """What the README promises: every command that takes `--set` (a config section) lists its keys
    with `--list-options`, without its other required arguments."""
    from typer.testing import CliRunner

    from qlass.cli import app

    assert "--set" in CliRunner().invoke(app, [*command, "--help"], terminal_width=200).output
    result = CliRunner().invoke(app, [*command, "--list-options"])
    assert result.exit_code == 0, result.output
    for text in expected:
        assert text in result.output, (text, result.output)


def test_extends_merges_sections_and_refuses_cycles(tmp_path: Path) -> None:
    from qlass.config import load_extended_yaml

    (tmp_path / "base.yaml").write_text("run_dir: runs/full\nseed: 0\nsft: {epochs: 2, lr: 1.0e-4}\n"
                                        "eval: {methods: [greedy, 'qlass:m=2']}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "limited.yaml").write_text("extends: ../base.yaml\nrun_dir: runs/limited\n"
                                                   "sft: {max_trajectories: 0.5}\neval: {methods: [greedy]}\n")
    data = load_extended_yaml(tmp_path / "sub" / "limited.yaml")
    assert data == {"run_dir": "runs/limited", "seed": 0, "sft": {"epochs": 2, "lr": 1.0e-4, "max_trajectories": 0.5},
                    "eval": {"methods": ["greedy"]}}  # sections merged key by key, lists replaced
    (tmp_path / "base.yaml").write_text("extends: sub/limited.yaml\nseed: 1\n")
    with pytest.raises(DataError, match="already in the chain"):
        load_extended_yaml(tmp_path / "sub" / "limited.yaml")
    (tmp_path / "base.yaml").write_text("extends: 3\n")
    with pytest.raises(DataError, match="field 'extends' must be the name of a YAML file"):
        load_extended_yaml(tmp_path / "base.yaml")


def test_float_options_must_be_finite_also_inside_lists() -> None:
    """NaN passes every `x <= 0` range check, so non-finite floats are refused where options are built."""
    from qlass.config import build, parse_kv
    from qlass.qnet_head import QNetHeadConfig
    from qlass.training.configs import SFTConfig

    with pytest.raises(QlassError, match=r"c\.yaml: option 'grad_clip' must be a finite number, got nan"):
        build(SFTConfig, {"grad_clip": float("nan")}, "c.yaml")
    with pytest.raises(QlassError, match=r"--set: option 'l2\[1\]' must be a finite number, got inf"):
        build(QNetHeadConfig, parse_kv(["l2=[1, .inf]"], "--set"), "--set")
    with pytest.raises(QlassError, match=r"option 'contrast\[0\]' expects bool, got 'yes'"):
        build(QNetHeadConfig, {"contrast": ["yes"]}, "c.yaml")
    assert build(QNetHeadConfig, {"l2": [1, 2.5]}, "c.yaml").l2 == [1.0, 2.5]


def test_bracketed_words_in_option_help_are_shown() -> None:
    """The help is rendered with rich markup, where ``[word]`` is a style tag and vanishes unless
    escaped: every bracketed word of every option's help must reach ``--help``."""
    from typer.main import get_command
    from typer.testing import CliRunner

    from qlass.cli import app

    def commands(cmd: Any, path: list[str]):  # typer's own (vendored) click command classes
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                yield from commands(sub, [*path, name])
        else:
            yield path, cmd

    shown = 0
    for path, cmd in commands(get_command(app), []):
        for param in cmd.params:
            for word in re.findall(r"\[[a-z_]+\]", (getattr(param, "help", None) or "").replace("\\[", "[")):
                out = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "400"}).output
                assert word in out, f"qlass {' '.join(path)} --help lost {word}"
                shown += 1
    assert shown >= 1  # eval's --oracle-terminal: "rows labelled [oracle]"


def _alias_bomb(levels: int) -> str:
    """A YAML flow list whose aliases expand to 10 ** levels values (a few hundred bytes of text)."""
    rows = ["&l0 [" + ", ".join(["1"] * 10) + "]"]
    rows += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "[" + ", ".join(rows) + "]"


def test_an_alias_bomb_is_refused_and_values_in_messages_are_bounded(tmp_path: Path) -> None:
    """A config whose aliases expand to millions of values was printed whole in the type error: 254 MB of
    message (1 GB of memory) for 8 levels, one level more exhausts memory."""
    from qlass.config import parse_kv

    path = write(tmp_path, f"epochs: {_alias_bomb(6)}\n")
    with pytest.raises(DataError, match="cfg.yaml: holds more than 100000 values once its aliases") as err:
        load_config(path, Demo)
    assert len(str(err.value)) < 300
    with pytest.raises(QlassError, match="'epochs' holds more than 100000 values") as err:
        parse_kv([f"epochs={_alias_bomb(6)}"], "--set")
    listed = write(tmp_path, "epochs: [" + ", ".join(map(str, range(5000))) + "]\n")
    with pytest.raises(QlassError, match=r"option 'epochs' expects int, got \[0, 1, 2, 3, 4, 5, 6, 7, \.\.\.\] "
                                         r"\(list\)"):
        load_config(listed, Demo)


def test_an_integer_too_large_for_a_number_is_named_in_yaml_and_overrides(tmp_path: Path) -> None:
    """5000 digits were a ValueError traceback from Python's int conversion (a YAML file, --set, --method)."""
    from qlass.config import load_yaml, parse_kv

    digits = "9" * 5000
    path = tmp_path / "c.yaml"
    path.write_text(f"epochs: 1\nmax_steps: {digits}\n")
    with pytest.raises(DataError, match=r"c\.yaml: invalid YAML: line 2, column 12: an integer of 5000 characters is "
                                        r"too large for a number"):
        load_yaml(path)
    with pytest.raises(QlassError, match=r"--set: the value of 'max_steps' is not a valid YAML scalar \(an integer "
                                         r"of 5000 characters"):
        parse_kv([f"max_steps={digits}"], "--set")
    big = "9" * 300
    path.write_text(f"seed: {big}\nhex: 0x1f\n")
    assert load_yaml(path) == {"seed": int(big), "hex": 31}
    assert parse_kv([f"seed=-{big}", "n=1_000"], "--set") == {"seed": -int(big), "n": 1000}


def test_pipeline_policy_seed_option_is_used_by_exploration(tiny_model_dir: Path, tmp_path: Path) -> None:
    """``policy: {seed: N}`` (an option of the local policy, which evaluation passes on) also reaches
    exploration; before: a TypeError traceback, as exploration passed the run seed beside it."""
    import yaml

    from qlass.pipeline import run_pipeline

    run = tmp_path / "run"
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({
        "run_dir": str(run), "sft_model": str(tiny_model_dir), "env": "toy_envs:Corridor", "policy": {"seed": 3},
        "explore": {"limit": 1, "max_new_tokens": 4, "max_depth": 1, "max_nodes": 3}}))
    assert run_pipeline(path, stop_after="explore") is None
    assert yaml.safe_load((run / "trees.config.yaml").read_text())["policy"]["seed"] == 3


def test_run_folder_refuses_more_exploration_tasks_once_the_trees_trained_a_qnet(tiny_model_dir: Path,
                                                                                  tmp_path: Path) -> None:
    """explore.limit may grow while only trees exist; once a QNet was trained on them, more trees would
    replace its Q data and have stage 3 refuse the folder in every later rerun (before: the extra trees
    were explored, qdata.jsonl overwritten, then train_qnet refused, even with the limit set back)."""
    import yaml

    from qlass.pipeline import run_pipeline

    run = tmp_path / "run"
    path = tmp_path / "p.yaml"
    config = {"run_dir": str(run), "sft_model": str(tiny_model_dir), "env": "toy_envs:Corridor",
              "explore": {"limit": 1, "max_new_tokens": 4, "max_depth": 1, "max_nodes": 3},
              "qnet": {"epochs": 1, "batch_size": 2, "val_fraction": 0.0, "max_length": 512}}
    path.write_text(yaml.safe_dump(config))
    assert run_pipeline(path, stop_after="qnet") is None
    trees, qdata = (run / "trees.jsonl").read_bytes(), (run / "qdata.jsonl").read_bytes()
    saved = (run / "config.yaml").read_bytes()
    path.write_text(yaml.safe_dump({**config, "explore": {**config["explore"], "limit": 2}}))
    with pytest.raises(QlassError, match=r"p\.yaml: explore: 1 task\(s\) without a tree \(first: 'corridor/1'\).*"
                                         r"QNet in .*qnet was trained on"):
        run_pipeline(path, stop_after="qnet")
    assert (run / "trees.jsonl").read_bytes() == trees and (run / "qdata.jsonl").read_bytes() == qdata
    assert (run / "config.yaml").read_bytes() == saved  # refused before it was rewritten with limit 2
    path.write_text(yaml.safe_dump(config))
    assert run_pipeline(path, stop_after="qnet") is None
    # a smaller limit: the Q data is every tree of the file, so the QNet trained on trees the config left out
    config = {**config, "run_dir": str(tmp_path / "run2"), "explore": {**config["explore"], "limit": 2}}
    path.write_text(yaml.safe_dump(config))
    assert run_pipeline(path, stop_after="explore") is None
    path.write_text(yaml.safe_dump({**config, "explore": {**config["explore"], "limit": 1}}))
    with pytest.raises(QlassError, match=r"p\.yaml: explore: .*trees\.jsonl holds 1 tree\(s\) of tasks this selection "
                                         r"leaves out \(first: 'corridor/1'\)"):
        run_pipeline(path, stop_after="qnet")
    assert not (tmp_path / "run2" / "qnet").exists()
    assert yaml.safe_load((tmp_path / "run2" / "config.yaml").read_text())["explore"]["limit"] == 2


def test_pipeline_refuses_a_qnet_action_budget_that_fills_its_input_before_any_work() -> None:
    """max_action_tokens must leave room in max_length (QNet refuses otherwise); before: accepted by the
    config and refused at stage 3, after SFT and exploration ran."""
    from qlass.pipeline_config import resolve

    with pytest.raises(QlassError, match=re.escape("p.yaml: qnet: max_action_tokens must be >= 1 and below "
                                                   "max_length, got 256 and 256")):
        resolve({"qnet": {"max_length": 256}}, "p.yaml")
    resolve({"qnet": {"max_length": 257}}, "p.yaml")


def test_pipeline_names_the_key_of_a_run_dir_file_an_expert_folder_and_a_missing_paraphrase_cache(
        tmp_path: Path) -> None:
    """Each was refused only by the stage reading it, without the config file or key (a run_dir that is a
    file, expert.data a folder: at stage 1b; explore.paraphrase: named the cache alone)."""
    from qlass.pipeline_config import resolve

    (tmp_path / "file").write_text("x")
    for config, message in (({"run_dir": str(tmp_path / "file")}, "field 'run_dir': .*file is a file, not a folder"),
                            ({"expert": {"data": str(tmp_path)}}, "field 'expert.data': .* is a folder, not a"),
                            ({"explore": {"paraphrase": str(tmp_path / "none.jsonl")}},
                             r"explore\.paraphrase: .*none\.jsonl: paraphrase cache not found")):
        with pytest.raises(QlassError, match=rf"^p\.yaml: {message}"):
            resolve(config, "p.yaml")


def test_pipeline_refuses_an_evaluation_paraphrase_cache_without_its_tasks_before_any_work(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    """Before: found at stage 4, after SFT, exploration and the QNet."""
    import yaml
    from test_paraphrase import cache_for
    from toy_envs import Corridor

    from qlass.pipeline import run_pipeline

    cache = cache_for(tmp_path, Corridor().tasks("seen")[:1])
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"), "sft_model": str(tiny_model_dir), "env": "toy_envs:Corridor",
        "explore": {"limit": 1, "max_new_tokens": 4, "max_depth": 1, "max_nodes": 3},
        "eval": {"limit": 2, "methods": [f"qlass:m=2,select=random,paraphrase={cache}"]}}))
    with pytest.raises(QlassError, match=r"p\.yaml: field 'eval\.methods': .*para\.jsonl: no paraphrase of 1 task"):
        run_pipeline(path)
    assert not (tmp_path / "run" / "trees.jsonl").exists()


@pytest.mark.parametrize("run_dir", ["", "  "])
def test_pipeline_refuses_an_empty_run_dir(run_dir: str) -> None:
    """Before: ``run_dir: ""`` (an unset template value, say) made the working directory the run folder."""
    from qlass.pipeline_config import resolve

    with pytest.raises(QlassError, match=re.escape(f"p.yaml: field 'run_dir' must name a folder, got {run_dir!r}")):
        resolve({"run_dir": run_dir}, "p.yaml")


@pytest.mark.parametrize("section", ["rft", "eto", "self_train"])
def test_pipeline_with_sft_model_needs_the_retrained_agents_expert_data_before_any_work(
        section: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    """With sft_model, no stage exports expert data; the RFT, ETO and self-training sections read it after the
    evaluation (before: a missing file was found only then, after exploration, QNet and evaluation ran)."""
    import yaml

    from qlass.pipeline import run_pipeline

    run = tmp_path / "run"
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({
        "run_dir": str(run), "sft_model": str(tiny_model_dir), "env": "toy_envs:Corridor", section: {},
        "explore": {"limit": 1, "max_new_tokens": 4, "max_depth": 1, "max_nodes": 3},
        "eval": {"limit": 1, "max_steps": 1, "methods": ["greedy:max_new_tokens=4"]}}))
    with pytest.raises(QlassError, match=rf"p\.yaml: {section}: no expert data at .*expert\.json"):
        run_pipeline(path)
    assert not (run / "trees.jsonl").exists()


@pytest.mark.parametrize("section", ["rft", "eto", "self_train"])
def test_retrained_agents_need_a_greedy_method_whose_settings_they_are_evaluated_with(section: str) -> None:
    """The RFT, ETO and self-trained agents are evaluated greedily with the settings of eval.methods' greedy
    entry; with none, they were evaluated with greedy's defaults (max_new_tokens 128) beside methods run at
    another limit, in one table. Such a config is refused before any work."""
    from qlass.pipeline_config import resolve

    data = {"run_dir": "r", "env": "toy_envs:Corridor", section: {},
            "eval": {"methods": ["qlass:m=2,max_new_tokens=48", "best-of-n:n=2,max_new_tokens=48"]}}
    with pytest.raises(QlassError, match=rf"p\.yaml: the {section} agents are evaluated with eval\.methods' greedy "
                                         r"settings, and they list no greedy method"):
        resolve(data, "p.yaml")
    data["eval"]["methods"].append("greedy:max_new_tokens=48")
    assert resolve(data, "p.yaml").eval_methods()[-1] == ("greedy", {"max_new_tokens": 48})


def test_pipeline_refuses_changed_evaluation_methods_before_rewriting_its_config(tiny_model_dir: Path,
                                                                                 tmp_path: Path) -> None:
    """A rerun whose eval.max_steps the evaluation's records refuse was refused at stage 4, after config.yaml was
    rewritten with settings no output was made with. It is now refused first, and config.yaml is kept."""
    import yaml

    from qlass.pipeline import run_pipeline

    run = tmp_path / "run"
    path = tmp_path / "p.yaml"
    config = {"run_dir": str(run), "sft_model": str(tiny_model_dir), "env": "toy_envs:Corridor",
              "policy": {"threads": 1}, "eval": {"limit": 1, "max_steps": 1, "methods": ["greedy:max_new_tokens=4"]}}
    path.write_text(yaml.safe_dump(config))
    rows = run_pipeline(path)
    assert [r["method"] for r in rows] == ["greedy"] and not (run / "trees.jsonl").exists()
    saved = (run / "config.yaml").read_text()
    path.write_text(yaml.safe_dump({**config, "eval": {**config["eval"], "max_steps": 2}}))
    refused = (r"p\.yaml: field 'eval': .*records\.jsonl: line 1 \(method 'greedy', task 'corridor/100'\): field "
               r"'config' differs from this run's \(max_steps: 1 → 2\); set eval back, or use a new run_dir")
    with pytest.raises(QlassError, match=refused):
        run_pipeline(path)
    assert (run / "config.yaml").read_text() == saved


def test_extends_errors_name_the_extending_file_and_a_bad_value_names_the_bases(tmp_path: Path) -> None:
    """Before: a missing base was "base.yaml: file not found" (which file's extends?), and a bad value set in a
    base was reported against the extending file alone, which does not hold it."""
    from qlass.config import load_extended_yaml
    from qlass.pipeline import run_pipeline

    top = tmp_path / "top.yaml"
    top.write_text("extends: nosuch.yaml\nseed: 1\n")
    with pytest.raises(DataError, match=r"top\.yaml: field 'extends': nosuch\.yaml \(.*nosuch\.yaml\) not found"):
        load_extended_yaml(top)
    (tmp_path / "nosuch.yaml").mkdir()
    with pytest.raises(DataError, match=r"top\.yaml: field 'extends': nosuch\.yaml \(.*\) is a folder"):
        load_extended_yaml(top)
    (tmp_path / "base.yaml").write_text("run_dir: [1]\n")
    top.write_text("extends: base.yaml\nseed: 1\n")
    with pytest.raises(QlassError, match=r"top\.yaml \(extending .*base\.yaml\): option 'run_dir' expects str"):
        run_pipeline(top)


@pytest.mark.parametrize("section, where", [
    ({"qnet": {"report_to": "bogus"}}, "qnet"),
    ({"rft": {"sft": {"report_to": "bogus"}}}, "rft.sft"),
    ({"self_train": {"sft": {"report_to": "bogus"}}}, "self_train.sft"),
    ({"eto": {"dpo": {"report_to": "bogus"}}}, "eto.dpo"),
    ({"eto": {"later_dpo": {"report_to": "bogus"}}}, "eto.later_dpo"),  # rounds 2 on: after round 1 ran
])
def test_pipeline_checks_every_trainers_report_to_before_any_work(section: dict, where: str) -> None:
    """Before: a trainer's report_to was checked when that trainer started (stage 3 or after the evaluation),
    with a message naming neither the file nor the section."""
    from qlass.pipeline_config import resolve

    with pytest.raises(QlassError, match=re.escape(f"p.yaml: {where}: report_to: unknown integration 'bogus'")):
        resolve(section, "p.yaml")


def test_report_to_lists_with_none_all_or_an_empty_name_are_refused_before_transformers_loads() -> None:
    """Before: ``none,tensorboard`` or ``tensorboard,`` imported transformers (and torch, about 4.5 s) first."""
    import subprocess
    import sys

    code = ("import sys\nfrom qlass.errors import QlassError\nfrom qlass.training.configs import check_report_to\n"
            "for bad in ('none,tensorboard', 'tensorboard,all', 'tensorboard,'):\n"
            "    try:\n        check_report_to(bad)\n    except QlassError as err:\n        print(err)\n"
            "print('transformers' in sys.modules, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["report_to: 'none' stands alone, not in a list ('none,tensorboard')",
                   "report_to: 'all' stands alone, not in a list ('tensorboard,all')",
                   "report_to: an empty name in 'tensorboard,'", "False False"]


def test_pipeline_task_types_that_select_no_task_are_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    """``task_types: []`` selects nothing (null selects all) and is refused before any work; types the
    environment has no task of are named as such (before: "no expert trajectory could be verified")."""
    import yaml

    from qlass.pipeline import run_pipeline
    from qlass.pipeline_config import resolve

    with pytest.raises(QlassError, match=re.escape("p.yaml: field 'task_types' must name at least one task type "
                                                   "(null: all of them)")):
        resolve({"task_types": []}, "p.yaml")
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "env": "toy_envs:Corridor",
                                    "model": str(tiny_model_dir), "task_types": ["wlak"]}))
    with pytest.raises(QlassError, match=re.escape("p.yaml: field 'expert.split': toy_envs:Corridor has no task in "
                                                   "split 'train' of the task types ['wlak']")):
        run_pipeline(path)
    assert not (tmp_path / "run" / "expert.json").exists()


MIXED_ENV = """from toy_envs import Corridor
from qlass.types import Task


class Mixed(Corridor):
    def splits(self):
        return {"train": 2, "seen": 2, "unseen": 2}

    def tasks(self, split, task_types=None):
        kind = "run" if split == "unseen" else "walk"
        return [Task(f"{split}/{i}", "mixed", split, kind, {"length": 1}) for i in range(2)]
"""


def test_pipeline_refuses_an_evaluation_split_without_tasks_of_the_types_before_any_work(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: an eval split with no task of the run's task types was found by the evaluation, at stage 4, after
    SFT, exploration and the QNet had run."""
    import yaml

    from qlass.pipeline import run_pipeline

    (tmp_path / "mixed_env.py").write_text(MIXED_ENV)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"), "env": "mixed_env:Mixed", "sft_model": str(tiny_model_dir),
        "task_types": ["walk"], "explore": {"limit": 1, "max_new_tokens": 4, "max_depth": 1, "max_nodes": 3},
        "eval": {"splits": ["seen", "unseen"], "limit": 1, "max_steps": 1, "methods": ["greedy:max_new_tokens=4"]}}))
    with pytest.raises(QlassError, match=re.escape("p.yaml: field 'eval.splits': mixed_env:Mixed has no task in "
                                                   "split 'unseen' of the task types ['walk']")):
        run_pipeline(path)
    assert not (tmp_path / "run" / "trees.jsonl").exists()


@pytest.mark.parametrize("server", ["localhost:8000/v1", "runs/sft", "ftp://127.0.0.1:9/v1", ""])
def test_pipeline_policy_server_must_be_a_server_url(server: str) -> None:
    """Before: a URL without its scheme passed as a model folder, so after SFT exploration failed with
    "HFPolicy has no option 'tokenizer'"."""
    from qlass.pipeline_config import resolve

    with pytest.raises(QlassError, match=re.escape(f"p.yaml: field 'policy_server' must be the http(s)://host:port/v1 "
                                                   f"URL of an OpenAI-compatible server, got {server!r}")):
        resolve({"policy_server": server}, "p.yaml")
    resolve({"policy_server": "HTTPS://example.org/v1"}, "p.yaml")


def test_pipeline_refuses_a_missing_base_model_before_exporting_expert_data(tmp_path: Path) -> None:
    """Before: the expert trajectories were exported first (minutes in ScienceWorld) and the run folder, now
    holding them, then refused the corrected model as a changed setting."""
    import yaml

    from qlass.pipeline import run_pipeline

    run = tmp_path / "run"
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(run), "env": "toy_envs:Corridor", "model": "/nonexistent/model"}))
    with pytest.raises(QlassError, match=re.escape("p.yaml: field 'model': /nonexistent/model is not a model folder "
                                                   "(no config.json)")):
        run_pipeline(path)
    assert not (run / "expert.json").exists()
    assert not run.exists()  # nor a config.yaml recording the missing model
    path.write_text(yaml.safe_dump({"run_dir": str(run), "env": "toy_envs:Corridor", "sft_model": str(tmp_path)}))
    with pytest.raises(QlassError, match="p.yaml: field 'sft_model': .* is not a model folder"):
        run_pipeline(path)
    assert not run.exists()


@pytest.mark.parametrize("policy, server, expected", [
    ({"dtype": "bogus"}, None, "unknown dtype 'bogus'; use one of float32, bfloat16, float16"),
    ({"cache_slots": -5}, None, "policy option cache_slots must be >= 0, got -5"),  # before: accepted silently
    ({"max_length": 0}, None, "policy option max_length must be >= 1, got 0"),
    ({"device": "gpu"}, None, "unknown torch device 'gpu'"),
    ({"top_p": 0.0}, None, "policy option top_p must be in (0, 1], got 0.0"),
    ({"endpoint": "responses"}, "http://127.0.0.1:9/v1", "unknown endpoint 'responses'"),
    ({"concurrency": 0}, "http://127.0.0.1:9/v1", "policy option concurrency must be >= 1, got 0"),
    ({"timeout": 0}, "http://127.0.0.1:9/v1", "policy option timeout must be > 0, got 0"),
])
def test_pipeline_checks_policy_values_before_any_work(policy: dict, server: str | None, expected: str) -> None:
    """Before: a policy value out of range was found when exploration loaded the policy, after SFT (at stage 2,
    naming neither the file nor 'policy'), or never (cache_slots: -5, concurrency: 0 were taken)."""
    from qlass.pipeline_config import resolve

    with pytest.raises(QlassError, match=re.escape(f"p.yaml: field 'policy': {expected}")):
        resolve({"policy": policy, "policy_server": server}, "p.yaml")


def test_pipeline_refuses_a_gpu_this_machine_lacks_unless_ray_may_place_the_workers() -> None:
    """Before: policy.device cuda on a machine without a GPU passed the up-front check (a name torch knows) and
    failed when exploration loaded the policy, after SFT. A Ray actor may run on another machine, where it is."""
    import torch

    from qlass.pipeline_config import resolve

    config = {"policy": {"device": "cuda"}}
    if torch.cuda.is_available():  # the machine has one: nothing to refuse
        assert resolve(config, "p.yaml").cfg.policy == {"device": "cuda"}
    else:
        with pytest.raises(QlassError, match=re.escape("p.yaml: field 'policy': device 'cuda' asked for, but torch "
                                                       "sees no CUDA GPU")):
            resolve(config, "p.yaml")
    assert resolve({**config, "backend": "ray"}, "p.yaml").cfg.backend == "ray"
    # the trainers run here whatever the backend: before, qnet.device cuda failed at stage 3
    for section, where in (({"qnet": {"device": "cuda"}}, "qnet"), ({"eto": {"dpo": {"device": "cuda"}}}, "eto.dpo"),
                           ({"rft": {"sft": {"device": "cuda"}}}, "rft.sft")):
        if not torch.cuda.is_available():
            with pytest.raises(QlassError, match=re.escape(f"p.yaml: field '{where}.device': device 'cuda' asked")):
                resolve({**section, "backend": "ray"}, "p.yaml")


def test_pipeline_with_sft_model_does_not_call_the_sft_section_ignored_when_eto_reads_its_subset(
        tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """ETO's pairs read the expert subset SFT saw (sft.max_trajectories, sft.seed). Before: with sft_model the
    run warned "section(s) sft ignored" although those two options chose ETO's expert data."""
    import logging

    import yaml

    from qlass.pipeline import run_pipeline

    expert = tmp_path / "expert.json"
    expert.write_text("[]")
    config = {"run_dir": str(tmp_path / "run"), "sft_model": str(tiny_model_dir), "env": "toy_envs:Corridor",
              "expert": {"data": str(expert)}, "eto": {}, "sft": {"max_trajectories": 2}}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(config))
    with caplog.at_level(logging.WARNING, logger="qlass"):
        run_pipeline(path, stop_after="sft")
    assert "ignored" not in caplog.text
    config["sft"] = {"epochs": 2}  # read by nothing here
    config["run_dir"] = str(tmp_path / "run2")
    path.write_text(yaml.safe_dump(config))
    with caplog.at_level(logging.WARNING, logger="qlass"):
        run_pipeline(path, stop_after="sft")
    assert "section(s) sft ignored: sft_model is set" in caplog.text
    caplog.clear()  # exploration leaving out the expert data's tasks reads it: the expert section is not ignored
    del config["eto"], config["sft"]
    config.update(run_dir=str(tmp_path / "run3"), explore={"exclude_expert": True})
    path.write_text(yaml.safe_dump(config))
    with caplog.at_level(logging.WARNING, logger="qlass"):
        run_pipeline(path, stop_after="sft")
    assert "ignored" not in caplog.text


@pytest.mark.parametrize("recorded", [
    {"qnet": {"max_length": 256}},  # before this qlass: refused by the QNet at stage 3
    {"qnet": {"report_to": "bogus"}},  # refused by the trainer at stage 3
    {"policy": {"cache_slots": -5, "max_batch_rows": 0}},  # taken by exploration (runtime options)
])
def test_run_folder_of_an_older_qlass_resumes_once_a_value_now_refused_is_corrected(recorded: dict,
                                                                                     tmp_path: Path) -> None:
    """config.yaml is read back only to compare settings: a value an older qlass recorded (and the new checks
    before any work refuse) does not block the corrected config. Before: 'config.yaml: qnet: max_action_tokens
    must be ...' although the run's YAML no longer held it, and SFT and exploration had to be redone."""
    import yaml

    from qlass.pipeline_config import resolve, save_resolved

    run = tmp_path / "run"
    data = {"run_dir": str(run), "sft_model": "sft-a", "explore": {"limit": 2}}
    save_resolved(resolve(data, "p.yaml"))
    (run / "trees.jsonl").write_text("")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    for section, values in recorded.items():
        saved[section].update(values)  # as an older qlass wrote it
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    save_resolved(resolve(data, "p.yaml"))
    with pytest.raises(QlassError, match=re.escape("explore.max_depth: None → 2")):  # a change is named
        save_resolved(resolve({**data, "explore": {"limit": 2, "max_depth": 2}}, "p.yaml"))


def test_policy_values_written_as_yaml_strings_are_checked_as_numbers(tiny_model_dir: Path) -> None:
    """YAML reads ``min_p: 1e-3`` (no dot) as a string, which the option check takes for a float option and
    converts; the range checks and the backend got the string. Before: a TypeError traceback ('<=' between
    int and str) from the pipeline's check, or from the policy's constructor."""
    from qlass.config import parse_kv
    from qlass.pipeline_config import resolve
    from qlass.policy import load_policy

    options = parse_kv(["min_p=1e-3", "top_p=95e-2"], "--policy-arg")
    assert options == {"min_p": "1e-3", "top_p": "95e-2"}
    resolve({"policy": options}, "p.yaml")
    resolve({"policy": {"timeout": "1e3"}, "policy_server": "http://127.0.0.1:9/v1"}, "p.yaml")
    with pytest.raises(QlassError, match=re.escape("p.yaml: field 'policy': policy option top_p must be in (0, 1], "
                                                   "got 2.0")):
        resolve({"policy": {"top_p": "2e0"}}, "p.yaml")
    policy = load_policy(str(tiny_model_dir), **options)
    assert (policy.min_p, policy.top_p) == (0.001, 0.95)


def test_policy_values_given_in_python_refuse_booleans_for_counts() -> None:
    """The YAML and command-line paths check types first; a policy built in Python does not. Before: True passed
    as a count (cache_slots=True was one slot)."""
    from qlass.policy.option_values import check_hf_options, check_openai_options

    with pytest.raises(QlassError, match="policy option cache_slots must be >= 0, got True"):
        check_hf_options({"cache_slots": True})
    with pytest.raises(QlassError, match="policy option concurrency must be >= 1, got False"):
        check_openai_options({"concurrency": False})


@pytest.mark.parametrize("make,error,message", [
    (lambda: ExploreConfig(temperature=float("nan")), ValueError, "ExploreConfig: option 'temperature' must be finite"),
    (lambda: ExploreConfig(candidates="2"), TypeError, "ExploreConfig: option 'candidates' expects int, got '2'"),
    (lambda: ExploreConfig(max_depth=2.5), TypeError, "option 'max_depth' expects int"),
    (lambda: ExploreConfig(expert_graft="no"), TypeError, "option 'expert_graft' expects bool"),
    (lambda: DecisionConfig(temperature=float("nan")), ValueError, "DecisionConfig: option 'temperature'"),
    (lambda: DecisionConfig(k=True), TypeError, "DecisionConfig: option 'k' expects int, got True"),
    (lambda: QlassConfig(margin=float("inf")), ValueError, "QlassConfig: option 'margin' must be finite"),
    (lambda: QlassConfig(beta=float("nan")), ValueError, "option 'beta'"),
    (lambda: QlassConfig(m=2.0), TypeError, "QlassConfig: option 'm' expects int"),
    (lambda: BestOfNConfig(n=2.5), TypeError, "BestOfNConfig: option 'n' expects int"),
    (lambda: SampleConfig(temperature=float("nan")), ValueError, "SampleConfig: option 'temperature'"),
    (lambda: GreedyConfig(max_steps=True), TypeError, "GreedyConfig: option 'max_steps' expects int"),
    (lambda: SFTConfig(lr=float("nan")), ValueError, "SFTConfig: option 'lr' must be finite"),
    (lambda: SFTConfig(lr="1e-5"), TypeError, "SFTConfig: option 'lr' expects float"),
    (lambda: SFTConfig(batch_size=True), TypeError, "option 'batch_size' expects int"),
    (lambda: QNetTrainConfig(pair_weight=float("nan")), ValueError, "QNetTrainConfig: option 'pair_weight'"),
    (lambda: QNetTrainConfig(max_steps=None, epochs=None), TypeError, "option 'epochs' may not be null"),
])
def test_configs_made_in_python_are_checked_like_yaml(make: Any, error: type, message: str) -> None:
    """build() checks types and finiteness; a config made in Python skipped them: NaN passed every range check
    (nan < 0 is false), True and 2.5 passed as counts, and "2" was a TypeError naming no option."""
    with pytest.raises(error, match=re.escape(message).replace("must\\ be\\ finite", "must be a finite number")):
        make()


@pytest.mark.parametrize("make,error,message", [
    (lambda: _cfg("qlass.rft", "RFTConfig", temperature=float("nan")), ValueError, "RFTConfig: option 'temperature'"),
    (lambda: _cfg("qlass.rft", "RFTConfig", samples=True), TypeError, "RFTConfig: option 'samples' expects int"),
    (lambda: _cfg("qlass.eto_config", "ETOConfig", min_reward=float("nan")), ValueError, "ETOConfig: option 'min_r"),
    (lambda: _cfg("qlass.self_train", "SelfTrainConfig", prefer_agent="no"), TypeError, "option 'prefer_agent' expe"),
    (lambda: _cfg("qlass.tree", "BackupConfig", keep_intermediate="yes"), TypeError, "BackupConfig: option 'keep_"),
    (lambda: _cfg("qlass.tree", "BackupConfig", gamma=float("nan")), ValueError, "BackupConfig: option 'gamma'"),
    (lambda: _cfg("qlass.paraphrase", "ParaphraseConfig", samples=2.5), TypeError, "option 'samples' expects int"),
    (lambda: _cfg("qlass.reflexion", "ReflexionConfig", success=float("nan")), ValueError, "option 'success'"),
    (lambda: _cfg("qlass.qnet_head", "QNetHeadConfig", l2=[1.0, float("nan")]), TypeError, "option 'l2[1]' must be"),
    (lambda: _cfg("qlass.decision_report", "ReportConfig", resamples=True), TypeError, "option 'resamples' expects"),
])
def test_the_other_configs_made_in_python_are_checked_like_yaml(make: Any, error: type, message: str) -> None:
    """The configs the first round left out. Before: NaN passed their range checks (nan < 0 is false), a string
    was taken for a bool (keep_intermediate='yes' is truthy) and True for a count."""
    with pytest.raises(error, match=re.escape(message)):
        make()


def _cfg(module: str, name: str, **options: Any) -> Any:
    import importlib

    return getattr(importlib.import_module(module), name)(**options)


def test_version_is_the_packages_and_printed_without_loading_torch() -> None:
    script = ("import sys\nsys.argv = ['qlass', '--version']\nfrom qlass.cli import main\ntry:\n    main()\n"
              "except SystemExit as done:\n    print('exit', done.code, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"$', pyproject, re.M).group(1)  # type: ignore[union-attr]
    assert done.stdout.splitlines() == [f"qlass {version}", "exit 0 False"], done.stderr[-3000:]
