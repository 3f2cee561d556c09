"""A model replica: one ONNX model behind the Open Inference Protocol (v2) REST API.

``create_app`` builds the FastAPI app (used in-process by tests and, later, by other backends);
``python -m shipyard.serving.replica`` loads the model from the blob store (hash-verified) and
serves it with uvicorn, either on ``--host/--port`` or on a listening socket inherited as
``--fd`` (the deployment service binds ``127.0.0.1:0`` itself, so the port is known without a
race). A model that cannot be loaded ends the process with a clear message on stderr and exit
status 1; it is never served half-loaded.

Endpoints: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}[/versions/
{v}]``, ``.../ready``, ``POST .../infer`` and ``GET /metrics`` (Prometheus text, from a registry
of the app's own). Errors follow the protocol: ``{"error": "..."}`` with 400 for a bad request
(also JSON nested deeper than 64 levels), 404 for an unknown model or version, 408 for a body
not received within ``--body-timeout`` seconds, 413 for a body over the limit and 429 with
``Retry-After`` when the request is shed (see below).

Overload: the batcher's queue is bounded (``--max-queue-rows``, ``--max-queue-ms``: the longest
a request may wait for the model); a request beyond either bound gets 429 at once, counted in
``shipyard_serving_shed_requests_total{reason}``. A request counts toward the batcher (and may
make a batch wait for it) only once its body is fully read, so a slow uploader delays nobody.
A client that goes away before its answer is counted with code 499 and logged in one line; a
request still queued when its client leaves is dropped, not run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import re
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from shipyard.blobs.store import BlobStore
from shipyard.domain.names import validate_name
from shipyard.errors import (
    InvalidInputError,
    InvalidStateError,
    NotFoundError,
    PayloadTooLargeError,
    ShipyardError,
)
from shipyard.serving.batcher import Batcher, OverloadedError
from shipyard.serving.protocol import (
    InferenceRequest,
    decode_request,
    encode_output,
    parse_json,
)
from shipyard.serving.runtime import PLATFORM, OnnxModel, load_model_from_blobs

_log = logging.getLogger("shipyard.serving.replica")

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_BODY_TIMEOUT_S = 5.0
DEFAULT_MAX_QUEUE_ROWS = 256
DEFAULT_MAX_QUEUE_MS = 1000.0
DEFAULT_MAX_QUEUE_CALLS = 2.0
CLIENT_GONE = 499  # the status counted (never sent) for a client that left before its answer
_INLINE_DECODE_BYTES = 64 * 1024
SERVER_NAME = "shipyard"

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

T = TypeVar("T")


class RequestTimeoutError(InvalidInputError):
    """The request body did not arrive within the body-read timeout (HTTP 408)."""

    code = "request_timeout"
    http_status = 408


class _ClientGone(Exception):
    """The client closed its connection before the answer; ``when`` says at which point."""

    def __init__(self, when: str) -> None:
        super().__init__(when)
        self.when = when


class ReplicaMetrics:
    """The replica's Prometheus metrics, in a registry of its own (one per app)."""

    def __init__(self, *, model: str, version: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"model": model, "version": version}
        self._requests = Counter(
            "shipyard_serving_requests",
            "Inference requests, by HTTP status code",
            ["model", "version", "code"],
            registry=self.registry,
        )
        self._labels = labels
        self.request_latency = Histogram(
            "shipyard_serving_request_duration_seconds",
            "Inference request latency, from body read to response",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        ).labels(**labels)
        self.batch_size = Histogram(
            "shipyard_serving_batch_size",
            "Rows per model call after adaptive batching",
            ["model", "version"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        ).labels(**labels)
        self.inference_latency = Histogram(
            "shipyard_serving_inference_duration_seconds",
            "Model execution time per batch",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        ).labels(**labels)
        self.ready = Gauge(
            "shipyard_serving_model_ready",
            "1 once the model is loaded and serving",
            ["model", "version"],
            registry=self.registry,
        ).labels(**labels)
        self._shed = Counter(
            "shipyard_serving_shed_requests",
            "Requests refused with 429 because the queue was full (queue_full) or their wait "
            "for the model would exceed, or exceeded, --max-queue-ms (queue_time)",
            ["model", "version", "reason"],
            registry=self.registry,
        )
        self.queued_rows = Gauge(
            "shipyard_serving_queued_rows",
            "Rows waiting for a batch",
            ["model", "version"],
            registry=self.registry,
        ).labels(**labels)

    def count_request(self, code: int) -> None:
        self._requests.labels(code=str(code), **self._labels).inc()

    def count_shed(self, reason: str) -> None:
        self._shed.labels(reason=reason, **self._labels).inc()

    def observe_batch(self, rows: int, seconds: float) -> None:
        self.batch_size.observe(rows)
        self.inference_latency.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class ReplicaState:
    """What the routes share: the model once loaded, its batcher, the metrics and the limits."""

    name: str
    version: str
    max_batch_size: int
    max_wait_ms: float
    max_body_bytes: int
    metrics: ReplicaMetrics
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    max_queue_rows: int | None = DEFAULT_MAX_QUEUE_ROWS
    max_queue_ms: float | None = DEFAULT_MAX_QUEUE_MS
    max_queue_calls: float | None = DEFAULT_MAX_QUEUE_CALLS
    model: OnnxModel | None = None
    batcher: Batcher | None = None
    load_error: str | None = None
    _load_task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def ready(self) -> bool:
        return self.model is not None and self.batcher is not None and self.batcher.running

    async def activate(self, model: OnnxModel) -> None:
        """Start serving ``model``: batching only when every input has a dynamic batch dim.

        The model is warmed up first, so ``ready`` means the first request is served at speed.
        """
        await asyncio.to_thread(model.warm_up)
        batcher = Batcher(
            model.predict,
            max_batch_size=self.max_batch_size if model.batchable else 1,
            max_wait_ms=self.max_wait_ms,
            on_batch=self.metrics.observe_batch,
            max_queue_rows=self.max_queue_rows,
            max_queue_ms=self.max_queue_ms,
            max_queue_calls=self.max_queue_calls,
        )
        await batcher.start()
        self.metrics.queued_rows.set_function(lambda: batcher.queued_rows)
        self.model, self.batcher = model, batcher
        self.metrics.ready.set(1)

    async def load_in_background(self, loader: Callable[[], OnnxModel]) -> None:
        try:
            model = await asyncio.to_thread(loader)
        except Exception as exc:
            self.load_error = str(exc)
            return
        await self.activate(model)

    async def close(self) -> None:
        self.metrics.ready.set(0)
        if self._load_task is not None:
            self._load_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._load_task
        if self.batcher is not None:
            await self.batcher.stop()


def create_app(
    *,
    name: str,
    version: str | int,
    model: OnnxModel | None = None,
    loader: Callable[[], OnnxModel] | None = None,
    max_batch_size: int = 32,
    max_wait_ms: float = 5.0,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    max_queue_rows: int | None = DEFAULT_MAX_QUEUE_ROWS,
    max_queue_ms: float | None = DEFAULT_MAX_QUEUE_MS,
    max_queue_calls: float | None = DEFAULT_MAX_QUEUE_CALLS,
) -> FastAPI:
    """The OIP v2 app for one model version.

    Give ``model`` (already loaded) or ``loader`` (run in a thread at startup; the replica
    answers live at once and ready only when it has finished). The batcher starts and stops
    with the app's lifespan. ``max_queue_rows``/``max_queue_ms``/``max_queue_calls`` bound the
    batcher's queue (None: that bound off); ``body_timeout_s`` bounds the time to receive a
    request body.
    """
    state = ReplicaState(
        name=name,
        version=str(version),
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        max_body_bytes=max_body_bytes,
        metrics=ReplicaMetrics(model=name, version=str(version)),
        body_timeout_s=body_timeout_s,
        max_queue_rows=max_queue_rows,
        max_queue_ms=max_queue_ms,
        max_queue_calls=max_queue_calls,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if model is not None:
            await state.activate(model)
        elif loader is not None:
            state._load_task = asyncio.create_task(state.load_in_background(loader))
        try:
            yield
        finally:
            await state.close()

    app = FastAPI(
        title=f"shipyard replica: {name}", lifespan=lifespan, docs_url=None, redoc_url=None
    )
    app.state.replica = state
    app.add_middleware(_ShedEarly, state=state)

    @app.exception_handler(ShipyardError)
    async def _shipyard_error(_request: Request, exc: ShipyardError) -> JSONResponse:
        return _error(_status_for(exc), exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": _package_version(), "extensions": []}

    @app.get("/v2/health/live")
    async def live() -> dict[str, Any]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        return _readiness(state)

    @app.get("/v2/models/{model_name}")
    async def model_metadata(model_name: str) -> dict[str, Any]:
        return _metadata(state, model_name, None)

    @app.get("/v2/models/{model_name}/versions/{model_version}")
    async def model_version_metadata(model_name: str, model_version: str) -> dict[str, Any]:
        return _metadata(state, model_name, model_version)

    @app.get("/v2/models/{model_name}/ready")
    async def model_ready(model_name: str) -> JSONResponse:
        _check_target(state, model_name, None)
        return _readiness(state)

    @app.get("/v2/models/{model_name}/versions/{model_version}/ready")
    async def model_version_ready(model_name: str, model_version: str) -> JSONResponse:
        _check_target(state, model_name, model_version)
        return _readiness(state)

    @app.post("/v2/models/{model_name}/infer")
    async def infer(model_name: str, request: Request) -> Response:
        return await _infer(state, request, model_name, None)

    @app.post("/v2/models/{model_name}/versions/{model_version}/infer")
    async def infer_version(model_name: str, model_version: str, request: Request) -> Response:
        return await _infer(state, request, model_name, model_version)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def main(argv: list[str] | None = None) -> int:
    """``python -m shipyard.serving.replica``; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        validate_name(args.name, field="--name")
        max_body = parse_size(args.max_body_bytes)
        if args.max_batch_size < 1:
            raise InvalidInputError("--max-batch-size must be at least 1", field="--max-batch-size")
        if args.max_wait_ms < 0:
            raise InvalidInputError("--max-wait-ms must not be negative", field="--max-wait-ms")
        if not args.body_timeout > 0:
            raise InvalidInputError(
                "--body-timeout must be a positive number of seconds", field="--body-timeout"
            )
        if args.max_queue_rows < 1:
            raise InvalidInputError("--max-queue-rows must be at least 1", field="--max-queue-rows")
        if not args.max_queue_ms > 0:
            raise InvalidInputError(
                "--max-queue-ms must be a positive number of milliseconds", field="--max-queue-ms"
            )
        if args.max_queue_calls is not None and not args.max_queue_calls > 0:
            raise InvalidInputError(
                "--max-queue-calls must be a positive number of model calls",
                field="--max-queue-calls",
            )
        if args.fd is None:
            _require_loopback(args.host)
    except ShipyardError as exc:
        print(f"shipyard replica: {exc.message}", file=sys.stderr, flush=True)
        return 2
    try:
        model = load_model_from_blobs(
            BlobStore(args.blobs), args.digest, intra_op_threads=args.threads or None
        )
    except ShipyardError as exc:
        print(
            f"shipyard replica: cannot load model {args.name!r} version {args.version} "
            f"(blob {args.digest} in {args.blobs}): {exc.message}",
            file=sys.stderr,
            flush=True,
        )
        return 1
    inputs = ", ".join(f"{t.name}:{t.datatype}{t.shape}" for t in model.signature.inputs)
    print(
        f"shipyard replica: loaded {args.name!r} version {args.version} (blob {args.digest}) on "
        f"{model.providers}; inputs {inputs}; batching "
        f"{'up to ' + str(args.max_batch_size) if model.batchable else 'off (fixed batch dim)'}",
        flush=True,
    )
    app = create_app(
        name=args.name,
        version=args.version,
        model=model,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_body_bytes=max_body,
        body_timeout_s=args.body_timeout,
        max_queue_rows=args.max_queue_rows,
        max_queue_ms=args.max_queue_ms,
        max_queue_calls=args.max_queue_calls,
    )
    _log_to_stderr(args.log_level)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    sockets = None
    if args.fd is not None:
        # uvicorn's own ``fd=`` wraps the descriptor as AF_UNIX, so asyncio never sets
        # TCP_NODELAY on accepted connections and Nagle + delayed ACK add ~40 ms to every
        # response. socket(fileno=...) reads the real family (AF_INET) off the descriptor.
        sockets = [socket.socket(fileno=args.fd)]
    uvicorn.Server(config).run(sockets=sockets)
    return 0


def parse_size(value: str | int) -> int:
    """``8MB``, ``512KiB``, ``1048576`` -> bytes (K/M/G are powers of 1024)."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(i?B)?\s*", str(value), flags=re.IGNORECASE)
    if not match or int(match.group(1)) <= 0:
        raise InvalidInputError(
            f"size {value!r} is not valid: use a positive number of bytes, e.g. 1048576, 512KB, "
            "8MB",
            field="--max-body-bytes",
        )
    scale = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[match.group(2).upper()]
    return int(match.group(1)) * scale


# --- helpers ------------------------------------------------------------------------------------


class _ShedEarly:
    """Answer 429 to an inference request the batcher would refuse, before routing, reading or
    parsing it: under overload a refusal must cost as little as possible."""

    def __init__(self, app: ASGIApp, *, state: ReplicaState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        batcher = self.state.batcher
        if (
            batcher is not None
            and scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"].endswith("/infer")
        ):
            try:
                batcher.admit()
            except OverloadedError as exc:
                await _shed(self.state, exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _shed(state: ReplicaState, exc: OverloadedError) -> Response:
    state.metrics.count_shed(exc.reason)
    state.metrics.count_request(429)
    return _error(429, exc.message, headers={"Retry-After": str(exc.retry_after)})


async def _infer(
    state: ReplicaState, request: Request, model_name: str, version: str | None
) -> Response:
    started = time.perf_counter()
    try:
        response = await _infer_inner(state, request, model_name, version)
    except OverloadedError as exc:
        state.metrics.request_latency.observe(time.perf_counter() - started)
        return _shed(state, exc)  # counted there
    except _ClientGone as gone:  # not an error of ours: one line, no traceback
        client = f"{request.client.host}:{request.client.port}" if request.client else "?"
        _log.info(
            "client %s went away %s (%s %s); counted as %d",
            client,
            gone.when,
            request.method,
            request.url.path,
            CLIENT_GONE,
        )
        response = Response(status_code=CLIENT_GONE)
    except ShipyardError as exc:
        status = _status_for(exc)
        # The rest of an unread body cannot be skipped cheaply: close the connection after it.
        headers = {"Connection": "close"} if status in (408, 413) else None
        response = _error(status, exc.message, headers=headers)
    except Exception as exc:  # a bug, not a bad request: log it, still answer in OIP form
        _log.exception("inference request failed")
        response = _error(500, f"internal error: {type(exc).__name__}: {exc}")
    state.metrics.count_request(response.status_code)
    state.metrics.request_latency.observe(time.perf_counter() - started)
    return response


async def _infer_inner(
    state: ReplicaState, request: Request, model_name: str, version: str | None
) -> Response:
    _check_target(state, model_name, version)
    if not state.ready or state.model is None or state.batcher is None:
        raise InvalidStateError(f"model {state.name!r} is not ready yet")
    if "inference-header-content-length" in request.headers:
        raise InvalidInputError(
            "the binary tensor data extension is not supported; send tensors as JSON 'data' "
            "(tritonclient: set_data_from_numpy(..., binary_data=False) and "
            "InferRequestedOutput(..., binary_data=False))",
            field="body",
        )
    model, batcher = state.model, state.batcher
    batcher.admit()  # shed before reading and decoding anything
    body = await _read_body(request, state.max_body_bytes, timeout=state.body_timeout_s)
    with batcher.arriving():  # only now may a batch wait for this request, while it decodes
        if len(body) > _INLINE_DECODE_BYTES:  # keep the event loop free while a big body parses
            decoded = await asyncio.to_thread(_decode, body, model)
        else:
            decoded = _decode(body, model)
    outputs = await _unless_client_leaves(request, batcher.submit(decoded.inputs))
    datatypes = {t.name: t.datatype for t in model.outputs}
    content = {
        "model_name": state.name,
        "model_version": state.version,
        "id": decoded.id if decoded.id is not None else uuid.uuid4().hex,
        "outputs": [
            encode_output(name, outputs[name], datatype=datatypes.get(name))
            for name in decoded.outputs
        ],
    }
    # allow_nan: a model may legitimately produce NaN/inf; Python and most clients read them back.
    return Response(
        json.dumps(content, allow_nan=True, separators=(",", ":")), media_type="application/json"
    )


def _decode(body: bytes, model: OnnxModel) -> InferenceRequest:
    payload = parse_json(body)  # refuses JSON nested too deep before it is parsed
    return decode_request(payload, inputs=model.inputs, outputs=model.outputs)


async def _read_body(request: Request, limit: int, *, timeout: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(
            f"the request body is {int(declared)} bytes; this replica accepts at most {limit} "
            "bytes (--max-body-bytes)",
            field="body",
        )
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout), contextlib.aclosing(request.stream()) as stream:
            async for chunk in stream:
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLargeError(
                        f"the request body is larger than {limit} bytes, the most this replica "
                        "accepts (--max-body-bytes)",
                        field="body",
                    )
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeoutError(
            f"the request body was not received within {timeout:g} s ({size} bytes arrived); "
            "send it at once (--body-timeout)",
            field="body",
        ) from None
    except ClientDisconnect:
        raise _ClientGone("while sending its request body") from None
    return b"".join(chunks)


async def _unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, but cancel it (and raise :class:`_ClientGone`) if the client leaves."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_client_left(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watcher):
            pending.cancel()
        await asyncio.wait((task, watcher))
    if not task.cancelled():
        return task.result()
    raise _ClientGone("while its request waited for the model")


async def _client_left(request: Request) -> None:
    """Return when the client closes the connection (the body has been read already)."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # the server cannot tell us: never cut a request short for that
        await asyncio.Future()  # (cancelled once the work is done)


def _check_target(state: ReplicaState, model_name: str, version: str | None) -> None:
    if model_name != state.name:
        raise NotFoundError(
            f"model {model_name!r} is not served here; this replica serves {state.name!r}",
            field="model_name",
        )
    if version is not None and version != state.version:
        raise NotFoundError(
            f"version {version!r} of model {model_name!r} is not served here; this replica "
            f"serves version {state.version}",
            field="model_version",
        )


def _metadata(state: ReplicaState, model_name: str, version: str | None) -> dict[str, Any]:
    _check_target(state, model_name, version)
    if state.model is None:
        raise InvalidStateError(f"model {state.name!r} is not loaded yet")
    signature = state.model.signature
    return {
        "name": state.name,
        "versions": [state.version],
        "platform": PLATFORM,
        "inputs": [t.model_dump() for t in signature.inputs],
        "outputs": [t.model_dump() for t in signature.outputs],
    }


def _readiness(state: ReplicaState) -> JSONResponse:
    if state.ready:
        return JSONResponse({"ready": True})
    reason = (
        f"the model failed to load: {state.load_error}"
        if state.load_error
        else "the model is loading"
    )
    # The protocol answers "not ready" with a 4xx status.
    return JSONResponse({"ready": False, "error": reason}, status_code=400)


def _status_for(exc: ShipyardError) -> int:
    if isinstance(exc, OverloadedError):
        return 429
    if isinstance(exc, RequestTimeoutError):
        return 408
    if isinstance(exc, PayloadTooLargeError):
        return 413
    if isinstance(exc, InvalidInputError):
        return 400
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, InvalidStateError):
        return 503
    return 500


def _error(status: int, message: str, *, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _log_to_stderr(level: str) -> None:
    """Send the replica's own log lines (``shipyard.*``) to stderr, i.e. the replica log."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
    logger = logging.getLogger("shipyard")
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False


def _package_version() -> str:
    try:
        return metadata.version("shipyard")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _require_loopback(host: str) -> None:
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise InvalidInputError(
        f"--host {host!r} is not a loopback address; a replica has no authentication of its own, "
        "so it only binds 127.0.0.1, ::1 or localhost",
        field="--host",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m shipyard.serving.replica",
        description="Serve one ONNX model version over the Open Inference Protocol (v2).",
    )
    parser.add_argument(
        "--blobs", required=True, help="blob store URL, e.g. file:///home/.../blobs"
    )
    parser.add_argument("--digest", required=True, help="BLAKE3 digest of the ONNX model blob")
    parser.add_argument("--name", required=True, help="model name in the /v2/models/{name} URLs")
    parser.add_argument("--version", required=True, help="model version reported and routed")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (loopback only)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--port", type=int, default=8080, help="bind port (0: any free port)")
    where.add_argument("--fd", type=int, help="serve on this inherited listening socket instead")
    parser.add_argument("--max-batch-size", type=int, default=32, help="rows per model call")
    parser.add_argument(
        "--max-wait-ms", type=float, default=5.0, help="longest wait for a batch to fill"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="ONNX Runtime intra-op threads (0: one per core). One suits small models: the "
        "batcher, not the thread pool, is what spreads load",
    )
    parser.add_argument(
        "--max-body-bytes", default="8MB", help="largest request body accepted (e.g. 8MB)"
    )
    parser.add_argument(
        "--body-timeout",
        type=float,
        default=DEFAULT_BODY_TIMEOUT_S,
        help="seconds to receive a whole request body; slower uploads get 408",
    )
    parser.add_argument(
        "--max-queue-rows",
        type=int,
        default=DEFAULT_MAX_QUEUE_ROWS,
        help="most rows waiting for the model; beyond it requests get 429 at once",
    )
    parser.add_argument(
        "--max-queue-ms",
        type=float,
        default=DEFAULT_MAX_QUEUE_MS,
        help="longest a request may wait for the model; requests that would wait longer get 429",
    )
    parser.add_argument(
        "--max-queue-calls",
        type=float,
        default=DEFAULT_MAX_QUEUE_CALLS,
        help="admit a request only if its predicted wait is at most this many model calls (as "
        "measured, and at least 100 ms): keeps admitted latency a small multiple of a slow "
        "model's own; --max-queue-ms caps it",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    return parser


if __name__ == "__main__":
    sys.exit(main())
