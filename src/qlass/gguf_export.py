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

import logging
import stat
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import QlassError
from .jsonl import read_json_object
from .policy.render import CHATML_TEMPLATE

log = logging.getLogger(__name__)

DTYPES = ("f16", "f32", "bf16")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)  # recomputed by llama.cpp; older HF checkpoints stored it
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors weight types converted exactly (to f32, then --dtype)
SPECIAL_TOKENS = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")  # the ``*_token_id`` fields gguf reads
MAX_UINT32 = 2**32 - 1  # GGUF stores widths, counts and token ids as uint32 ...
MAX_FLOAT32 = 3.4028234e38  # ... and RoPE base, scaling factor and RMS epsilon as float32


@dataclass(frozen=True)
class _Tensor:
    """One tensor to write: where it comes from, its GGUF name and how to reorder it."""

    file: Path
    key: str
    name: str
    shape: tuple[int, ...]
    heads: int = 0  # > 0: a query/key projection with this many heads, reordered for llama.cpp's RoPE


@dataclass(frozen=True)
class _Vocab:
    """The token list (one per embedding row), each token's llama.cpp type, and the pre-tokenizer."""

    tokens: list[str]
    types: list[int]
    pre: str
    tokenizer: Any  # the ``tokenizers.Tokenizer`` read from tokenizer.json


@dataclass(frozen=True)
class _Dims:
    """The sizes and constants ``config.json`` gives, checked against each other."""

    vocab: int
    hidden: int
    ffn: int
    blocks: int
    heads: int
    kv_heads: int
    head_dim: int
    context: int
    rms_eps: float
    rope_base: float
    rope_scaling: str  # "default" or "linear"
    rope_factor: float


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
    import gguf

    model_dir = Path(model_dir)
    if dtype not in DTYPES:
        raise QlassError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    config = _read_config(model_dir)
    dims = _dims(config, model_dir / "config.json")
    tensors = _plan_tensors(model_dir, config, dims)  # before the vocabulary: vocab_size is checked against the weights
    vocab = _read_vocab(model_dir, dims.vocab)
    _check_chat_template_files(model_dir)
    out = Path(out) if out is not None else default_output(model_dir, dtype)
    partial = out.with_name(out.name + ".partial")
    _check_out(out, partial)
    out.parent.mkdir(parents=True, exist_ok=True)

    matrix_type = {"f16": gguf.GGMLQuantizationType.F16, "f32": gguf.GGMLQuantizationType.F32,
                   "bf16": gguf.GGMLQuantizationType.BF16}[dtype]
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "f32": gguf.LlamaFileType.ALL_F32,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype]
    writer = gguf.GGUFWriter(partial, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
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
        for i, (array, qtype) in enumerate(zip(_load_tensors(tensors), types), start=1):
            writer.write_tensor_data(gguf.quants.quantize(array, qtype))
            if i % step == 0 or i == len(tensors):
                log.info("gguf export: %d/%d tensors written", i, len(tensors))
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
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
    kind = _kind(partial)
    if kind not in (None, "a regular file"):
        raise QlassError(f"{partial}: exists and is {kind}; the export writes the GGUF file there first (remove it "
                         "or give another --out)")


# -- reading and checking the folder ---------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    try:
        return read_json_object(path)
    except FileNotFoundError:
        raise QlassError(f"{path}: missing; an HF causal-LM folder (e.g. `qlass sft`'s output) is expected") from None


def _read_config(model_dir: Path) -> dict[str, Any]:
    if not model_dir.is_dir():
        raise QlassError(f"{model_dir}: not a folder; an HF causal-LM folder (e.g. `qlass sft`'s output) is expected")
    path = model_dir / "config.json"
    config = _read_json(path)
    archs = config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and len(archs) == 1 else archs
    if arch not in SUPPORTED_ARCHITECTURES:
        raise QlassError(f"{path}: architectures is {arch!r}; GGUF export supports "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)} (a QNet folder cannot be served as a policy)")
    checks = {"hidden_act": ("silu",), "attention_bias": (False, None), "mlp_bias": (False, None),
              "tie_word_embeddings": (False, True, None)}
    for key, allowed in checks.items():
        value = config.get(key)
        if not any(value is a or isinstance(a, str) and value == a for a in allowed):  # 0 is not False here
            raise QlassError(f"{path}: {key} is {value!r}; GGUF export supports only "
                             f"{' or '.join(repr(a) for a in allowed if a is not None)}")
    for typ in SPECIAL_TOKENS:  # read by gguf's SpecialVocab: a list (several EOS ids) is skipped there
        value = config.get(f"{typ}_token_id")
        if not all(_is_id(v) for v in (value if isinstance(value, list) else [value]) if v is not None):
            raise QlassError(f"{path}: {typ}_token_id is {value!r}, expected a token id (or a list of them)")
    return config


