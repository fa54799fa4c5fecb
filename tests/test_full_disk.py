"""Training and exporting onto a full or read-only disk (a real tmpfs): one clear error naming the output, then a
rerun resumes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_jsonl import tmpfs
from test_sft import write_data
from transformers import AutoModelForCausalLM


@pytest.mark.parametrize("size", ["4m", "20m"])
def test_sft_on_a_full_disk_names_its_folder_and_a_rerun_after_freeing_space_finishes(
        tiny_model_dir: Path, tmp_path: Path, size: str) -> None:
    """``qlass sft --out`` on a full disk ended in a 70-line traceback: safetensors (the weights, 4 MiB: they need
    13) and torch.save (the optimizer state, 20 MiB) report a failed write as ``SafetensorError('... No space left
    on device')`` or ``RuntimeError('basic_ios::clear: iostream error')``, naming no file."""
    data = write_data(tmp_path / "data.json", n=4)
    with tmpfs(tmp_path / "disk", f"size={size}") as disk:
        out = disk / "sft"
        cmd = [sys.executable, "-m", "qlass", "sft", "--data", str(data), "--model", str(tiny_model_dir), "--out",
               str(out), "--set", "epochs=1", "--set", "batch_size=2", "--set", "val_fraction=0", "--set", "threads=1"]
        full = subprocess.run(cmd, capture_output=True, text=True, check=False)
        assert full.returncode == 2, full.stderr[-3000:]
        assert f"error: {out}: writing the model or a checkpoint failed (" in full.stderr
        assert "free space and rerun the same command to resume" in full.stderr and "Traceback" not in full.stderr
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        AutoModelForCausalLM.from_pretrained(out)


def test_the_default_model_made_into_a_full_cache_names_the_cache(tmp_path: Path) -> None:
    """The first ``qlass model default`` (or any command given ``--model default``) with ``QLASS_CACHE`` on a disk
    without room for the converted model (a real 20 MiB tmpfs; it needs about 540) ended in a traceback of
    safetensors' 'I/O error: No space left on device'. The error names the cache folder and says what to do."""
    with tmpfs(tmp_path / "disk", "size=20m") as disk:
        cache = disk / "cache"
        made = subprocess.run([sys.executable, "-m", "qlass", "model", "default"], capture_output=True, text=True,
                              check=False, env={**os.environ, "QLASS_CACHE": str(cache)})
        assert made.returncode == 2, made.stderr[-3000:]
        assert f"error: {cache / 'models'}: writing the model or a checkpoint failed (" in made.stderr
        assert "set QLASS_CACHE to a folder on another disk" in made.stderr and "Traceback" not in made.stderr


@pytest.mark.parametrize("options", ["size=1m", "ro"])
def test_export_gguf_onto_a_full_or_read_only_disk_names_the_output(tiny_model_dir: Path, tmp_path: Path,
                                                                    options: str) -> None:
    """``qlass model export-gguf --out`` named its temporary file on a read-only disk ('x.gguf.partial: Read-only
    file system', the failed clean-up's error replacing the first), and on a full disk no file at all ('No space
    left on device'). Now the output asked for, and nothing is left there."""
    with tmpfs(tmp_path / "disk", options) as disk:
        out = disk / "x.gguf"
        done = subprocess.run([sys.executable, "-m", "qlass", "model", "export-gguf", str(tiny_model_dir), "--out",
                               str(out)], capture_output=True, text=True, check=False)
        assert done.returncode == 2, done.stderr[-3000:]
        why = ("Read-only file system: its writer lock" if options == "ro" else
               "No space left on device; it is written as x.gguf.partial first, which is not kept)")
        assert done.stderr.startswith(f"error: {out}: cannot be written there ({why}"), done.stderr[-3000:]
        assert not list(disk.iterdir())
