"""The app factory - the one place where the server's backends are chosen and wired - and ``serve``.

``create_app`` opens the context (metadata store, blob store) from ``Settings``, mounts the REST
routers under ``/api/v1``, ``/healthz``, ``/metrics``, the web page and its static files, and
wraps them in the guards, from the outside in:

1. metrics  - counts and times every request, whatever answered it;
2. internal - an unexpected exception becomes a 500 ``internal`` JSON error (details only logged);
3. paths    - dot segments, encoded separators and double encodings are refused (400);
4. auth     - no valid bearer token, no entry (401), except ``/healthz``; otherwise the caller;
5. size     - bodies over the bound are refused (413) before or while they are read.

In front of all of them, ``routers.inference.InferenceFastPath`` answers the OIP inference
routes itself when those guards would pass the request unchanged and the caller is known
without the database (auth off, or a token verified seconds ago); it counts and guards what it
answers like they do, and sends everything else on to them.

It is also a uvicorn factory: ``uvicorn --factory shipyard.server.app:create_app`` reads settings
and ``SHIPYARD_AUTH`` from the environment, and applies the same bind check as ``serve``: started
by uvicorn on a non-loopback ``--host`` without auth, it refuses to start. With auth off, the app
also refuses (403) any request that arrived on a non-loopback local address, whatever started
it (another ASGI server, a wrapper that binds its own socket). While the app runs, a background
thread runs the admission pipeline (``compute.admission.step``) every half second, and at once
when a submit or cancel wakes it, so queued jobs start and lost ones are noticed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import ipaddress
import logging
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio.to_thread
import uvicorn
from fastapi import APIRouter, FastAPI, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from shipyard import __version__, wiring
from shipyard.compute import admission
from shipyard.context import Context, open_context
from shipyard.data import datasets as datasets_service
from shipyard.errors import InvalidInputError, PermissionDeniedError
from shipyard.monitoring.metrics import MetricsMiddleware, ServerMetrics
from shipyard.schemas import Health
from shipyard.security.tokens import list_tokens
from shipyard.server.auth import AuthMiddleware, auth_enabled
from shipyard.server.errors import InternalErrorMiddleware, error_response, install_error_handlers
from shipyard.server.guards import (
    DEFAULT_MAX_BLOB_BYTES,
    DEFAULT_MAX_BODY_BYTES,
    BodyLimitMiddleware,
    MiB,
    PathGuardMiddleware,
)
from shipyard.server.openapi import ERROR_RESPONSES, install_exact_openapi
from shipyard.server.routers import (
    audit,
    blobs,
    datasets,
    deployments,
    inference,
    lineage,
    members,
    models,
    nodes,
    pages,
    projects,
    prometheus,
    queues,
    runs,
    tokens,
    users,
)
from shipyard.server.routers import jobs as jobs_router
from shipyard.serving import deployments as deployments_service
from shipyard.serving import reconciler
from shipyard.serving.gateway import Gateway
from shipyard.settings import Settings
from shipyard.tracking.runs import mark_crashed_runs, run_grace_s

log = logging.getLogger("shipyard.server")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8340
TICK_INTERVAL_S = 1.0
SCHEDULER_ACTOR = "system:scheduler"
ENV_MAX_BODY_MB = "SHIPYARD_MAX_BODY_MB"
ENV_MAX_BLOB_MB = "SHIPYARD_MAX_BLOB_MB"
STALE_UPLOAD_S = 24 * 3600
STALE_TEMP_S = 3600.0  # the garbage collector's default grace period
STATIC_DIR = Path(__file__).resolve().parent / "static"

API_ROUTERS: tuple[APIRouter, ...] = (
    blobs.router,
    datasets.router,
    runs.router,
    models.router,
    jobs_router.router,
    deployments.router,
    lineage.router,
    audit.router,
    projects.router,
    members.router,
    users.router,
    tokens.router,
    nodes.router,
    queues.router,
    prometheus.router,
)


def create_app(
    settings: Settings | None = None,
    *,
    auth: bool | None = None,
    max_body_bytes: int | None = None,
    max_blob_bytes: int | None = None,
    scheduler: bool = True,
    host: str | None = None,
) -> FastAPI:
    """Build the server app on ``settings`` (default: from the environment).

    ``host``: the address it will be served on, checked like ``serve`` does (a non-loopback one
    needs auth); by default, the ``--host`` of the uvicorn that calls this as its factory.

    ``auth``: require API tokens (default: ``SHIPYARD_AUTH``). ``max_body_bytes`` bounds API
    request bodies (default 64 MiB, ``SHIPYARD_MAX_BODY_MB``), ``max_blob_bytes`` blob uploads
    (default 16 GiB, ``SHIPYARD_MAX_BLOB_MB``). ``scheduler=False`` leaves the background tick
    out (for tests that drive the scheduler themselves).
    """
    settings = with_server_url(settings or Settings.from_env())
    wiring.executor_scheme(settings.executor)  # an unknown executor URL refuses to start
    enabled = auth_enabled(auth)
    if host is not None:
        check_bind(host, auth=enabled)
    elif (served_on := _uvicorn_host()) is not None:
        try:
            check_bind(served_on, auth=enabled)
        except InvalidInputError as exc:  # uvicorn --factory: one line and out, like the CLI
            log.error("shipyard server: error: %s", exc.message)
            raise SystemExit(2) from None
    body_limit = _limit(max_body_bytes, ENV_MAX_BODY_MB, DEFAULT_MAX_BODY_BYTES)
    blob_limit = _limit(max_blob_bytes, ENV_MAX_BLOB_MB, DEFAULT_MAX_BLOB_BYTES)
    ctx = open_context(settings)
    metrics = ServerMetrics(ctx=ctx)

    app = ShipyardApp(
        title="shipyard",
        version=__version__,
        summary="Self-hosted AI infrastructure: data, jobs, tracking, registry, serving.",
        lifespan=_lifespan(ctx, tick=admission.step if scheduler else None, reconcile=scheduler),
        responses=ERROR_RESPONSES,  # every error has one JSON shape: documented on every route
    )
    app.state.ctx = ctx
    app.state.gateway = Gateway(ctx)  # the inference front door (routers/inference.py)
    app.state.metrics = metrics
    app.state.auth = enabled
    install_error_handlers(app)
    install_exact_openapi(app)

    for router in API_ROUTERS:
        app.include_router(router)
    app.include_router(inference.router)
    app.include_router(_service_router(metrics))
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # add_middleware wraps what is there: the last added is the outermost.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=body_limit, max_blob_bytes=blob_limit)
    app.add_middleware(AuthMiddleware, ctx=ctx, enabled=enabled)
    if not enabled:
        app.add_middleware(LoopbackOnlyMiddleware)
    app.add_middleware(PathGuardMiddleware)
    app.add_middleware(InternalErrorMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.fast_path = inference.InferenceFastPath(
        functools.partial(FastAPI.__call__, app),
        ctx=ctx,
        gateway=app.state.gateway,
        metrics=metrics,
        auth=enabled,
        max_body_bytes=body_limit,
        local_refused=local_refused,
    )
    return app


def serve(
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    auth: bool | None = None,
    settings: Settings | None = None,
    access_log: bool = True,
) -> None:
    """Run the server until interrupted. Refuses a non-loopback ``host`` unless auth is on.

    ``access_log=False`` writes no line per request: formatting and writing one costs about a
    fifth of an inference request's time through the gateway, and requests are counted and
    timed by route in ``/metrics`` anyway (changes are in the audit log).
    """
    enabled = auth_enabled(auth)
    check_bind(host, auth=enabled)
    if not 0 <= port <= 65535:
        raise InvalidInputError(f"port {port} is not a TCP port (0-65535)", field="port")
    settings = with_server_url(settings or Settings.from_env(), host=host, port=port)
    app = create_app(settings, auth=enabled, host=host)
    if not enabled:
        log.warning("auth is off: every caller acts as 'local'; this is only safe on loopback")
    elif not list_tokens(app.state.ctx):
        log.warning(
            "auth is on but no API token exists yet, so every request will be refused; create "
            "one on this host with 'shipyard token create NAME'"
        )
    uvicorn.run(
        app, host=host, port=port, log_level="info", server_header=False, access_log=access_log
    )


def with_server_url(
    settings: Settings, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
) -> Settings:
    """``settings`` with the URL this server's jobs reach it on (kept when already set, e.g. by
    ``SHIPYARD_SERVER_URL`` behind a proxy), and its home made private to the server's user:
    jobs it launches are somebody else's code (``compute.sandbox``)."""
    with contextlib.suppress(OSError):
        settings.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        if settings.home.stat().st_uid == os.geteuid():
            os.chmod(settings.home, 0o700)
    if settings.server_url is not None:
        return settings
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    return dataclasses.replace(settings, server_url=f"http://{shown}:{port}")


