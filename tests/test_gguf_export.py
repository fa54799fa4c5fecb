"""``qlass model export-gguf``: an SFT folder → GGUF → llama.cpp, checked against the HF model.

- The tiny test model (attention sharpened so that a wrong RoPE layout of the query/key rows
  shows in the logits) exported in f32, f16 and bf16: llama.cpp's logits on a conversation match
  HF's, and llama.cpp tokenizes rendered conversations to HF's ids (also with SmolLM's
  digit-splitting pre-tokenizer).
- The default model exported in f32 and served by llama.cpp's server on 127.0.0.1: one greedy
  episode on the toy corridor through qlass's OpenAI backend plays exactly the HF policy's episode.
- Bad inputs (not a folder, a QNet folder, another architecture, an unsupported tokenizer, missing
  weights, fields of the wrong type, sizes that do not fit the weights) are QlassErrors naming the
  file and field; the command prints them without a traceback. An existing --out is replaced only
  when it is a GGUF file (not a pipe or socket); ``export-gguf .`` writes beside the folder.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from setup_parts import installed
from test_policy_openai import KEY, _free_port, running_llama_server
from toy_envs import Corridor

from qlass.agent import EpisodeConfig, run_episode
from qlass.errors import QlassError
from qlass.gguf_export import default_output, export_gguf
from qlass.policy.render import encode_conversation, render
from qlass.types import Message

llama_cpp = installed("llama_cpp")  # built by scripts/setup.sh --test

TESTS = Path(__file__).resolve().parent
CONVERSATIONS = [
    [Message("user", "Walk to the goal. Actions: go east, go west, look.\nAnswer as:\nThought: ...\nAction: ..."),
     Message("assistant", "OK"), Message("user", "Task: reach the goal 3 rooms east. You are in room 0.")],
    [Message("user", "Numbers 7, 42, 1234567 and 3.14159; a café, naïve señor, 東京, emoji 🦙!"),
     Message("assistant", "Thought: it's   spaced\tout\n\nAction: look  "),
     Message("user", "Observation:  trailing   \n\n  leading <|im_start|> inside text <|im_end|>")],
]
TEXTS = ["", " ", "  x", "hello world", "don't won't I'm we'll", "a\n\n\tb  \n", "12345 678", "x=1+2*3 // 4",
         "ÿ Ā ı", "<|im_end|>literal", "  \n  "]


def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    from qlass.policy.render import ensure_chat_template

    return ensure_chat_template(AutoTokenizer.from_pretrained(model_dir))


def _vocab_only(gguf_path: Path):
    return llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)


@pytest.fixture(scope="module")
def sharp_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with query and key weights x4 (attention logits x16): a random 64-wide model
    attends almost uniformly, so a query/key row order that breaks RoPE would barely move its logits."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("sharp") / "model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    model.save_pretrained(out, safe_serialization=True)
    _tokenizer(tiny_model_dir).save_pretrained(out)
    return out


# Measured max |logit difference| on this 117-token conversation (HF's logits span -0.85..1.37):
# f32 5e-7, f16 6e-4, bf16 4.5e-3 (the weights' own rounding; llama.cpp's KV cache set to f32).
# The same model exported without reordering the query/key rows for llama.cpp's RoPE differs by
# 0.24, so every bound is far below what a layout error gives.
@pytest.mark.parametrize(("dtype", "tolerance"), [("f32", 1e-4), ("f16", 3e-3), ("bf16", 2e-2)])
def test_llamacpp_logits_match_hf(sharp_model: Path, tmp_path: Path, dtype: str, tolerance: float) -> None:
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    path = export_gguf(sharp_model, tmp_path / f"m-{dtype}.gguf", dtype)
    reader = gguf.GGUFReader(path)
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == dtype.upper() and kinds["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" not in kinds  # tied: llama.cpp reads token_embd
    assert not list(tmp_path.glob("*.partial"))

    tok = _tokenizer(sharp_model)
    ids, _ = encode_conversation(tok, CONVERSATIONS[1])
    model = AutoModelForCausalLM.from_pretrained(sharp_model).eval()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=1, logits_all=True, type_k=0, type_v=0, verbose=False)
    try:
        llm.eval(ids)
        got = np.asarray(llm.scores[: len(ids)])
    finally:
        llm.close()
    assert np.abs(got - want).max() < tolerance
    top2 = np.sort(want, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * tolerance  # greedy picks that rounding cannot flip
    assert clear.sum() > len(ids) // 2 and (got.argmax(-1) == want.argmax(-1))[clear].all()


def test_metadata_tokenizer_and_chat_template(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Token list, types, special ids and template as HF has them; llama.cpp tokenizes rendered
    conversations (special tokens parsed) and plain text to HF's very ids, and detokenizes back."""
    import gguf

    model = tmp_path / "sft"
    shutil.copytree(tiny_model_dir, model)
    path = export_gguf(model)  # the defaults: f16, beside the folder
    assert path == default_output(model, "f16") == tmp_path / "sft-f16.gguf"
    tok = _tokenizer(model)
    fields = gguf.GGUFReader(path).fields
    value = {k: fields[k].contents() for k in ("general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.pre",
                                               "tokenizer.ggml.eos_token_id", "tokenizer.ggml.bos_token_id",
                                               "tokenizer.ggml.add_bos_token", "tokenizer.chat_template",
                                               "llama.block_count", "llama.attention.head_count_kv")}
    assert value == {"general.architecture": "llama", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
                     "tokenizer.ggml.eos_token_id": tok.eos_token_id, "tokenizer.ggml.bos_token_id": tok.bos_token_id,
                     "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": tok.chat_template,
                     "llama.block_count": 2, "llama.attention.head_count_kv": 4}
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    assert tokens == [tok.convert_ids_to_tokens(i) for i in range(len(tok))]
    assert {i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL} == set(tok.added_tokens_decoder)

    llm = _vocab_only(path)
    try:
        for conversation in CONVERSATIONS:
            text = render(tok, conversation)
            ids, _ = encode_conversation(tok, conversation)
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids
            assert llm.detokenize(ids, special=True).decode() == text
        for text in TEXTS:  # HF parses special tokens in any text, as llama.cpp does with special=True
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok(text)["input_ids"], text
    finally:
        llm.close()


