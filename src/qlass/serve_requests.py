"""The request checks of ``qlass serve`` (:mod:`qlass.serve`): the body middleware (size, time, UTF-8),
the shape of a POST's body and the query's instance id."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from .jsonl import JSONContentError, loads

QUERY_ID = re.compile(r"-?(0|[1-9][0-9]{0,17})")
"""An instance id as the query string gives it: decimal digits without leading zeros (``007`` is no
id, as in a JSON body), below 2**53."""


class RequestBody:
    """ASGI middleware: reads a request's body before the application sees it, refusing one over ``limit``
    bytes (413, so a huge body is never held in memory), one not received within ``timeout`` seconds
    (408: a stalled client would hold its connection, and a stopping server, for ever) and one that is
    not UTF-8 (400: JSON bodies are). A request that a stopping server cancels (still waiting for its body,
    or still running when the wait for the requests under way ends) is answered 503, the server is stopping
    (uvicorn answered the second 500 and logged a traceback of the cancellation)."""

    def __init__(self, app: Any, limit: int, timeout: float) -> None:
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse

        declared = dict(scope["headers"]).get(b"content-length", b"")
        body, too_big = bytearray(), declared.isdigit() and int(declared) > self.limit
        deadline = asyncio.get_running_loop().time() + self.timeout
        while not too_big:
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except asyncio.CancelledError:  # the server stops, cutting the wait short (not the request's fault)
                answer = JSONResponse({"error": "the server is stopping"}, 503, headers={"Connection": "close"})
                return await answer(scope, receive, send)
            except asyncio.TimeoutError:
                answer = JSONResponse({"error": f"request body of {scope['method']} {scope['path']} not received "
                                                f"within {self.timeout:g} s"}, 408, headers={"Connection": "close"})
                return await answer(scope, receive, send)
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            too_big = len(body) > self.limit
            if not message.get("more_body", False):
                break
        if too_big:
            answer = JSONResponse({"error": f"request body over the server's limit of {self.limit} bytes"}, 413)
            return await answer(scope, receive, send)
        try:
            bytes(body).decode("utf-8")
        except UnicodeDecodeError as exc:
            answer = JSONResponse({"error": f"body of {scope['method']} {scope['path']} is not valid UTF-8 JSON "
                                            f"(byte {exc.start})"}, 400)
            return await answer(scope, receive, send)
        scope["qlass.body"] = bytes(body)  # for an error handler, after FastAPI's parse gave up (e.g. a huge int)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        started = False

        async def sending(message: dict[str, Any]) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self.app(scope, replay, sending)
        except asyncio.CancelledError:  # the server stops and this request outlasted its wait for the requests
            if started:  # under way (an environment call running on); the answer, cut, cannot be replaced
                raise
            answer = JSONResponse({"error": "the server is stopping"}, 503, headers={"Connection": "close"})
            await answer(scope, receive, send)


def body_problem(body: bytes) -> str | None:
    """What is wrong with a POST's ``body`` (UTF-8: :class:`RequestBody` checked it), None when it is
    empty or a JSON object giving each key once (``json`` would keep a repeated key's last value unsaid,
    where qlass's file readers refuse it: :class:`~qlass.jsonl.DuplicateKeyError`). A body of whitespace
    only is no JSON (FastAPI would name a character offset of it as the field)."""
    if not body:
        return None
    if not body.strip():
        return "not JSON (whitespace only): give a JSON object, or no body"
    try:
        value = loads(body)
    except JSONContentError as exc:
        return str(exc)
    except RecursionError:
        return "JSON nested too deeply"
    except ValueError as exc:  # json.JSONDecodeError
        return f"not JSON ({exc})"
    if isinstance(value, dict):
        return None
    return f"expected a JSON object, got {'null' if value is None else type(value).__name__}"


def is_json_type(content_type: str | None) -> bool:
    """Whether a request's ``Content-Type`` makes FastAPI read its body as JSON (``application/json`` or
    ``application/...+json``, parameters aside)."""
    kind = (content_type or "").split(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def validation_problems(exc: Any, content_type: str | None = "application/json") -> str:
    """The problems of FastAPI's :class:`RequestValidationError` ``exc``, ``field: message`` each. A body
    that is not JSON is named ``body`` with :func:`body_problem`'s words (FastAPI names a character
    offset in it as the field: ``body.6: JSON decode error``). A body sent with another ``content_type``
    (curl's ``-d`` sends a form type) is never read as JSON: the problem says so, rather than that the
    body is no object."""
    errors = exc.errors()
    sent = bool(getattr(exc, "body", None))
    if sent and not is_json_type(content_type) and any(tuple(err.get("loc", ())) == ("body",) for err in errors):
        return (f"body: sent as Content-Type {content_type or '(none)'}, which is not read as JSON; send it as "
                "application/json")
    problems = []
    for err in errors:
        if err.get("type") == "json_invalid":
            raw = exc.body.encode() if isinstance(exc.body, str) else exc.body
            problem = body_problem(raw) if isinstance(raw, bytes) else None
            problems.append(f"body: {problem or 'not JSON'}")
        else:
            problems.append(f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', '')}")
    return "; ".join(problems)


def query_id(request: Any, key: str = "id") -> int:
    """The instance id of the query's ``key`` field (``id``; AgentGym's WebShop: ``env_idx``): given once,
    ASCII digits (``1.0``, ``²`` or 5000 digits are no id); else a :class:`RequestValidationError`,
    answered as any malformed request (400; FastAPI's 422 in the agentgym protocol)."""
    from fastapi.exceptions import RequestValidationError

    values = request.query_params.getlist(key)
    if len(values) == 1 and QUERY_ID.fullmatch(values[0]):
        return int(values[0])
    problem = ("Field required" if not values else "Input should be a valid integer" if len(values) == 1
               else f"given {len(values)} times; give one id")
    raise RequestValidationError([{"loc": ("query", key), "msg": problem, "type": "int_parsing"}])

