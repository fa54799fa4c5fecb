"""Serve any qlass environment over HTTP in AgentGym's protocol (``qlass serve ENV``).

Endpoints (JSON bodies and answers; the shapes of AgentGym's environment servers)::

    POST /create                        -> {"id": int}          one new environment instance
    POST /reset  {"id", "task": str}    -> {"id", "observation", "task": {...}}
                 {"id", "data_idx"|"game": int}  AgentGym style: index into all tasks, splits in order
    POST /step   {"id", "output": str}  -> {"observation", "reward", "done", "info"}
                 {"id", "action": str}  AgentGym style: a bare action (sent as ``Action: <action>``)
    GET  /observation?id=N              -> the instance's latest observation (a JSON string)
    POST /close  {"id"}                 -> {"id", "closed": true}

Extensions that let :class:`qlass.envs.http.HttpEnv` implement the whole Env protocol::

    GET /            -> {"env", "protocol", "instances", "max_instances"}
    GET /splits      -> {"env", "splits": {split: size}}
    GET /tasks?split=S[&task_types=a,b]  -> {"tasks": [{"id", "env", "split", "task_type", "meta"}]}
    GET /prompt      -> {"messages": [{"role", "content"}]}
    GET /expert?task=ID                  -> {"outputs": ["Thought: ...\\nAction: ...", ...]}

``protocol="agentgym"`` (``qlass serve ENV --protocol agentgym``) answers instead exactly as
AgentGym's own server for ENV does (sciworld, alfworld, webshop): see :mod:`qlass.serve_agentgym`.

Every instance is its own environment object (``make_env(ENV, **env_args)``), used by one request
at a time. Every failure is answered as ``{"error": message}`` with its status: 4xx for bad requests
(unknown id, task, split or path, wrong method, malformed body, a body over ``max_request_bytes`` (413),
step before reset, too many instances, a :class:`~qlass.errors.QlassError` the environment raises);
500 for any other environment exception, whose text and traceback go to the server's log only (the
answer carries a reference to find them there) — the server keeps running either way. The
interactive API pages (``/docs``, ``/redoc``, ``/openapi.json``) are served only with ``docs=True``.
Nothing here authenticates: the server binds to 127.0.0.1 unless told otherwise.
"""

import json
import logging
import socket
import threading
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from .envs.base import Env, make_env
from .errors import QlassError, require
from .types import Task

log = logging.getLogger(__name__)

PROTOCOL = "agentgym+qlass/1"
PROTOCOLS = ("qlass", "agentgym")
MAX_REQUEST_BYTES = 1 << 20
"""Default limit on a request body (a step's model output is a few kilobytes)."""


