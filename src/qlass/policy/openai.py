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
when the server reports none. A reply of the wrong shape (a missing or mistyped field) is a
:class:`~qlass.errors.QlassError` naming the URL and the field path, e.g. ``choices[0].message.content``.

Requests time out (the whole answer must arrive within ``timeout``); 429, 5xx, timeouts and broken
connections are retried with exponential backoff (honouring ``Retry-After``). A refused connection
(nothing listens there) is not retried: it fails at once, naming the URL. The API key is read from
an environment variable (``OPENAI_API_KEY`` unless told otherwise) and sent only in the
``Authorization`` header; error texts and log lines show it as ``***`` (a server or proxy may echo
it back). Redirects are followed as curl and ``requests`` follow them: one to the same origin keeps
the header, one to another origin (scheme, host or port differ) goes without it, with a warning
naming both origins, so the key never reaches a host it was not given for. Log-probabilities must be
numbers <= 0 and texts valid Unicode; an HTTP 200 answer carrying ``{"error": ...}`` shows its message.

Transport is the standard library's ``urllib`` rather than ``httpx``: a request here lasts
seconds (a whole generation), so connection pooling would save nothing measurable, while the retry,
backoff and timeout policy is ours either way; it keeps the core free of another dependency tree.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import math
import os
import random
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..errors import QlassError
from ..jsonl import is_text
from ..seeding import candidate_seed, history_seeds
from ..types import Completion, History, Message
from .outputs import final_output
from .render import encode_conversation, ensure_chat_template, fit_history, render

log = logging.getLogger(__name__)

