"""Export an SFT folder (a plain HF causal-LM folder) to one GGUF file that llama.cpp serves.

A CPU user then runs the model with llama.cpp's server and points ``policy_server`` (or
``qlass eval --policy-server``) at it; prompts are still rendered by the SFT folder's tokenizer.

What is written, with the ``gguf`` package's writer, tensor-name map and constants:

- hyperparameters (``llama.*``: context, widths, heads, RoPE base and head size, RMS epsilon);
- the weights, streamed one tensor at a time (memory: one tensor, not the model). Matrices in the
  asked type (``f16`` by default, ``f32``, ``bf16``), 1-D tensors (norms) always in f32. The query
  and key projections are reordered from HF's rotate-half RoPE layout to llama.cpp's interleaved
  pairs, so both compute the same attention. A tied output matrix is not written (llama.cpp reads
  the embedding instead);
- the tokenizer: every token of ``tokenizer.json`` (vocab and added tokens) with its type
  (added special tokens are control tokens, other added tokens user-defined), the BPE merges, the
  special token ids, whether BOS/EOS are added, the pre-tokenizer llama.cpp must use, and the chat
  template (the plain ChatML one qlass renders with when the folder has none).

Only what llama.cpp reproduces exactly is accepted: Llama-architecture models
(``LlamaForCausalLM``, SiLU, no biases, default or linear RoPE) with a byte-level BPE tokenizer
whose pre-tokenizer is GPT-2's (optionally after splitting digits one by one, as SmolLM's does).
Anything else is a :class:`~qlass.errors.QlassError` naming the file and the field, as is a field
of the wrong type, sizes in ``config.json`` that do not fit together or the weights' shapes, and a
weight that is not a float. The file is written beside its final name and renamed when complete, so
an interrupted export leaves no truncated GGUF behind; an existing ``--out`` is replaced only when
it is a GGUF file (never the model's weights, a named pipe or a device).
"""

from __future__ import annotations

import contextlib
import logging
import stat
from pathlib import Path
from typing import Any

import numpy as np

from .errors import QlassError
from .gguf_read import (
    Dims,
    Tensor,
    Vocab,
    check_chat_template_files,
    load_tensors,
    model_dims,
    plan_tensors,
    read_config,
    read_vocab,
)
from .locking import writer_lock
from .policy.loading import load_tokenizer
from .policy.render import ensure_chat_template

log = logging.getLogger(__name__)

DTYPES = ("f16", "f32", "bf16")
GGUF_MAGIC = b"GGUF"
"""The first bytes of a GGUF file: an existing ``--out`` without them is not replaced."""


def default_output(model_dir: Path, dtype: str) -> Path:
    """``<model_dir>-<dtype>.gguf`` beside the folder (e.g. ``runs/demo/sft-f16.gguf``); a folder spelled
    ``.`` or ending in ``..`` is resolved first, so its file too lands beside it."""
    model_dir = Path(model_dir)
    if model_dir.name in ("", ".."):
        model_dir = model_dir.resolve()
    if not model_dir.name:
        raise QlassError(f"{model_dir}: has no folder beside which to write the GGUF file; give its path with --out")
    return model_dir.with_name(f"{model_dir.resolve().name}-{dtype}.gguf")


def export_gguf(model_dir: str | Path, out: str | Path | None = None, dtype: str = "f16") -> Path:
    """Write ``model_dir`` (an HF Llama causal-LM folder) as a GGUF file for llama.cpp; return its path.

    ``dtype`` is the type of the weight matrices (``f16``, ``f32`` or ``bf16``); ``out`` defaults
    to :func:`default_output`.
    """
    model_dir = Path(model_dir)
    if dtype not in DTYPES:
        raise QlassError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    config = read_config(model_dir)
    dims = model_dims(config, model_dir / "config.json")
    tensors = plan_tensors(model_dir, config, dims)  # before the vocabulary: vocab_size is checked against the weights
    vocab = read_vocab(model_dir, dims.vocab)
    check_chat_template_files(model_dir)
    out = Path(out) if out is not None else default_output(model_dir, dtype)
    partial = out.with_name(out.name + ".partial")
    _check_out(out, partial)
    with writer_lock(out, folder=False):  # two exports to one file would write one partial file
        return _write(model_dir, out, partial, dtype, dims, tensors, vocab)


