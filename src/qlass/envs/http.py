"""An environment that lives behind an HTTP server: ``qlass serve`` or AgentGym's env servers.

``HttpEnv(url)`` speaks to ``qlass serve`` (see :mod:`qlass.serve`): one server-side instance per
client (``/create`` on construction, ``/close`` on :meth:`close`), the raw model output is sent to
``/step`` and parsed on the server exactly as in-process, and the task lists, prompt and expert
trajectories come from the server's extension endpoints — so an episode played through the client
is the episode played in-process.

``dialect="agentgym-alfworld" | "agentgym-sciworld" | "agentgym-webshop"`` talks to AgentGym's
original servers, which know tasks only by integer index and take a bare action: the client parses
the ``Action:`` line itself (no action → :data:`~qlass.envs.base.FORMAT_HINT`, a step, no request),
tasks are index ranges given as ``splits={"seen": [0, 140], ...}`` (ids ``<name>/<split>/<index>``),
the prompt is a built-in prompt name or a prompt file (``prompt="alfworld"``) and ``step_limit``
ends episodes on the client side. Where the reset answer names the task (``agentgym-sciworld``:
``task_name`` and ``var_num``; ``agentgym-alfworld``: ``task_type``, the game's task and trial
folders), the client keeps it in the task's ``meta`` (``task_name``/``variation``,
``task_folder``/``trial``), and ``tasks(split, task_types)`` learns each index's type by resetting
it once (remembered by the client), so ``--task-types`` works with these dialects.

Transport is the standard library's ``http.client`` with one kept-alive connection per client
(a step is milliseconds of server work, so reconnecting each time would dominate on remote
hosts). ``timeout`` bounds each whole request, connecting and reading the answer included, and an
answer over ``max_answer_bytes`` is refused. A connection the server has closed is replaced before
a request goes out; a ``/step`` or ``/create`` goes out on a fresh connection once the kept one has
been idle a while (a server may be closing it just then), and only requests that are safe to
repeat are sent again when a kept connection turns out dead. Timeouts, refused or lost
connections, malformed answers and error answers raise :class:`~qlass.errors.QlassError` naming
the server and the endpoint.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import QlassError
from ..types import Message, StepResult, Task
from .base import FORMAT_HINT, parse_action
from .prompt_file import load_prompt

log = logging.getLogger(__name__)

EPISODE_OVER = "The episode is over."
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


@dataclass(frozen=True)
class Dialect:
    """How one kind of server names things (fields of requests and answers)."""

    id_key: str = "id"
    reset_key: str | None = None  # an integer task index field; None: qlass (task id in "task")
    reset_extra: dict[str, Any] = field(default_factory=dict)
    step_key: str = "output"  # "output": raw model output; "action": a bare, client-parsed action
    obs_key: str = "observation"
    reward_key: str = "reward"
    reward_scale: float = 1.0
    first_obs_keys: tuple[str, ...] = ("observation",)  # joined by newlines; () = GET /observation
    describe: Callable[[dict[str, Any]], tuple[str, dict[str, Any]]] | None = None  # reset answer -> type, meta


def _sciworld_names(answer: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Task type and meta from an AgentGym ScienceWorld reset answer."""
    return str(answer["task_name"]), {"task_name": str(answer["task_name"]), "variation": int(answer["var_num"])}


