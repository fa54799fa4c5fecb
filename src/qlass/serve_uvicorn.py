"""``qlass serve``'s application on uvicorn: the listening socket (TCP_NODELAY on every connection),
a deadline on request heads, a bounded backlog and number of connections, one warning instead of a
flood when the file descriptors run out, and a stop that waits a few seconds for requests under way.
"""

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import Any

from .errors import QlassError, require

log = logging.getLogger(__name__)

LIMIT_CONCURRENCY = 256
"""Default number of open connections (or requests) beyond which requests are answered 503."""
SHUTDOWN_GRACE = 3
"""Seconds a stopping server waits for the requests under way before it cancels them."""
HEADER_TIMEOUT = 10.0
"""Seconds a new connection has to send a whole request head (uvicorn waits for ever, so a few hundred
stalled sockets exhausted the file descriptors)."""
BACKLOG = 64
"""Connections the kernel queues before the server accepts them (uvicorn's 2048 let a client that
exhausts the file descriptors flood the log with one error per queued connection)."""
ACCEPT_WARN_EVERY = 10.0
"""Seconds between two warnings that the server cannot accept connections (out of file descriptors)."""


class AcceptErrors:
    """An event-loop exception handler that turns asyncio's "socket.accept() out of system resource"
    errors (while the file descriptors are exhausted: one per queued connection, each with a
    traceback, tens a second) into one warning line every :data:`ACCEPT_WARN_EVERY` seconds with their
    count; any other error goes to the loop's default handler."""

    def __init__(self) -> None:
        self.count, self.last = 0, -ACCEPT_WARN_EVERY

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != "socket.accept() out of system resource":
            loop.default_exception_handler(context)
            return
        self.count += 1
        if loop.time() - self.last >= ACCEPT_WARN_EVERY:
            exc = context.get("exception")
            log.warning("cannot accept connections: %s (%d failed accept(s) since the last warning); raise the "
                        "limit on open files (ulimit -n) or lower --limit-concurrency",
                        getattr(exc, "strerror", None) or exc, self.count)
            self.count, self.last = 0, loop.time()


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port=0``: a free one), or a clear error."""
    # proto IPPROTO_TCP: asyncio then sets TCP_NODELAY on accepted connections (it checks the listening
    # socket's proto); without it a small answer waited about 40 ms for the client's delayed ACK
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(BACKLOG)  # connections queue from now on, before the server thread accepts them
    except (OSError, OverflowError) as exc:  # OverflowError: a port outside 0..65535
        sock.close()
        raise QlassError(f"serve: cannot listen on {host}:{port}: {exc}") from None
    return sock


def uvicorn_server(app: Any, limit_concurrency: int = LIMIT_CONCURRENCY) -> Any:
    """The uvicorn server of ``app`` (:func:`qlass.serve.create_app`'s): beyond
    ``limit_concurrency`` open connections or requests it answers 503, a connection that sends no request
    head within :data:`HEADER_TIMEOUT` seconds is closed; stopping, it waits :data:`SHUTDOWN_GRACE`
    seconds for the requests under way, and says so."""
    uvicorn = require("uvicorn", "serve")
    if limit_concurrency < 1:
        raise QlassError(f"serve: limit_concurrency must be >= 1, got {limit_concurrency}")

    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Server(uvicorn.Server):
        stopped_by: tuple[int, ...] = ()  # the signals that stopped it

        async def shutdown(self, sockets: Any = None) -> None:
            if self.server_state.tasks:
                log.warning("stopping: waiting up to %d s for %d request(s) under way", SHUTDOWN_GRACE,
                            len(self.server_state.tasks))
            await super().shutdown(sockets)

        serving: Any = None  # the coroutine of serve(), kept to close one that never ran

        def serve(self, sockets: Any = None) -> Any:
            self.serving = super().serve(sockets=sockets)
            return self.serving

        def run(self, sockets: Any = None) -> None:
            """uvicorn's, except that a Ctrl-C before the serving coroutine runs (between the serving line
            and uvicorn taking over the signals) no longer also prints "coroutine 'Server.serve' was never
            awaited": the coroutine is closed, and the interrupt goes on as any other."""
            try:
                super().run(sockets=sockets)
            except BaseException:
                if self.serving is not None:
                    self.serving.close()  # nothing to do for one that ran
                raise

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            """uvicorn's, except that a Ctrl-C or SIGTERM that stopped the server is not raised again once it
            has stopped: Ctrl-C then ended in a 40-line traceback (the lifespan task cancelled under asyncio's
            KeyboardInterrupt) and SIGTERM killed the process before its environments were closed."""
            with super().capture_signals():
                yield
                captured = getattr(self, "_captured_signals", [])  # uvicorn >= 0.29 raises these on exit
                self.stopped_by = tuple(captured)
                captured.clear()

    class Protocol(H11Protocol):  # type: ignore[misc]
        """uvicorn's HTTP/1.1 protocol, closing a connection whose request head is not complete within
        :data:`HEADER_TIMEOUT` seconds of it opening or sending its first bytes of one."""

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self.head_timer = self.loop.call_later(HEADER_TIMEOUT, self.no_head)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            waiting = self.conn.their_state is h11.IDLE  # for a (whole) request head
            if waiting and self.head_timer is None:
                self.head_timer = self.loop.call_later(HEADER_TIMEOUT, self.no_head)
            elif not waiting and self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def connection_lost(self, exc: Exception | None) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
            super().connection_lost(exc)

        def no_head(self) -> None:
            self.head_timer = None
            if self.conn.their_state is h11.IDLE:
                self.timeout_keep_alive_handler()  # closes the connection

    # a long keep-alive so that clients thinking for seconds between steps keep their connection
    config = uvicorn.Config(app, http=Protocol, log_level="warning", timeout_keep_alive=75,
                            timeout_graceful_shutdown=SHUTDOWN_GRACE, limit_concurrency=limit_concurrency,
                            backlog=BACKLOG)  # sets up uvicorn's loggers: the filter goes on after it
    logging.getLogger("uvicorn.error").addFilter(_cancelled_in_qlass_words)
    return Server(config)


def _cancelled_in_qlass_words(record: logging.LogRecord) -> bool:
    """False for uvicorn's "Cancel N running task(s), timeout graceful shutdown exceeded", said instead in
    qlass's words (its log format, what the clients get, why the process may go on a while), and for the
    traceback of the lifespan task that a second Ctrl-C cancels (the environments are closed all the same)."""
    message = record.getMessage()
    if message.startswith("Traceback") and message.rstrip().endswith("CancelledError"):
        log.warning("stopping at once (signal given again): requests under way are cut short")
        return False
    if not message.endswith("timeout graceful shutdown exceeded"):
        return True
    log.warning("stopping: %s request(s) still under way after %d s are answered 503; their environment calls "
                "run to their end before the environments close", record.args[0] if record.args else "the",
                SHUTDOWN_GRACE)
    return False


def url_of(host: str, port: int) -> str:
    """The base URL of a server on ``host:port`` (an IPv6 address in brackets)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
