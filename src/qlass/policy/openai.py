"""OpenAI-compatible servers as policies: vLLM, SGLang, llama.cpp's server, hosted APIs.

Two endpoints:

- ``completions`` (``/v1/completions``): the prompt is rendered *here* by the model's chat template
  (:func:`~qlass.policy.render.render`, the rendering SFT, the local backend and the QNet use), so a
  served SFT checkpoint reads exactly the strings it was trained on. Needs the model's tokenizer.
- ``chat`` (``/v1/chat/completions``): the server applies its own template (hosted chat models).

``endpoint="auto"`` uses ``completions`` when a tokenizer is given and ``chat`` otherwise.

One request asks for all ``n`` candidates (``"n": n``); servers that return fewer (llama.cpp's
server ignores ``n``) are asked again for the rest. History ``i`` has a base seed as in the local
backend (``seed[i]`` for a list, ``seed + i * SEED_STRIDE`` for one int), sent with its first
request; an extra request that already holds ``k`` candidates is sent
:func:`~qlass.seeding.candidate_seed` ``(base, k)``. Stop sequences end the output at the next
turn; the text is then cut after its ``Action:`` line, so one completion is one
``Thought: ...\\nAction: ...``. A choice the server ended on the token limit
(``finish_reason == "length"``) before its action line was complete is returned as generated with
``truncated=True`` (:func:`~qlass.policy.outputs.final_output`). ``top_p`` and ``min_p`` are sent
when set (vLLM, SGLang and llama.cpp take ``min_p``; hosted APIs may refuse it). Token counts
come from the response's ``usage`` (split over the choices by their token counts where ``n > 1``),
or are counted with the tokenizer when the server reports none. A reply of the wrong shape (a
missing or mistyped field) is a :class:`~qlass.errors.QlassError` naming the URL and the field
path, e.g. ``choices[0].message.content``.

Log-probabilities must be numbers <= 0 and texts valid Unicode; an HTTP 200 answer carrying
``{"error": ...}`` shows its message. Timeouts, retries, the API key and redirects:
:mod:`qlass.policy.openai_http`.
"""

from __future__ import annotations

import logging
import math
import random
import threading
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from ..errors import QlassError
from ..jsonl import is_text
from ..seeding import candidate_seed, history_seeds
from ..types import Completion, History, Message
from .base import check_sample_args
from .openai_http import ApiClient
from .option_values import check_openai_options
from .outputs import final_output
from .render import encode_conversation, ensure_chat_template, fit_history, render

log = logging.getLogger(__name__)

DEFAULT_STOP = ("\nObservation:", "\nThought:", "<|im_end|>")
_MISSING = object()
LLAMA_CPP_PLAIN = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0}
LOGPROB_SLACK = 1e-4
"""How far above 0 a server's token log-probability may round and still be taken."""
MAX_TOKEN_COUNT = 10**9
"""More tokens than this in one request's ``usage`` is a broken server or proxy, not a count."""
_OWN_FIELDS = {"model", "prompt", "messages", "max_tokens", "temperature", "stop", "n", "seed", "logprobs"}