def check_bind(host: str, *, auth: bool) -> None:
    """Raise unless binding ``host`` is safe: loopback, or any address with auth on."""
    if auth or is_loopback(host):
        return
    raise InvalidInputError(
        f"refusing to listen on {host!r} without auth: anyone who can reach it could read and "
        "change everything. Turn auth on (--auth, or SHIPYARD_AUTH=1) and create a token "
        "('shipyard token create NAME'), or bind 127.0.0.1",
        field="host",
    )


class ShipyardApp(FastAPI):
    """FastAPI, with the inference fast path (``fast_path``) in front of its whole stack: an
    inference request it answers skips FastAPI's and the guards' layers, which cost more than
    the replica's work does."""

    fast_path: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.fast_path is not None and scope["type"] == "http":
            await self.fast_path(scope, receive, send)  # it hands on what it does not answer
            return
        await super().__call__(scope, receive, send)


class LoopbackOnlyMiddleware:
    """With auth off: refuse (403) a request that arrived on a non-loopback local address.

    ``scope["server"]`` is the address the connection was accepted on, so a server bound to
    ``0.0.0.0`` without auth still answers 127.0.0.1 and refuses everyone else. Addresses that are
    not IP addresses (a Unix socket path, an in-process test transport) are let through.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server") if scope["type"] in ("http", "websocket") else None
        local = str(server[0]) if server else ""
        if local and local_refused(local):
            refused = PermissionDeniedError(
                f"this server runs without auth, so it only answers on loopback, and this "
                f"request arrived on {local}; its operator must turn auth on (--auth) to serve "
                "other addresses",
                field="host",
            )
            await error_response(refused)(scope, receive, send)
            return
        await self.app(scope, receive, send)


@functools.lru_cache(maxsize=64)
def local_refused(local: str) -> bool:
    """Whether a server without auth refuses a request that arrived on local address ``local``
    (an IP address that is not loopback). Remembered: a server has only a few local addresses,
    and parsing one costs more than the rest of an inference request's guards."""
    return _is_ip(local) and not is_loopback(local)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _uvicorn_host() -> str | None:
    """The ``--host`` of the uvicorn calling this as its app factory (``uvicorn --factory``),
    read off its ``Config`` in the call stack; None when not called that way. A Unix socket or an
    inherited file descriptor is not a TCP bind: the per-request check covers those."""
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, uvicorn.Config):
            if candidate.uds or candidate.fd is not None:
                return None
            return str(candidate.host)
        frame = frame.f_back  # type: ignore[assignment]
    return None


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses; hostnames are not resolved (fail closed)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --- helpers ------------------------------------------------------------------------------------


