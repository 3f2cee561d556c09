"""A small HTTP/1.1 server for the replica's data plane, on asyncio (uvloop) and httptools.

Why not uvicorn: measured on one core, uvicorn's ASGI layer alone (a hello-world app, httptools
and uvloop) answers about 6,000 requests/s, while the same parser driven from an asyncio
``Protocol`` answers about 15,000. The replica's hot path is a few tens of microseconds of
JSON and model, so the server is most of a request's cost; this one does only what the replica
needs:

- keep-alive, pipelining (answers in order), chunked request bodies, ``Expect: 100-continue``;
- a request body limit (``max_body_bytes``: a declared ``Content-Length`` over it is refused
  before any body is read, a chunked one as soon as it passes it) and a body-read timeout,
  both answered by the app's own responses, and the connection closed after them;
- an app hook at the head of each request (:meth:`HttpApp.on_head`), so a request can be
  refused (shed, routed nowhere) before its body is read or buffered;
- handlers that return a :class:`Response` directly run inside the read callback, with no task
  and no await; handlers that return an awaitable run as a task, cancelled if the client leaves
  (the app is told, :meth:`HttpApp.on_gone`);
- idle keep-alive connections are closed after ``keep_alive_s``; on stop the server stops
  accepting, lets requests in flight finish (at most ``graceful_s``), then closes the rest.

:func:`asgi` runs the same :class:`HttpApp` behind any ASGI server or test client (Starlette's
``TestClient``), so the handlers are tested in-process through the same hooks.

:class:`Router` is the routing table: one line per route, ``{name}`` segments as parameters.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import signal
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Protocol, cast
from urllib.parse import unquote

import httptools

_log = logging.getLogger("shipyard.serving.http")

JSON = "application/json"
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_MAX_PIPELINED = 16  # parsed requests waiting behind one in flight before reading pauses
_SWEEP_S = 1.0
MAX_HEAD_BYTES = 64 * 1024  # request line and headers; more is refused with 431
_LINGER_S = 2.0


class Phase(enum.Enum):
    """When a client left before its answer."""

    BODY = "while sending its request body"
    WAITING = "while its request waited for the model"


@dataclass(slots=True)
class Response:
    """A whole response: status, body bytes, content type and extra headers.

    ``close`` asks for the connection to be closed after it (a ``Connection: close`` header is
    added then).
    """

    status: int
    body: bytes = b""
    content_type: str = JSON
    headers: Iterable[tuple[str, str]] = ()
    close: bool = False


@dataclass(slots=True, eq=False)
class Request:
    """One request: its head at :meth:`HttpApp.on_head`, its whole ``body`` at ``on_request``.

    ``headers`` has lower-case names (repeated headers joined with ``", "``); ``params`` holds
    the route's ``{name}`` segments; ``route`` and ``started`` are the app's to use.
    """

    method: str
    path: str
    query: str
    headers: dict[str, str]
    client: tuple[str, int] | None = None
    body: bytes = b""
    params: dict[str, str] = field(default_factory=dict)
    route: Route | None = None
    started: float = 0.0
    keep_alive: bool = True
    # transport bookkeeping
    response: Response | None = None  # answered at its head (body skipped)
    size: int = 0
    chunks: list[bytes] = field(default_factory=list)

    @property
    def declared_length(self) -> int | None:
        value = self.headers.get("content-length")
        return int(value) if value is not None and value.isdigit() else None


Handler = Callable[[Request], "Response | Awaitable[Response]"]
HeadCheck = Callable[[Request], "Response | None"]


class HttpApp(Protocol):
    """What the server (and :func:`asgi`) asks of an application."""

    max_body_bytes: int
    body_timeout_s: float

    async def startup(self) -> None: ...

    async def shutdown(self) -> None: ...

    def on_head(self, request: Request) -> Response | None:
        """The head is parsed (no body yet): route it; a Response answers it at once (the
        declared body length is checked after it)."""

    def on_request(self, request: Request) -> Response | Awaitable[Response]:
        """The body is complete: answer it, directly or through an awaitable."""

    def too_large(self, request: Request, declared: int | None) -> Response:
        """The body is over ``max_body_bytes`` (``declared``: its Content-Length, if any)."""

    def body_timeout(self, request: Request, received: int) -> Response:
        """The body did not arrive within ``body_timeout_s`` (``received`` bytes came)."""

    def on_gone(self, request: Request, phase: Phase) -> None:
        """The client closed its connection before its answer."""


# --- routing ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    pattern: str
    handler: Handler
    head: HeadCheck | None = None  # run once the head is parsed, before the body is read
    segments: tuple[str, ...] = ()


class Router:
    """Routes by method and path; ``{name}`` matches one non-empty segment.

    ``resolve`` returns ``(route, params, 0)``, or ``(None, {}, 404 | 405)``.
    """

    def __init__(self) -> None:
        self._routes: list[Route] = []
        self._cache: dict[tuple[str, str], tuple[Route | None, dict[str, str], int]] = {}

    def add(
        self, method: str, pattern: str, handler: Handler, *, head: HeadCheck | None = None
    ) -> None:
        segments = tuple(pattern.strip("/").split("/"))
        self._routes.append(Route(method, pattern, handler, head, segments))
        self._cache.clear()

    def get(self, pattern: str, handler: Handler) -> None:
        self.add("GET", pattern, handler)

    def post(self, pattern: str, handler: Handler, *, head: HeadCheck | None = None) -> None:
        self.add("POST", pattern, handler, head=head)

    @property
    def routes(self) -> list[Route]:
        return list(self._routes)

    def resolve(self, method: str, path: str) -> tuple[Route | None, dict[str, str], int]:
        key = (method, path)
        hit = self._cache.get(key)
        if hit is not None:
            return hit[0], dict(hit[1]), hit[2]
        found = self._resolve(method, path)
        if len(self._cache) < 1024:
            self._cache[key] = found
        return found[0], dict(found[1]), found[2]

    def _resolve(self, method: str, path: str) -> tuple[Route | None, dict[str, str], int]:
        parts = path.strip("/").split("/")
        status = 404
        for route in self._routes:
            params = _match(route.segments, parts)
            if params is None:
                continue
            if route.method == method:
                return route, params, 0
            status = 405
        return None, {}, status


def _match(segments: tuple[str, ...], parts: list[str]) -> dict[str, str] | None:
    if len(segments) != len(parts):
        return None
    params: dict[str, str] = {}
    for segment, part in zip(segments, parts, strict=True):
        if segment.startswith("{") and segment.endswith("}"):
            if not part:
                return None
            params[segment[1:-1]] = part
        elif segment != part:
            return None
    return params


# --- the server ---------------------------------------------------------------------------------


class HttpServer:
    """Serve an :class:`HttpApp` on listening sockets until :meth:`stop` (thread-safe)."""

    def __init__(
        self,
        app: HttpApp,
        *,
        keep_alive_s: float = 5.0,
        graceful_s: float = 10.0,
        server_name: str = "shipyard",
    ) -> None:
        self.app = app
        self.keep_alive_s = keep_alive_s
        self.graceful_s = graceful_s
        self.started = False
        self.stopping = False
        self.connections: set[_Connection] = set()
        self.date = b""
        self._server_header = f"server: {server_name}\r\n".encode()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    def stop(self) -> None:
        """Ask the server to stop (from any thread or a signal handler)."""
        loop, event = self._loop, self._stop
        if loop is not None and event is not None:
            loop.call_soon_threadsafe(event.set)

    async def serve(self, sockets: list[socket.socket], *, handle_signals: bool = False) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop.set)
        await self.app.startup()
        servers = []
        try:
            self._tick()
            for sock in sockets:
                sock.setblocking(False)
                servers.append(
                    await loop.create_server(lambda: _Connection(self), sock=sock, backlog=1024)
                )
            self.started = True
            await self._stop.wait()
            self.stopping = True
            for server in servers:
                server.close()
            await self._drain_connections()
        finally:
            for server in servers:
                server.close()
            for conn in list(self.connections):
                conn.abort()
            with contextlib.suppress(Exception):
                await asyncio.gather(*(s.wait_closed() for s in servers))
            await self.app.shutdown()
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)

    async def _drain_connections(self) -> None:
        deadline = time.monotonic() + self.graceful_s
        while self.connections and time.monotonic() < deadline:
            for conn in list(self.connections):
                if conn.idle:
                    conn.abort()
            await asyncio.sleep(0.05)

    def _tick(self) -> None:
        """Once a second: refresh the Date header and close idle keep-alive connections."""
        self.date = f"date: {formatdate(usegmt=True)}\r\n".encode() + self._server_header
        now = time.monotonic()
        for conn in list(self.connections):
            if conn.idle and now - conn.last_active > self.keep_alive_s:
                conn.abort()
        if not self.stopping and self._loop is not None:
            self._loop.call_later(_SWEEP_S, self._tick)


class _HeadTooLarge(Exception):
    """Raised from a parser callback: the request head is over :data:`MAX_HEAD_BYTES`."""


class _Connection(asyncio.Protocol):
    """One client connection: parse requests, answer them in order."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.app = server.app
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.client: tuple[str, int] | None = None
        self.closing = False  # no more requests are read or answered on this connection
        self.broken = False  # the parser refused the stream
        self.paused = False  # reading paused: too many pipelined requests wait
        self.write_paused = False  # reading paused: the client does not read its answers
        self.head_bytes = 0
        self.last_active = time.monotonic()
        self.pending: deque[Request] = deque()  # ready for an answer, in order
        self.current: Request | None = None  # the request whose awaitable is in flight
        self.task: asyncio.Future[Response] | None = None
        self.req: Request | None = None  # head parsed, body still arriving
        self.timer: asyncio.TimerHandle | None = None
        self._url = b""
        self._headers: dict[str, str] = {}

    @property
    def idle(self) -> bool:
        return self.req is None and self.task is None and not self.pending

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.client = (str(peer[0]), int(peer[1]))
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.connections.discard(self)
        self._cancel_timer()
        req, self.req = self.req, None
        if req is not None and req.response is None:
            self.app.on_gone(req, Phase.BODY)
        task, current = self.task, self.current
        if task is not None and current is not None:
            self.task = self.current = None
            self.app.on_gone(current, Phase.WAITING)
            task.cancel()
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        if self.closing or self.broken:
            return  # (a closing connection discards what the client still sends)
        self.last_active = time.monotonic()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._finish(
                Response(400, b'{"error":"protocol upgrades are not supported"}', close=True)
            )
            return
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):  # (raised in a callback: wrapped)
                message = f"the request line and headers are larger than {MAX_HEAD_BYTES} bytes"
                self._finish(Response(431, f'{{"error":"{message}"}}'.encode(), close=True))
                return
            message = f"invalid HTTP request: {exc}".replace('"', "'")
            self._finish(Response(400, f'{{"error":"{message}"}}'.encode(), close=True))
            return
        if self.req is not None and self.timer is None and not self.closing:
            self.timer = self.loop.call_later(self.app.body_timeout_s, self._body_timed_out)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if not self.paused and not self.closing and self.transport is not None:
            self.transport.resume_reading()
        self._drain()  # the answers that waited for the client to read

    def eof_received(self) -> bool | None:
        return None  # the client closed its side: close the connection (connection_lost)

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self.head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self.head_bytes += len(url)
        if self.head_bytes > MAX_HEAD_BYTES:
            raise _HeadTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value)
        if self.head_bytes > MAX_HEAD_BYTES:
            raise _HeadTooLarge
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        previous = self._headers.get(key)
        self._headers[key] = text if previous is None else f"{previous}, {text}"

    def on_headers_complete(self) -> None:
        if self.closing:
            return
        raw_path, _, query = self._url.partition(b"?")
        path = raw_path.decode("latin-1")
        if "%" in path:
            path = unquote(path)
        req = Request(
            method=self.parser.get_method().decode("latin-1"),
            path=path,
            query=query.decode("latin-1"),
            headers=self._headers,
            client=self.client,
            keep_alive=self.parser.should_keep_alive(),
        )
        self.req = req
        declared = req.declared_length
        early = self.app.on_head(req)
        if early is None and declared is not None and declared > self.app.max_body_bytes:
            early = self.app.too_large(req, declared)
        if early is not None:
            req.response = early
            self.pending.append(req)
            self._drain()
        elif (
            req.headers.get("expect", "").lower() == "100-continue"
            and self.task is None
            and not self.pending
            and self.transport is not None
        ):
            self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        req = self.req
        if req is None or req.response is not None:
            return  # answered at its head: the body is skipped
        req.size += len(body)
        if req.size > self.app.max_body_bytes:
            req.chunks.clear()
            req.response = self.app.too_large(req, None)
            self.pending.append(req)
            self._drain()
            return
        req.chunks.append(body)

    def on_message_complete(self) -> None:
        req, self.req = self.req, None
        self._cancel_timer()
        if req is None or req.response is not None or self.closing:
            return
        chunks = req.chunks
        req.body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        req.chunks = []
        self.pending.append(req)
        self._drain()

    # answering

    def _drain(self) -> None:
        pending = self.pending
        while pending and self.task is None and not self.closing and not self.write_paused:
            req = pending.popleft()
            response = req.response
            if response is None:
                try:
                    result = self.app.on_request(req)
                except Exception:  # the app's own errors are answered by the app: a bug here
                    _log.exception("request handler failed")
                    result = Response(500, b'{"error":"internal error"}')
                if not isinstance(result, Response):
                    self.current = req
                    self.task = task = asyncio.ensure_future(result)
                    task.add_done_callback(self._task_done)
                    if len(pending) >= _MAX_PIPELINED and not self.paused and self.transport:
                        self.paused = True
                        self.transport.pause_reading()
                    return
                response = result
            self._write(req, response)
        if self.paused and not self.closing and self.transport is not None:
            self.paused = False
            if not self.write_paused:
                self.transport.resume_reading()

    def _task_done(self, task: asyncio.Future[Response]) -> None:
        if self.task is not task:
            return  # the connection was lost and the task cancelled
        req = self.current
        self.task = self.current = None
        if task.cancelled():
            response = Response(503, b'{"error":"the request was cancelled"}', close=True)
        else:
            try:
                response = task.result()
            except Exception:
                _log.exception("request handler failed")
                response = Response(500, b'{"error":"internal error"}')
        if req is not None and not self.closing:
            self._write(req, response)
        self._drain()

    def _write(self, req: Request, response: Response) -> None:
        transport = self.transport
        if transport is None or self.closing:
            return
        keep = req.keep_alive and not response.close and not self.server.stopping
        body = response.body
        head = [
            b"HTTP/1.1 %d %s\r\n" % (response.status, _REASONS.get(response.status, b"")),
            self.server.date,
            b"content-type: %s\r\ncontent-length: %d\r\n"
            % (response.content_type.encode("latin-1"), len(body)),
        ]
        for name, value in response.headers:
            head.append(f"{name}: {value}\r\n".encode("latin-1"))
        if not keep:
            head.append(b"connection: close\r\n")
        head.append(b"\r\n")
        if req.method != "HEAD":
            head.append(body)
        transport.write(b"".join(head))
        self.last_active = time.monotonic()
        if not keep:
            self._linger(transport)

    def _linger(self, transport: asyncio.Transport) -> None:
        """Close after the answer without a reset: send FIN, discard what the client still
        sends (an unread body would make the kernel reset the connection and lose the answer),
        and close for good after :data:`_LINGER_S` or the client's own close."""
        self.closing = True
        self._cancel_timer()
        if transport.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                transport.write_eof()
            self.loop.call_later(_LINGER_S, transport.close)
        else:
            transport.close()

    def _finish(self, response: Response) -> None:
        """Answer a request the parser refused, after those ahead of it, and close."""
        self.broken = True
        req = Request(method="GET", path="", query="", headers={}, keep_alive=False)
        req.response = response
        self.req = None
        self.pending.append(req)
        self._drain()

    def _body_timed_out(self) -> None:
        self.timer = None
        req, self.req = self.req, None
        if req is None or self.closing:
            return
        if req.response is not None:  # answered already; its body never came
            self.abort()
            return
        req.chunks = []
        req.response = self.app.body_timeout(req, req.size)
        req.response.close = True
        self.broken = True  # the rest of its body, if it ever comes, is not a new request
        self.pending.append(req)
        self._drain()

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.close()