class OpenAIPolicy:
    """A policy served over the OpenAI API, implementing :class:`~qlass.policy.base.Policy`.

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1``.
        model: model name sent with each request; by default the first one ``/models`` lists.
        endpoint: ``completions``, ``chat`` or ``auto`` (see the module docstring).
        tokenizer: a tokenizer folder (or tokenizer object) of the served model: renders prompts for
            ``completions``, counts tokens the server does not report, enables ``max_length``.
        api_key_env: environment variable holding the API key (none needed for local servers).
        timeout: seconds a request may take, the whole answer's arrival included (> 0).
            max_retries / backoff / max_backoff: retry policy (>= 0).
        concurrency: histories of one call sent at once (each its own request).
        stop: stop sequences. logprobs: ask for token log-probabilities (``Completion.logprob``).
        max_length: drop the oldest turns so prompt + ``max_new_tokens`` fit (needs ``tokenizer``).
        seed: seeds the per-call seeds of calls made with ``seed=None``.
        top_p / min_p: nucleus and min-p sampling (sent only when not 1 / 0).
        extra_body: more fields for every request, e.g. a server's own sampling options. llama.cpp's
            server (``llama_cpp.server``) filters and penalizes by default (top_k 40, top_p 0.95,
            min_p 0.05, repeat_penalty 1.1); :data:`LLAMA_CPP_PLAIN` turns that off, so greedy decoding
            and sampling follow the model's own distribution as the local backend does. Fields this
            class sets itself (model, prompt, n, temperature ...) cannot be given here.
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        endpoint: str = "auto",
        tokenizer: Any = None,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 120.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        concurrency: int = 8,
        stop: Sequence[str] = DEFAULT_STOP,
        logprobs: bool = False,
        max_length: int | None = None,
        seed: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        self.extra_body = dict(extra_body or {})
        given = {"top_p": top_p < 1, "min_p": min_p > 0}
        clash = sorted(k for k in self.extra_body if k in _OWN_FIELDS or given.get(k))
        if clash:
            raise QlassError(f"policy option extra_body sets {', '.join(clash)}, which qlass sets itself "
                             "(give top_p / min_p once, as policy options or in extra_body)")
        check_openai_options({"top_p": top_p, "min_p": min_p, "endpoint": endpoint, "concurrency": concurrency,
                              "max_length": max_length})
        self.top_p, self.min_p = float(top_p), float(min_p)
        self.base_url = base_url.rstrip("/")
        if isinstance(tokenizer, (str, Path)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.tokenizer = ensure_chat_template(tokenizer) if tokenizer is not None else None
        if endpoint == "auto":
            endpoint = "completions" if self.tokenizer is not None else "chat"
        if endpoint == "completions" and self.tokenizer is None:
            raise QlassError("the completions endpoint renders prompts locally: pass tokenizer=<model or tokenizer "
                             "folder>")
        if max_length is not None and self.tokenizer is None:
            raise QlassError("max_length needs tokenizer= to count prompt tokens")
        self.endpoint = endpoint
        self.concurrency = int(concurrency)
        self.stop = list(stop)
        self.logprobs = bool(logprobs)
        self.max_length = max_length
        self._api = ApiClient(self.base_url, api_key_env, timeout, max_retries, backoff, max_backoff, seed + 1)
        self._rng = random.Random(seed)
        self._warned_null = False
        self.model = model or ""
        if not self.model:
            self.model = self._first_model()

    def __repr__(self) -> str:
        return f"OpenAIPolicy({self.base_url!r}, model={self.model!r}, endpoint={self.endpoint!r})"

    # -- public API ------------------------------------------------------------------------
    def sample(
        self,
        histories: Sequence[History],
        n: int = 1,
        temperature: float = 0.0,
        max_new_tokens: int = 128,
        seed: int | Sequence[int] | None = None,
    ) -> list[list[Completion]]:
        """``n`` completions per history, one request per history (all ``n`` in it), sent concurrently."""
        check_sample_args(n, temperature, max_new_tokens)
        bases = history_seeds(seed, len(histories), self._rng)
        stop = threading.Event()

        def one(i: int) -> list[Completion]:
            return self._sample_one(list(histories[i]), n, temperature, max_new_tokens, bases[i], stop)

        if len(histories) <= 1 or self.concurrency == 1:
            return [one(i) for i in range(len(histories))]
        pool = ThreadPoolExecutor(min(self.concurrency, len(histories)))
        futures = [pool.submit(one, i) for i in range(len(histories))]
        try:
            done, running = wait(futures, return_when=FIRST_EXCEPTION)
            if running:  # a history failed while others' requests are under way: its error, now
                next(f for f in done if f.exception() is not None).result()
            return [f.result() for f in futures]
        except BaseException:  # Ctrl-C or one history's error: requests not yet sent are not sent, and
            stop.set()  # those under way end after their current attempt, not after every retry
            raise
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def score_outputs(self, histories: Sequence[History], outputs: Sequence[str]) -> list[tuple[float, int]]:
        """Not available: teacher-forced scoring needs the model's log-probabilities of given text."""
        raise QlassError(f"{self!r} cannot score given outputs (teacher forcing needs a local model folder); "
                         "use a local policy for likelihood scoring")

    # -- requests --------------------------------------------------------------------------
    def _sample_one(self, history: list[Message], n: int, temperature: float, max_new_tokens: int,
                    seed: int, stop: threading.Event | None = None) -> list[Completion]:
        if self.max_length is not None:
            budget = self.max_length - max_new_tokens
            if budget < 1:  # as the local backend says it
                raise QlassError(f"max_new_tokens ({max_new_tokens}) leaves no room for a prompt in max_length "
                                 f"{self.max_length}")
            history = fit_history(history, lambda m: len(encode_conversation(self.tokenizer, m, True)[0]) <= budget)
        prompt_ids = encode_conversation(self.tokenizer, history, True)[0] if self.tokenizer is not None else None
        body: dict[str, Any] = {**self.extra_body, "model": self.model, "max_tokens": max_new_tokens,
                                "temperature": temperature, "stop": self.stop}
        if self.top_p < 1:
            body["top_p"] = self.top_p
        if self.min_p > 0:
            body["min_p"] = self.min_p
        if self.endpoint == "completions":
            path = "/completions"
            body["prompt"] = render(self.tokenizer, history, add_generation_prompt=True)
            if self.logprobs:
                body["logprobs"] = 1
        else:
            path = "/chat/completions"
            body["messages"] = [{"role": m.role, "content": m.content} for m in history]
            if self.logprobs:
                body["logprobs"] = True
        want = 1 if temperature == 0 else n
        got: list[Completion] = []
        while len(got) < want:
            reply = self._api.request(path, dict(body, n=want - len(got), seed=candidate_seed(seed, len(got))), stop)
            got.extend(self._parse(reply, path, prompt_ids)[: want - len(got)])
        return got * n if want == 1 else got

    def _first_model(self) -> str:
        data = self._api.request("/models").get("data")
        first = data[0] if isinstance(data, list) and data else None
        if not isinstance(first, dict) or not isinstance(first.get("id"), str) or not first["id"]:
            raise QlassError(f"{self.base_url}/models lists no model (no string data[0].id); pass model=<name>")
        return first["id"]

    # -- responses -------------------------------------------------------------------------
    def _parse(self, reply: dict[str, Any], path: str, prompt_ids: list[int] | None) -> list[Completion]:
        """Completions from one reply, with per-choice token counts (see the module docstring)."""
        where = f"{self.base_url}{path}"
        choices = reply.get("choices", _MISSING)
        if not (isinstance(choices, list) and choices) and reply.get("error") is not None:  # an error, HTTP 200
            error = reply["error"]
            message = error.get("message", error) if isinstance(error, dict) else error
            raise QlassError(f"{where}: the server answered an error: {self._api.redact(str(message))[:300]}")
        if not isinstance(choices, list) or not choices:
            raise _malformed(where, "choices", choices, "a non-empty list")
        choices = _by_index(choices, where)
        texts, cut, token_lists, logprobs = [], [], [], []
        for k, choice in enumerate(choices):
            if not isinstance(choice, dict):
                raise _malformed(where, f"choices[{k}]", choice, "an object")
            holder, field, name = choice, f"choices[{k}].text", "text"
            if path != "/completions":
                holder, field, name = choice.get("message", _MISSING), f"choices[{k}].message.content", "content"
                if not isinstance(holder, dict):
                    raise _malformed(where, f"choices[{k}].message", holder, "an object")
            raw = holder.get(name, _MISSING)
            if raw is not None and not isinstance(raw, str):
                raise _malformed(where, field, raw, "a string")
            if raw is not None and not is_text(raw):
                raise QlassError(f"{where}: malformed response: {field} is not valid Unicode (it holds a lone "
                                 "surrogate, a '\\ud800'-style escape)")
            if raw is None and not self._warned_null:
                log.warning("%s: %s is null (a refusal or a tool call?); played as an empty output", where, field)
                self._warned_null = True
            texts.append(raw or "")
            cut.append(choice.get("finish_reason") == "length")
            token_lists.append(_token_logprobs(choice.get("logprobs"), where, f"choices[{k}].logprobs"))
            logprobs.append(sum(token_lists[-1]) if token_lists[-1] else None)
        usage = reply.get("usage")
        if usage is not None and not isinstance(usage, dict):
            raise _malformed(where, "usage", usage, "an object")
        prompt_tokens, total = (_count(usage or {}, name, where) for name in ("prompt_tokens", "completion_tokens"))
        if prompt_tokens is None:
            if prompt_ids is None:
                raise QlassError(f"{where}: response has no usage.prompt_tokens; pass tokenizer= to count them")
            prompt_tokens = len(prompt_ids)
        counts = self._completion_counts(texts, token_lists, total, where)
        out = []
        for text, stopped_by_limit, count, lp, tokens in zip(texts, cut, counts, logprobs, token_lists):
            text, truncated = final_output(text, stopped_by_limit)
            own = len(tokens) if lp is not None and len(tokens) < count else None  # what the logprob sums over
            out.append(Completion(text, prompt_tokens, count, lp, truncated, logprob_tokens=own))
        return out

    def _completion_counts(self, texts: list[str], token_lists: list[list[float]], total: int | None,
                           where: str) -> list[int]:
        if all(token_lists):  # exact per choice, unless the server counts tokens they leave out (llama.cpp's
            lengths = [len(t) for t in token_lists]  # server drops the stop string's; usage counts them)
            return lengths if total is None or total <= sum(lengths) else _apportion(total, lengths)
        if total is not None and len(texts) == 1:
            return [total]
        if self.tokenizer is not None:
            counted = [len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
            return counted if total is None else _apportion(total, counted)
        if total is None:
            raise QlassError(f"{where}: response has no usage.completion_tokens; pass tokenizer= to count them")
        return _apportion(total, [1] * len(texts))


def _by_index(choices: list[Any], where: str) -> list[Any]:
    """``choices`` in the order of their ``index`` fields when every one has an integer index (a server
    may send them in another order: candidate ``k`` must be the same choice for the same seed), else
    as sent; indices given twice are a malformed reply."""
    indices = [c.get("index") if isinstance(c, dict) else None for c in choices]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        return choices
    if len(set(indices)) != len(indices):
        raise QlassError(f"{where}: malformed response: choices give an index twice ({sorted(indices)})")
    return [c for _, c in sorted(zip(indices, choices), key=lambda pair: pair[0])]


def _token_logprobs(logprobs: Any, where: str, field: str) -> list[float]:
    """Sampled tokens' log-probabilities from a completions or chat ``logprobs`` object ([] if none)."""
    if logprobs is None:
        return []
    if not isinstance(logprobs, dict):
        raise _malformed(where, field, logprobs, "an object or null")
    if logprobs.get("token_logprobs") is not None:  # completions: {"token_logprobs": [x, ...]}
        values = logprobs["token_logprobs"]
        if not isinstance(values, list):
            raise _malformed(where, f"{field}.token_logprobs", values, "a list")
        paths = [f"{field}.token_logprobs[{i}]" for i in range(len(values))]
    elif logprobs.get("content") is not None:  # chat: {"content": [{"logprob": x, ...}, ...]}
        entries = logprobs["content"]
        if not isinstance(entries, list):
            raise _malformed(where, f"{field}.content", entries, "a list")
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise _malformed(where, f"{field}.content[{i}]", entry, "an object")
        values = [entry.get("logprob", _MISSING) for entry in entries]
        paths = [f"{field}.content[{i}].logprob" for i in range(len(values))]
    else:
        return []
    for value, path in zip(values, paths):
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise _malformed(where, path, value, "a number")
        if isinstance(value, int) and not -MAX_TOKEN_COUNT <= value <= 0:  # beyond a float's range, too
            raise QlassError(f"{where}: malformed response: {path} is an integer of {len(str(value))} digits, "
                             "expected a log-probability (a number <= 0)")
        if value is not None and (math.isnan(value) or value > LOGPROB_SLACK):
            raise QlassError(f"{where}: malformed response: {path} is {value!r}, expected a log-probability "
                             "(a number <= 0)")
    return [min(float(x), 0.0) for x in values if x is not None]  # rounded above 0: a probability of 1


def _count(usage: dict[str, Any], name: str, where: str) -> int | None:
    """``usage[name]`` as a token count, ``None`` when the server left it out."""
    value = usage.get(name)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise _malformed(where, f"usage.{name}", value, "a non-negative integer")
    if value is not None and value > MAX_TOKEN_COUNT:
        raise QlassError(f"{where}: malformed response: usage.{name} is {value}, more tokens than any request "
                         "could hold")
    return value


def _malformed(where: str, field: str, value: Any, expected: str) -> QlassError:
    """The error for a reply field of the wrong shape; it names the field and the JSON type, never the value."""
    if value is _MISSING or value is None:
        got = "missing" if value is _MISSING else "null"
    elif isinstance(value, (list, dict)) and not value:
        got = "an empty list" if isinstance(value, list) else "an empty object"
    else:
        kinds = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
                 dict: "an object"}
        got = kinds.get(type(value), type(value).__name__)
    return QlassError(f"{where}: malformed response: {field} is {got}, expected {expected}")


def _apportion(total: int, weights: list[int]) -> list[int]:
    """Split ``total`` in proportion to ``weights`` (largest remainders), summing exactly to it."""
    weights = weights if sum(weights) else [1] * len(weights)
    raw = [total * w / sum(weights) for w in weights]
    parts = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - parts[i], reverse=True)[: total - sum(parts)]:
        parts[i] += 1
    return parts
