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
hosts). A connection the server closed while idle is reopened and the request sent once more;
timeouts, refused connections and error answers raise :class:`~qlass.errors.QlassError` naming
the server and the endpoint.
"""

from __future__ import annotations

import http.client
import json
import logging
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
_KINDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "an object",
          list: "a list"}
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, http.client.CannotSendRequest)


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


class HttpClient:
    """JSON over one kept-alive HTTP connection, with clear errors."""

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        parsed = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise QlassError(f"env server URL must look like http://HOST:PORT, got {url!r}")
        if timeout <= 0:
            raise QlassError(f"env server timeout must be > 0 seconds, got {timeout}")
        self.url = url.rstrip("/")
        self._https = parsed.scheme == "https"
        self._host, self._port = parsed.hostname, parsed.port
        self._prefix = parsed.path.rstrip("/")
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None
        self._used = False

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._conn = cls(self._host, self._port, timeout=self.timeout)
            self._used = False
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                query: dict[str, Any] | None = None) -> Any:
        """Send one request and return the decoded JSON answer; errors become :class:`QlassError`."""
        target = self._prefix + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        where = f"env server {self.url} ({method} {path})"
        for attempt in (0, 1):
            conn = self._connection()
            reused = self._used
            try:
                conn.request(method, target, body=payload, headers=headers)
                response = conn.getresponse()
                status, raw = response.status, response.read()
                self._used = True
                break
            except _STALE as exc:
                self._drop()
                if reused and attempt == 0:  # the server closed an idle kept-alive connection
                    continue
                raise QlassError(f"{where}: connection lost ({type(exc).__name__}: {exc})") from None
            except TimeoutError:
                self._drop()
                raise QlassError(f"{where}: no answer within {self.timeout:g} s (raise timeout=...)") from None
            except ConnectionRefusedError:
                self._drop()
                raise QlassError(f"{where}: connection refused — is the server running "
                                 "(e.g. `qlass serve ENV --port N`)?") from None
            except OSError as exc:
                self._drop()
                raise QlassError(f"{where}: {type(exc).__name__}: {exc}") from None
        try:
            data = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            raise QlassError(f"{where}: HTTP {status}, answer is not JSON: {raw[:200]!r}") from None
        error = data.get("error") if isinstance(data, dict) else None
        if status >= 400 or error is not None:
            message = error if error is not None else (data.get("detail") if isinstance(data, dict) else data)
            raise QlassError(f"{where}: HTTP {status}: {message}")
        return data

    def field(self, answer: Any, endpoint: str, key: str, kind: type, optional: bool = False) -> Any:
        """``answer[key]`` of ``kind`` (``float`` takes any number), or a :class:`QlassError` naming the
        server, the endpoint and the field; ``optional``: a missing or null field gives ``None``."""
        value = answer.get(key) if isinstance(answer, dict) else None
        if value is None and optional and isinstance(answer, dict):
            return None
        if not isinstance(answer, dict) or key not in answer:
            raise QlassError(f"env server {self.url}: {endpoint} answer lacks {key!r}: {str(answer)[:200]}")
        accepted = (int, float) if kind is float else kind
        if not isinstance(value, accepted) or (kind is not bool and isinstance(value, bool)):
            raise QlassError(f"env server {self.url}: {endpoint} answer's {key!r} must be {_KINDS[kind]}, got "
                             f"{repr(value)[:100]}")
        return value

    def close(self) -> None:
        self._drop()


class HttpEnv:
    """An :class:`~qlass.envs.base.Env` served over HTTP (see the module docstring).

    Args:
        url: the server root, e.g. ``http://127.0.0.1:8000``.
        dialect: ``qlass`` (``qlass serve``) or one of AgentGym's: ``agentgym-alfworld``,
            ``agentgym-sciworld``, ``agentgym-webshop``.
        timeout: seconds to wait for any answer.
        name: the environment name (qlass dialect: the server's; otherwise default ``http``).
        prompt: AgentGym dialects: a built-in prompt name or prompt file.
        splits: AgentGym dialects: split name → ``[first, end)`` task index range.
        step_limit: AgentGym dialects: steps after which the client ends an episode.
    """

    def __init__(self, url: str, dialect: str = "qlass", timeout: float = 60.0, name: str | None = None,
                 prompt: str | None = None, splits: dict[str, Sequence[int]] | None = None,
                 step_limit: int | None = None) -> None:
        if dialect not in DIALECTS:
            raise QlassError(f"http env: unknown dialect {dialect!r}; known: {', '.join(DIALECTS)}")
        self.dialect_name, self.dialect = dialect, DIALECTS[dialect]
        self._native = dialect == "qlass"
        if step_limit is not None and step_limit < 1:
            raise QlassError(f"http env: step_limit must be >= 1, got {step_limit}")
        self._ranges = self._check_ranges(splits or {})
        self._prompt_spec, self.step_limit = prompt, step_limit
        self._client = HttpClient(url, timeout)
        self.name = name or (self._native_splits()[0] if self._native else "http")
        created = self._client.request("POST", "/create")
        self._id = created if isinstance(created, int) else created.get("id") if isinstance(created, dict) else None
        if not isinstance(self._id, int):
            raise QlassError(f"env server {url}: /create answered {created!r}, expected an id")
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
                    log.info("http env: learning task types by reset, index %d (%d of %d)", i, n, len(self._ranges[split]))
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
                             f"({type(exc).__name__}: {exc}): {answer!r}") from None
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
            missing = [k for k in d.first_obs_keys if not isinstance(answer, dict) or k not in answer]
            if missing:
                raise QlassError(f"env server {self._client.url}: /reset answer lacks {', '.join(missing)}")
            first = ("\n".join(str(answer[k]) for k in d.first_obs_keys) if not self._native
                     else self._client.field(answer, "/reset", "observation", str))
        else:
            first = str(self._client.request("GET", "/observation", query={d.id_key: self._id}))
        self._task, self._steps, self._done, self._reward = task, 0, False, 0.0
        return first

    def step(self, output: str) -> StepResult:
        if self._task is None:
            raise QlassError("http env: step() before reset()")
        if self._native:
            answer, field = self._post("/step", {"output": output}), self._client.field
            return StepResult(field(answer, "/step", "observation", str),
                              float(field(answer, "/step", "reward", float)), field(answer, "/step", "done", bool),
                              field(answer, "/step", "info", dict, optional=True) or {})
        if self._done:
            return StepResult(EPISODE_OVER, self._reward, True, {"steps": self._steps})
        self._steps += 1
        action = parse_action(output)
        if action is None:
            observation = FORMAT_HINT
        else:
            answer = self._post("/step", {"action": action})
            d = self.dialect
            if not isinstance(answer, dict) or d.obs_key not in answer:
                raise QlassError(f"env server {self._client.url}: /step answer lacks {d.obs_key!r}: {answer!r}")
            observation = str(answer[d.obs_key])
            self._reward = min(max(float(answer.get(d.reward_key) or 0.0) * d.reward_scale, 0.0), 1.0)
            self._done = bool(answer.get("done"))
        if self.step_limit is not None and self._steps >= self.step_limit:
            self._done = True
        return StepResult(observation, self._reward, self._done, {"steps": self._steps, "action": action})

    def close(self) -> None:
        if self._id is not None:
            try:
                self._post("/close", {})
            except QlassError as exc:  # the server may be gone already; nothing is left to release here
                log.debug("http env: close: %s", exc)
            self._id = None
        self._client.close()