def _service_router(metrics: ServerMetrics) -> APIRouter:
    router = APIRouter()

    @router.get("/healthz", tags=["service"])
    def healthz() -> Health:
        return Health(status="ok", version=__version__)

    @router.get("/metrics", tags=["service"], response_class=Response)
    def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    return router


def _lifespan(
    ctx: Context, *, tick: Callable[[Context], Any] | None, reconcile: bool = True
) -> Any:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _sweep_uploads(ctx)
        ctx.blobs.sweep_temp(older_than_s=STALE_TEMP_S)  # left by writers killed mid-write
        # once per store: owners for the files of dataset versions made before blobs had owners
        await anyio.to_thread.run_sync(datasets_service.backfill_file_refs, ctx)
        ticker = (
            _Ticker(
                tick,
                ctx.as_actor(SCHEDULER_ACTOR),
                interval=admission.STEP_INTERVAL_S,
                wake=admission.WAKE,
            )
            if tick is not None
            else None
        )
        if ticker is not None:
            ticker.start()
            admission.background(True)  # submits wake it instead of stepping inline
        # runs whose process stopped sending heartbeats are marked crashed after the grace
        sweeper = _Ticker(
            mark_crashed_runs,
            ctx,
            interval=min(10.0, run_grace_s(ctx) / 4),
            name="shipyard-heartbeat-sweep",
            what="the sweep of runs without heartbeats",
        )
        sweeper.start()
        # deployments: replicas started, health-checked, restarted and drained to match specs
        reconcile_loop = (
            _Ticker(
                reconciler.reconcile_once,
                ctx.as_actor(reconciler.ACTOR),
                interval=reconciler.INTERVAL_S,
                name="shipyard-reconciler",
                what="the deployments' reconcile pass",
                wake=deployments_service.WAKE,
            )
            if reconcile
            else None
        )
        if reconcile_loop is not None:
            reconcile_loop.start()
            reconciler.background(True)
        try:
            yield
        finally:
            if reconcile_loop is not None:
                reconciler.background(False)
                reconcile_loop.stop()
            await app.state.gateway.aclose()
            sweeper.stop()
            if ticker is not None:
                admission.background(False)
                ticker.stop()
                wiring.close_executors()

    return lifespan