def test_an_empty_chat_template_exports_the_chatml_one_qlass_renders_with(tiny_model_dir: Path,
                                                                        tmp_path: Path) -> None:
    """An empty chat_template.jinja is no template to qlass (it renders ChatML), but the export wrote the
    GGUF without one, so llama.cpp's server fell back to a template of its own."""
    import gguf

    from qlass.policy.render import CHATML_TEMPLATE

    model = _copy(tiny_model_dir, tmp_path / "sft")
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").write_text("")
    path = export_gguf(model, tmp_path / "m.gguf")
    assert gguf.GGUFReader(path).fields["tokenizer.chat_template"].contents() == CHATML_TEMPLATE
    # a template in tokenizer_config.json beside chat_template.jinja: transformers (and so qlass) renders with the
    # .jinja file, and gguf's reader took the other
    (model / "chat_template.jinja").write_text(CHATML_TEMPLATE.replace("<|im_start|>", "<|im_start|> "))
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{{ messages }}"}))
    path = export_gguf(model, tmp_path / "m2.gguf")
    assert gguf.GGUFReader(path).fields["tokenizer.chat_template"].contents() == (
        model / "chat_template.jinja").read_text()


def test_smollm_digit_splitting_pre_tokenizer(tiny_model_dir: Path, tmp_path: Path) -> None:
    """SmolLM's own tokenizer.json splits digits one by one before GPT-2's split: exported as
    llama.cpp's ``smollm`` pre-tokenizer, it tokenizes numbers as HF does (``gpt-2`` would not)."""
    model = tmp_path / "smollm"
    shutil.copytree(tiny_model_dir, model)
    spec = json.loads((model / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, spec["pre_tokenizer"]]}
    (model / "tokenizer.json").write_text(json.dumps(spec))
    tok = _tokenizer(model)
    digits = ["2024", "x  123456789 y", "3.14159 and  1,000,000", "a1b22c333", "  42", "x\n\n 7"]
    # SmolLM's vocabulary has no multi-digit tokens; spaces before digits are where the splits differ
    assert any(tok(t)["input_ids"] != _tokenizer(tiny_model_dir)(t)["input_ids"] for t in digits)  # it matters
    llm = _vocab_only(export_gguf(model, tmp_path / "smollm.gguf"))
    try:
        for text in digits + TEXTS:
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok(text)["input_ids"], text
    finally:
        llm.close()