class ServeError(Exception):
    """A request the server refuses: HTTP ``status`` with ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class _Instance:
    env: Env
    lock: threading.Lock = field(default_factory=threading.Lock)
    task: Task | None = None
    observation: str = ""
    done: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # what a protocol keeps per episode


def task_dict(task: Task) -> dict[str, Any]:
    """The JSON form of a task, as ``/tasks`` and ``/reset`` answer it."""
    return _jsonable(asdict(task))


def _jsonable(value: Any) -> Any:
    """``value`` with anything JSON cannot hold turned into strings."""
    return json.loads(json.dumps(value, default=str))


class EnvPool:
    """The environment instances of one server, by id, plus one instance that answers task lists,
    prompts and expert trajectories."""

    def __init__(self, env_spec: str, env_args: dict[str, Any] | None = None, max_instances: int = 64) -> None:
        if max_instances < 1:
            raise QlassError(f"serve: max_instances must be >= 1, got {max_instances}")
        self.env_spec, self.env_args, self.max_instances = env_spec, dict(env_args or {}), max_instances
        self.meta = make_env(env_spec, **self.env_args)
        self.name = self.meta.name
        self._meta_lock = threading.Lock()
        self._lock = threading.Lock()
        self._instances: dict[int, _Instance] = {}
        self._next_id = 0
        self._pending = 0
        self._all_tasks: list[Task] | None = None

    # -- instances -------------------------------------------------------------------------
    def create(self) -> int:
        with self._lock:
            if len(self._instances) + self._pending >= self.max_instances:
                raise ServeError(429, f"too many open environments ({self.max_instances}); close some with /close")
            env_id = self._next_id
            self._next_id += 1
            self._pending += 1  # counted against the limit while it is being built
        try:
            env = make_env(self.env_spec, **self.env_args)
        except QlassError as exc:
            raise ServeError(500, f"cannot create environment {self.env_spec!r}: {exc}") from None
        else:
            with self._lock:
                self._instances[env_id] = _Instance(env)
        finally:
            with self._lock:
                self._pending -= 1
        return env_id

    def get(self, env_id: int) -> _Instance:
        with self._lock:
            inst = self._instances.get(env_id)
        if inst is None:
            raise ServeError(404, f"unknown environment id {env_id} (create one with POST /create)")
        return inst

    def close(self, env_id: int) -> None:
        with self._lock:
            inst = self._instances.pop(env_id, None)
        if inst is None:
            raise ServeError(404, f"unknown environment id {env_id}")
        with inst.lock:
            inst.env.close()

    def count(self) -> int:
        with self._lock:
            return len(self._instances)

    def shutdown(self) -> None:
        """Close every instance and the meta environment."""
        with self._lock:
            instances, self._instances = list(self._instances.values()), {}
        for inst in instances:
            with inst.lock:
                inst.env.close()
        with self._meta_lock:
            self.meta.close()

    # -- tasks -----------------------------------------------------------------------------
    def splits(self) -> dict[str, int]:
        with self._meta_lock:
            return dict(self.meta.splits())

    def tasks(self, split: str, task_types: list[str] | None = None) -> list[Task]:
        with self._meta_lock:
            return self.meta.tasks(split, task_types)

    def all_tasks(self) -> list[Task]:
        """Every task, splits in the order ``splits()`` lists them (what integer indices address)."""
        if self._all_tasks is None:
            self._all_tasks = [t for split in self.splits() for t in self.tasks(split)]
        return self._all_tasks

    def task(self, task_id: str) -> Task:
        with self._meta_lock:
            finder = getattr(self.meta, "task", None)
            if callable(finder):
                try:
                    return finder(task_id)
                except QlassError as exc:
                    raise ServeError(404, str(exc)) from None
        for task in self.all_tasks():
            if task.id == task_id:
                return task
        raise ServeError(404, f"unknown task {task_id!r}")

    def task_at(self, index: int) -> Task:
        tasks = self.all_tasks()
        if not 0 <= index < len(tasks):
            raise ServeError(404, f"task index {index} out of range 0..{len(tasks) - 1}")
        return tasks[index]

    def prompt(self) -> list[dict[str, str]]:
        with self._meta_lock:
            return [{"role": m.role, "content": m.content} for m in self.meta.prompt()]

    def expert(self, task: Task) -> list[str]:
        with self._meta_lock:
            return list(self.meta.expert(task))


class _BodyLimit:
    """ASGI middleware: reads a request's body up to ``limit`` bytes and refuses a longer one with 413
    before the application sees it (so a huge body is never held in memory)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse

        declared = dict(scope["headers"]).get(b"content-length", b"")
        body, too_big = bytearray(), declared.isdigit() and int(declared) > self.limit
        while not too_big:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            too_big = len(body) > self.limit
            if not message.get("more_body", False):
                break
        if too_big:
            answer = JSONResponse({"error": f"request body over the server's limit of {self.limit} bytes"}, 413)
            return await answer(scope, receive, send)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