class _Ticker:
    """Call ``fn(ctx)`` every ``interval`` seconds on a daemon thread until stopped.

    A failing tick is logged and the next one runs anyway: one bad job must not stop the queue.
    """

    def __init__(
        self,
        fn: Callable[[Context], Any],
        ctx: Context,
        interval: float = TICK_INTERVAL_S,
        name: str = "shipyard-scheduler",
        what: str = "scheduler tick",
        wake: threading.Event | None = None,
    ) -> None:
        self.fn = fn
        self._wake = wake  # set by another thread: run now instead of at the next interval
        self.what = what
        self.ctx = ctx
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._wake is not None:
            self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.fn(self.ctx)
            except Exception:
                log.exception("%s failed; trying again in %ss", self.what, self.interval)
            if self._wake is None:
                self._stop.wait(self.interval)
            else:
                self._wake.wait(self.interval)
                self._wake.clear()


def _sweep_uploads(ctx: Context) -> None:
    """Remove upload temp files left by a server killed mid-upload (old ones only: another
    server on the same home may be receiving one right now)."""
    folder = ctx.settings.home / blobs.UPLOADS_DIR
    if not folder.is_dir():
        return
    cutoff = time.time() - STALE_UPLOAD_S
    for entry in folder.iterdir():
        with contextlib.suppress(FileNotFoundError):
            if entry.name.startswith("upload-") and entry.stat().st_mtime < cutoff:
                entry.unlink()


def _limit(value: int | None, env: str, default: int) -> int:
    if value is not None:
        if value < 0:
            raise InvalidInputError(f"a body limit must not be negative, got {value}", field=env)
        return value
    raw = os.environ.get(env, "").strip()
    if not raw:
        return default
    try:
        mb = float(raw)
    except ValueError:
        raise InvalidInputError(f"{env}={raw!r} is not a number of MiB", field=env) from None
    if mb <= 0:
        raise InvalidInputError(f"{env}={raw!r} must be positive", field=env)
    return int(mb * MiB)