# --- the same app behind ASGI ---------------------------------------------------------------------


async def asgi(app: HttpApp, scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Run ``app`` as an ASGI application (lifespan and http scopes)."""
    if scope["type"] == "lifespan":
        await _lifespan(app, receive, send)
        return
    if scope["type"] != "http":
        return
    headers: dict[str, str] = {}
    for name, value in scope.get("headers", ()):
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers[key] = text if key not in headers else f"{headers[key]}, {text}"
    client = scope.get("client")
    req = Request(
        method=scope["method"],
        path=scope["path"],
        query=scope.get("query_string", b"").decode("latin-1"),
        headers=headers,
        client=(str(client[0]), int(client[1])) if client else None,
    )
    declared = req.declared_length
    early = app.on_head(req)
    if early is None and declared is not None and declared > app.max_body_bytes:
        early = app.too_large(req, declared)
    if early is not None:
        await _send(send, early)
        return
    body = await _receive_body(app, req, receive)
    if isinstance(body, Response):
        await _send(send, body)
        return
    if body is None:
        return
    req.body = body
    result = app.on_request(req)
    if not isinstance(result, Response):
        answer = await _unless_client_leaves(app, req, result, receive)
        if answer is None:
            return
        result = answer
    await _send(send, result)


async def _lifespan(app: HttpApp, receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                await app.startup()
            except Exception as exc:
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await app.shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _receive_body(app: HttpApp, req: Request, receive: Any) -> bytes | Response | None:
    """The whole body; a Response when over the limit or too slow; None if the client left."""
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(app.body_timeout_s):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    app.on_gone(req, Phase.BODY)
                    return None
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > app.max_body_bytes:
                    response = app.too_large(req, None)
                    response.close = True
                    return response
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
    except TimeoutError:
        response = app.body_timeout(req, size)
        response.close = True
        return response


async def _unless_client_leaves(
    app: HttpApp, req: Request, work: Awaitable[Response], receive: Any
) -> Response | None:
    task = asyncio.ensure_future(work)

    async def client_left() -> None:
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except Exception:  # the server cannot tell us: never cut a request short for that
            await asyncio.Future()

    watcher = asyncio.ensure_future(client_left())
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watcher):
            pending.cancel()
        await asyncio.wait((task, watcher))
    if not task.cancelled():
        return task.result()
    app.on_gone(req, Phase.WAITING)
    return None


async def _send(send: Any, response: Response) -> None:
    headers = [(b"content-type", response.content_type.encode("latin-1"))]
    headers.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers)
    if response.close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})
