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
connection dropped before any response came (a replica that died under load): inference is
idempotent - a model call changes nothing - so a second try cannot do harm. A slow answer
(a read timeout) or any HTTP response, 5xx included, is never retried. A replica that failed
that way is left out of this gateway's picks for ``EJECT_S`` seconds, until the reconciler has
seen it too.

Routes come from the store (the replicas the reconciler marked ready, of the versions that
serve) and are cached for ``REFRESH_S`` seconds, or until the reconciler in this process changes
what serves. The reconciler drains replicas for longer than that before stopping them, so a
route cached a moment too long still reaches a live replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

import anyio.to_thread
import httpx
from sqlalchemy import select

from shipyard.context import Context
from shipyard.domain.models import DeploymentStatus, ReplicaState, ServingTarget
from shipyard.domain.names import validate_name
from shipyard.domain.principals import Role
from shipyard.errors import BackendError, NotFoundError
from shipyard.security.rbac import authorize
from shipyard.serving import deployments, reconciler
from shipyard.store.queries import project_id
from shipyard.store.tables import DeploymentReplicaRow, DeploymentRow

REFRESH_S = 0.5
EJECT_S = 2.0
TIMEOUT_S = 60.0
MAX_CONNECTIONS = 512
MAX_SHADOW_IN_FLIGHT = 64
REQUEST_ID = "x-request-id"
VERSION_HEADER = "x-shipyard-model-version"
# request headers passed on to the replica (the rest stay at the gateway: auth, cookies, ...)
_FORWARDED = (b"content-type", b"inference-header-content-length", b"accept", b"content-encoding")
_RETURNED = ("content-type", "inference-header-content-length", "content-encoding")


class NoReplicaError(BackendError):
    """The deployment exists but no replica of it is ready to take the request (503)."""

    code = "unavailable"
    http_status = 503


@dataclass(frozen=True, slots=True)
class GatewayResponse:
    status: int
    headers: dict[str, str]
    content: bytes


@dataclass(slots=True)
class _Target:
    target: ServingTarget
    urls: list[str]
    turn: itertools.count[int] = field(default_factory=itertools.count)
    current: float = 0.0  # smooth weighted round-robin state


@dataclass(slots=True)
class _Routes:
    loaded_at: float
    generation: int
    serving: list[_Target]
    shadows: list[_Target]
    status: str


class Gateway:
    """Forwards OIP requests to replicas over one pooled, keep-alive HTTP client."""

    def __init__(self, ctx: Context, *, refresh_s: float = REFRESH_S) -> None:
        self.ctx = ctx
        self.refresh_s = refresh_s
        self._client: httpx.AsyncClient | None = None
        self._routes: dict[tuple[str, str], _Routes] = {}
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

        Raises NotFoundError for an unknown deployment (or one the caller may not see) and
        NoReplicaError when none of its replicas is ready.
        """
        validate_name(name, field="name")
        authorize(ctx, project=project, need=Role.VIEWER)
        routes = await self._routes_of(project, name)
        pairs = headers.items() if isinstance(headers, Mapping) else headers
        sent = {k.decode("latin-1"): v.decode("latin-1") for k, v in pairs if k in _FORWARDED}
        request_id = (
            next((v.decode("latin-1") for k, v in pairs if k == b"x-request-id" and v), None)
            or uuid.uuid4().hex
        )
        sent[REQUEST_ID] = request_id
        target, url = self._pick(routes, name=name, project=project)
        tried = {url}
        client = self._http()
        for attempt in (0, 1):
            try:
                answer = await client.request(method, f"{url}{path}", content=body, headers=sent)
                break
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError,
                    httpx.ReadError, httpx.WriteError) as exc:  # fmt: skip
                self._ejected[url] = time.monotonic() + EJECT_S
                if attempt == 1:
                    raise BackendError(
                        f"deployment {name!r}: replicas at {', '.join(sorted(tried))} could not "
                        f"be reached ({type(exc).__name__}); the reconciler restarts them",
                        field="name",
                    ) from None
                target, url = self._pick(routes, name=name, project=project, avoid=tried)
                tried.add(url)
            except httpx.TimeoutException:
                raise BackendError(
                    f"deployment {name!r}: the replica at {url} did not answer within "
                    f"{TIMEOUT_S:.0f}s",
                    field="name",
                ) from None
        if routes.shadows and method == "POST":
            self._mirror(routes, path, body, sent)
        out = {k: answer.headers[k] for k in _RETURNED if k in answer.headers}
        out[REQUEST_ID] = request_id
        out[VERSION_HEADER] = str(target.version)
        return GatewayResponse(answer.status_code, out, answer.content)

    async def aclose(self) -> None:
        for task in list(self._shadows):
            task.cancel()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # --- helpers --------------------------------------------------------------------------------

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:  # made on first use, inside the serving event loop
            limits = httpx.Limits(
                max_connections=MAX_CONNECTIONS,
                max_keepalive_connections=MAX_CONNECTIONS,
                keepalive_expiry=30.0,
            )
            timeout = httpx.Timeout(TIMEOUT_S, connect=2.0)
            self._client = httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False)
        return self._client

    async def _routes_of(self, project: str, name: str) -> _Routes:
        key = (project, name)
        cached = self._routes.get(key)
        now = time.monotonic()
        generation = reconciler.generation()
        if (
            cached is not None
            and now - cached.loaded_at < self.refresh_s
            and cached.generation == generation
        ):
            return cached
        fresh = await anyio.to_thread.run_sync(self._load, project, name)
        fresh.generation = generation
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
        )

    def _pick(
        self, routes: _Routes, *, name: str, project: str, avoid: set[str] | None = None
    ) -> tuple[ServingTarget, str]:
        now = time.monotonic()
        avoid = avoid or set()

        def usable(target: _Target, strict: bool) -> list[str]:
            return [
                u
                for u in target.urls
                if u not in avoid and (not strict or self._ejected.get(u, 0.0) <= now)
            ]

        for strict in (True, False):  # an ejected replica beats none at all
            candidates = [(t, usable(t, strict)) for t in routes.serving]
            candidates = [(t, urls) for t, urls in candidates if urls and t.target.weight > 0]
            if candidates:
                chosen, urls = _smooth_weighted(candidates)
                return chosen.target, urls[next(chosen.turn) % len(urls)]
        if avoid:  # nothing else: the same replica once more
            for target in routes.serving:
                if target.urls:
                    return target.target, target.urls[next(target.turn) % len(target.urls)]
        raise NoReplicaError(
            f"deployment {name!r} in project {project!r} has no ready replica "
            f"(it is {routes.status}); see `shipyard deployments show {name} --project "
            f"{project}`",
            field="name",
        )

    def _mirror(self, routes: _Routes, path: str, body: bytes, headers: dict[str, str]) -> None:
        for shadow in routes.shadows:
            if not shadow.urls or len(self._shadows) >= MAX_SHADOW_IN_FLIGHT:
                continue
            url = shadow.urls[next(shadow.turn) % len(shadow.urls)]
            task = asyncio.create_task(self._shadow_call(f"{url}{path}", body, headers))
            self._shadows.add(task)
            task.add_done_callback(self._shadows.discard)

    async def _shadow_call(self, url: str, body: bytes, headers: dict[str, str]) -> None:
        with contextlib.suppress(httpx.HTTPError):  # a shadow's failure is its own
            await self._http().post(url, content=body, headers=headers)


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