def create_app(pool: EnvPool, docs: bool = False, max_request_bytes: int = MAX_REQUEST_BYTES,
               protocol: str = "qlass", agentgym_games: str | None = None) -> Any:
    """The FastAPI application serving ``pool`` (see the module docstring for the endpoints); ``docs``
    serves the interactive API pages, ``max_request_bytes`` limits request bodies; ``protocol`` is
    ``qlass`` or ``agentgym`` (``agentgym_games``: AgentGym's ALFWorld game list folder, see
    :mod:`qlass.serve_agentgym`).

    (This module does not use postponed annotations: FastAPI reads the request models from the
    annotations of the endpoint functions defined in here.)"""
    require("fastapi", "serve")
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict
    from starlette.exceptions import HTTPException

    class IdBody(BaseModel):
        model_config = ConfigDict(extra="ignore")
        id: int

    class ResetBody(IdBody):
        task: str | None = None
        data_idx: int | None = None
        game: int | None = None

    class StepBody(IdBody):
        output: str | None = None
        action: str | None = None

    if max_request_bytes < 1:
        raise QlassError(f"serve: max_request_bytes must be >= 1, got {max_request_bytes}")
    if protocol not in PROTOCOLS:
        raise QlassError(f"serve: unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    app = FastAPI(title=f"qlass environment server: {pool.name}", version=PROTOCOL, docs_url="/docs" if docs else None,
                  redoc_url="/redoc" if docs else None, openapi_url="/openapi.json" if docs else None)
    app.add_middleware(_BodyLimit, limit=max_request_bytes)
    if protocol == "agentgym":
        from .serve_agentgym import add_routes

        add_routes(app, pool, agentgym_games)
        return app
    if agentgym_games is not None:
        raise QlassError("serve: agentgym_games needs protocol 'agentgym'")

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:  # unknown path, wrong method ...
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ServeError)
    async def _refused(request: Request, exc: ServeError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _malformed(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors())
        return JSONResponse({"error": f"malformed request to {request.url.path}: {problems}"}, status_code=400)

    @app.exception_handler(QlassError)
    async def _env_refused(request: Request, exc: QlassError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(Exception)
    async def _failed(request: Request, exc: Exception) -> JSONResponse:
        ref = uuid.uuid4().hex[:8]  # the exception's text stays in the log: it may hold paths or secrets
        log.exception("environment error %s on %s", ref, request.url.path)
        return JSONResponse({"error": f"environment error on {request.url.path} (see the server log, "
                                      f"reference {ref})"}, status_code=500)

    @app.get("/")
    def root() -> dict[str, Any]:
        return {"env": pool.name, "protocol": PROTOCOL, "instances": pool.count(), "max_instances": pool.max_instances}

    @app.post("/create")
    def create() -> dict[str, int]:
        return {"id": pool.create()}

    @app.post("/reset")
    def reset(body: ResetBody) -> dict[str, Any]:
        given = [k for k in ("task", "data_idx", "game") if getattr(body, k) is not None]
        if len(given) != 1:
            raise ServeError(400, "reset needs exactly one of 'task' (a task id), 'data_idx' or 'game' (an index)")
        task = pool.task(body.task) if body.task is not None else pool.task_at(getattr(body, given[0]))
        inst = pool.get(body.id)
        with inst.lock:
            inst.observation = inst.env.reset(task)
            inst.task, inst.done = task, False
            return {"id": body.id, "observation": inst.observation, "task": task_dict(task), "task_type": task.task_type}

    @app.post("/step")
    def step(body: StepBody) -> dict[str, Any]:
        if (body.output is None) == (body.action is None):
            raise ServeError(400, "step needs exactly one of 'output' (raw model output) or 'action' (a bare action)")
        output = body.output if body.output is not None else f"Action: {body.action}"
        inst = pool.get(body.id)
        with inst.lock:
            if inst.task is None:
                raise ServeError(409, f"environment {body.id} has no episode yet: POST /reset first")
            result = inst.env.step(output)
            inst.observation, inst.done = result.observation, bool(result.done)
            return {"observation": result.observation, "reward": float(result.reward), "done": bool(result.done),
                    "info": _jsonable(result.info)}

    @app.get("/observation")
    def observation(id: int = Query(...)) -> str:
        inst = pool.get(id)
        with inst.lock:
            return inst.observation

    @app.post("/close")
    def close(body: IdBody) -> dict[str, Any]:
        pool.close(body.id)
        return {"id": body.id, "closed": True}

    @app.get("/splits")
    def splits() -> dict[str, Any]:
        return {"env": pool.name, "splits": pool.splits()}

    @app.get("/tasks")
    def tasks(split: str = Query(...), task_types: str | None = Query(None)) -> dict[str, Any]:
        known = pool.splits()
        if split not in known:  # an environment may hand any name its default tasks
            raise ServeError(404, f"unknown split {split!r}; splits: {', '.join(known)}")
        types = [t for t in task_types.split(",") if t] if task_types else None
        return {"tasks": [task_dict(t) for t in pool.tasks(split, types)]}

    @app.get("/prompt")
    def prompt() -> dict[str, Any]:
        return {"messages": pool.prompt()}

    @app.get("/expert")
    def expert(task: str = Query(...)) -> dict[str, Any]:
        return {"outputs": pool.expert(pool.task(task))}

    return app


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port=0``: a free one), or a clear error."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)  # connections queue from now on, before the server thread accepts them
    except (OSError, OverflowError) as exc:  # OverflowError: a port outside 0..65535
        sock.close()
        raise QlassError(f"serve: cannot listen on {host}:{port}: {exc}") from None
    return sock


def _server(pool: EnvPool, **app_options: Any) -> Any:
    uvicorn = require("uvicorn", "serve")
    # a long keep-alive so that clients thinking for seconds between steps keep their connection
    return uvicorn.Server(uvicorn.Config(create_app(pool, **app_options), log_level="warning", timeout_keep_alive=75))


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class BackgroundServer:
    """A server on its own thread (tests, notebooks): ``url`` while running, ``stop()`` to end it.

    The socket is bound before the thread starts, so ``port=0`` picks a free port and ``url`` is
    valid as soon as the constructor returns. ``app_options`` go to :func:`create_app`.
    """

    def __init__(self, pool: EnvPool, host: str = "127.0.0.1", port: int = 0, **app_options: Any) -> None:
        self.pool = pool
        self._sock = _bind(host, port)
        self.url = _url(host, self._sock.getsockname()[1])
        self._server = _server(pool, **app_options)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(env_spec: str, host: str = "127.0.0.1", port: int = 8000, env_args: dict[str, Any] | None = None,
          max_instances: int = 64, docs: bool = False, max_request_bytes: int = MAX_REQUEST_BYTES,
          protocol: str = "qlass", agentgym_games: str | None = None) -> None:
    """Serve ``env_spec`` on ``host:port`` until interrupted (the ``qlass serve`` command); ``docs``,
    ``max_request_bytes``, ``protocol`` and ``agentgym_games`` as in :func:`create_app`. With
    ``protocol="agentgym"`` the environment's options default to AgentGym's game variant and step limit."""
    require("uvicorn", "serve")
    if protocol not in PROTOCOLS:
        raise QlassError(f"serve: unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    if protocol == "agentgym":
        from .serve_agentgym import default_env_args

        env_args = default_env_args(env_spec, env_args)
        log.info("agentgym protocol: %s options %s", env_spec, env_args)
    sock = _bind(host, port)
    try:
        pool = EnvPool(env_spec, env_args, max_instances)
        try:
            if host not in ("127.0.0.1", "localhost", "::1"):
                log.warning("serving on %s: anyone who can reach it can drive the environment (no authentication)", host)
            server = _server(pool, docs=docs, max_request_bytes=max_request_bytes, protocol=protocol,
                             agentgym_games=agentgym_games)  # refuses a missing game list before announcing
            sizes = ", ".join(f"{k} {v}" for k, v in pool.splits().items())
            log.info("serving %s (%s) on %s", pool.name, sizes, _url(host, sock.getsockname()[1]))
            server.run(sockets=[sock])
        finally:
            pool.shutdown()
    finally:
        sock.close()