def _edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, **changes}))


def test_bad_inputs_are_named_errors(tiny_model_dir: Path, tmp_path: Path) -> None:
    def copy(name: str) -> Path:
        return Path(shutil.copytree(tiny_model_dir, tmp_path / name))

    with pytest.raises(QlassError, match="nope: not a folder"):
        export_gguf(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(QlassError, match=r"empty/config\.json: missing"):
        export_gguf(tmp_path / "empty")
    qnet = copy("qnet")
    _edit_json(qnet / "config.json", architectures=["LlamaForSequenceClassification"])
    with pytest.raises(QlassError, match=r"qnet/config\.json: architectures is 'LlamaForSequenceClassification'"):
        export_gguf(qnet)
    gpt2 = copy("gpt2")
    _edit_json(gpt2 / "config.json", architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(QlassError, match="architectures is 'GPT2LMHeadModel'; GGUF export supports LlamaForCausalLM"):
        export_gguf(gpt2)
    scaled = copy("yarn")
    _edit_json(scaled / "config.json", rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
    with pytest.raises(QlassError, match="rope_type is 'yarn'"):
        export_gguf(scaled, tmp_path / "yarn.gguf")
    split = copy("split")
    spec = json.loads((split / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\d{1,3}"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (split / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(QlassError, match=r"split/tokenizer\.json: pre_tokenizer is Sequence\[Split\(.*ByteLevel\("):
        export_gguf(split)
    spm = copy("spm")
    spec["pre_tokenizer"], spec["model"]["byte_fallback"] = None, True
    (spm / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(QlassError, match=r"spm/tokenizer\.json: model is 'BPE' \(byte_fallback=True\)"):
        export_gguf(spm)
    no_weights = copy("noweights")
    (no_weights / "model.safetensors").unlink()
    (no_weights / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(QlassError, match=r"noweights: no \*\.safetensors weights \(found pytorch_model\.bin"):
        export_gguf(no_weights)
    with pytest.raises(QlassError, match="--dtype 'q4'"):
        export_gguf(tiny_model_dir, tmp_path / "x.gguf", "q4")
    own = copy("own")
    weights = (own / "model.safetensors").read_bytes()
    with pytest.raises(QlassError, match=r"own/model\.safetensors: exists and is not a GGUF file"):
        export_gguf(own, own / "model.safetensors")  # the export replaced the weights it read
    assert (own / "model.safetensors").read_bytes() == weights
    assert not list(tmp_path.glob("*.gguf*"))  # nothing half-written

    done = subprocess.run([sys.executable, "-m", "qlass", "model", "export-gguf", str(qnet), "--out",
                           str(tmp_path / "q.gguf")], capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "architectures is 'LlamaForSequenceClassification'" in done.stderr


def _copy(model_dir: Path, to: Path) -> Path:
    return Path(shutil.copytree(model_dir, to))


def test_out_that_is_a_pipe_or_socket_is_refused_not_replaced(tiny_model_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """An existing --out is replaced only when it is a GGUF file (a link to one included): a named pipe or a
    socket (or, as root, /dev/null) was replaced by a regular file holding the GGUF."""
    import socket

    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    with pytest.raises(QlassError, match=r"pipe\.gguf: exists and is a named pipe \(FIFO\), not a GGUF file"):
        export_gguf(tiny_model_dir, fifo)
    monkeypatch.chdir(tmp_path)  # a relative name: a socket's path must be short
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind("s.gguf")
        with pytest.raises(QlassError, match=r"s\.gguf: exists and is a socket, not a GGUF file"):
            export_gguf(tiny_model_dir, "s.gguf")
        assert stat.S_ISSOCK(os.stat("s.gguf").st_mode)
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe.gguf", "s.gguf"]  # nothing half-written

    # the file written first and renamed: a pipe there blocked the export for ever
    os.mkfifo(tmp_path / "m.gguf.partial")
    done = subprocess.run([sys.executable, "-m", "qlass", "model", "export-gguf", str(tiny_model_dir), "--out",
                           str(tmp_path / "m.gguf")], capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "m.gguf.partial: exists and is a named pipe (FIFO)" in done.stderr
    assert stat.S_ISFIFO((tmp_path / "m.gguf.partial").stat().st_mode) and not (tmp_path / "m.gguf").exists()


def test_folder_given_as_dot_and_out_linked_to_a_gguf_file(tiny_model_dir: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """``cd MODEL && qlass model export-gguf .`` writes beside the folder (a ValueError traceback before);
    an --out that links to a GGUF file is replaced like the file itself."""
    model = _copy(tiny_model_dir, tmp_path / "sft")
    done = subprocess.run([sys.executable, "-m", "qlass", "model", "export-gguf", "."], cwd=model,
                          capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(tmp_path / "sft-f16.gguf")
    assert (tmp_path / "sft-f16.gguf").read_bytes()[:4] == b"GGUF"
    (model / "sub").mkdir()
    monkeypatch.chdir(model / "sub")
    assert default_output(Path(".."), "bf16").resolve() == tmp_path / "sft-bf16.gguf"
    link = tmp_path / "link.gguf"
    link.symlink_to(tmp_path / "sft-f16.gguf")
    assert export_gguf("..", link, "f32") == link
    assert link.read_bytes()[:4] == b"GGUF"


def _set(key: str, value: object):
    """An edit of a parsed JSON object: ``key`` (dotted for nested objects) set to ``value``."""
    def edit(data: dict) -> None:
        *parents, last = key.split(".")
        for part in parents:
            data = data[part]
        data[last] = value
    return edit


def _without_head_dim(heads: int):
    def edit(data: dict) -> None:
        del data["head_dim"]
        data["num_attention_heads"] = heads
    return edit


def _transformers4_rope(scaling: object):
    """RoPE as transformers 4 wrote it: ``rope_theta`` and ``rope_scaling`` instead of ``rope_parameters``."""
    def edit(data: dict) -> None:
        data["rope_theta"] = data.pop("rope_parameters")["rope_theta"]
        data["rope_scaling"] = scaling
    return edit


# config.json edits (the tiny model: hidden 64, 4 heads of 16, 4 KV heads, 2 layers, ffn 256, vocab 49152)
# and the one-line error each gives; before, a traceback (reshape, TypeError, struct) or a broken GGUF.
CONFIG_CASES = [
    (_without_head_dim(7), r"num_attention_heads 7 does not divide hidden_size 64"),
    (_set("num_key_value_heads", 3), r"num_key_value_heads 3 does not divide num_attention_heads 4"),
    (_set("head_dim", 15), r"the head size 15 is odd"),
    (_set("num_key_value_heads", 2), r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' has "
                                     r"shape \[64, 64\]; config\.json's sizes give \[32, 64\]"),
    (_set("hidden_size", 32), r"tensor 'model\.embed_tokens\.weight' has shape \[49152, 64\]; .* give \[49152, 32\]"),
    (_set("vocab_size", 49153), r"tensor 'model\.embed_tokens\.weight' has shape \[49152, 64\]; .* \[49153, 64\]"),
    (_set("intermediate_size", 128), r"tensor 'model\.layers\.0\.mlp\.down_proj\.weight' has shape \[64, 256\]"),
    (_set("max_position_embeddings", 2**40), r"max_position_embeddings is 1099511627776, expected a positive integer"),
    (_set("rope_parameters.rope_theta", "1e4"), r"rope_parameters\.rope_theta is '1e4', expected a positive number"),
    (_set("rms_norm_eps", 1e300), r"rms_norm_eps is 1e\+300, expected a positive number"),
    (_transformers4_rope("linear"), r"config\.json: rope_scaling is 'linear', expected an object"),
    (_set("tie_word_embeddings", "false"), r"tie_word_embeddings is 'false'; GGUF export supports only False or True"),
    (_set("bos_token_id", -1), r"config\.json: bos_token_id is -1, expected a token id"),
    (_set("num_hidden_layers", 3), r"config\.json: num_hidden_layers is 3; the weights hold 2 layer\(s\)"),
    # gguf's name map was built for every layer the config names: hours and all memory before any error
    pytest.param(_set("num_hidden_layers", 2**32 - 1), r"num_hidden_layers is 4294967295; the weights hold 2 layer",
                 marks=pytest.mark.timeout(120)),
]


@pytest.mark.parametrize(("edit", "message"), CONFIG_CASES)
def test_config_fields_and_weight_shapes_are_checked(tiny_model_dir: Path, tmp_path: Path, edit, message: str) -> None:
    model = _copy(tiny_model_dir, tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    edit(config)
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(QlassError, match=message):
        export_gguf(model, tmp_path / "m.gguf")
    assert not list(tmp_path.glob("m.gguf*"))


@pytest.mark.timeout(120)
def test_layers_are_counted_not_read_off_the_highest_layer_number(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Before: the check took the highest layer number in the weights, so a config with num_hidden_layers
    4294967295 and layer 1's weights renamed to layer 4294967294 passed it, and gguf's name map was built for
    every layer (hours and all memory)."""
    from safetensors.torch import load_file, save_file

    model = _copy(tiny_model_dir, tmp_path / "m")
    weights = load_file(model / "model.safetensors")
    save_file({k.replace("model.layers.1.", "model.layers.4294967294."): v for k, v in weights.items()},
              model / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((model / "config.json").read_text())
    config["num_hidden_layers"] = 2**32 - 1
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(QlassError, match=r"num_hidden_layers is 4294967295; the weights hold 2 layer\(s\)"):
        export_gguf(model, tmp_path / "m.gguf")


TOKENIZER_CASES = [
    (_set("model", 5), r"tokenizer\.json: model is 5, expected an object"),
    (_set("model.vocab.zzzq", "7"), r"tokenizer\.json: model\.vocab\['zzzq'\] is '7', expected a token id"),
    (_set("added_tokens", "abc"), r"tokenizer\.json: added_tokens is 'abc', expected a list"),
    (_set("pre_tokenizer", {"type": "Sequence", "pretokenizers": 5}), r"pre_tokenizer is Sequence\(pretokenizers=5\)"),
    (_set("post_processor", 5), r"tokenizer\.json: not a tokenizer the tokenizers library reads \(.*PostProcessor"),
    (_set("model.merges", 5), r"tokenizer\.json: not a tokenizer the tokenizers library reads \(.*MergeType"),
]


@pytest.mark.parametrize(("edit", "message"), TOKENIZER_CASES)
def test_tokenizer_fields_are_checked(tiny_model_dir: Path, tmp_path: Path, edit, message: str) -> None:
    model = _copy(tiny_model_dir, tmp_path / "m")
    spec = json.loads((model / "tokenizer.json").read_text())
    edit(spec)
    (model / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(QlassError, match=message):
        export_gguf(model, tmp_path / "m.gguf")
    assert not list(tmp_path.glob("m.gguf*"))


def test_other_files_of_the_folder_are_checked(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The chat template's files and the weights' names and types; each before any GGUF is written."""
    import torch
    from safetensors.torch import load_file, save_file

    def export(name: str, edit) -> None:
        model = _copy(tiny_model_dir, tmp_path / name)
        edit(model)
        export_gguf(model, tmp_path / "m.gguf")

    cases = [
        ("list", lambda m: (m / "tokenizer_config.json").write_text("[1]"),
         r"list/tokenizer_config\.json: expected a JSON object, got list"),
        ("template", lambda m: _edit_json(m / "tokenizer_config.json", chat_template=5),  # was ChatML, silently
         r"template/tokenizer_config\.json: chat_template is 5, expected text or a list of \{name, template\}"),
        ("jinja", lambda m: (m / "chat_template.jinja").write_bytes(b"\xff{{ messages }}"),
         r"jinja/chat_template\.jinja: not UTF-8 text"),
    ]
    weights = load_file(tiny_model_dir / "model.safetensors")
    norm = {"model.norm.weight": weights["model.norm.weight"]}
    cases += [
        ("twice", lambda m: save_file(norm, m / "extra.safetensors"),
         r"twice/model\.safetensors: tensor 'model\.norm\.weight' is also in extra\.safetensors"),
        ("int", lambda m: save_file({**weights, "model.norm.weight": torch.ones(64, dtype=torch.int8)},
                                    m / "model.safetensors"),
         r"int/model\.safetensors: tensor 'model\.norm\.weight' is I8; GGUF export reads F64, F32, F16, BF16"),
        ("bias", lambda m: save_file({**weights, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)},
                                     m / "model.safetensors"),  # HF's Llama (attention_bias false) ignores it
         r"bias/model\.safetensors: tensor 'model\.layers\.0\.self_attn\.q_proj\.bias' has no place"),
    ]
    for name, edit, message in cases:
        with pytest.raises(QlassError, match=message):
            export(name, edit)
    assert not list(tmp_path.glob("m.gguf*"))


def test_extra_body_is_sent_but_cannot_override_what_qlass_sets() -> None:
    """``--policy-arg 'extra_body={...}'`` reaches the backend as a mapping; fields qlass sets itself
    (or top_p / min_p given twice) are refused rather than silently overridden either way."""
    from qlass.config import parse_kv
    from qlass.policy import OpenAIPolicy, load_policy
    from qlass.policy.openai import LLAMA_CPP_PLAIN

    url = f"http://127.0.0.1:{_free_port()}/v1"  # nothing is sent: the model name is given
    options = parse_kv(["extra_body={top_k: 0, top_p: 1.0, min_p: 0.0, repeat_penalty: 1.0}"], "--policy-arg")
    assert load_policy(url, model="m", endpoint="chat", **options).extra_body == LLAMA_CPP_PLAIN
    with pytest.raises(QlassError, match="extra_body sets n, temperature, which qlass sets itself"):
        OpenAIPolicy(url, model="m", endpoint="chat", extra_body={"temperature": 1.0, "n": 3, "top_k": 5})
    with pytest.raises(QlassError, match="extra_body sets min_p"):
        OpenAIPolicy(url, model="m", endpoint="chat", min_p=0.1, extra_body=LLAMA_CPP_PLAIN)
    with pytest.raises(QlassError, match="option 'extra_body' expects dict"):
        load_policy(url, model="m", endpoint="chat", extra_body="top_k=0")


# -- the documented CPU path, end to end ------------------------------------------------------------
@pytest.fixture(scope="module")
def served_default_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """The default model exported by the command (f32), served by llama.cpp's server on 127.0.0.1."""
    installed("llama_cpp.server")
    from qlass.models import default_model_dir

    model = default_model_dir()
    folder = tmp_path_factory.mktemp("served")
    path = folder / "smol-f32.gguf"
    done = subprocess.run([sys.executable, "-m", "qlass", "model", "export-gguf", str(model), "--out", str(path),
                           "--dtype", "f32"], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.strip() == str(path), done.stderr[-2000:]
    # f32 KV cache (GGML type 0) so that nothing but the order of float additions differs from HF's fp32.
    with running_llama_server(path, folder, "--n_threads", "1", "--type_k", "0", "--type_v", "0") as url:
        yield path, url


class ShownCorridor(Corridor):
    """The toy corridor with a worked example in its prompt, so the small default model answers in
    the ``Thought:``/``Action:`` format and walks (its plain prompt gets no action from it)."""

    def prompt(self) -> list[Message]:
        return [Message("user", "You walk through a corridor of rooms to a goal room. Actions: go east, go west, "
                                "look.\nAnswer every turn with two lines:\nThought: <your reasoning>\n"
                                "Action: <one action>"),
                Message("assistant", "OK"),
                Message("user", "Task: reach the goal 1 rooms east. You are in room 0."),
                Message("assistant", "Thought: The goal is one room east of me, so I walk east.\nAction: go east")]


def sciworld_histories() -> list[list[Message]]:
    """ScienceWorld's real instruction and worked example, then three different task turns."""
    from importlib import resources

    text = resources.files("qlass.envs.prompts").joinpath("sciworld.txt").read_text(encoding="utf-8")
    instruction, _, example = text.partition("\n=== EXAMPLE ===\n")
    turns = [t.strip() for t in example.split("\n---\n") if t.strip()]
    prefix = [Message("user", instruction.strip()), Message("assistant", "OK")]
    prefix += [Message("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(turns)]
    tasks = [("Your task is to find a(n) animal. First, focus on the thing. Then, move it to the red box in the "
              "kitchen.\nThis room is called the hallway. In it, you see:\n\tthe agent\n\ta picture\nYou also see:"
              "\n\tA door to the kitchen (that is open)\n\tA door to the outside (that is open)"),
             ("Your task is to boil water. First, focus on the substance.\nThis room is called the kitchen. In it, "
              "you see:\n\ta stove, which is turned off\n\ta sink\n\ta metal pot (containing nothing)"),
             ("Your task is to measure the temperature of a banana.\nThis room is called the workshop. In it, you "
              "see:\n\ta table\n\ta thermometer\nYou also see:\n\tA door to the hallway (that is open)")]
    return [prefix + [Message("user", task)] for task in tasks]


@pytest.mark.slow
def test_greedy_episode_on_llamacpp_matches_hf(served_default_model: tuple[Path, str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """One greedy episode, then greedy outputs on three ScienceWorld prompts, served vs local.

    The requests carry ``LLAMA_CPP_PLAIN``: with llama.cpp's default repeat penalty (1.1) the
    served model walks west at the first step where HF's greedy walks east (logits 27.1 vs 24.9).
    Tolerance: none. Weights and KV cache are f32 on both sides (max logit difference 1e-4 on
    logits spanning -31..41), so greedy decoding could only differ at a near-tie; on these
    prompts there is none, and every output, action and prompt token count must be equal."""
    from qlass.models import default_model_dir
    from qlass.policy import OpenAIPolicy
    from qlass.policy.hf import HFPolicy
    from qlass.policy.openai import LLAMA_CPP_PLAIN

    path, url = served_default_model
    monkeypatch.setenv("QLASS_TEST_API_KEY", KEY)
    model = default_model_dir()
    served = OpenAIPolicy(url, tokenizer=model, api_key_env="QLASS_TEST_API_KEY", extra_body=LLAMA_CPP_PLAIN)
    local = HFPolicy(model, threads=1)
    env = ShownCorridor(step_limit=4)
    task = env.tasks("seen")[2]  # three rooms to walk
    cfg = EpisodeConfig(max_steps=4, max_new_tokens=40)
    got, want = run_episode(env, served, task, cfg), run_episode(env, local, task, cfg)
    assert [(s.output, s.action, s.observation, s.prompt_tokens) for s in got.steps] == \
           [(s.output, s.action, s.observation, s.prompt_tokens) for s in want.steps]
    actions = [s.action for s in got.steps]  # SmolLM walks east, then west, then north
    assert len(actions) == 4 and None not in actions and len(set(actions)) > 1
    histories = sciworld_histories()  # longer prompts (about 1,000 tokens), free-form thoughts
    outputs = [[(c.text, c.prompt_tokens) for c in cands] for cands in served.sample(histories, 1, 0.0, 48)]
    assert outputs == [[(c.text, c.prompt_tokens) for c in cands] for cands in local.sample(histories, 1, 0.0, 48)]
    assert all(cands[0][0].startswith("Thought:") for cands in outputs)
    llm = _vocab_only(path)  # the prompts the server read are HF's very ids, not only as many
    try:
        for history in [got.messages[: len(env.prompt()) + 1 + 2 * k] for k in range(len(got.steps))] + histories:
            ids, _ = encode_conversation(local.tokenizer, history)
            assert llm.tokenize(render(local.tokenizer, history).encode(), add_bos=True, special=True) == ids
    finally:
        llm.close()


def test_out_onto_the_default_models_gguf_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Before: `qlass model export-gguf SFT --out "$(qlass model gguf)"` replaced the GGUF inside the installed
    wheel, the file every default model is made of. The test names it through a link, so that the code before
    the fix (which replaced the link, not what it points to) could not touch the wheel."""
    from qlass.models import default_gguf_path

    link = tmp_path / "default.gguf"
    link.symlink_to(default_gguf_path())
    before = default_gguf_path().stat()
    with pytest.raises(QlassError, match=r"default\.gguf: is the default model's GGUF, inside its installed wheel"):
        export_gguf(tiny_model_dir, link, "f32")
    after = default_gguf_path().stat()
    assert link.is_symlink() and (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_an_export_to_a_file_another_process_writes_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Two exports to one file both wrote its one ``.partial`` file; the second is now refused, naming the holder."""
    from test_locking import hold

    out = tmp_path / "x.gguf"
    holder = hold(out, False)
    try:
        with pytest.raises(QlassError, match=r"x\.gguf is being written by another qlass process \(pid \d+"):
            export_gguf(tiny_model_dir, out)
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists() and not out.with_name("x.gguf.partial").exists()
    assert export_gguf(tiny_model_dir, out) == out and out.read_bytes()[:4] == b"GGUF"
