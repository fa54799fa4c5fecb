"""JSON over HTTP for :class:`~qlass.envs.http.HttpEnv`: one kept-alive ``http.client`` connection per
client, with a deadline over each whole request, a size limit on answers, and one clear
:class:`~qlass.errors.QlassError` naming the server and endpoint for anything that goes wrong (see
:mod:`qlass.envs.http` for the policy on connections and repeats).
"""

from __future__ import annotations

import functools
import http.client
import io
import json
import logging
import math
import reprlib
import selectors
import socket
import time
import urllib.parse
from typing import Any

from ..errors import QlassError

log = logging.getLogger(__name__)

MAX_ANSWER_BYTES = 64 * 2**20
_KINDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "an object",
          list: "a list"}
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, http.client.CannotSendRequest)
# POSTs sent once more when a kept connection dies under them. A reset replaces the whole episode (environments
# are deterministic), so after a repeat the server holds the episode whose first observation the client reads;
# closing an instance twice leaves it closed. A repeated /step would apply the action twice and a repeated
# /create would leave an instance that nobody closes, so those (and any other POST) fail instead.
_REPEATABLE_POSTS = frozenset({"/reset", "/close"})
# A request that is not repeated goes out on a fresh connection once the kept one has been idle this long:
# servers close idle connections after a few seconds (gunicorn 2 s, uvicorn 5 s), and one closing it while the
# request is on its way would leave the client not knowing whether the request was applied.
_FRESH_AFTER_IDLE_S = 1.0
_READ_SIZE = 1 << 16
_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}


def short_repr(value: Any) -> str:
    """A bounded repr of a value from an answer (for error messages)."""
    return reprlib.repr(value)


def _left(deadline: float) -> float:
    """Seconds left before ``deadline`` (``time.monotonic()``); :class:`TimeoutError` once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


def _closed_by_server(sock: socket.socket) -> bool:
    """Whether an idle kept-alive socket is unusable: readable means the server closed it (or sent
    something unasked)."""
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(sock, selectors.EVENT_READ)
            return bool(selector.select(0))
    except (OSError, ValueError):
        return True


class _DeadlineReader(io.RawIOBase):
    """A socket's answer, each read waiting only for what is left of the request's time: the timeout
    bounds the whole answer, not each read (a server trickling bytes would hold the client for ever)."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        # the socket's own reader keeps it open while the answer is read, as http.client expects
        self._sock, self._raw, self._deadline = sock, sock.makefile("rb", buffering=0), deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        self._sock.settimeout(_left(self._deadline))
        return self._raw.readinto(buffer)

    def close(self) -> None:
        self._raw.close()
        super().close()

    def makefile(self, mode: str) -> io.BufferedReader:
        """What :class:`http.client.HTTPResponse` reads the status line, headers and body from."""
        return io.BufferedReader(self)


class _DeadlineResponse(http.client.HTTPResponse):
    """An HTTP answer read against a deadline (see :class:`_DeadlineReader`)."""

    def __init__(self, sock: socket.socket, *args: Any, deadline: float, **kwargs: Any) -> None:
        super().__init__(_DeadlineReader(sock, deadline), *args, **kwargs)  # type: ignore[arg-type]


def _malformed(exc: http.client.HTTPException) -> str:
    """What is wrong with an HTTP answer that ``http.client`` refused."""
    if isinstance(exc, http.client.BadStatusLine):
        return f"bad status line {exc.line.strip()[:100]!r}"
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def _decode(raw: bytes) -> Any:
    """The JSON value of an answer's body (None if empty); a :class:`ValueError` saying what is wrong."""
    if not raw.strip():
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"answer is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("answer nested too deeply") from None
    except ValueError:  # not JSON, or an integer of more digits than Python converts
        raise ValueError(f"answer is not JSON: {raw[:200]!r}") from None


def _finite(value: int | float) -> float | None:
    """``value`` as a float, or None if it is not finite (NaN, an infinity, an integer beyond floats)."""
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


