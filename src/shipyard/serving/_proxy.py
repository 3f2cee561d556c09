"""The gateway's HTTP/1.1 client to replicas: pooled keep-alive connections per replica (and,
where a server batches pipelined requests, pipelining), on asyncio protocols and httptools'
response parser.

Why not httpx: measured behind the server's gateway, httpx (over httpcore and anyio) spent
milliseconds of CPU per request - several awaits, locks and stream wrappers per hop, and an
import attempt per call - where a hop needs one write and one parse.

Writes wait for the end of the event loop's turn, so the requests forwarded in one turn leave
together. With ``max_pipeline`` above 1 they also share connections: a request joins another's
connection while that one's write is still being gathered (up to ``max_pipeline`` deep, so it
never waits behind a request already with the model), and they go out in one write - a write to
a loopback socket is the most expensive step of a hop. It is off (1) by default: shipyard's
replicas answer a connection's pipelined requests one after another, which would keep them out
of one batch. Otherwise a request takes the most recently used idle connection, or a new one.

- whole bodies both ways, a ``Content-Length`` on every request; responses with a length,
  chunked or (the last one) ended by close;
- idle connections are dropped after ``idle_s`` - sooner than the replica's own keep-alive
  timeout, so a connection is rarely reused just as the replica closes it; when that happens
  anyway (an idle connection ends before a single byte of the answer), the request is sent once
  more on a fresh connection;
- failures say what they mean for a retry: :class:`ConnectFailed` (nothing was sent),
  :class:`Dropped` (the connection ended before the whole answer: the replica died or broke
  the protocol) and :class:`ReadTimeout` (the replica is alive but slow: not to be retried).
  A timeout closes its connection: requests pipelined behind it are Dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

CONNECT_TIMEOUT_S = 2.0
TIMEOUT_S = 60.0
IDLE_S = 4.0  # < the replica's keep-alive (serving._http: 5 s)
MAX_CONNECTIONS = 256  # per replica; past it, requests queue on the least busy connection
# requests gathered into one write per connection: 1, i.e. none, for shipyard's replicas, which
# answer a connection's pipelined requests one after another - so pipelining would keep them
# out of one batch - while requests on separate connections are batched together
MAX_PIPELINE = 1


class ProxyError(Exception):
    """A request to a replica got no complete answer."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{url}: {reason}")
        self.url = url
        self.reason = reason


class ConnectFailed(ProxyError):
    """No connection could be made (refused, unreachable, timed out): nothing was sent."""


class Dropped(ProxyError):
    """The connection ended (or the answer was not HTTP) before the whole answer came.

    ``stale``: it was an idle keep-alive connection and not a byte of the answer came - most
    likely the replica closed it just as it was reused, so a fresh connection may well work.
    """

    def __init__(self, url: str, reason: str, *, stale: bool = False) -> None:
        super().__init__(url, reason)
        self.stale = stale


class ReadTimeout(ProxyError):
    """The replica took longer than the timeout to answer; it may still be working on it."""


@dataclass(frozen=True, slots=True)
class Answer:
    """A replica's whole answer; header names are lower-case bytes, as the parser gives them."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


class Pool:
    """Keep-alive connections to replicas by base URL (``http://host:port``), for one event
    loop at a time (connections of a loop that is gone are forgotten)."""

    def __init__(
        self,
        *,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        timeout_s: float = TIMEOUT_S,
        idle_s: float = IDLE_S,
        max_connections: int = MAX_CONNECTIONS,
        max_pipeline: int = MAX_PIPELINE,
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.timeout_s = timeout_s
        self.idle_s = idle_s
        self.max_connections = max_connections
        self.max_pipeline = max_pipeline
        self.opened = 0  # connections made so far (tests watch reuse with it)
        self._conns: dict[str, list[_Connection]] = {}
        self._addresses: dict[str, tuple[str, int, bytes]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    async def request(
        self,
        url: str,
        method: str,
        path: str,
        *,
        headers: list[tuple[bytes, bytes]],
        body: bytes = b"",
    ) -> Answer:
        """Send ``method path`` to the replica at ``url`` and return its whole answer.

        ``headers`` must not hold ``host``, ``content-length`` or ``connection``: they are set
        here. Raises ConnectFailed, Dropped or ReadTimeout.
        """
        host, port, host_header = self._address(url)
        data = _head(method, path, host_header, headers, len(body))
        if body:
            data += body
        conn = self._choose(url)
        if conn is not None:
            try:
                return await conn.send(data, self.timeout_s)
            except Dropped as exc:
                if not exc.stale:
                    raise
                # the replica closed this idle connection as we reused it: a fresh one
        conn = await self._connect(url, host, port)
        return await conn.send(data, self.timeout_s)

    def connection_count(self, url: str) -> int:
        return sum(1 for c in self._conns.get(url, ()) if not c.closed)

    def close(self) -> None:
        """Close every connection; requests still in flight on them fail with Dropped."""
        for conns in self._conns.values():
            for conn in list(conns):
                conn.close()
        self._conns.clear()

    # --- helpers --------------------------------------------------------------------------------

    def _address(self, url: str) -> tuple[str, int, bytes]:
        known = self._addresses.get(url)
        if known is not None:
            return known
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ConnectFailed(url, "not an http://host:port URL")
        known = (parts.hostname, parts.port or 80, parts.netloc.encode("latin-1"))
        self._addresses[url] = known
        return known

    def _choose(self, url: str) -> _Connection | None:
        """The connection whose write is being gathered (joined up to ``max_pipeline``), else
        the most recently used idle one, else None (make one) - or, at ``max_connections``,
        the least busy."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new event loop: the old one's connections are dead
            self._conns.clear()
            self._loop = loop
        conns = self._conns.get(url)
        if not conns:
            return None
        now = time.monotonic()
        idle: _Connection | None = None
        expired: list[_Connection] = []
        for conn in reversed(conns):
            if conn.gathering and len(conn.pending) < self.max_pipeline:
                return conn
            if not conn.pending and idle is None:
                if now - conn.idle_since < self.idle_s:
                    idle = conn
                else:
                    expired.append(conn)
        for conn in expired:
            conn.close()
        if idle is not None or len(conns) < self.max_connections:
            return idle
        return min(conns, key=lambda c: len(c.pending))

    async def _connect(self, url: str, host: str, port: int) -> _Connection:
        loop = asyncio.get_running_loop()
        conns = self._conns.setdefault(url, [])
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(url, conns), host, port),
                self.connect_timeout_s,
            )
        except TimeoutError:
            raise ConnectFailed(url, f"no connection within {self.connect_timeout_s:g}s") from None
        except OSError as exc:
            raise ConnectFailed(url, exc.strerror or type(exc).__name__) from None
        self.opened += 1
        return conn