DEFAULT_STOP = ("\nObservation:", "\nThought:", "<|im_end|>")
_RETRY_ERRORS = (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException)
_DEFAULT_PORTS = {"http": 80, "https": 443}
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
        for name, value, positive in (("timeout", timeout, True), ("max_retries", max_retries, False),
                                      ("backoff", backoff, False), ("max_backoff", max_backoff, False)):
            if (value <= 0) if positive else (value < 0):
                raise QlassError(f"policy option {name} must be {'> 0' if positive else '>= 0'}, got {value!r}")
        self.timeout, self.max_retries = float(timeout), int(max_retries)
        self.backoff, self.max_backoff = float(backoff), float(max_backoff)
        self.concurrency = max(1, int(concurrency))
        self.stop = list(stop)
        self.logprobs = bool(logprobs)
        self.max_length = max_length
        self._api_key = os.environ.get(api_key_env, "").strip() or None
        if self._api_key is None:
            log.debug("no API key in $%s; sending requests without one", api_key_env)
        elif not all("!" <= ch <= "~" for ch in self._api_key):
            raise QlassError(f"${api_key_env} holds spaces, control or non-ASCII characters, which an HTTP "
                             "header cannot carry")
        self._opener = _opener_for(self.base_url, self._redact)
        self._rng = random.Random(seed)
        self._jitter = random.Random(seed + 1)
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
                deadline = time.monotonic() + self.timeout
                with self._opener.open(request, timeout=self.timeout) as resp:
                    raw = _read_by(resp, deadline, url, self.timeout)
                break
            except urllib.error.HTTPError as exc:
                try:
                    detail = self._redact(exc.read(65536).decode("utf-8", "replace"))[:300]
                except (OSError, http.client.HTTPException):
                    detail = "(body unreadable)"
                if exc.code != 429 and exc.code < 500:
                    where = url if exc.url == url else f"{url} (redirected to {self._redact(exc.url)})"
                    raise QlassError(f"{where}: HTTP {exc.code}: {detail}") from None
                problem = f"HTTP {exc.code}: {detail}"
                retry_after = (exc.headers.get("Retry-After", "") if exc.headers else "").strip()
                if re.fullmatch(r"[0-9]{1,9}(\.[0-9]{1,9})?", retry_after):  # seconds (ASCII digits only)
                    delay = min(self.max_backoff, float(retry_after))
            except _RETRY_ERRORS as exc:
                reason = getattr(exc, "reason", exc)
                if isinstance(reason, ConnectionRefusedError):
                    raise QlassError(f"{url}: connection refused (is the server running?); not retried") from None
                problem = self._redact(f"{type(exc).__name__}: {reason}")
            if attempt == self.max_retries:
                raise QlassError(f"{url}: giving up after {attempt + 1} attempts; last error {problem}")
            log.warning("%s: %s; retrying in %.1f s", url, problem, delay)
            time.sleep(delay)
        try:
            reply = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise QlassError(f"{url}: response is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
        except RecursionError:
            raise QlassError(f"{url}: response is not usable JSON (nested too deeply)") from None
        except ValueError:
            shown = self._redact(raw[:4096].decode("utf-8", "replace"))[:200]
            raise QlassError(f"{url}: response is not JSON: {shown!r}") from None
        if not isinstance(reply, dict):
            raise QlassError(f"{url}: response is not a JSON object")
        return reply

    def _redact(self, text: str) -> str:
        """``text`` with the API key shown as ``***``."""
        return text.replace(self._api_key, "***") if self._api_key else text

    def _first_model(self) -> str:
        data = self._request("/models").get("data")
        first = data[0] if isinstance(data, list) and data else None
        if not isinstance(first, dict) or not isinstance(first.get("id"), str) or not first["id"]:
            raise QlassError(f"{self.base_url}/models lists no model (no string data[0].id); pass model=<name>")
        return first["id"]

    # -- responses -------------------------------------------------------------------------
    def _parse(self, reply: dict[str, Any], path: str, prompt_ids: list[int] | None) -> list[Completion]:
        """Completions from one reply, with per-choice token counts (see the module docstring)."""
        where = f"{self.base_url}{path}"
        choices = reply.get("choices", _MISSING)
        if choices is _MISSING and reply.get("error") is not None:  # an error answered with HTTP 200
            error = reply["error"]
            message = error.get("message", error) if isinstance(error, dict) else error
            raise QlassError(f"{where}: the server answered an error: {self._redact(str(message))[:300]}")
        if not isinstance(choices, list) or not choices:
            raise _malformed(where, "choices", choices, "a non-empty list")
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
        for text, stopped_by_limit, count, lp in zip(texts, cut, counts, logprobs):
            text, truncated = final_output(text, stopped_by_limit)
            out.append(Completion(text, prompt_tokens, count, lp, truncated))
        return out

    def _completion_counts(self, texts: list[str], token_lists: list[list[float]], total: int | None,
                           where: str) -> list[int]:
        if all(token_lists):
            return [len(t) for t in token_lists]
        if total is not None and len(texts) == 1:
            return [total]
        if self.tokenizer is not None:
            counted = [len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
            return counted if total is None else _apportion(total, counted)
        if total is None:
            raise QlassError(f"{where}: response has no usage.completion_tokens; pass tokenizer= to count them")
        return _apportion(total, [1] * len(texts))


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
        if value is not None and (math.isnan(value) or value > LOGPROB_SLACK):
            raise QlassError(f"{where}: malformed response: {path} is {value!r}, expected a log-probability "
                             "(a number <= 0)")
    return [float(x) for x in values if x is not None]


def _read_by(resp: http.client.HTTPResponse, deadline: float, url: str, timeout: float) -> bytes:
    """The body of ``resp``, read as it arrives; past ``deadline`` a :class:`TimeoutError` (retried):
    the socket timeout alone restarts with every byte, so a server trickling its answer would hold
    the request for ever."""
    parts = []
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}: the answer did not arrive within {timeout:g} s (raise timeout=...)")
        part = resp.read1(65536)
        if not part:
            return b"".join(parts)
        parts.append(part)


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
        kinds = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
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


def _origin(url: str) -> str:
    """``scheme://host:port`` of ``url``, the port filled in from the scheme when absent."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or _DEFAULT_PORTS.get(scheme)
    except ValueError:  # a port out of range: an origin of its own
        port = parts.netloc.rpartition(":")[2]
    return f"{scheme}://{parts.hostname or ''}:{port}"


class _KeepKeyInOrigin(urllib.request.HTTPRedirectHandler):
    """Follows redirects, dropping ``Authorization`` from one that leaves the origin (scheme, host, port)."""

    def __init__(self, redact: Callable[[str], str]) -> None:
        self.redact = redact

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and new.has_header("Authorization") and _origin(newurl) != _origin(req.full_url):
            new.remove_header("Authorization")
            log.warning("%s redirected to another origin, %s; following without the API key",
                        self.redact(_origin(req.full_url)), self.redact(_origin(newurl)))
        return new


def _opener_for(base_url: str, redact: Callable[[str], str]) -> urllib.request.OpenerDirector:
    """An opener that keeps the API key within the origin (see :class:`_KeepKeyInOrigin`) and ignores
    proxy settings for loopback servers (uses them otherwise)."""
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme not in ("http", "https"):
        raise QlassError(f"{base_url}: not an http(s) URL")
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    proxies = urllib.request.ProxyHandler({}) if loopback else urllib.request.ProxyHandler()
    return urllib.request.build_opener(proxies, _KeepKeyInOrigin(redact))
