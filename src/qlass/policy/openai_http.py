"""JSON requests to an OpenAI-compatible server for :class:`~qlass.policy.openai.OpenAIPolicy`.

Requests time out (the whole answer must arrive within ``timeout``); 429, 5xx, timeouts and broken
connections are retried with exponential backoff (honouring ``Retry-After``). A refused connection
(nothing listens there) is not retried: it fails at once, naming the URL. The API key is read from
an environment variable (``OPENAI_API_KEY`` unless told otherwise) and sent only in the
``Authorization`` header; error texts and log lines show it as ``***`` (a server or proxy may echo
it back). Redirects are followed as curl and ``requests`` follow them: one to the same origin keeps
the header, one to another origin (scheme, host or port differ) goes without it, with a warning
naming both origins, so the key never reaches a host it was not given for.

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
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from ..errors import QlassError
from .option_values import check_request_options

log = logging.getLogger(__name__)

MAX_ANSWER_BYTES = 64 << 20
"""Answers larger than this are refused: no request of qlass's asks for that much text."""
_RETRY_ERRORS = (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException)
_DEFAULT_PORTS = {"http": 80, "https": 443}


class ApiClient:
    """Requests to the API root ``base_url`` with the key in ``$api_key_env`` (if set): each answer must
    arrive within ``timeout`` seconds (> 0); transient failures are retried ``max_retries`` times with
    exponential backoff from ``backoff`` up to ``max_backoff`` seconds (>= 0), jittered by ``seed``."""

    def __init__(self, base_url: str, api_key_env: str, timeout: float, max_retries: int, backoff: float,
                 max_backoff: float, seed: int) -> None:
        check_request_options({"timeout": timeout, "max_retries": max_retries, "backoff": backoff,
                               "max_backoff": max_backoff})
        self.base_url = base_url
        self.timeout, self.max_retries = float(timeout), int(max_retries)
        self.backoff, self.max_backoff = float(backoff), float(max_backoff)
        self._api_key = os.environ.get(api_key_env, "").strip() or None
        if self._api_key is None:
            log.debug("no API key in $%s; sending requests without one", api_key_env)
        elif not all("!" <= ch <= "~" for ch in self._api_key):
            raise QlassError(f"${api_key_env} holds spaces, control or non-ASCII characters, which an HTTP "
                             "header cannot carry")
        self._opener = _opener_for(self.base_url, self.redact)
        self._jitter = random.Random(seed)

    def request(self, path: str, body: dict[str, Any] | None = None,
                stop: threading.Event | None = None) -> dict[str, Any]:
        """POST ``body`` (GET when ``None``) and return the JSON reply, retrying transient failures until
        ``stop`` is set (the call it serves was given up: Ctrl-C, or another request's error)."""
        url = self.base_url + path
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        data = None if body is None else json.dumps(body).encode("utf-8")
        for attempt in range(self.max_retries + 1):
            delay = min(self.max_backoff, self.backoff * 2**attempt) * (0.5 + self._jitter.random())
            try:
                log.debug("%s %s (attempt %d)", "GET" if data is None else "POST", url, attempt + 1)
                request = urllib.request.Request(url, data=data, headers=headers,
                                                 method="GET" if data is None else "POST")
                deadline = time.monotonic() + self.timeout
                with self._opener.open(request, timeout=self.timeout) as resp:
                    raw = _read_by(resp, deadline, url, self.timeout)
                break
            except urllib.error.HTTPError as exc:
                try:
                    detail = self.redact(exc.read(65536).decode("utf-8", "replace"))[:300]
                except (OSError, http.client.HTTPException):
                    detail = "(body unreadable)"
                if exc.code != 429 and exc.code < 500:
                    where = url if exc.url == url else f"{url} (redirected to {self.redact(exc.url)})"
                    raise QlassError(f"{where}: HTTP {exc.code}: {detail}") from None
                problem = f"HTTP {exc.code}: {detail}"
                retry_after = (exc.headers.get("Retry-After", "") if exc.headers else "").strip()
                if re.fullmatch(r"[0-9]{1,9}(\.[0-9]{1,9})?", retry_after):  # seconds (ASCII digits only)
                    delay = min(self.max_backoff, float(retry_after))
            except _RETRY_ERRORS as exc:
                reason = getattr(exc, "reason", exc)
                if isinstance(reason, ConnectionRefusedError):
                    raise QlassError(f"{url}: connection refused (is the server running?); not retried") from None
                problem = self.redact(f"{type(exc).__name__}: {reason}")
            if attempt == self.max_retries:
                raise QlassError(f"{url}: giving up after {attempt + 1} attempts; last error {problem}")
            given_up = QlassError(f"{url}: {problem}; not retried (the call was given up)")
            if stop is not None and stop.is_set():
                raise given_up
            log.warning("%s: %s; retrying in %.1f s", url, problem, delay)
            if stop is None:
                time.sleep(delay)
            elif stop.wait(delay):
                raise given_up
        try:
            reply = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise QlassError(f"{url}: response is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
        except RecursionError:
            raise QlassError(f"{url}: response is not usable JSON (nested too deeply)") from None
        except ValueError:
            shown = self.redact(raw[:4096].decode("utf-8", "replace"))[:200]
            raise QlassError(f"{url}: response is not JSON: {shown!r}") from None
        if not isinstance(reply, dict):
            raise QlassError(f"{url}: response is not a JSON object")
        return reply

    def redact(self, text: str) -> str:
        """``text`` with the API key shown as ``***``."""
        return text.replace(self._api_key, "***") if self._api_key else text


def _read_by(resp: http.client.HTTPResponse, deadline: float, url: str, timeout: float) -> bytes:
    """The body of ``resp``, read as it arrives; past ``deadline`` a :class:`TimeoutError` (retried):
    the socket timeout alone restarts with every byte, so a server trickling its answer would hold
    the request for ever. One over :data:`MAX_ANSWER_BYTES` is refused (not retried) as it passes it."""
    parts, size = [], 0
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}: the answer did not arrive within {timeout:g} s (raise timeout=...)")
        part = resp.read1(65536)
        if not part:
            return b"".join(parts)
        size += len(part)
        if size > MAX_ANSWER_BYTES:
            raise QlassError(f"{url}: the answer is larger than {MAX_ANSWER_BYTES >> 20} MiB; no completion of one "
                             "step is that long (a broken server or proxy?)")
        parts.append(part)


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
        if code in (307, 308) and req.get_method() == "POST":  # urllib refuses these; curl and requests resend
            new = urllib.request.Request(newurl.replace(" ", "%20"), data=req.data, headers=dict(req.headers),
                                         origin_req_host=req.origin_req_host, unverifiable=True, method="POST")
        else:  # 301-303 turn a POST into a GET without its body, as curl and requests do
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