class _Exchange:
    """One request on a connection, waiting for its answer."""

    __slots__ = ("answered", "stale_ok", "timer", "waiter")

    def __init__(self, waiter: asyncio.Future[Answer], *, stale_ok: bool) -> None:
        self.waiter = waiter
        self.timer: asyncio.TimerHandle | None = None
        self.answered = False  # a byte of its answer came
        self.stale_ok = stale_ok  # sent on an idle keep-alive connection


class _Connection(asyncio.Protocol):
    """One keep-alive connection: requests written in order, answers matched in order."""

    def __init__(self, url: str, registry: list[_Connection]) -> None:
        self.url = url
        self.registry = registry  # the pool's list of this replica's connections
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.gathering = False  # a write is being gathered, to go out at the loop's next turn
        self.idle_since = time.monotonic()
        self.pending: deque[_Exchange] = deque()
        self._out: list[bytes] = []
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._used = False  # has answered a request before

    def send(self, data: bytes, timeout_s: float) -> asyncio.Future[Answer]:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Answer] = loop.create_future()
        exchange = _Exchange(waiter, stale_ok=self._used and not self.pending)
        if self.closed:
            waiter.set_exception(
                Dropped(self.url, "the connection was closed", stale=exchange.stale_ok)
            )
            return waiter
        exchange.timer = loop.call_later(timeout_s, self._timed_out, exchange, timeout_s)
        self.pending.append(exchange)
        self._out.append(data)
        if not self.gathering:
            self.gathering = True
            loop.call_soon(self._flush)
        return waiter

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()  # connection_lost fails what is pending
        self.closed = True

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.registry.append(self)

    def data_received(self, data: bytes) -> None:
        if not self.pending:  # bytes nobody asked for: the connection is not usable
            self._fail_all("the replica sent bytes nobody asked for")
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail_all(f"the answer is not valid HTTP ({exc})")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        with contextlib.suppress(ValueError):
            self.registry.remove(self)
        if self.pending and self.pending[0].answered:
            # an answer without a length ends at the close
            with contextlib.suppress(httptools.HttpParserError):
                self.parser.feed_data(b"")
        self._fail_all(None)

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.pending[0].answered = True
        self._headers = []
        self._body = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        exchange = self.pending.popleft()
        if exchange.timer is not None:
            exchange.timer.cancel()
        self._used = True
        if not self.pending:
            self.idle_since = time.monotonic()
        if not exchange.waiter.done():  # not cancelled: the caller still wants it
            body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
            answer = Answer(self.parser.get_status_code(), self._headers, body)
            exchange.waiter.set_result(answer)
        if not self.parser.should_keep_alive():
            self._fail_all("the replica closed the connection after an earlier answer")

    # helpers

    def _flush(self) -> None:
        self.gathering = False
        out, self._out = self._out, []
        if self.closed or self.transport is None or not out:
            return
        self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _timed_out(self, exchange: _Exchange, timeout_s: float) -> None:
        if not exchange.waiter.done():
            exchange.waiter.set_exception(ReadTimeout(self.url, f"no answer within {timeout_s:g}s"))
        self._fail_all("a request ahead of this one on its connection timed out")

    def _fail_all(self, reason: str | None) -> None:
        """Close, and fail every request still waiting (Dropped)."""
        self.close()
        self._out = []
        while self.pending:
            exchange = self.pending.popleft()
            if exchange.timer is not None:
                exchange.timer.cancel()
            if exchange.waiter.done():
                continue
            why = reason or (
                "the connection dropped before the whole answer came"
                if exchange.answered
                else "no answer came"
            )
            stale = exchange.stale_ok and not exchange.answered
            exchange.waiter.set_exception(Dropped(self.url, why, stale=stale))


def _head(
    method: str, path: str, host: bytes, headers: list[tuple[bytes, bytes]], length: int
) -> bytes:
    lines = [b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (method.encode(), path.encode(), host)]
    lines.extend(b"%s: %s\r\n" % pair for pair in headers)
    if length or method != "GET":
        lines.append(b"content-length: %d\r\n" % length)
    lines.append(b"\r\n")
    return b"".join(lines)
