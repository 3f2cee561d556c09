"""The app factory - the one place where the server's backends are chosen and wired - and ``serve``.

``create_app`` opens the context (metadata store, blob store) from ``Settings``, mounts the REST
routers under ``/api/v1``, ``/healthz``, ``/metrics``, the web page and its static files, and
wraps them in the guards, from the outside in:

1. metrics  - counts and times every request, whatever answered it;
2. internal - an unexpected exception becomes a 500 ``internal`` JSON error (details only logged);
3. paths    - dot segments, encoded separators and double encodings are refused (400);
4. auth     - no valid bearer token, no entry (401), except ``/healthz``; otherwise the caller;
5. size     - bodies over the bound are refused (413) before or while they are read.

It is also a uvicorn factory: ``uvicorn --factory shipyard.server.app:create_app`` reads settings
and ``SHIPYARD_AUTH`` from the environment. While the app runs, a background thread calls the
job scheduler's ``tick`` every second so queued jobs start and lost supervisors are noticed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI, Response
from fastapi.staticfiles import StaticFiles

from shipyard import __version__
from shipyard.compute import jobs
from shipyard.context import Context, open_context
from shipyard.errors import InvalidInputError
from shipyard.monitoring.metrics import MetricsMiddleware, ServerMetrics
from shipyard.schemas import Health
from shipyard.security.tokens import list_tokens
from shipyard.server.auth import AuthMiddleware, auth_enabled
from shipyard.server.errors import InternalErrorMiddleware, install_error_handlers
from shipyard.server.guards import (
    DEFAULT_MAX_BLOB_BYTES,
    DEFAULT_MAX_BODY_BYTES,
    BodyLimitMiddleware,
    MiB,
    PathGuardMiddleware,
)
from shipyard.server.routers import (
    audit,
    blobs,
    datasets,
    deployments,
    lineage,
    models,
    pages,
    runs,
)
from shipyard.server.routers import jobs as jobs_router
from shipyard.settings import Settings

log = logging.getLogger("shipyard.server")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8340
TICK_INTERVAL_S = 1.0
SCHEDULER_ACTOR = "system:scheduler"
ENV_MAX_BODY_MB = "SHIPYARD_MAX_BODY_MB"
ENV_MAX_BLOB_MB = "SHIPYARD_MAX_BLOB_MB"
STALE_UPLOAD_S = 24 * 3600
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
)


def create_app(
    settings: Settings | None = None,
    *,
    auth: bool | None = None,
    max_body_bytes: int | None = None,
    max_blob_bytes: int | None = None,
    scheduler: bool = True,
) -> FastAPI:
    """Build the server app on ``settings`` (default: from the environment).

    ``auth``: require API tokens (default: ``SHIPYARD_AUTH``). ``max_body_bytes`` bounds API
    request bodies (default 64 MiB, ``SHIPYARD_MAX_BODY_MB``), ``max_blob_bytes`` blob uploads
    (default 16 GiB, ``SHIPYARD_MAX_BLOB_MB``). ``scheduler=False`` leaves the background tick
    out (for tests that drive the scheduler themselves).
    """
    settings = settings or Settings.from_env()
    enabled = auth_enabled(auth)
    body_limit = _limit(max_body_bytes, ENV_MAX_BODY_MB, DEFAULT_MAX_BODY_BYTES)
    blob_limit = _limit(max_blob_bytes, ENV_MAX_BLOB_MB, DEFAULT_MAX_BLOB_BYTES)
    ctx = open_context(settings)
    metrics = ServerMetrics(ctx=ctx)

    app = FastAPI(
        title="shipyard",
        version=__version__,
        summary="Self-hosted AI infrastructure: data, jobs, tracking, registry, serving.",
        lifespan=_lifespan(ctx, tick=jobs.tick if scheduler else None),
    )
    app.state.ctx = ctx
    app.state.metrics = metrics
    app.state.auth = enabled
    install_error_handlers(app)

    for router in API_ROUTERS:
        app.include_router(router)
    app.include_router(_service_router(metrics))
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # add_middleware wraps what is there: the last added is the outermost.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=body_limit, max_blob_bytes=blob_limit)
    app.add_middleware(AuthMiddleware, ctx=ctx, enabled=enabled)
    app.add_middleware(PathGuardMiddleware)
    app.add_middleware(InternalErrorMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def serve(
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    auth: bool | None = None,
    settings: Settings | None = None,
) -> None:
    """Run the server until interrupted. Refuses a non-loopback ``host`` unless auth is on."""
    enabled = auth_enabled(auth)
    check_bind(host, auth=enabled)
    if not 0 <= port <= 65535:
        raise InvalidInputError(f"port {port} is not a TCP port (0-65535)", field="port")
    app = create_app(settings, auth=enabled)
    if not enabled:
        log.warning("auth is off: every caller acts as 'local'; this is only safe on loopback")
    elif not list_tokens(app.state.ctx):
        log.warning(
            "auth is on but no API token exists yet, so every request will be refused; create "
            "one on this host with 'shipyard token create NAME'"
        )
    uvicorn.run(app, host=host, port=port, log_level="info", server_header=False)


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


def _lifespan(ctx: Context, *, tick: Callable[[Context], Any] | None) -> Any:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _sweep_uploads(ctx)
        ticker = _Ticker(tick, ctx.as_actor(SCHEDULER_ACTOR)) if tick is not None else None
        if ticker is not None:
            ticker.start()
        try:
            yield
        finally:
            if ticker is not None:
                ticker.stop()

    return lifespan


class _Ticker:
    """Call ``fn(ctx)`` every ``interval`` seconds on a daemon thread until stopped.

    A failing tick is logged and the next one runs anyway: one bad job must not stop the queue.
    """

    def __init__(
        self, fn: Callable[[Context], Any], ctx: Context, interval: float = TICK_INTERVAL_S
    ) -> None:
        self.fn = fn
        self.ctx = ctx
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shipyard-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.fn(self.ctx)
            except Exception:
                log.exception("scheduler tick failed; trying again in %ss", self.interval)
            self._stop.wait(self.interval)


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
