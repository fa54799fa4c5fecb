"""Reading an HF Llama causal-LM folder for :mod:`qlass.gguf_export`, checking everything first:
``config.json`` (architecture, sizes that fit together, RoPE), ``tokenizer.json`` (a byte-level BPE
tokenizer with a pre-tokenizer llama.cpp reproduces), the chat-template files, and each weight's
name, shape and type against what llama.cpp's Llama graph reads. Anything else is a
:class:`~qlass.errors.QlassError` naming the file and the field.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import QlassError
from .jsonl import read_json_object

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)  # recomputed by llama.cpp; older HF checkpoints stored it
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors weight types converted exactly (to f32, then --dtype)
SPECIAL_TOKENS = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")  # the ``*_token_id`` fields gguf reads
MAX_UINT32 = 2**32 - 1  # GGUF stores widths, counts and token ids as uint32 ...
MAX_FLOAT32 = 3.4028234e38  # ... and RoPE base, scaling factor and RMS epsilon as float32
LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")  # an HF Llama layer's weights


@dataclass(frozen=True)
class Tensor:
    """One tensor to write: where it comes from, its GGUF name and how to reorder it."""

    file: Path
    key: str
    name: str
    shape: tuple[int, ...]
    heads: int = 0  # > 0: a query/key projection with this many heads, reordered for llama.cpp's RoPE


@dataclass(frozen=True)
class Vocab:
    """The token list (one per embedding row), each token's llama.cpp type, and the pre-tokenizer."""

    tokens: list[str]
    types: list[int]
    pre: str
    tokenizer: Any  # the ``tokenizers.Tokenizer`` read from tokenizer.json


@dataclass(frozen=True)
class Dims:
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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return read_json_object(path)
    except FileNotFoundError:
        raise QlassError(f"{path}: missing; an HF causal-LM folder (e.g. `qlass sft`'s output) is expected") from None


def read_config(model_dir: Path) -> dict[str, Any]:
    """``model_dir``'s config.json, checked: a supported architecture, SiLU, no biases, token ids that
    fit GGUF's."""
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


def model_dims(config: dict[str, Any], path: Path) -> Dims:
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
    return Dims(_int_field(config, "vocab_size", path), hidden, _int_field(config, "intermediate_size", path),
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


def read_vocab(model_dir: Path, n_vocab: int) -> Vocab:
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
    return Vocab(tokens, [types.get(i, int(TokenType.UNUSED)) for i in range(n_vocab)], pre, tokenizer)


def check_chat_template_files(model_dir: Path) -> None:
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


def _expected_shapes(dims: Dims) -> dict[Any, tuple[int, ...]]:
    """The shape (HF's, rows first) of each weight llama.cpp's dense Llama graph reads, by GGUF tensor kind."""
    from gguf import MODEL_TENSOR as T

    q, kv = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    return {T.TOKEN_EMBD: (dims.vocab, dims.hidden), T.OUTPUT: (dims.vocab, dims.hidden), T.OUTPUT_NORM: (dims.hidden,),
            T.ATTN_NORM: (dims.hidden,), T.ATTN_Q: (q, dims.hidden), T.ATTN_K: (kv, dims.hidden),
            T.ATTN_V: (kv, dims.hidden), T.ATTN_OUT: (dims.hidden, q), T.FFN_NORM: (dims.hidden,),
            T.FFN_GATE: (dims.ffn, dims.hidden), T.FFN_UP: (dims.ffn, dims.hidden), T.FFN_DOWN: (dims.hidden, dims.ffn)}


def plan_tensors(model_dir: Path, config: dict[str, Any], dims: Dims) -> list[Tensor]:
    """Every weight with its GGUF name, checked against what llama.cpp's Llama graph reads."""
    import gguf
    from safetensors import SafetensorError, safe_open

    tied = bool(config.get("tie_word_embeddings", False))
    files: dict[Path, dict[str, tuple[tuple[int, ...], str]]] = {}
    for file in _safetensors_files(model_dir):
        try:
            with safe_open(file, framework="pt") as f:
                files[file] = {key: (tuple(f.get_slice(key).get_shape()), f.get_slice(key).get_dtype())
                               for key in sorted(f.keys())}
        except (SafetensorError, OSError) as exc:
            raise QlassError(f"{file}: cannot read the safetensors file ({exc})") from None
    # gguf's name map holds every tensor name of every layer: a num_hidden_layers far above the weights' (e.g. 10**9)
    # took hours and all memory to build it. The layers are counted, not read off the highest number, which a
    # single weight named model.layers.4294967294 would set.
    layers = len({int(m[1]) for found in files.values() for key in found if (m := LAYER_KEY.match(key))})
    if dims.blocks > layers:
        raise QlassError(f"{model_dir / 'config.json'}: num_hidden_layers is {dims.blocks}; the weights hold "
                         f"{layers} layer(s)")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, dims.blocks)
    shapes = _expected_shapes(dims)
    plan: dict[str, Tensor] = {}
    for file, found in files.items():
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
            plan[name] = Tensor(file, key, name, shape, heads)
    required = ["token_embd.weight", "output_norm.weight"] + ([] if tied else ["output.weight"])
    required += [f"blk.{b}.{part}.weight" for b in range(dims.blocks) for part in ("attn_norm", "attn_q", "attn_k",
                 "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")]
    missing = [n for n in required if n not in plan]
    if missing:
        raise QlassError(f"{model_dir}: the weights lack {len(missing)} tensor(s) a Llama model needs "
                         f"(GGUF names: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''})")
    return list(plan.values())


def load_tensors(plan: list[Tensor]) -> Iterator[np.ndarray]:
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