def _write(model_dir: Path, out: Path, partial: Path, dtype: str, dims: Dims, tensors: list[Tensor],
           vocab: Vocab) -> Path:
    """Write the GGUF file ``out`` (first as ``partial``) from the checked parts of ``model_dir``."""
    import gguf

    matrix_type = {"f16": gguf.GGMLQuantizationType.F16, "f32": gguf.GGMLQuantizationType.F32,
                   "bf16": gguf.GGMLQuantizationType.BF16}[dtype]
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "f32": gguf.LlamaFileType.ALL_F32,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype]
    writer = gguf.GGUFWriter(partial, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])  # opens it when writing
    try:
        writer.add_name(model_dir.resolve().name)
        writer.add_file_type(file_type)
        _add_hparams(writer, dims)
        _add_tokenizer(writer, model_dir, vocab, dims.vocab)
        types = [gguf.GGMLQuantizationType.F32 if len(t.shape) == 1 else matrix_type for t in tensors]
        # Every tensor is declared before any data is written (the header comes first); bf16 has no
        # numpy type, so it is declared by its GGML type with a 2-byte placeholder numpy type.
        np_dtype = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}
        for t, qtype in zip(tensors, types):
            item = np.dtype(np_dtype.get(qtype, np.uint16))
            writer.add_tensor_info(t.name, t.shape, item, int(np.prod(t.shape)) * item.itemsize,
                                   raw_dtype=None if qtype in np_dtype else qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        step = max(1, len(tensors) // 10)
        for i, (array, qtype) in enumerate(zip(load_tensors(tensors), types), start=1):
            writer.write_tensor_data(gguf.quants.quantize(array, qtype))
            if i % step == 0 or i == len(tensors):
                log.info("gguf export: %d/%d tensors written", i, len(tensors))
    except BaseException as exc:
        writer.close()
        with contextlib.suppress(OSError):  # on a read-only disk there is nothing to remove, and unlink fails too
            partial.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename in (None, str(partial)):
            # a full or read-only disk: name the output asked for (the error named the temporary file, or none)
            raise QlassError(f"{out}: cannot be written there ({exc.strerror or exc}; it is written as "
                             f"{partial.name} first, which is not kept)") from None
        raise
    writer.close()
    partial.replace(out)
    log.info("wrote %s (%s, %.0f MB)", out, dtype, out.stat().st_size / 2**20)
    return out


def _kind(path: Path) -> str | None:
    """What ``path`` is (links followed): ``None`` when there is nothing there, else e.g. ``'a named pipe (FIFO)'``."""
    try:
        mode = path.stat().st_mode
    except OSError:  # missing, or not reachable: creating the file names the problem
        return None
    for test, kind in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"),
                       (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a special file"


def _check_out(out: Path, partial: Path) -> None:
    """Refuse an existing ``out`` that the export would replace but must not: a folder, anything but a regular
    file (a named pipe, device or socket, which the final rename would replace by the GGUF) and a regular file
    that is not a GGUF file (e.g. the model's own weights). ``partial`` (written first) may only be a regular
    file, e.g. left by an interrupted export."""
    kind = _kind(out)
    if kind == "a folder":
        raise QlassError(f"{out}: is a folder; give the GGUF file's path with --out")
    if kind not in (None, "a regular file"):
        raise QlassError(f"{out}: exists and is {kind}, not a GGUF file; the export would replace it (give another "
                         "--out)")
    if kind is not None:
        with out.open("rb") as f:
            if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:  # the model's own weights, or any other file: never replaced
                raise QlassError(f"{out}: exists and is not a GGUF file; the export would replace it (give another "
                                 "--out)")
        if _is_default_gguf(out):  # `--out "$(qlass model gguf)"` replaced the file every default model is made of
            raise QlassError(f"{out}: is the default model's GGUF, inside its installed wheel; the export would "
                             "replace the default model (give another --out)")
    kind = _kind(partial)
    if kind not in (None, "a regular file"):
        raise QlassError(f"{partial}: exists and is {kind}; the export writes the GGUF file there first (remove it "
                         "or give another --out)")


def _is_default_gguf(path: Path) -> bool:
    """Whether ``path`` is the default model's GGUF file (:func:`~qlass.models.default_gguf_path`)."""
    from .models import default_gguf_path

    try:
        return path.samefile(default_gguf_path())
    except (QlassError, OSError):  # the wheel is not installed
        return False


# -- metadata ------------------------------------------------------------------------------------
def _add_hparams(writer: Any, dims: Dims) -> None:
    import gguf

    writer.add_context_length(dims.context)
    writer.add_embedding_length(dims.hidden)
    writer.add_block_count(dims.blocks)
    writer.add_feed_forward_length(dims.ffn)
    writer.add_head_count(dims.heads)
    writer.add_head_count_kv(dims.kv_heads)
    writer.add_layer_norm_rms_eps(dims.rms_eps)
    writer.add_rope_freq_base(dims.rope_base)
    writer.add_rope_dimension_count(dims.head_dim)
    if dims.head_dim * dims.heads != dims.hidden:
        writer.add_key_length(dims.head_dim)
        writer.add_value_length(dims.head_dim)
    if dims.rope_scaling == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(dims.rope_factor)
    writer.add_vocab_size(dims.vocab)


def _add_tokenizer(writer: Any, model_dir: Path, vocab: Vocab, n_vocab: int) -> None:
    import gguf

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_add_space_prefix(False)
    try:  # the folder's files were checked; this names anything gguf's reader still refuses
        special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab)
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        raise QlassError(f"{model_dir}: cannot read its special tokens and merges (tokenizer.json, "
                         f"tokenizer_config.json, config.json): {exc}") from None
    if not special.merges:
        raise QlassError(f"{model_dir / 'tokenizer.json'}: model.merges is empty; a BPE tokenizer needs its merges")
    # Whether BOS/EOS are added is measured on the tokenizer itself rather than read from its
    # post-processor's template, so llama.cpp adds exactly what HF adds.
    tok = vocab.tokenizer
    plain, full = tok.encode("a", add_special_tokens=False).ids, tok.encode("a", add_special_tokens=True).ids
    ids = special.special_token_ids
    special.add_special_token["bos"] = "bos" in ids and full[:1] == [ids["bos"]] != plain[:1]
    special.add_special_token["eos"] = "eos" in ids and full[-1:] == [ids["eos"]] != plain[-1:]
    # the template qlass renders with: transformers' (chat_template.jinja before tokenizer_config.json's, which
    # gguf's reader prefers), or ChatML where there is none
    special.chat_template = ensure_chat_template(load_tokenizer(model_dir)).chat_template
    special.add_to_gguf(writer, quiet=True)
