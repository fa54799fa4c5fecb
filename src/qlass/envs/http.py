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

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import QlassError
from ..types import Message, StepResult, Task
from .base import FORMAT_HINT, parse_action
from .http_client import MAX_ANSWER_BYTES, HttpClient, short_repr
from .prompt_file import load_prompt

log = logging.getLogger(__name__)

EPISODE_OVER = "The episode is over."
@dataclass(frozen=True)
class Dialect:
    """How one kind of server names things (fields of requests and answers)."""

    id_key: str = "id"
    reset_key: str | None = None  # an integer task index field; None: qlass (task id in "task")
    reset_extra: dict[str, Any] = field(default_factory=dict)
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


MAX_TASK_INDEX = 2**31 - 1
"""The largest task index a ``splits`` range may name (a range must have a length Python can count)."""

DIALECTS: dict[str, Dialect] = {
    "qlass": Dialect(),
    "agentgym-alfworld": Dialect(reset_key="game", reset_extra={"world_type": "Text"}, describe=_alfworld_names),
    "agentgym-sciworld": Dialect(reset_key="data_idx", reward_key="score", reward_scale=0.01,
                                 first_obs_keys=("task_description", "observation"), describe=_sciworld_names),
    "agentgym-webshop": Dialect(id_key="env_idx", reset_key="session_id", obs_key="state", first_obs_keys=()),
}


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
        ignored = [k for k, v in (("prompt", prompt), ("splits", splits), ("step_limit", step_limit)) if v is not None]
        if self._native and ignored:  # a qlass server's environment has its own (qlass serve ... --env-arg)
            what = "is an option" if len(ignored) == 1 else "are options"
            raise QlassError(f"http env: {', '.join(ignored)} {what} of the AgentGym dialects; a qlass server "
                             "gives its environment's own prompt, splits and step limit (set them with qlass serve's "
                             "--env-arg)")
        if step_limit is not None and step_limit < 1:
            raise QlassError(f"http env: step_limit must be >= 1, got {step_limit}")
        self._ranges = self._check_ranges(splits or {})
        self._prompt_spec, self.step_limit = prompt, step_limit
        self._client = HttpClient(url, timeout, max_answer_bytes)
        self.name = name or (self._native_splits()[0] if self._native else "http")
        created = self._client.request("POST", "/create")
        self._id = created if isinstance(created, int) else created.get("id") if isinstance(created, dict) else None
        if not isinstance(self._id, int) or isinstance(self._id, bool):
            raise QlassError(f"env server {url}: /create answered {short_repr(created)}, expected an id")
        self._prompt: list[Message] | None = None
        self._described: dict[int, tuple[str, dict[str, Any]]] = {}  # task index -> type and meta from its reset
        self._task: Task | None = None
        self._steps, self._done, self._reward = 0, True, 0.0

    @staticmethod
    def _check_ranges(splits: dict[str, Sequence[int]]) -> dict[str, range]:
        ranges = {}
        for split, bounds in splits.items():
            if (not isinstance(bounds, (list, tuple)) or len(bounds) != 2
                    or not all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)
                    or not 0 <= bounds[0] <= bounds[1] <= MAX_TASK_INDEX):
                raise QlassError(f"http env: splits[{split!r}] must be [first, end) task indices (0 to "
                                 f"{MAX_TASK_INDEX}), got {bounds!r}")
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
            if self._client.field(sizes, "/splits", split, int) < 0:
                raise QlassError(f"env server {self._client.url}: /splits answer's {split!r} must be a number of "
                                 f"tasks (>= 0), got {sizes[split]}")
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
                             f"({type(exc).__name__}: {exc}): {short_repr(answer)}") from None
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
        self._task = None  # a failed reset leaves no episode to step on in (was: the previous one)
        self._check_open("reset()")
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
                                 f"{short_repr(first)}")
        self._task, self._steps, self._done, self._reward = task, 0, False, 0.0
        return first

    def _check_open(self, call: str) -> None:
        """Refuse ``call`` on a closed client (was: the server's 400 for a request with id null)."""
        if self._id is None:
            raise QlassError(f"http env: {call} after close(): its instance on {self._client.url} was released; "
                             "make a new HttpEnv")

    def step(self, output: str) -> StepResult:
        self._check_open("step()")
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
            self._id, self._task = None, None
            self._client.close()
