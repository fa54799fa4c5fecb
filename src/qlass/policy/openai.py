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
when set (vLLM, SGLang and llama.cpp take ``min_p``; hosted APIs may refuse it). Token counts come from the response's ``usage``
(split over the choices by their token counts where ``n > 1``), or are counted with the tokenizer
when the server reports none. Requests time out, and 429, 5xx and connection errors are retried
with exponential backoff (honouring ``Retry-After``). The API key is read from an environment
variable (``OPENAI_API_KEY`` unless told otherwise), sent only in the ``Authorization`` header and
never logged or shown.

Transport is the standard library's ``urllib`` rather than ``httpx``: a request here lasts
seconds (a whole generation), so connection pooling would save nothing measurable, while the retry,
backoff and timeout policy is ours either way; it keeps the core free of another dependency tree.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import os
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..errors import QlassError
from ..seeding import candidate_seed
from ..types import Completion, History, Message
from .hf import fit_history, history_seeds
from .outputs import final_output
from .render import encode_conversation, ensure_chat_template, render

log = logging.getLogger(__name__)

DEFAULT_STOP = ("\nObservation:", "\nThought:", "<|im_end|>")
_RETRY_ERRORS = (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException)


class OpenAIPolicy:
    """A policy served over the OpenAI API, implementing :class:`~qlass.policy.base.Policy`.

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1``.
        model: model name sent with each request; by default the first one ``/models`` lists.
        endpoint: ``completions``, ``chat`` or ``auto`` (see the module docstring).
        tokenizer: a tokenizer folder (or tokenizer object) of the served model: renders prompts for
            ``completions``, counts tokens the server does not report, enables ``max_length``.
        api_key_env: environment variable holding the API key (none needed for local servers).
        timeout: seconds per request. max_retries / backoff / max_backoff: retry policy.
        concurrency: histories of one call sent at once (each its own request).
        stop: stop sequences. logprobs: ask for token log-probabilities (``Completion.logprob``).
        max_length: drop the oldest turns so prompt + ``max_new_tokens`` fit (needs ``tokenizer``).
        seed: seeds the per-call seeds of calls made with ``seed=None``.
        top_p / min_p: nucleus and min-p sampling (sent only when not 1 / 0).
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
    ) -> None:
        if not 0 < top_p <= 1:
            raise QlassError(f"policy option top_p must be in (0, 1], got {top_p!r}")
        if not 0 <= min_p <= 1:
            raise QlassError(f"policy option min_p must be in [0, 1], got {min_p!r}")
        self.top_p, self.min_p = float(top_p), float(min_p)
        self.base_url = base_url.rstrip("/")
        if isinstance(tokenizer, (str, Path)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.tokenizer = ensure_chat_template(tokenizer) if tokenizer is not None else None
        if endpoint == "auto":
            endpoint = "completions" if self.tokenizer is not None else "chat"
        if endpoint not in ("completions", "chat"):
            raise QlassError(f"unknown endpoint {endpoint!r}; use completions, chat or auto")
        if endpoint == "completions" and self.tokenizer is None:
            raise QlassError("the completions endpoint renders prompts locally: pass tokenizer=<model or tokenizer folder>")
        if max_length is not None and self.tokenizer is None:
            raise QlassError("max_length needs tokenizer= to count prompt tokens")
        self.endpoint = endpoint
        self.timeout, self.max_retries = float(timeout), int(max_retries)
        self.backoff, self.max_backoff = float(backoff), float(max_backoff)
        self.concurrency = max(1, int(concurrency))
        self.stop = list(stop)
        self.logprobs = bool(logprobs)
        self.max_length = max_length
        self._api_key = os.environ.get(api_key_env) or None
        if self._api_key is None:
            log.debug("no API key in $%s; sending requests without one", api_key_env)
        self._opener = _opener_for(self.base_url)
        self._rng = random.Random(seed)
        self._jitter = random.Random(seed + 1)
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
        if n < 1 or temperature < 0 or max_new_tokens < 1:
            raise ValueError(f"need n >= 1, temperature >= 0, max_new_tokens >= 1 (got {n}, {temperature}, "
                             f"{max_new_tokens})")
        bases = history_seeds(seed, len(histories), self._rng)

        def one(i: int) -> list[Completion]:
            return self._sample_one(list(histories[i]), n, temperature, max_new_tokens, bases[i])

        if len(histories) <= 1 or self.concurrency == 1:
            return [one(i) for i in range(len(histories))]
        with ThreadPoolExecutor(min(self.concurrency, len(histories))) as pool:
            return list(pool.map(one, range(len(histories))))

    def score_outputs(self, histories: Sequence[History], outputs: Sequence[str]) -> list[tuple[float, int]]:
        """Not available: teacher-forced scoring needs the model's log-probabilities of given text."""
        raise QlassError(f"{self!r} cannot score given outputs (teacher forcing needs a local model folder); "
                         "use a local policy for likelihood scoring")

    # -- requests --------------------------------------------------------------------------
    def _sample_one(self, history: list[Message], n: int, temperature: float, max_new_tokens: int,
                    seed: int) -> list[Completion]:
        if self.max_length is not None:
            budget = self.max_length - max_new_tokens
            history = fit_history(history, lambda m: len(encode_conversation(self.tokenizer, m, True)[0]) <= budget)
        prompt_ids = encode_conversation(self.tokenizer, history, True)[0] if self.tokenizer is not None else None
        body: dict[str, Any] = {"model": self.model, "max_tokens": max_new_tokens, "temperature": temperature,
                                "stop": self.stop}
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
            reply = self._request(path, dict(body, n=want - len(got), seed=candidate_seed(seed, len(got))))
            got.extend(self._parse(reply, path, prompt_ids)[: want - len(got)])
        return got * n if want == 1 else got

    def _request(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """POST ``body`` (GET when ``None``) and return the JSON reply, retrying transient failures."""
        url = self.base_url + path
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        data = None if body is None else json.dumps(body).encode("utf-8")
        for attempt in range(self.max_retries + 1):
            delay = min(self.max_backoff, self.backoff * 2**attempt) * (0.5 + self._jitter.random())
            try:
                log.debug("%s %s (attempt %d)", "GET" if data is None else "POST", url, attempt + 1)
                request = urllib.request.Request(url, data=data, headers=headers, method="GET" if data is None else "POST")
                with self._opener.open(request, timeout=self.timeout) as resp:
                    raw = resp.read()
                break
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:300].decode("utf-8", "replace")
                if exc.code != 429 and exc.code < 500:
                    raise QlassError(f"{url}: HTTP {exc.code}: {detail}") from None
                problem = f"HTTP {exc.code}: {detail}"
                retry_after = exc.headers.get("Retry-After", "") if exc.headers else ""
                if retry_after.strip().replace(".", "", 1).isdigit():
                    delay = min(self.max_backoff, float(retry_after))
            except _RETRY_ERRORS as exc:
                problem = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            if attempt == self.max_retries:
                raise QlassError(f"{url}: giving up after {attempt + 1} attempts; last error {problem}")
            log.warning("%s: %s; retrying in %.1f s", url, problem, delay)
            time.sleep(delay)
        try:
            reply = json.loads(raw)
        except ValueError:
            raise QlassError(f"{url}: response is not JSON: {raw[:200]!r}") from None
        if not isinstance(reply, dict):
            raise QlassError(f"{url}: response is not a JSON object")
        return reply

    def _first_model(self) -> str:
        reply = self._request("/models")
        try:
            return str(reply["data"][0]["id"])
        except (KeyError, IndexError, TypeError):
            raise QlassError(f"{self.base_url}/models lists no model; pass model=<name>") from None

    # -- responses -------------------------------------------------------------------------
    def _parse(self, reply: dict[str, Any], path: str, prompt_ids: list[int] | None) -> list[Completion]:
        """Completions from one reply, with per-choice token counts (see the module docstring)."""
        where = f"{self.base_url}{path}"
        choices = reply.get("choices")
        if not isinstance(choices, list) or not choices:
            raise QlassError(f"{where}: response has no 'choices'")
        texts, cut, token_lists, logprobs = [], [], [], []
        for k, choice in enumerate(choices):
            try:
                raw = choice["text"] if path == "/completions" else choice["message"]["content"]
            except (KeyError, TypeError):
                raise QlassError(f"{where}: choice {k} has no {'text' if path == '/completions' else 'message.content'}") from None
            texts.append(raw or "")
            cut.append(choice.get("finish_reason") == "length")
            token_lists.append(_token_logprobs(choice.get("logprobs")))
            logprobs.append(sum(token_lists[-1]) if token_lists[-1] else None)
        usage = reply.get("usage") or {}
        prompt_tokens = usage.get("prompt_tokens")
        if prompt_tokens is None:
            if prompt_ids is None:
                raise QlassError(f"{where}: response has no usage.prompt_tokens; pass tokenizer= to count them")
            prompt_tokens = len(prompt_ids)
        counts = self._completion_counts(texts, token_lists, usage.get("completion_tokens"), where)
        out = []
        for text, stopped_by_limit, count, lp in zip(texts, cut, counts, logprobs):
            text, truncated = final_output(text, stopped_by_limit)
            out.append(Completion(text, int(prompt_tokens), count, lp, truncated))
        return out

    def _completion_counts(self, texts: list[str], token_lists: list[list[float]], total: int | None,
                           where: str) -> list[int]:
        if all(token_lists):
            return [len(t) for t in token_lists]
        if total is not None and len(texts) == 1:
            return [int(total)]
        if self.tokenizer is not None:
            counted = [len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
            return counted if total is None else _apportion(int(total), counted)
        if total is None:
            raise QlassError(f"{where}: response has no usage.completion_tokens; pass tokenizer= to count them")
        return _apportion(int(total), [1] * len(texts))


def _token_logprobs(logprobs: Any) -> list[float]:
    """Sampled tokens' log-probabilities from a completions or chat ``logprobs`` object ([] if none)."""
    if not isinstance(logprobs, dict):
        return []
    if isinstance(logprobs.get("token_logprobs"), list):
        return [float(x) for x in logprobs["token_logprobs"] if x is not None]
    if isinstance(logprobs.get("content"), list):
        return [float(x["logprob"]) for x in logprobs["content"] if isinstance(x, dict) and "logprob" in x]
    return []


def _apportion(total: int, weights: list[int]) -> list[int]:
    """Split ``total`` in proportion to ``weights`` (largest remainders), summing exactly to it."""
    weights = weights if sum(weights) else [1] * len(weights)
    raw = [total * w / sum(weights) for w in weights]
    parts = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - parts[i], reverse=True)[: total - sum(parts)]:
        parts[i] += 1
    return parts


def _opener_for(base_url: str) -> urllib.request.OpenerDirector:
    """An opener that ignores proxy settings for loopback servers (uses them otherwise)."""
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme not in ("http", "https"):
        raise QlassError(f"{base_url}: not an http(s) URL")
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    return urllib.request.build_opener(urllib.request.ProxyHandler({})) if loopback else urllib.request.build_opener()