class HttpClient:
    """JSON over one kept-alive HTTP connection, with clear errors (see the module docstring)."""

    def __init__(self, url: str, timeout: float = 60.0, max_answer_bytes: int = MAX_ANSWER_BYTES) -> None:
        if not isinstance(url, str):
            raise QlassError(f"http env: url must be a string like http://HOST:PORT, got {short_repr(url)}")
        try:
            parsed = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
            self._host, self._port = parsed.hostname, parsed.port
        except ValueError as exc:
            raise QlassError(f"http env: url={url!r} is not a server address ({exc}); it must look like "
                             "http://HOST:PORT") from None
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise QlassError(f"http env: url must look like http://HOST:PORT, got {url!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
            raise QlassError(f"http env: timeout must be a number of seconds > 0, got {short_repr(timeout)}")
        if isinstance(max_answer_bytes, bool) or not isinstance(max_answer_bytes, int) or max_answer_bytes < 1:
            raise QlassError(f"http env: max_answer_bytes must be an integer >= 1, got {short_repr(max_answer_bytes)}")
        self.url = url.rstrip("/")
        self._https = parsed.scheme == "https"
        self._prefix = parsed.path.rstrip("/")
        self.timeout, self.max_answer_bytes = timeout, max_answer_bytes
        self._conn: http.client.HTTPConnection | None = None
        self._last_used = 0.0  # time.monotonic() of the kept connection's last answer

    def _connection(self, repeatable: bool) -> tuple[http.client.HTTPConnection, bool]:
        """The kept connection if it is fit for this request, else a new one; and whether it is kept."""
        if self._conn is not None and self._conn.sock is not None:
            idle = time.monotonic() - self._last_used
            if _closed_by_server(self._conn.sock) or (not repeatable and idle > _FRESH_AFTER_IDLE_S):
                self._drop()
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._conn = cls(self._host, self._port, timeout=self.timeout)
        return self._conn, self._conn.sock is not None

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    def _exchange(self, conn: http.client.HTTPConnection, method: str, target: str, payload: bytes | None,
                  deadline: float, where: str) -> tuple[http.client.HTTPResponse, bytes]:
        """Send one request and read its whole answer by ``deadline``."""
        conn.timeout = _left(deadline)  # connecting
        if conn.sock is not None:
            conn.sock.settimeout(conn.timeout)  # sending
        conn.response_class = functools.partial(_DeadlineResponse, deadline=deadline)  # type: ignore[misc]
        conn.request(method, target, body=payload, headers=_HEADERS)
        response = conn.getresponse()
        return response, self._read_body(response, where)

    def _read_body(self, response: http.client.HTTPResponse, where: str) -> bytes:
        """The body of ``response``, in pieces up to ``max_answer_bytes``, checked against its Content-Length."""
        expected, limit = response.length, self.max_answer_bytes
        over = f"over the limit of {limit} bytes (raise max_answer_bytes=...)"
        if expected is not None and expected > limit:
            raise QlassError(f"{where}: answer of {expected} bytes is {over}")
        parts, size = [], 0
        try:
            while chunk := response.read(_READ_SIZE):
                size += len(chunk)
                if size > limit:
                    raise QlassError(f"{where}: answer is {over}")
                parts.append(chunk)
        except http.client.IncompleteRead as exc:
            size += len(exc.partial)
            raise QlassError(f"{where}: malformed or truncated chunked answer (after {size} bytes)") from None
        if expected is not None and size < expected:
            raise QlassError(f"{where}: answer ended after {size} of {expected} bytes")
        return b"".join(parts)

    def _failure(self, exc: BaseException, where: str, method: str, path: str,
                 repeatable: bool) -> QlassError | None:
        """The one-line error for ``exc`` raised while talking to the server (None: not a transport error)."""
        if isinstance(exc, QlassError):
            return exc
        if isinstance(exc, _STALE):
            if not repeatable:
                what = "the step" if path == "/step" else "the request"
                return QlassError(f"{where}: connection lost during {method} {path}; {what} may have been applied "
                                  f"on the server ({type(exc).__name__}: {exc})")
            return QlassError(f"{where}: connection lost ({type(exc).__name__}: {exc})")
        if isinstance(exc, TimeoutError):
            return QlassError(f"{where}: no answer within {self.timeout:g} s (raise timeout=...)")
        if isinstance(exc, ConnectionRefusedError):
            return QlassError(f"{where}: connection refused — is the server running "
                              "(e.g. `qlass serve ENV --port N`)?")
        if isinstance(exc, http.client.HTTPException):
            return QlassError(f"{where}: malformed HTTP answer: {_malformed(exc)}")
        if isinstance(exc, OSError):
            return QlassError(f"{where}: {type(exc).__name__}: {exc}")
        return None

    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                query: dict[str, Any] | None = None) -> Any:
        """Send one request and return the decoded JSON answer; errors become :class:`QlassError`."""
        target = self._prefix + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        payload = json.dumps(body).encode() if body is not None else None
        where = f"env server {self.url} ({method} {path})"
        repeatable = method == "GET" or path in _REPEATABLE_POSTS
        deadline = time.monotonic() + self.timeout
        for attempt in (0, 1):
            conn, kept = self._connection(repeatable)
            try:
                response, raw = self._exchange(conn, method, target, payload, deadline, where)
                break
            except BaseException as exc:
                self._drop()
                if isinstance(exc, _STALE) and kept and repeatable and attempt == 0:
                    log.debug("%s: the kept connection was closed (%s); sending again", where, type(exc).__name__)
                    continue
                error = self._failure(exc, where, method, path, repeatable)
                if error is None:
                    raise
                raise error from None
        self._last_used = time.monotonic()
        return self._answer(response, raw, where)

    @staticmethod
    def _answer(response: http.client.HTTPResponse, raw: bytes, where: str) -> Any:
        """The decoded JSON of an answer, or the error it reports as a :class:`QlassError`."""
        status = response.status
        if 300 <= status < 400:
            raise QlassError(f"{where}: HTTP {status} {response.reason}, a redirect to "
                             f"{response.getheader('Location') or '(no Location)'}, which the client does not "
                             "follow: give the final address as url=")
        try:
            data = _decode(raw)
        except ValueError as exc:
            raise QlassError(f"{where}: HTTP {status} {response.reason}, {exc}") from None
        error = data.get("error") if isinstance(data, dict) else None
        if status >= 400 or error is not None:
            message = error if error is not None else data.get("detail", data) if isinstance(data, dict) else data
            if message is None:
                raise QlassError(f"{where}: HTTP {status} {response.reason} with an empty answer")
            raise QlassError(f"{where}: HTTP {status}: {str(message)[:500]}")
        return data

    def field(self, answer: Any, endpoint: str, key: str, kind: type, optional: bool = False) -> Any:
        """``answer[key]`` of ``kind`` (``float``: any finite number, as a float), or a :class:`QlassError`
        naming the server, the endpoint and the field; ``optional``: a missing or null field gives ``None``."""
        value = answer.get(key) if isinstance(answer, dict) else None
        if value is None and optional and isinstance(answer, dict):
            return None
        if not isinstance(answer, dict) or key not in answer:
            raise QlassError(f"env server {self.url}: {endpoint} answer lacks {key!r}: {short_repr(answer)}")
        accepted = (int, float) if kind is float else kind
        if not isinstance(value, accepted) or (kind is not bool and isinstance(value, bool)):
            raise QlassError(f"env server {self.url}: {endpoint} answer's {key!r} must be {_KINDS[kind]}, got "
                             f"{short_repr(value)}")
        if kind is float:
            number = _finite(value)
            if number is None:
                raise QlassError(f"env server {self.url}: {endpoint} answer's {key!r} must be a finite number, got "
                                 f"{short_repr(value)}")
            return number
        return value

    def close(self) -> None:
        self._drop()
