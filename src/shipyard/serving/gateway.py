"""The gateway: the one front door for inference, in front of every deployment's replicas.

``Gateway.forward`` sends an OIP request for deployment ``name`` to one of its ready replicas
and hands back the replica's answer untouched: the body's bytes are never parsed here. Which
replica: a smooth weighted round-robin over the deployment's serving targets (their weights,
among those with a ready replica), then round-robin over that target's ready replicas. A shadow
target gets a copy of each request, sent in the background; its answer is dropped.

Every request carries an id end to end: the caller's ``X-Request-Id`` or a new one, sent to the
replica and returned; the response names the version that served it
(``X-Shipyard-Model-Version``; the OIP body's ``model_version`` comes from the replica itself).

Retries: a request that could not be delivered (the connection was refused, or timed out while
connecting) is sent once more, to another replica when there is one. So is a request whose
connection dropped before the whole answer came (a replica that died under load): inference is
idempotent - a model call changes nothing - so a second try cannot do harm. A slow answer
(a read timeout) or any HTTP response, 5xx included, is never retried. A replica that failed
that way is left out of this gateway's picks for ``EJECT_S`` seconds, until the reconciler has
seen it too.

Routes come from the store (the replicas the reconciler marked ready, of the versions that
serve) and are cached for ``REFRESH_S`` seconds, or until the reconciler in this process changes
what serves. An expired route is reloaded in the background while requests keep using it (one
load at a time per deployment, so a busy deployment costs one query per ``REFRESH_S``, not one
per request); a changed generation, or a deployment not seen yet, waits for its load. The
reconciler drains replicas for longer than that before stopping them, so a route cached a moment
too long still reaches a live replica.

The hop to replicas is ``serving._proxy``: pooled keep-alive HTTP/1.1 connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import anyio.to_thread
from sqlalchemy import select

from shipyard.context import Context
from shipyard.domain.models import DeploymentSpec, DeploymentStatus, ReplicaState, ServingTarget
from shipyard.domain.names import validate_name
from shipyard.domain.principals import Role
from shipyard.errors import BackendError, NotFoundError
from shipyard.security.rbac import authorize
from shipyard.serving import deployments, reconciler
from shipyard.serving._proxy import ConnectFailed, Dropped, Pool, ProxyError, ReadTimeout
from shipyard.store.queries import project_id
from shipyard.store.tables import DeploymentReplicaRow, DeploymentRow

REFRESH_S = 0.5
EJECT_S = 2.0
TIMEOUT_S = 60.0
MAX_SHADOW_IN_FLIGHT = 64
REQUEST_ID = "x-request-id"
VERSION_HEADER = "x-shipyard-model-version"
_REQUEST_ID = REQUEST_ID.encode()
_VERSION_HEADER = VERSION_HEADER.encode()
# request headers passed on to the replica (the rest stay at the gateway: auth, cookies, ...)
_FORWARDED = frozenset(
    (b"content-type", b"inference-header-content-length", b"accept", b"content-encoding")
)
_RETURNED = frozenset((b"content-type", b"inference-header-content-length", b"content-encoding"))
# new request ids: unique per process start and request, 32 hex digits like a uuid4's, without
# a random read per request
_ID_PREFIX = uuid.uuid4().hex[:16].encode()
_ID_COUNTER = itertools.count(1)


WAKE_TIMEOUT_S = 30.0  # how long a request to a deployment scaled to zero waits for a replica
WAKE_POLL_S = 0.05


class NoReplicaError(BackendError):
    """The deployment exists but no replica of it is ready to take the request (503)."""

    code = "unavailable"
    http_status = 503


@dataclass(frozen=True, slots=True)
class GatewayResponse:
    """The replica's answer as the gateway returns it: status, headers (lower-case names, as
    bytes: the replica's content headers, the request id and the serving version) and body."""

    status: int
    raw_headers: list[tuple[bytes, bytes]]
    content: bytes

    @property
    def headers(self) -> dict[str, str]:
        return {k.decode("latin-1"): v.decode("latin-1") for k, v in self.raw_headers}


@dataclass(slots=True)
class _Target:
    target: ServingTarget
    urls: list[str]
    turn: itertools.count[int] = field(default_factory=itertools.count)
    current: float = 0.0  # smooth weighted round-robin state
    version: bytes = b""  # the version header's value

    def __post_init__(self) -> None:
        self.version = str(self.target.version).encode()


@dataclass(slots=True)
class _Routes:
    loaded_at: float
    generation: int
    serving: list[_Target]
    shadows: list[_Target]
    status: str
    wakes: bool = False  # scaled to zero when idle: a request waits for a replica to start


