"""Local Hugging Face causal LMs as policies: shared prefill, KV-cache reuse, action-line stopping.

- All ``n`` candidates of a history come from one prefill: the prompt's KV cache is computed once
  and expanded to ``n`` rows, which then decode in one batch.
- The KV caches of recent prompts are kept (LRU). A new prompt whose token ids extend a cached one
  (the next turn of an episode, or a child node in an exploration tree) only prefills its new
  tokens; :func:`~qlass.policy.render.encode_conversation` is prefix-stable, so this is exact.
- Decoding stops at the end of the ``Action:`` line, at EOS, or at the end-of-turn token.
- Optional bf16 autocast on CPU (AVX512-BF16/AMX machines run it 1.6–2.2× faster).
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import QlassError
from ..types import Completion, History, Message
from .render import encode_conversation, ensure_chat_template, truncate_history

log = logging.getLogger(__name__)

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>")


def default_keep_prefix(messages: Sequence[Message]) -> int:
    """Messages to keep when truncating: everything up to the task turn, i.e. the last user turn
    that is not an ``Observation:`` (the agent loop's layout)."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].role == "user" and not messages[i].content.startswith("Observation:"):
            return i + 1
    return min(1, len(messages))


def complete_action(text: str) -> str | None:
    """``text`` cut after its first complete ``Action:`` line (non-empty and ended by a newline),
    or ``None`` while no such line exists."""
    head, sep, tail = text.partition("Action:")
    if not sep or "\n" not in tail.lstrip(" "):
        return None
    action = tail.lstrip(" ").split("\n", 1)[0].strip()
    return f"{head}Action: {action}" if action else None


def load_causal_lm(path: str | Path, dtype: str = "float32") -> tuple[Any, Any]:
    """Load a causal-LM folder and its tokenizer (with a chat template), quietly and in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = Path(path)
    if not (path / "config.json").exists():
        raise QlassError(f"{path}: not a model folder (no config.json); `qlass model default` prints the default one")
    hf_logging.disable_progress_bar()
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise QlassError(f"unknown dtype {dtype!r}; use float32 or bfloat16")
    tokenizer = ensure_chat_template(AutoTokenizer.from_pretrained(path))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).eval()
    return model, tokenizer


@dataclass
class _Entry:
    cache: Any
    logits: torch.Tensor


class HFPolicy:
    """A local causal LM implementing :class:`~qlass.policy.base.Policy`."""

    def __init__(
        self,
        model_dir: str | Path,
        dtype: str = "float32",
        autocast: bool = False,
        max_length: int = 4096,
        cache_slots: int = 8,
        threads: int | None = None,
        seed: int = 0,
    ) -> None:
        if threads:
            torch.set_num_threads(int(threads))
        self.model, self.tokenizer = load_causal_lm(model_dir, dtype)
        self.model_dir = Path(model_dir)
        self.autocast = bool(autocast)
        self.max_length = int(max_length)
        self.cache_slots = int(cache_slots)
        self._caches: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()
        self._rng = random.Random(seed)
        vocab = self.tokenizer.get_vocab()
        stops = {self.tokenizer.eos_token_id} | {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
        self.stop_ids = {s for s in stops if s is not None}
        self.newline_ids = {i for t, i in vocab.items() if "Ċ" in t or "\n" in t}
        self.prefill_tokens = 0

    # -- public API ------------------------------------------------------------------------
    def sample(
        self,
        histories: Sequence[History],
        n: int = 1,
        temperature: float = 0.0,
        max_new_tokens: int = 128,
        seed: int | None = None,
    ) -> list[list[Completion]]:
        """``n`` completions per history from one shared prefill each (see module docstring)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        out = []
        for k, history in enumerate(histories):
            call_seed = self._rng.getrandbits(62) if seed is None else seed + 7919 * k
            out.append(self._sample_one(list(history), n, temperature, max_new_tokens, call_seed))
        return out

    def encode(self, history: Sequence[Message], reserve: int = 0) -> list[int]:
        """Prompt ids of ``history``, oldest turns dropped so that ``reserve`` new tokens still fit."""
        budget = self.max_length - reserve
        ids, _ = encode_conversation(self.tokenizer, history, add_generation_prompt=True)
        if len(ids) <= budget:
            return ids
        keep = default_keep_prefix(history)
        fits = lambda msgs: len(encode_conversation(self.tokenizer, msgs, True)[0]) <= budget  # noqa: E731
        ids, _ = encode_conversation(self.tokenizer, truncate_history(history, keep, fits), True)
        return ids[-budget:]

    # -- internals -------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].float(), out.cache

    def _prefill(self, ids: list[int]) -> _Entry:
        """The cache and last logits of ``ids``, reusing the longest cached prefix."""
        from transformers import DynamicCache

        key = tuple(ids)
        if key in self._caches:
            self._caches.move_to_end(key)
            return self._caches[key]
        best: tuple[int, ...] = ()
        for cached in self._caches:
            if len(best) < len(cached) < len(key) and key[: len(cached)] == cached:
                best = cached
        cache = DynamicCache(config=self.model.config)
        if best:
            src = self._caches[best].cache
            cache = DynamicCache(ddp_cache_data=[(layer.keys, layer.values) for layer in src.layers],
                                 config=self.model.config)
        new = torch.tensor([ids[len(best):]], dtype=torch.long)
        self.prefill_tokens += new.shape[1]
        logits, cache = self._forward(new, cache)
        entry = _Entry(cache, logits)
        self._caches[key] = entry
        while len(self._caches) > self.cache_slots:
            self._caches.popitem(last=False)
        return entry

    def _sample_one(self, history: list[Message], n: int, temperature: float, max_new_tokens: int,
                    seed: int) -> list[Completion]:
        from transformers import DynamicCache

        ids = self.encode(history, reserve=max_new_tokens)
        entry = self._prefill(ids)
        rows = 1 if temperature == 0 else n
        cache = DynamicCache(ddp_cache_data=[(layer.keys, layer.values) for layer in entry.cache.layers],
                             config=self.model.config)
        if rows > 1:
            cache.batch_repeat_interleave(rows)
        logits = entry.logits.expand(rows, -1)
        gen = torch.Generator().manual_seed(seed)
        tokens: list[list[int]] = [[] for _ in range(rows)]
        logprob = [0.0] * rows
        done = [False] * rows
        texts = [""] * rows
        for _ in range(max_new_tokens):
            logp = torch.log_softmax(logits, dim=-1)
            if temperature == 0:
                nxt = logits.argmax(dim=-1)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
            for r in range(rows):
                if done[r]:
                    continue
                tok = int(nxt[r])
                tokens[r].append(tok)
                logprob[r] += float(logp[r, tok])
                if tok in self.stop_ids:
                    done[r] = True
                    continue
                piece = self.tokenizer.decode([tok])
                texts[r] += piece
                if "\n" in piece and complete_action(texts[r]) is not None:
                    done[r] = True
            if all(done):
                break
            feed = torch.tensor([[t[-1]] for t in tokens], dtype=torch.long)
            logits, cache = self._forward(feed, cache)
        results = []
        for r in range(rows):
            text = self.tokenizer.decode([t for t in tokens[r] if t not in self.stop_ids])
            text = complete_action(text + "\n") or text
            results.append(Completion(text.strip(), len(ids), len(tokens[r]), logprob[r]))
        if rows == 1 and n > 1:
            results = results * n
        return results
