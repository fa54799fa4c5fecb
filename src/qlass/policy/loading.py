"""Loading a local model folder for the policy, SFT and the QNet: its causal LM and tokenizer, with one
clear :class:`~qlass.errors.QlassError` naming the folder for a missing config, tokenizer or a
damaged weights file, and the sequence length ``qlass sft`` fine-tuned it at.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..config import load_yaml
from ..errors import DataError, QlassError
from ..file_checks import refuse_classifier, require_model_folder
from .option_values import HF_DTYPES
from .render import ensure_chat_template

NO_TOKENIZER = ("no usable tokenizer in this model folder (tokenizer.json and tokenizer_config.json, as "
                "save_pretrained writes them)")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "merges.txt", "tekken.json")
"""Files a tokenizer is read from (besides sentencepiece ``*.model`` and ``*.tiktoken`` files)."""
SFT_RECORD = "sft_config.yaml"
"""The options file ``qlass sft`` writes into the model folder it makes (its ``max_length`` is read here)."""


def fine_tuned_length(model_dir: Path) -> int | None:
    """The ``max_length`` that ``qlass sft`` fine-tuned the model in ``model_dir`` at, if it recorded one."""
    try:
        value = load_yaml(model_dir / SFT_RECORD).get("max_length")
    except (DataError, OSError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def check_causal_lm_folder(path: str | Path) -> None:
    """Raise :class:`QlassError` for what :func:`load_causal_lm` would refuse in the folder itself (no
    ``config.json``, a QNet, no tokenizer files), without importing torch or transformers."""
    path = Path(path)
    require_model_folder(path, f"{path}: not a model folder (no config.json); `qlass model default` prints the "
                               "default one")
    refuse_classifier(path)
    require_tokenizer_files(path)


def load_causal_lm(path: str | Path, dtype: str = "float32") -> tuple[Any, Any]:
    """Load a causal-LM folder and its tokenizer (with a chat template), quietly and in eval mode."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    check_causal_lm_folder(path)
    if dtype not in HF_DTYPES:
        raise QlassError(f"unknown dtype {dtype!r}; use one of {', '.join(HF_DTYPES)}")
    tokenizer = ensure_chat_template(load_tokenizer(path))
    with loading_weights(path, "model"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return model, tokenizer


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer of model folder ``path``; a folder without a usable one is a :class:`QlassError`
    naming it (not transformers' traceback)."""
    require_tokenizer_files(Path(path))
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QlassError(f"{path}: {NO_TOKENIZER}: {first}") from None


def require_tokenizer_files(path: Path) -> None:
    """Raise :class:`QlassError` for a model folder that holds none of the files a tokenizer is read from
    (found before transformers and torch are imported; a folder with some of them is judged by loading it)."""
    if path.is_dir() and not any((path / name).exists() for name in TOKENIZER_FILES) \
            and not any(path.glob("*.model")) and not any(path.glob("*.tiktoken")):
        raise QlassError(f"{path}: {NO_TOKENIZER}: it holds none of {', '.join(TOKENIZER_FILES)}")


@contextlib.contextmanager
def loading_weights(path: Path, what: str) -> Iterator[None]:
    """A truncated or corrupt weights file in ``path`` as one :class:`QlassError` naming the folder; no loading
    progress bar meanwhile (transformers' setting is put back after, for the caller's own loads)."""
    from safetensors import SafetensorError
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    except (SafetensorError, OSError) as exc:
        raise QlassError(f"{path}: cannot load the {what}'s weights ({' '.join(str(exc).split())})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
