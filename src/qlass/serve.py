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

    GET /            -> {"env", "protocol", "instances", "max_instances", "idle_timeout"}
    GET /instances   -> {"instances": [{"id", "task", "busy", "idle_s"}], "idle_timeout"}
    GET /splits      -> {"env", "splits": {split: size}}
    GET /tasks?split=S[&task_types=a,b]  -> {"tasks": [{"id", "env", "split", "task_type", "meta"}]}
    GET /prompt      -> {"messages": [{"role", "content"}]}
    GET /expert?task=ID                  -> {"outputs": ["Thought: ...\\nAction: ...", ...]}

``protocol="agentgym"`` (``qlass serve ENV --protocol agentgym``) answers instead exactly as
AgentGym's own server for ENV does (sciworld, alfworld, webshop): see :mod:`qlass.serve_agentgym`.

Every instance is its own environment object (``make_env(ENV, **env_args)``), used by one request
at a time: a request for an instance busy with another is refused (409). Instance ids are random
integers below 2**53 that a restarted server does not reissue; an instance unused for ``idle_timeout``
seconds (default 30 minutes) is closed, its client taken for dead. Ids and indices must be JSON
integers (not ``true``, ``"3"`` or ``3.0``; a query's ``id`` one field of digits, not ``1.0``), strings
valid Unicode (no lone surrogate such as a ``\\ud800`` escape) and a POST's body UTF-8 JSON, an object
giving each key once (``/create``'s may be empty), sent whole within ``body_timeout`` seconds (408
after; a connection without a whole request head after :data:`qlass.serve_uvicorn.HEADER_TIMEOUT`
seconds is closed).

Every failure is answered as ``{"error": message}`` with its status: 4xx for bad requests
(unknown id, task, split or path, wrong method, malformed body, a body over ``max_request_bytes`` (413),
a step or observation before the first reset, a busy instance, too many instances, a
:class:`~qlass.errors.QlassError` the environment raises); 500 for an environment that breaks its
contract (what the checks of :mod:`qlass.envs.base` refuse: a step answer that is not a ``StepResult``,
a NaN reward, ``done="no"``, an observation that is not a string or holds a lone surrogate, ``expert()``
returning a string ...; the answer says what it returned) and for an exception from its code, whose
text and traceback go to the server's log only (the answer carries a reference to find them there) —
the server keeps running either way. Free-form ``info`` and task fields are sent as JSON can hold them, lone
surrogates replaced by U+FFFD. The interactive API pages (``/docs``, ``/redoc``, ``/openapi.json``)
are served only with ``docs=True``.
Nothing here authenticates: the server binds to 127.0.0.1 unless told otherwise.
"""

import asyncio
import logging
import signal
import threading
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

from .envs.base import env_reset, env_step
from .errors import QlassError, require
from .serve_pool import (
    IDLE_TIMEOUT,
    EnvFault,
    EnvPool,
    ServeError,
    env_call,
    fault_message,
    json_safe,
    refuse_non_text,
    task_dict,
)
from .serve_requests import RequestBody, body_problem, query_id, validation_problems
from .serve_uvicorn import LIMIT_CONCURRENCY, AcceptErrors, bind, url_of, uvicorn_server

log = logging.getLogger(__name__)

PROTOCOL = "agentgym+qlass/1"
PROTOCOLS = ("qlass", "agentgym")
MAX_REQUEST_BYTES = 1 << 20
"""Default limit on a request body (a step's model output is a few kilobytes)."""
BODY_TIMEOUT = 30.0
"""Default seconds a client has to send a request's whole body (408 after)."""


def _lifespan(pool: EnvPool) -> Callable[[Any], Any]:
    """The application's lifespan: closes ``pool``'s idle instances now and then while it serves, and
    all of them when it stops (a SIGTERM ends the process right after, before any caller's cleanup);
    condenses the loop's accept errors (:class:`AcceptErrors`)."""

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        async def reap_forever() -> None:
            while True:
                await asyncio.sleep(max(0.1, min(60.0, pool.idle_timeout / 2)))  # a tiny timeout must not spin
                await asyncio.to_thread(pool.reap)

        task = asyncio.create_task(reap_forever()) if pool.idle_timeout else None
        asyncio.get_running_loop().set_exception_handler(AcceptErrors())
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
            await asyncio.to_thread(pool.shutdown)

    return lifespan


def create_app(pool: EnvPool, docs: bool = False, max_request_bytes: int = MAX_REQUEST_BYTES,
               protocol: str = "qlass", agentgym_games: str | None = None, body_timeout: float = BODY_TIMEOUT) -> Any:
    """The FastAPI application serving ``pool`` (see the module docstring for the endpoints); ``docs``
    serves the interactive API pages, ``max_request_bytes`` limits request bodies and ``body_timeout``
    the seconds to send one; ``protocol`` is ``qlass`` or ``agentgym`` (``agentgym_games``: AgentGym's
    ALFWorld game list folder, see :mod:`qlass.serve_agentgym`).

    (This module does not use postponed annotations: FastAPI reads the request models from the
    annotations of the endpoint functions defined in here.)"""
    require("fastapi", "serve")
    from fastapi import Depends, FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, StrictInt
    from starlette.exceptions import HTTPException

    class IdBody(BaseModel):
        model_config = ConfigDict(extra="ignore")
        id: StrictInt

    class ResetBody(IdBody):
        task: str | None = None
        data_idx: StrictInt | None = None
        game: StrictInt | None = None

    class StepBody(IdBody):
        output: str | None = None
        action: str | None = None

    if max_request_bytes < 1:
        raise QlassError(f"serve: max_request_bytes must be >= 1, got {max_request_bytes}")
    if not body_timeout > 0:
        raise QlassError(f"serve: body_timeout must be > 0 seconds, got {body_timeout}")
    if protocol not in PROTOCOLS:
        raise QlassError(f"serve: unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    app = FastAPI(title=f"qlass environment server: {pool.name}", version=PROTOCOL, docs_url="/docs" if docs else None,
                  redoc_url="/redoc" if docs else None, openapi_url="/openapi.json" if docs else None,
                  lifespan=_lifespan(pool))
    app.add_middleware(RequestBody, limit=max_request_bytes, timeout=body_timeout)
    if protocol == "agentgym":
        from .serve_agentgym import add_routes

        add_routes(app, pool, agentgym_games)
        return app
    if agentgym_games is not None:
        raise QlassError("serve: agentgym_games needs protocol 'agentgym'")

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:  # unknown path, wrong method ...
        problem = body_problem(request.scope.get("qlass.body", b"")) if exc.status_code == 400 else None
        if problem:  # FastAPI's parse gave up ("There was an error parsing the body"): say what is wrong
            return JSONResponse({"error": f"malformed request to {request.url.path}: body: {problem}"}, 400)
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ServeError)
    async def _refused(request: Request, exc: ServeError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _malformed(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = validation_problems(exc, request.headers.get("content-type"))
        return JSONResponse({"error": f"malformed request to {request.url.path}: {problems}"}, status_code=400)

    @app.exception_handler(QlassError)
    async def _env_refused(request: Request, exc: QlassError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(EnvFault)
    async def _env_fault(request: Request, exc: EnvFault) -> JSONResponse:
        return JSONResponse({"error": fault_message(request.url.path, exc)}, status_code=500)

    @app.exception_handler(Exception)
    async def _failed(request: Request, exc: Exception) -> JSONResponse:
        ref = uuid.uuid4().hex[:8]  # the exception's text stays in the log: it may hold paths or secrets
        log.exception("server error %s on %s", ref, request.url.path)
        return JSONResponse({"error": f"environment error on {request.url.path} (see the server log, "
                                      f"reference {ref})"}, status_code=500)

    @app.get("/")
    def root() -> dict[str, Any]:
        return {"env": pool.name, "protocol": PROTOCOL, "instances": pool.count(), "max_instances": pool.max_instances,
                "idle_timeout": pool.idle_timeout}

    @app.get("/instances")
    def instances() -> dict[str, Any]:
        pool.reap()
        return {"instances": pool.instances(), "idle_timeout": pool.idle_timeout}

    async def refuse_malformed_body(request: Request) -> None:
        problem = body_problem(await request.body())
        if problem:
            raise RequestValidationError([{"loc": ("body",), "msg": problem, "type": "value_error"}])

    object_body = [Depends(refuse_malformed_body)]

    @app.post("/create", dependencies=object_body)
    def create() -> dict[str, int]:
        return {"id": pool.create()}

    @app.post("/reset", dependencies=object_body)
    def reset(body: ResetBody) -> dict[str, Any]:
        given = [k for k in ("task", "data_idx", "game") if getattr(body, k) is not None]
        if len(given) != 1:  # a malformed request changes nothing
            raise ServeError(400, "reset needs exactly one of 'task' (a task id), 'data_idx' or 'game' (an index)")
        refuse_non_text(body.task, "task")
        with pool.use(body.id) as inst:
            inst.task = None  # a failed reset (an unknown task included) leaves no episode to step on
            task = pool.task(body.task) if body.task is not None else pool.task_at(getattr(body, given[0]))
            inst.observation = env_call(lambda: env_reset(inst.env, task))
            inst.task, inst.done = task, False
            return {"id": body.id, "observation": inst.observation, "task": task_dict(task),
                    "task_type": task.task_type}

    @app.post("/step", dependencies=object_body)
    def step(body: StepBody) -> dict[str, Any]:
        if (body.output is None) == (body.action is None):
            raise ServeError(400, "step needs exactly one of 'output' (raw model output) or 'action' (a bare action)")
        refuse_non_text(body.output, "output")
        refuse_non_text(body.action, "action")
        output = body.output if body.output is not None else f"Action: {body.action}"
        with pool.use(body.id) as inst:
            if inst.task is None:
                raise ServeError(409, f"environment {body.id} has no episode yet: POST /reset first")
            result = env_call(lambda: env_step(inst.env, output))
            inst.observation, inst.done = result.observation, bool(result.done)
            return {"observation": result.observation, "reward": float(result.reward), "done": bool(result.done),
                    "info": json_safe(result.info)}

    @app.get("/observation")
    def observation(request: Request) -> str:
        env_id = query_id(request)
        inst = pool.get(env_id)
        if inst.task is None:
            raise ServeError(409, f"environment {env_id} has no episode yet: POST /reset first")
        return inst.observation

    @app.post("/close", dependencies=object_body)
    def close(body: IdBody) -> dict[str, Any]:
        pool.close(body.id)
        return {"id": body.id, "closed": True}

    @app.get("/splits")
    def splits() -> dict[str, Any]:
        return {"env": pool.name, "splits": json_safe(pool.splits())}

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


class BackgroundServer:
    """A server on its own thread (tests, notebooks): ``url`` while running, ``stop()`` to end it.

    The socket is bound before the thread starts, so ``port=0`` picks a free port and ``url`` is
    valid as soon as the constructor returns. ``app_options`` go to :func:`create_app`.
    """

    def __init__(self, pool: EnvPool, host: str = "127.0.0.1", port: int = 0,
                 limit_concurrency: int = LIMIT_CONCURRENCY, **app_options: Any) -> None:
        self.pool = pool
        self._server = uvicorn_server(create_app(pool, **app_options), limit_concurrency)  # refused: no socket held
        self._sock = bind(host, port)
        self.url = url_of(host, self._sock.getsockname()[1])
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
          protocol: str = "qlass", agentgym_games: str | None = None, idle_timeout: float = IDLE_TIMEOUT,
          limit_concurrency: int = LIMIT_CONCURRENCY) -> None:
    """Serve ``env_spec`` on ``host:port`` until interrupted (the ``qlass serve`` command); ``docs``,
    ``max_request_bytes``, ``protocol`` and ``agentgym_games`` as in :func:`create_app`, ``idle_timeout``
    as in :class:`EnvPool`; beyond ``limit_concurrency`` open connections requests are answered 503.
    With ``protocol="agentgym"`` the environment's options default to AgentGym's game variant and step
    limit."""
    require("uvicorn", "serve")
    if protocol not in PROTOCOLS:
        raise QlassError(f"serve: unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    if protocol == "agentgym":
        from .serve_agentgym import default_env_args

        env_args = default_env_args(env_spec, env_args)
        log.info("agentgym protocol: %s options %s", env_spec, env_args)
    sock = bind(host, port)
    try:
        pool = EnvPool(env_spec, env_args, max_instances, idle_timeout)
        try:
            if host not in ("127.0.0.1", "localhost", "::1"):
                log.warning("serving on %s: anyone who can reach it can drive the environment (no "
                            "authentication)", host)
            app = create_app(pool, docs=docs, max_request_bytes=max_request_bytes, protocol=protocol,
                             agentgym_games=agentgym_games)  # refuses a missing game list first
            server = uvicorn_server(app, limit_concurrency)
            sizes = ", ".join(f"{k} {v}" for k, v in pool.splits().items())
            log.info("serving %s (%s) on %s", pool.name, sizes, url_of(host, sock.getsockname()[1]))
            server.run(sockets=[sock])
            if server.stopped_by:
                log.info("stopped (%s)", signal.Signals(server.stopped_by[0]).name)
        finally:
            pool.shutdown()
    finally:
        sock.close()