def _alfworld_names(answer: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Task type and meta from an AgentGym ALFWorld reset answer (``task_type``: ``<task folder>/<trial>``)."""
    folder, _, trial = str(answer["task_type"]).partition("/")
    return folder.split("-")[0], {"task_folder": folder, "trial": trial}


DIALECTS: dict[str, Dialect] = {
    "qlass": Dialect(),
    "agentgym-alfworld": Dialect(reset_key="game", reset_extra={"world_type": "Text"}, step_key="action",
                                 describe=_alfworld_names),
    "agentgym-sciworld": Dialect(reset_key="data_idx", step_key="action", reward_key="score", reward_scale=0.01,
                                 first_obs_keys=("task_description", "observation"), describe=_sciworld_names),
    "agentgym-webshop": Dialect(id_key="env_idx", reset_key="session_id", step_key="action", obs_key="state",
                                first_obs_keys=()),
}


def _short(value: Any) -> str:
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
            raise QlassError(f"http env: url must be a string like http://HOST:PORT, got {_short(url)}")
        try:
            parsed = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
            self._host, self._port = parsed.hostname, parsed.port
        except ValueError as exc:
            raise QlassError(f"http env: url={url!r} is not a server address ({exc}); it must look like "
                             "http://HOST:PORT") from None
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise QlassError(f"http env: url must look like http://HOST:PORT, got {url!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
            raise QlassError(f"http env: timeout must be a number of seconds > 0, got {_short(timeout)}")
        if isinstance(max_answer_bytes, bool) or not isinstance(max_answer_bytes, int) or max_answer_bytes < 1:
            raise QlassError(f"http env: max_answer_bytes must be an integer >= 1, got {_short(max_answer_bytes)}")
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
            raise QlassError(f"env server {self.url}: {endpoint} answer lacks {key!r}: {_short(answer)}")
        accepted = (int, float) if kind is float else kind
        if not isinstance(value, accepted) or (kind is not bool and isinstance(value, bool)):
            raise QlassError(f"env server {self.url}: {endpoint} answer's {key!r} must be {_KINDS[kind]}, got "
                             f"{_short(value)}")
        if kind is float:
            number = _finite(value)
            if number is None:
                raise QlassError(f"env server {self.url}: {endpoint} answer's {key!r} must be a finite number, got "
                                 f"{_short(value)}")
            return number
        return value

    def close(self) -> None:
        self._drop()


class HttpEnv:
    """An :class:`~qlass.envs.base.Env` served over HTTP (see the module docstring).

    Args:
        url: the server root, e.g. ``http://127.0.0.1:8000``.
        dialect: ``qlass`` (``qlass serve``) or one of AgentGym's: ``agentgym-alfworld``,
            ``agentgym-sciworld``, ``agentgym-webshop``.
        timeout: seconds a request may take, answer included.
        max_answer_bytes: answers longer than this are refused (default 64 MiB).
        name: the environment name (qlass dialect: the server's; otherwise default ``http``).
        prompt: AgentGym dialects: a built-in prompt name or prompt file.
        splits: AgentGym dialects: split name → ``[first, end)`` task index range.
        step_limit: AgentGym dialects: steps after which the client ends an episode.
    """

    def __init__(self, url: str, dialect: str = "qlass", timeout: float = 60.0, name: str | None = None,
                 prompt: str | None = None, splits: dict[str, Sequence[int]] | None = None,
                 step_limit: int | None = None, max_answer_bytes: int = MAX_ANSWER_BYTES) -> None:
        if dialect not in DIALECTS:
            raise QlassError(f"http env: unknown dialect {dialect!r}; known: {', '.join(DIALECTS)}")
        self.dialect_name, self.dialect = dialect, DIALECTS[dialect]
        self._native = dialect == "qlass"
        if step_limit is not None and step_limit < 1:
            raise QlassError(f"http env: step_limit must be >= 1, got {step_limit}")
        self._ranges = self._check_ranges(splits or {})
        self._prompt_spec, self.step_limit = prompt, step_limit
        self._client = HttpClient(url, timeout, max_answer_bytes)
        self.name = name or (self._native_splits()[0] if self._native else "http")
        created = self._client.request("POST", "/create")
        self._id = created if isinstance(created, int) else created.get("id") if isinstance(created, dict) else None
        if not isinstance(self._id, int) or isinstance(self._id, bool):
            raise QlassError(f"env server {url}: /create answered {_short(created)}, expected an id")
        self._prompt: list[Message] | None = None
        self._described: dict[int, tuple[str, dict[str, Any]]] = {}  # task index -> type and meta from its reset
        self._task: Task | None = None
        self._steps, self._done, self._reward = 0, True, 0.0

    @staticmethod
    def _check_ranges(splits: dict[str, Sequence[int]]) -> dict[str, range]:
        ranges = {}
        for split, bounds in splits.items():
            if (not isinstance(bounds, (list, tuple)) or len(bounds) != 2
                    or not all(isinstance(b, int) for b in bounds) or not 0 <= bounds[0] <= bounds[1]):
                raise QlassError(f"http env: splits[{split!r}] must be [first, end) task indices, got {bounds!r}")
            ranges[split] = range(bounds[0], bounds[1])
        return ranges

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        return self._client.request("POST", path, {self.dialect.id_key: self._id, **body})

    # -- tasks -----------------------------------------------------------------------------
    def _native_splits(self) -> tuple[str, dict[str, int]]:
        """The qlass server's environment name and split sizes (``GET /splits``), checked."""
        answer = self._client.request("GET", "/splits")
        name = self._client.field(answer, "/splits", "env", str)
        sizes = self._client.field(answer, "/splits", "splits", dict)
        for split in sizes:
            self._client.field(sizes, "/splits", split, int)
        return name, sizes

    def splits(self) -> dict[str, int]:
        if self._native:
            return self._native_splits()[1]
        return {split: len(r) for split, r in self._ranges.items()}

    def _native_task(self, d: Any) -> Task:
        """A task of a qlass server's ``/tasks`` answer, checked."""
        field = self._client.field
        return Task(field(d, "/tasks", "id", str), field(d, "/tasks", "env", str), field(d, "/tasks", "split", str),
                    field(d, "/tasks", "task_type", str, optional=True) or "",
                    field(d, "/tasks", "meta", dict, optional=True) or {})

    def tasks(self, split: str, task_types: Sequence[str] | None = None) -> list[Task]:
        if self._native:
            query = {"split": split, **({"task_types": ",".join(task_types)} if task_types else {})}
            answer = self._client.request("GET", "/tasks", query=query)
            return [self._native_task(d) for d in self._client.field(answer, "/tasks", "tasks", list)]
        if split not in self._ranges:
            raise QlassError(f"http env: unknown split {split!r}; configured: {', '.join(self._ranges) or 'none'} "
                             "(pass splits={name: [first, end)})")
        if not task_types:
            return [Task(f"{self.name}/{split}/{i}", self.name, split, "", {"index": i}) for i in self._ranges[split]]
        if self.dialect.describe is None:
            raise QlassError(f"http env: dialect {self.dialect_name!r} knows no task types")
        found = []
        for n, i in enumerate(self._ranges[split]):
            if i not in self._described:
                if n % 100 == 0:
                    log.info("http env: learning task types by reset, index %d (%d of %d)", i, n,
                             len(self._ranges[split]))
                self._describe(i, self._reset_answer(i))
            task_type, meta = self._described[i]
            found.append(Task(f"{self.name}/{split}/{i}", self.name, split, task_type, {"index": i, **meta}))
        unknown = sorted(set(task_types) - {t.task_type for t in found})
        if unknown:
            raise QlassError(f"http env: no task of type(s) {', '.join(unknown)} in split {split!r}; its types: "
                             f"{', '.join(sorted({t.task_type for t in found}))}")
        return [t for t in found if t.task_type in set(task_types)]

    def _reset_answer(self, index: int) -> Any:
        """Reset the server's instance to task ``index`` (AgentGym dialects); ends the client's episode."""
        self._task, self._done = None, True
        return self._post("/reset", {self.dialect.reset_key: index, **self.dialect.reset_extra})

    def _describe(self, index: int, answer: Any) -> dict[str, Any]:
        """Remember what the reset answer says of task ``index``; returns its meta ({} if nothing)."""
        if self.dialect.describe is None:
            return {}
        try:
            self._described[index] = self.dialect.describe(answer)
        except (KeyError, TypeError, ValueError) as exc:
            raise QlassError(f"env server {self._client.url}: /reset answer for index {index} does not name its task "
                             f"({type(exc).__name__}: {exc}): {_short(answer)}") from None
        return self._described[index][1]

    def prompt(self) -> list[Message]:
        if self._prompt is None:
            if self._native:
                field = self._client.field
                messages = field(self._client.request("GET", "/prompt"), "/prompt", "messages", list)
                self._prompt = [Message(field(m, "/prompt", "role", str), field(m, "/prompt", "content", str))
                                for m in messages]
            elif self._prompt_spec:
                self._prompt = load_prompt(self._prompt_spec)
            else:
                raise QlassError(f"http env: dialect {self.dialect_name!r} serves no prompt; pass prompt=NAME_OR_FILE")
        return list(self._prompt)

    def expert(self, task: Task) -> list[str]:
        if not self._native:
            return []
        answer = self._client.request("GET", "/expert", query={"task": task.id})
        outputs = self._client.field(answer, "/expert", "outputs", list)
        if not all(isinstance(o, str) for o in outputs):
            raise QlassError(f"env server {self._client.url}: /expert answer's 'outputs' must be a list of strings")
        return outputs

    # -- episodes --------------------------------------------------------------------------
    def reset(self, task: Task) -> str:
        d = self.dialect
        if self._native:
            answer = self._post("/reset", {"task": task.id})
        else:
            if "index" not in task.meta:
                raise QlassError(f"http env: task {task.id!r} has no 'index' for an AgentGym server")
            answer = self._reset_answer(int(task.meta["index"]))
            task.meta.update(self._describe(int(task.meta["index"]), answer))  # the task's name and variation
        if d.first_obs_keys:
            first = "\n".join(self._client.field(answer, "/reset", key, str) for key in d.first_obs_keys)
        else:
            first = self._client.request("GET", "/observation", query={d.id_key: self._id})
            if not isinstance(first, str):
                raise QlassError(f"env server {self._client.url}: /observation answer must be a string, got "
                                 f"{_short(first)}")
        self._task, self._steps, self._done, self._reward = task, 0, False, 0.0
        return first

    def step(self, output: str) -> StepResult:
        if self._task is None:
            raise QlassError("http env: step() before reset()")
        if self._native:
            answer, field = self._post("/step", {"output": output}), self._client.field
            return StepResult(field(answer, "/step", "observation", str),
                              field(answer, "/step", "reward", float), field(answer, "/step", "done", bool),
                              field(answer, "/step", "info", dict, optional=True) or {})
        if self._done:
            return StepResult(EPISODE_OVER, self._reward, True, {"steps": self._steps})
        self._steps += 1
        action = parse_action(output)
        if action is None:
            observation = FORMAT_HINT
        else:
            answer, field, d = self._post("/step", {"action": action}), self._client.field, self.dialect
            observation = field(answer, "/step", d.obs_key, str)
            self._reward = min(max(field(answer, "/step", d.reward_key, float) * d.reward_scale, 0.0), 1.0)
            self._done = field(answer, "/step", "done", bool)
        if self.step_limit is not None and self._steps >= self.step_limit:
            self._done = True
        return StepResult(observation, self._reward, self._done, {"steps": self._steps, "action": action})

    def close(self) -> None:
        """Release the server's instance, best effort: a failure is a warning (closing must never lose
        the work a command has done)."""
        try:
            if self._id is not None:
                self._post("/close", {})
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, there is nothing left to do here
            log.warning("http env: could not close instance %s on env server %s: %s", self._id, self._client.url,
                        exc if isinstance(exc, QlassError) else f"{type(exc).__name__}: {exc}")
        finally:
            self._id = None
            self._client.close()