class Gateway:
    """Forwards OIP requests to replicas over pooled keep-alive connections."""

    def __init__(
        self, ctx: Context, *, refresh_s: float = REFRESH_S, pool: Pool | None = None
    ) -> None:
        self.ctx = ctx
        self.refresh_s = refresh_s
        self.pool = pool or Pool(timeout_s=TIMEOUT_S)
        self._routes: dict[tuple[str, str], _Routes] = {}
        self._loading: dict[tuple[str, str], tuple[int, asyncio.Task[_Routes]]] = {}
        self._ejected: dict[str, float] = {}
        self._shadows: set[asyncio.Task[None]] = set()

    async def forward(
        self,
        ctx: Context,
        *,
        project: str,
        name: str,
        path: str,
        body: bytes,
        headers: Mapping[bytes, bytes] | list[tuple[bytes, bytes]],
        method: str = "POST",
    ) -> GatewayResponse:
        """Send ``method path`` (a path under ``/v2/models/{name}``) to a replica of ``name``.

        Raises NotFoundError for an unknown deployment (or one the caller may not see),
        NoReplicaError when none of its replicas is ready, and BackendError when the replicas
        tried could not be reached or did not answer in time.
        """
        validate_name(name, field="name")
        authorize(ctx, project=project, need=Role.VIEWER)
        routes = await self._routes_of(project, name)
        sent, request_id = _outgoing(headers.items() if isinstance(headers, Mapping) else headers)
        try:
            target, url = self._pick(routes, name=name, project=project)
        except NoReplicaError:
            if not routes.wakes:
                raise
            routes, (target, url) = await self._wake(routes, project=project, name=name)
        tried = [url]
        while True:
            try:
                answer = await self.pool.request(url, method, path, headers=sent, body=body)
                break
            except (ConnectFailed, Dropped) as exc:
                self._ejected[url] = time.monotonic() + EJECT_S
                if len(tried) > 1:
                    raise BackendError(
                        f"deployment {name!r}: replicas at {', '.join(sorted(set(tried)))} "
                        f"could not be reached ({exc.reason}); the reconciler restarts them",
                        field="name",
                    ) from None
                target, url = self._pick(routes, name=name, project=project, avoid=set(tried))
                tried.append(url)
            except ReadTimeout:
                raise BackendError(
                    f"deployment {name!r}: the replica at {url} did not answer within "
                    f"{self.pool.timeout_s:.0f}s",
                    field="name",
                ) from None
        if routes.shadows and method == "POST":
            self._mirror(routes, path, body, sent)
        out = [(k, v) for k, v in answer.headers if k in _RETURNED]
        out.append((_REQUEST_ID, request_id))
        out.append((_VERSION_HEADER, target.version))
        return GatewayResponse(answer.status, out, answer.body)

    async def _wake(
        self, routes: _Routes, *, project: str, name: str
    ) -> tuple[_Routes, tuple[_Target, str]]:
        """Hold a request to a deployment scaled to zero until a replica is ready: ask the
        reconciler for one (``reconciler.wake``) and look again every ``WAKE_POLL_S`` (the routes
        reload as soon as the reconciler marks the replica ready), for ``WAKE_TIMEOUT_S``."""
        reconciler.wake(self.ctx, project=project, name=name)
        deadline = time.monotonic() + WAKE_TIMEOUT_S
        while True:
            await asyncio.sleep(WAKE_POLL_S)
            routes = await self._routes_of(project, name)
            try:
                return routes, self._pick(routes, name=name, project=project)
            except NoReplicaError:
                if time.monotonic() >= deadline or not routes.wakes:
                    raise NoReplicaError(
                        f"deployment {name!r} in project {project!r} is scaled to zero and no "
                        f"replica was ready within {WAKE_TIMEOUT_S:.0f}s of this request; see "
                        f"`shipyard deployments show {name} --project {project}`",
                        field="name",
                    ) from None

    async def aclose(self) -> None:
        for task in [*self._shadows, *(t for _, t in self._loading.values())]:
            task.cancel()
        self.pool.close()

    # --- helpers --------------------------------------------------------------------------------

    async def _routes_of(self, project: str, name: str) -> _Routes:
        key = (project, name)
        cached = self._routes.get(key)
        generation = reconciler.generation()
        if cached is not None and cached.generation == generation:
            if time.monotonic() - cached.loaded_at >= self.refresh_s:
                self._refresh(key, generation)  # in the background; this request uses the old
            return cached
        return await asyncio.shield(self._refresh(key, generation))

    def _refresh(self, key: tuple[str, str], generation: int) -> asyncio.Task[_Routes]:
        """The load of ``key``'s routes for ``generation`` in flight, started if none is."""
        loading = self._loading.get(key)
        if loading is not None and loading[0] == generation:
            return loading[1]
        task = asyncio.create_task(self._reload(key, generation))
        self._loading[key] = (generation, task)
        task.add_done_callback(lambda t: _settle(self, key, t))
        return task

    async def _reload(self, key: tuple[str, str], generation: int) -> _Routes:
        try:
            fresh = await anyio.to_thread.run_sync(self._load, *key)
        except BaseException:
            self._routes.pop(key, None)  # the next request loads (and fails) on its own
            raise
        fresh.generation = generation
        cached = self._routes.get(key)
        if cached is not None:  # keep the round-robin positions across refreshes
            _carry(cached.serving, fresh.serving)
            _carry(cached.shadows, fresh.shadows)
        self._routes[key] = fresh
        return fresh

    def _load(self, project: str, name: str) -> _Routes:
        with self.ctx.db.read() as s:
            row = s.scalar(
                select(DeploymentRow).where(
                    DeploymentRow.project_id == project_id(s, project, create=False),
                    DeploymentRow.name == name,
                )
            )
            if row is None:
                raise NotFoundError(
                    f"deployment {name!r} does not exist in project {project!r}", field="name"
                )
            ready = s.execute(
                select(DeploymentReplicaRow.version, DeploymentReplicaRow.url)
                .where(
                    DeploymentReplicaRow.deployment_id == row.id,
                    DeploymentReplicaRow.state == ReplicaState.READY.value,
                )
                .order_by(DeploymentReplicaRow.id)
            ).all()
            serving = deployments.load_targets(row.serving)
            status = row.status
            spec = DeploymentSpec.model_validate(row.spec) if row.spec else None
        urls: dict[int, list[str]] = {}
        for version, url in ready:
            if url:
                urls.setdefault(version, []).append(url)
        if status == DeploymentStatus.STOPPED.value:
            serving = []
        targets = [_Target(t, urls.get(t.version, [])) for t in serving]
        return _Routes(
            loaded_at=time.monotonic(),
            generation=0,
            serving=[t for t in targets if not t.target.shadow],
            shadows=[t for t in targets if t.target.shadow],
            status=status,
            wakes=spec is not None
            and spec.autoscaling is not None
            and spec.replicas.min == 0
            and status != DeploymentStatus.STOPPED.value,
        )

    def _pick(
        self, routes: _Routes, *, name: str, project: str, avoid: set[str] | None = None
    ) -> tuple[_Target, str]:
        now = time.monotonic()
        avoid = avoid or set()
        ejected = self._ejected

        def usable(target: _Target, strict: bool) -> list[str]:
            return [
                u
                for u in target.urls
                if u not in avoid and (not strict or ejected.get(u, 0.0) <= now)
            ]

        for strict in (True, False):  # an ejected replica beats none at all
            candidates = [(t, usable(t, strict)) for t in routes.serving]
            candidates = [(t, urls) for t, urls in candidates if urls and t.target.weight > 0]
            if candidates:
                chosen, urls = _smooth_weighted(candidates)
                return chosen, urls[next(chosen.turn) % len(urls)]
        if avoid:  # nothing else: the same replica once more
            for target in routes.serving:
                if target.urls:
                    return target, target.urls[next(target.turn) % len(target.urls)]
        raise NoReplicaError(
            f"deployment {name!r} in project {project!r} has no ready replica "
            f"(it is {routes.status}); see `shipyard deployments show {name} --project "
            f"{project}`",
            field="name",
        )

    def _mirror(
        self, routes: _Routes, path: str, body: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        for shadow in routes.shadows:
            if not shadow.urls or len(self._shadows) >= MAX_SHADOW_IN_FLIGHT:
                continue
            url = shadow.urls[next(shadow.turn) % len(shadow.urls)]
            task = asyncio.create_task(self._shadow_call(url, path, body, headers))
            self._shadows.add(task)
            task.add_done_callback(self._shadows.discard)

    async def _shadow_call(
        self, url: str, path: str, body: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        with contextlib.suppress(ProxyError):  # a shadow's failure is its own
            await self.pool.request(url, "POST", path, headers=headers, body=body)


def _outgoing(pairs: Iterable[tuple[bytes, bytes]]) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The headers sent on to the replica, and the request id (the caller's, or a new one)."""
    sent: list[tuple[bytes, bytes]] = []
    request_id = b""
    for key, value in pairs:
        if key in _FORWARDED:
            sent.append((key, value))
        elif key == _REQUEST_ID and value:
            request_id = value
    if not request_id:
        request_id = b"%s%016x" % (_ID_PREFIX, next(_ID_COUNTER))
    sent.append((_REQUEST_ID, request_id))
    return sent, request_id


def _settle(gateway: Gateway, key: tuple[str, str], task: asyncio.Task[_Routes]) -> None:
    loading = gateway._loading.get(key)
    if loading is not None and loading[1] is task:
        del gateway._loading[key]
    if not task.cancelled():
        task.exception()  # retrieved: a failed background load is answered by the next request


def _smooth_weighted(
    candidates: list[tuple[_Target, list[str]]],
) -> tuple[_Target, list[str]]:
    """nginx's smooth weighted round-robin: over ``n`` picks each target gets its share, and
    picks of one target are spread out rather than bunched."""
    total = 0
    best: tuple[_Target, list[str]] | None = None
    for target, urls in candidates:
        target.current += target.target.weight
        total += target.target.weight
        if best is None or target.current > best[0].current:
            best = (target, urls)
    assert best is not None
    best[0].current -= total
    return best


def _carry(old: list[_Target], new: list[_Target]) -> None:
    by_version = {t.target.version: t for t in old}
    for target in new:
        before = by_version.get(target.target.version)
        if before is not None:
            target.turn = before.turn
            target.current = before.current