def _is_id(value: Any) -> bool:
    """Whether ``value`` can be a token id (GGUF: uint32)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_UINT32


def _int_field(config: dict[str, Any], key: str, path: Path, default: int | None = None) -> int:
    value = config.get(key)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_UINT32:
        raise QlassError(f"{path}: {key} is {value!r}, expected a positive integer (at most {MAX_UINT32})")
    return value


def _float_field(params: dict[str, Any], key: str, path: Path, default: float | None, where: str = "") -> float:
    """A positive number that a float32 holds (``where`` names the object the field is in)."""
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_FLOAT32:
        raise QlassError(f"{path}: {where}{key} is {value!r}, expected a positive number (at most {MAX_FLOAT32:g})")
    return float(value)


def _dims(config: dict[str, Any], path: Path) -> _Dims:
    """The model's sizes and constants; the attention heads must split the projections as llama.cpp and HF
    both split them."""
    hidden, heads = _int_field(config, "hidden_size", path), _int_field(config, "num_attention_heads", path)
    kv_heads = _int_field(config, "num_key_value_heads", path, default=heads)
    if config.get("head_dim") is None and hidden % heads:
        raise QlassError(f"{path}: num_attention_heads {heads} does not divide hidden_size {hidden} (and no "
                         "head_dim is given)")
    head_dim = _int_field(config, "head_dim", path, default=hidden // heads)
    if head_dim % 2:
        raise QlassError(f"{path}: the head size {head_dim} is odd; RoPE rotates pairs of dimensions")
    if heads % kv_heads:
        raise QlassError(f"{path}: num_key_value_heads {kv_heads} does not divide num_attention_heads {heads}")
    base, kind, factor = _rope(config, path)
    return _Dims(_int_field(config, "vocab_size", path), hidden, _int_field(config, "intermediate_size", path),
                 _int_field(config, "num_hidden_layers", path), heads, kv_heads, head_dim,
                 _int_field(config, "max_position_embeddings", path), _float_field(config, "rms_norm_eps", path, None),
                 base, kind, factor)


def _rope(config: dict[str, Any], path: Path) -> tuple[float, str, float]:
    """(base, scaling type, factor) from ``rope_parameters`` (transformers 5) or ``rope_theta`` /
    ``rope_scaling`` (earlier versions)."""
    key = "rope_parameters" if config.get("rope_parameters") is not None else "rope_scaling"
    params = config.get(key)
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise QlassError(f"{path}: {key} is {params!r}, expected an object")
    base = _float_field(params, "rope_theta", path, config.get("rope_theta", 10000.0),
                        f"{key}." if "rope_theta" in params else "")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear"):
        raise QlassError(f"{path}: rope_type is {kind!r}; GGUF export supports 'default' and 'linear' RoPE")
    factor = _float_field(params, "factor", path, 1.0, f"{key}.") if kind == "linear" else 1.0
    return base, kind, factor


def _describe(pre: Any) -> str:
    """A pre-tokenizer as a short readable expression, e.g. ``Sequence[Split, ByteLevel(use_regex=False)]``."""
    if not isinstance(pre, dict):
        return repr(pre)
    if pre.get("type") == "Sequence" and isinstance(pre.get("pretokenizers"), list):
        return "Sequence[" + ", ".join(_describe(p) for p in pre["pretokenizers"]) + "]"
    opts = ", ".join(f"{k}={v!r}" for k, v in pre.items() if k not in ("type", "trim_offsets"))
    return f"{pre.get('type')}({opts})"


def _pre_tokenizer(pre: Any) -> str | None:
    """llama.cpp's name for an HF pre-tokenizer it reproduces exactly, else ``None``.

    GPT-2's byte-level split is ``gpt-2``; SmolLM's (digits split one by one, then GPT-2's split)
    is ``smollm``.
    """
    def gpt2(p: Any) -> bool:
        return (isinstance(p, dict) and p.get("type") == "ByteLevel" and p.get("use_regex", True) is True
                and p.get("add_prefix_space", False) is False)

    if gpt2(pre):
        return "gpt-2"
    if isinstance(pre, dict) and pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers")
        if (isinstance(parts, list) and len(parts) == 2 and parts[0] == {"type": "Digits", "individual_digits": True}
                and gpt2(parts[1])):
            return "smollm"
    return None


def _read_vocab(model_dir: Path, n_vocab: int) -> _Vocab:
    """Tokens (padded to the model's vocabulary size), their llama.cpp types and the pre-tokenizer."""
    from gguf import TokenType
    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json"
    spec = _read_json(path)
    model = spec.get("model")
    if not isinstance(model, dict):
        raise QlassError(f"{path}: model is {model!r}, expected an object (a BPE tokenizer model)")
    vocab = model.get("vocab")
    if model.get("type") != "BPE" or model.get("byte_fallback") or not isinstance(vocab, dict):
        raise QlassError(f"{path}: model is {model.get('type')!r} (byte_fallback={model.get('byte_fallback')!r}); "
                         "GGUF export supports byte-level BPE tokenizers (GPT-2 style) only")
    bad = next(((t, i) for t, i in vocab.items() if not _is_id(i)), None)
    if bad is not None:
        raise QlassError(f"{path}: model.vocab[{bad[0]!r}] is {bad[1]!r}, expected a token id")
    if spec.get("normalizer") is not None:
        raise QlassError(f"{path}: normalizer is {_describe(spec['normalizer'])}; GGUF export supports none")
    pre = _pre_tokenizer(spec.get("pre_tokenizer"))
    if pre is None:
        raise QlassError(f"{path}: pre_tokenizer is {_describe(spec.get('pre_tokenizer'))}; GGUF export supports "
                         "ByteLevel(use_regex=True) alone or after Digits(individual_digits=True)")
    text: dict[int, str] = {i: t for t, i in vocab.items()}
    types: dict[int, int] = dict.fromkeys(text, int(TokenType.NORMAL))
    added_tokens = spec.get("added_tokens")
    if not isinstance(added_tokens, (list, type(None))):
        raise QlassError(f"{path}: added_tokens is {added_tokens!r}, expected a list")
    for k, added in enumerate(added_tokens or []):
        if (not isinstance(added, dict) or not _is_id(added.get("id")) or not isinstance(added.get("content"), str)
                or not isinstance(added.get("special", False), bool)):
            raise QlassError(f"{path}: added_tokens[{k}] is {added!r}, expected an object with a token id, a "
                             "content and special true or false")
        text[added["id"]] = added["content"]
        types[added["id"]] = int(TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED)
    if not text:
        raise QlassError(f"{path}: model.vocab and added_tokens are empty")
    if max(text) >= n_vocab:
        raise QlassError(f"{path}: token id {max(text)} does not fit the model's vocab_size {n_vocab} (config.json)")
    try:  # every other field, as the tokenizers library (HF's own reader) checks it
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception
        raise QlassError(f"{path}: not a tokenizer the tokenizers library reads ({exc})") from None
    tokens = [text.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    return _Vocab(tokens, [types.get(i, int(TokenType.UNUSED)) for i in range(n_vocab)], pre, tokenizer)


def _check_chat_template_files(model_dir: Path) -> None:
    """The files gguf's SpecialVocab reads the chat template and special tokens from, when present: JSON
    objects whose ``chat_template`` is text or a list of named templates, and a ``chat_template.jinja`` of
    UTF-8 text."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        try:
            jinja.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise QlassError(f"{jinja}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for name in ("tokenizer_config.json", "chat_template.json"):
        path = model_dir / name
        if not path.is_file():
            continue
        template = read_json_object(path).get("chat_template")
        if not (template is None or isinstance(template, str) or isinstance(template, list) and all(
                isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                for t in template)):
            raise QlassError(f"{path}: chat_template is {template!r:.200}, expected text or a list of "
                             "{name, template} objects")


def _safetensors_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        found = ", ".join(sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth")))
        raise QlassError(f"{model_dir}: no *.safetensors weights" + (f" (found {found}; re-save the model with "
                                                                    "save_pretrained(safe_serialization=True))"
                                                                    if found else ""))
    return files


def _expected_shapes(dims: _Dims) -> dict[Any, tuple[int, ...]]:
    """The shape (HF's, rows first) of each weight llama.cpp's dense Llama graph reads, by GGUF tensor kind."""
    from gguf import MODEL_TENSOR as T

    q, kv = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    return {T.TOKEN_EMBD: (dims.vocab, dims.hidden), T.OUTPUT: (dims.vocab, dims.hidden), T.OUTPUT_NORM: (dims.hidden,),
            T.ATTN_NORM: (dims.hidden,), T.ATTN_Q: (q, dims.hidden), T.ATTN_K: (kv, dims.hidden),
            T.ATTN_V: (kv, dims.hidden), T.ATTN_OUT: (dims.hidden, q), T.FFN_NORM: (dims.hidden,),
            T.FFN_GATE: (dims.ffn, dims.hidden), T.FFN_UP: (dims.ffn, dims.hidden), T.FFN_DOWN: (dims.hidden, dims.ffn)}


def _plan_tensors(model_dir: Path, config: dict[str, Any], dims: _Dims) -> list[_Tensor]:
    """Every weight with its GGUF name, checked against what llama.cpp's Llama graph reads."""
    import gguf
    from safetensors import SafetensorError, safe_open

    tied = bool(config.get("tie_word_embeddings", False))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, dims.blocks)
    shapes = _expected_shapes(dims)
    plan: dict[str, _Tensor] = {}
    for file in _safetensors_files(model_dir):
        try:
            with safe_open(file, framework="pt") as f:
                found = {key: (tuple(f.get_slice(key).get_shape()), f.get_slice(key).get_dtype())
                         for key in sorted(f.keys())}
        except (SafetensorError, OSError) as exc:
            raise QlassError(f"{file}: cannot read the safetensors file ({exc})") from None
        for key, (shape, dtype) in found.items():
            if key.endswith(SKIPPED_SUFFIXES) or (tied and key == "lm_head.weight"):
                continue
            kind_name = names.get_type_and_name(key, try_suffixes=(".weight",))  # no biases: HF's Llama has none
            if kind_name is None or kind_name[0] not in shapes:
                raise QlassError(f"{file}: tensor {key!r} has no place in llama.cpp's Llama model")
            kind, name = kind_name
            if shape != shapes[kind]:
                raise QlassError(f"{file}: tensor {key!r} has shape {list(shape)}; config.json's sizes give "
                                 f"{list(shapes[kind])}")
            if dtype not in FLOAT_DTYPES:
                raise QlassError(f"{file}: tensor {key!r} is {dtype}; GGUF export reads {', '.join(FLOAT_DTYPES)} "
                                 "weights")
            if name in plan:
                raise QlassError(f"{file}: tensor {key!r} is also in {plan[name].file.name} as {plan[name].key!r}")
            heads = {gguf.MODEL_TENSOR.ATTN_Q: dims.heads, gguf.MODEL_TENSOR.ATTN_K: dims.kv_heads}.get(kind, 0)
            plan[name] = _Tensor(file, key, name, shape, heads)
    required = ["token_embd.weight", "output_norm.weight"] + ([] if tied else ["output.weight"])
    required += [f"blk.{b}.{part}.weight" for b in range(dims.blocks) for part in ("attn_norm", "attn_q", "attn_k",
                 "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")]
    missing = [n for n in required if n not in plan]
    if missing:
        raise QlassError(f"{model_dir}: the weights lack {len(missing)} tensor(s) a Llama model needs "
                         f"(GGUF names: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''})")
    return list(plan.values())
def _load_tensors(plan: list[_Tensor]) -> Iterator[np.ndarray]:
    """Each planned tensor as float32 numpy, in plan order (query/key rows reordered for llama.cpp)."""
    from safetensors import safe_open

    with ExitStack() as stack:
        opened: dict[Path, Any] = {}
        for t in plan:
            if t.file not in opened:
                opened[t.file] = stack.enter_context(safe_open(t.file, framework="pt"))
            array = opened[t.file].get_tensor(t.key).float().numpy()
            yield _interleave_rope(array, t.heads) if t.heads else array


def _interleave_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """Reorder a query/key projection's output rows from HF's rotate-half RoPE layout (dimension
    ``j`` pairs with ``j + d/2`` within a head) to llama.cpp's (dimension ``2j`` pairs with ``2j + 1``)."""
    rows = w.shape[0]
    half = rows // heads // 2
    return np.ascontiguousarray(w.reshape(heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


# -- metadata ------------------------------------------------------------------------------------
def _add_hparams(writer: Any, dims: _Dims) -> None:
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


def _add_tokenizer(writer: Any, model_dir: Path, vocab: _Vocab, n_vocab: int) -> None:
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
    if special.chat_template is None:
        special.chat_template = CHATML_TEMPLATE  # what qlass renders with for a folder without one
    special.add_to_gguf(writer, quiet=True)
