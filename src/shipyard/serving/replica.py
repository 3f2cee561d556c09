"""A model replica: one ONNX model behind the Open Inference Protocol (v2) REST API.

``create_app`` builds the replica app (a :class:`ReplicaApp`; it is also an ASGI app, used
in-process by tests); ``python -m shipyard.serving.replica`` loads the model from the blob store
(hash-verified) and serves it with shipyard's own HTTP server (``_http``: httptools on uvloop),
either on ``--host/--port`` or on a listening socket inherited as ``--fd`` (the deployment
service binds ``127.0.0.1:0`` itself, so the port is known without a race). A model that cannot
be loaded ends the process with a clear message on stderr and exit status 1; it is never served
half-loaded.

Endpoints: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}[/versions/
{v}]``, ``.../ready``, ``POST .../infer`` and ``GET /metrics`` (Prometheus text: the replica's
own counters and the process metrics), plus Triton's extensions as ``tritonclient`` calls them:
``GET .../config`` (model configuration), ``GET /v2/models[/{name}[/versions/{v}]]/stats``
(statistics, counted on the hot path without a lock) and ``POST /v2/repository/index``. Routes
are one line each in :meth:`ReplicaApp.routes`; the infer handler gets the raw body bytes and
the headers. An infer request with an ``Inference-Header-Content-Length`` header carries binary
tensors (the binary tensor data extension, ``tritonclient.http``'s default; see ``binary``);
outputs asked for with ``binary_data`` (or ``binary_data_output``) come back as raw bytes after
the JSON header, whose length the response's ``Inference-Header-Content-Length`` gives. A plain
JSON request pays nothing for this.

With ``--grpc-port`` the replica also serves the KServe v2 / Triton gRPC API (``grpc_server``)
in the same event loop, through the same model, batcher, statistics and metrics; it prints
``shipyard replica: serving gRPC on HOST:PORT`` (:data:`GRPC_LISTENING`) once it listens, so
``--grpc-port 0`` (any free port) can be read back from its log.

Metrics carry ``deployment`` (``--deployment``), ``model`` (the registered model's name,
``--model-name``, default ``--name``) and ``version``; request counts add ``code`` (a gRPC call
counts with the HTTP status the same outcome gets), and ``shipyard_serving_in_flight_requests``
is the number of requests being answered. Errors follow the protocol:
``{"error": "..."}`` with 400 for a bad request (also JSON nested deeper than 64 levels), 404
for an unknown model or version (or path), 405 for a known path with another method, 408 for a
body not received within ``--body-timeout`` seconds, 413 for a body over the limit and 429 with
``Retry-After`` when the request is shed (see below).

The hot path costs tens of microseconds: no pydantic and no framework routing per request, the
body parsed by orjson straight into numpy, the response written by orjson, metrics as plain
counters rendered on scrape, and a fast model (measured under 0.2 ms a call) run on the event
loop with no thread hop (see ``batcher``); ``benchmarks/serving.py`` measures it against a
plain FastAPI app.

Overload: the batcher's queue is bounded (``--max-queue-rows``, ``--max-queue-ms``: the longest
a request may wait for the model); a request beyond either bound gets 429 at once, before its
body is read, counted in ``shipyard_serving_shed_requests_total{reason}``. A request counts
toward the batcher (and may make a batch wait for it) only once its body is fully read, so a
slow uploader delays nobody. A client that goes away before its answer is counted with code
499 and logged in one line; a request still queued when its client leaves is dropped, not run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import ipaddress
import logging
import math
import os
import re
import socket
import sys
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson
import uvloop
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.process_collector import ProcessCollector

from shipyard.blobs.store import BlobStore
from shipyard.domain.names import validate_name
from shipyard.errors import (
    InvalidInputError,
    InvalidStateError,
    NotFoundError,
    PayloadTooLargeError,
    ShipyardError,
)
from shipyard.serving import binary, triton
from shipyard.serving._http import HttpServer, Phase, Request, Response, Router, asgi
from shipyard.serving.batcher import Batcher, OverloadedError
from shipyard.serving.grpc_server import DEFAULT_MAX_MESSAGE_BYTES, GrpcServer, start_grpc_server
from shipyard.serving.protocol import (
    InferenceRequest,
    decode_request,
    encode_response,
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
GRPC_GRACE_S = 5.0
# The line the replica prints once its gRPC service listens, then ``host:port``; the launcher
# (or anyone reading the replica's log) takes the bound port from it.
GRPC_LISTENING = "shipyard replica: serving gRPC on "
_HEADER_LENGTH = binary.HEADER_LENGTH.lower()  # the request headers' names are lower case

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class RequestTimeoutError(InvalidInputError):
    """The request body did not arrive within the body-read timeout (HTTP 408)."""

    code = "request_timeout"
    http_status = 408


class _Histogram:
    """A Prometheus histogram as plain numbers: observing is a bisect and two additions."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def samples(self, name: str, labels: dict[str, str]) -> Iterator[str]:
        cumulative = 0
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            cumulative += count
            yield f"{name}_bucket{_labels({**labels, 'le': _go_float(bound)})} {cumulative}"
        yield f"{name}_count{_labels(labels)} {cumulative}"
        yield f"{name}_sum{_labels(labels)} {_go_float(self.sum)}"


class ReplicaMetrics:
    """The replica's Prometheus metrics: plain counters, rendered as text on scrape.

    Counting costs nanoseconds (no locks, no label lookups per request); ``render`` writes the
    Prometheus text format with the same names, help texts and labels (``model``: the registered
    model's name, ``version``, ``deployment`` when known, plus ``code`` or ``reason``) as
    before, then the process metrics of prometheus_client's process collector.
    """

    def __init__(self, *, model: str, version: str, deployment: str | None = None) -> None:
        self.labels = {"model": model, "version": version}
        if deployment is not None:
            self.labels["deployment"] = deployment
        self.in_flight: Callable[[], int] = lambda: 0
        self.requests: dict[int, int] = {}
        self.shed: dict[str, int] = {}
        self.request_latency = _Histogram(_LATENCY_BUCKETS)
        self.batch_size = _Histogram(_BATCH_BUCKETS)
        self.inference_latency = _Histogram(_LATENCY_BUCKETS)
        self.ready = 0
        self.queued_rows: Callable[[], int] = lambda: 0
        self._process = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self._process)

    def count_request(self, code: int) -> None:
        self.requests[code] = self.requests.get(code, 0) + 1

    def count_shed(self, reason: str) -> None:
        self.shed[reason] = self.shed.get(reason, 0) + 1

    def observe_batch(self, rows: int, seconds: float) -> None:
        self.batch_size.observe(rows)
        self.inference_latency.observe(seconds)

    def render(self) -> bytes:
        labels = self.labels
        lines = _family(
            "shipyard_serving_requests_total",
            "counter",
            "Inference requests, by HTTP status code",
        )
        for code, count in sorted(self.requests.items()):
            code_labels = _labels({**labels, "code": str(code)})
            lines.append(f"shipyard_serving_requests_total{code_labels} {float(count)}")
        lines += _family(
            "shipyard_serving_request_duration_seconds",
            "histogram",
            "Inference request latency, from body read to response",
        )
        lines += self.request_latency.samples("shipyard_serving_request_duration_seconds", labels)
        lines += _family(
            "shipyard_serving_batch_size",
            "histogram",
            "Rows per model call after adaptive batching",
        )
        lines += self.batch_size.samples("shipyard_serving_batch_size", labels)
        lines += _family(
            "shipyard_serving_inference_duration_seconds",
            "histogram",
            "Model execution time per batch",
        )
        lines += self.inference_latency.samples(
            "shipyard_serving_inference_duration_seconds", labels
        )
        lines += _family(
            "shipyard_serving_model_ready", "gauge", "1 once the model is loaded and serving"
        )
        lines.append(f"shipyard_serving_model_ready{_labels(labels)} {float(self.ready)}")
        lines += _family(
            "shipyard_serving_in_flight_requests",
            "gauge",
            "Inference requests being answered (HTTP: body read, answer not sent yet; gRPC: "
            "ModelInfer calls running)",
        )
        lines.append(
            f"shipyard_serving_in_flight_requests{_labels(labels)} {float(self.in_flight())}"
        )
        lines += _family(
            "shipyard_serving_shed_requests_total",
            "counter",
            "Requests refused with 429 because the queue was full (queue_full) or their wait "
            "for the model would exceed, or exceeded, --max-queue-ms (queue_time)",
        )
        for reason, count in sorted(self.shed.items()):
            shed_labels = _labels({**labels, "reason": reason})
            lines.append(f"shipyard_serving_shed_requests_total{shed_labels} {float(count)}")
        lines += _family("shipyard_serving_queued_rows", "gauge", "Rows waiting for a batch")
        lines.append(f"shipyard_serving_queued_rows{_labels(labels)} {float(self.queued_rows())}")
        return "\n".join(lines).encode() + b"\n" + generate_latest(self._process)


def _go_float(value: float) -> str:
    """A number as Prometheus text writes it (as prometheus_client does: ``1.0``, ``+Inf``)."""
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


def _family(name: str, kind: str, help_text: str) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


def _labels(labels: dict[str, str]) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


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
    inline_below_ms: float = 0.2
    model: OnnxModel | None = None
    batcher: Batcher | None = None
    load_error: str | None = None
    stats: triton.InferenceStats = field(default_factory=triton.InferenceStats)
    grpc: GrpcServer | None = None  # the gRPC service of the same model, when started
    _load_task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def ready(self) -> bool:
        return self.model is not None and self.batcher is not None and self.batcher.running

    async def activate(self, model: OnnxModel) -> None:
        """Start serving ``model``: batching only when every input has a dynamic batch dim.

        The model is warmed up first, so ``ready`` means the first request is served at speed.
        The gRPC service, if started, serves it through the same batcher.
        """
        await asyncio.to_thread(model.warm_up)
        metrics, stats = self.metrics, self.stats

        def on_batch(rows: int, seconds: float) -> None:
            metrics.observe_batch(rows, seconds)
            stats.observe_batch(rows, seconds)

        batcher = Batcher(
            model.predict,
            max_batch_size=self.max_batch_size if model.batchable else 1,
            max_wait_ms=self.max_wait_ms,
            on_batch=on_batch,
            max_queue_rows=self.max_queue_rows,
            max_queue_ms=self.max_queue_ms,
            max_queue_calls=self.max_queue_calls,
            inline_below_ms=self.inline_below_ms,
        )
        await batcher.start()
        self.metrics.queued_rows = lambda: batcher.queued_rows
        self.model, self.batcher = model, batcher
        if self.grpc is not None:
            self.grpc.servicer.activate(model, batcher=batcher)
        self.metrics.ready = 1

    async def load_in_background(self, loader: Callable[[], OnnxModel]) -> None:
        try:
            model = await asyncio.to_thread(loader)
        except Exception as exc:
            self.load_error = str(exc)
            if self.grpc is not None:
                self.grpc.servicer.loading_failed(self.load_error)
            return
        await self.activate(model)

    async def close(self) -> None:
        self.metrics.ready = 0
        if self.grpc is not None:  # before the batcher stops: its calls in flight finish first
            await self.grpc.stop(GRPC_GRACE_S)
        if self._load_task is not None:
            self._load_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._load_task
        if self.batcher is not None:
            await self.batcher.stop()


class ReplicaApp:
    """The OIP v2 app of one model version, for :class:`~shipyard.serving._http.HttpServer`
    (and, as an ASGI app, for any ASGI server or test client).

    ``state.replica`` is the :class:`ReplicaState`.
    """

    def __init__(
        self,
        replica: ReplicaState,
        *,
        model: OnnxModel | None = None,
        loader: Callable[[], OnnxModel] | None = None,
    ) -> None:
        self.replica = replica
        self.state = SimpleNamespace(replica=replica)
        self.max_body_bytes = replica.max_body_bytes
        self.body_timeout_s = replica.body_timeout_s
        self._model = model
        self._loader = loader
        self.router = Router()
        self.routes(self.router)
        self._datatypes: dict[str, str] = {}
        # The HTTP inference requests being answered (body read), and the gRPC ones.
        self._answering: set[Request] = set()
        self._grpc_in_flight = 0
        replica.metrics.in_flight = lambda: len(self._answering) + self._grpc_in_flight

    def routes(self, r: Router) -> None:
        """The routing table: one line per route."""
        versioned = "/v2/models/{model_name}/versions/{model_version}"
        r.get("/v2", self.server_metadata)
        r.get("/v2/health/live", self.live)
        r.get("/v2/health/ready", self.ready)
        r.get("/v2/models/stats", self.statistics)  # before /v2/models/{model_name}
        r.get("/v2/models/{model_name}", self.model_metadata)
        r.get(versioned, self.model_metadata)
        r.get("/v2/models/{model_name}/ready", self.model_ready)
        r.get(f"{versioned}/ready", self.model_ready)
        r.get("/v2/models/{model_name}/config", self.model_config)
        r.get(f"{versioned}/config", self.model_config)
        r.get("/v2/models/{model_name}/stats", self.statistics)
        r.get(f"{versioned}/stats", self.statistics)
        r.post("/v2/models/{model_name}/infer", self.infer, head=self.infer_head)
        r.post(f"{versioned}/infer", self.infer, head=self.infer_head)
        r.post("/v2/repository/index", self.repository_index)
        r.post("/v2/repository/models/{model_name}/load", self.repository_refused)
        r.post("/v2/repository/models/{model_name}/unload", self.repository_refused)
        r.get("/metrics", self.metrics)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await asgi(self, scope, receive, send)

    # --- lifespan ------------------------------------------------------------------------------

    async def startup(self) -> None:
        if self._model is not None:
            await self.replica.activate(self._model)
        elif self._loader is not None:
            self.replica._load_task = asyncio.create_task(
                self.replica.load_in_background(self._loader)
            )

    async def shutdown(self) -> None:
        await self.replica.close()

    # --- transport hooks -----------------------------------------------------------------------

    def on_head(self, request: Request) -> Response | None:
        route, params, status = self.router.resolve(request.method, request.path)
        if route is None:
            return _error(status, "Not Found" if status == 404 else "Method Not Allowed")
        request.route, request.params = route, params
        return route.head(request) if route.head is not None else None

    def on_request(self, request: Request) -> Response | Awaitable[Response]:
        assert request.route is not None
        try:
            return request.route.handler(request)
        except ShipyardError as exc:
            return _error(_status_for(exc), exc.message)

    def too_large(self, request: Request, declared: int | None) -> Response:
        limit = self.max_body_bytes
        message = (
            f"the request body is larger than {limit} bytes, the most this replica accepts "
            "(--max-body-bytes)"
            if declared is None
            else f"the request body is {declared} bytes; this replica accepts at most {limit} "
            "bytes (--max-body-bytes)"
        )
        return self._refused(request, _error(413, message, close=True))

    def body_timeout(self, request: Request, received: int) -> Response:
        message = (
            f"the request body was not received within {self.body_timeout_s:g} s ({received} "
            "bytes arrived); send it at once (--body-timeout)"
        )
        return self._refused(request, _error(408, message, close=True))

    def on_gone(self, request: Request, phase: Phase) -> None:
        if not _is_infer(request):
            return
        if phase is Phase.WAITING:
            if request not in self._answering:
                return  # answered (and counted) just before the client left
            self._answering.discard(request)
        client = f"{request.client[0]}:{request.client[1]}" if request.client else "?"
        _log.info(
            "client %s went away %s (%s %s); counted as %d",
            client,
            phase.value,
            request.method,
            request.path,
            CLIENT_GONE,
        )
        self._count(request, CLIENT_GONE)

    # --- routes --------------------------------------------------------------------------------

    def server_metadata(self, _request: Request) -> Response:
        return _json(triton.server_metadata(name=SERVER_NAME, version=_package_version()))

    def live(self, _request: Request) -> Response:
        return _json({"live": True})

    def ready(self, _request: Request) -> Response:
        return _readiness(self.replica)

    def model_ready(self, request: Request) -> Response:
        _check_target(
            self.replica, request.params["model_name"], request.params.get("model_version")
        )
        return _readiness(self.replica)

    def model_metadata(self, request: Request) -> Response:
        state = self.replica
        _check_target(state, request.params["model_name"], request.params.get("model_version"))
        if state.model is None:
            raise InvalidStateError(f"model {state.name!r} is not loaded yet")
        signature = state.model.signature
        return _json(
            {
                "name": state.name,
                "versions": [state.version],
                "platform": PLATFORM,
                "inputs": [t.model_dump() for t in signature.inputs],
                "outputs": [t.model_dump() for t in signature.outputs],
            }
        )

    def model_config(self, request: Request) -> Response:
        """Triton's ``GET .../config``: the model configuration of the loaded model."""
        state = self.replica
        _check_target(state, request.params["model_name"], request.params.get("model_version"))
        model, batcher = state.model, state.batcher
        if model is None or batcher is None:
            raise InvalidStateError(f"model {state.name!r} is not loaded yet")
        return _json(
            triton.model_config(
                model,
                name=state.name,
                max_batch_size=batcher.max_batch_size,
                max_queue_delay_us=round(batcher.max_wait * 1_000_000),
            )
        )

    def statistics(self, request: Request) -> Response:
        """Triton's ``GET /v2/models[/{m}[/versions/{v}]]/stats``, shared with gRPC."""
        state = self.replica
        name = request.params.get("model_name")
        if name is not None:
            _check_target(state, name, request.params.get("model_version"))
        return _json(triton.model_statistics([(state.name, state.version, state.stats.snapshot())]))

    def repository_index(self, request: Request) -> Response:
        """Triton's ``POST /v2/repository/index`` (body ``{"ready": true}``: ready ones only)."""
        state = self.replica
        body = parse_json(request.body) if request.body.strip() else {}
        if not isinstance(body, dict) or not isinstance(body.get("ready", False), bool):
            raise InvalidInputError(
                'the body must be empty or a JSON object like {"ready": true}', field="ready"
            )
        entry = triton.index_entry(
            name=state.name,
            version=state.version,
            loaded=state.model is not None,
            load_error=state.load_error,
        )
        return _json(triton.repository_index([entry], ready_only=body.get("ready", False)))

    def repository_refused(self, request: Request) -> Response:
        state = self.replica
        return _error(
            400,
            f"this replica serves {state.name!r} version {state.version} only; models are "
            f"loaded and unloaded by deploying them with shipyard (asked for "
            f"{request.params['model_name']!r})",
        )

    def metrics(self, _request: Request) -> Response:
        return Response(200, self.replica.metrics.render(), content_type=_PROMETHEUS)

    def infer_head(self, request: Request) -> Response | None:
        """Refuse before the body is read: unknown target, not ready, binary data, or shed."""
        request.started = time.perf_counter()
        try:
            self._serving(request)
        except Exception as exc:
            return self._finish(request, self._infer_error(exc))
        return None

    def infer(self, request: Request) -> Response | Awaitable[Response]:
        """``POST .../infer``: decode, queue (or run) and answer; the body is complete.

        A body with an ``Inference-Header-Content-Length`` header carries binary tensors (the
        binary tensor data extension); a plain JSON one takes the fast path, which only looks
        for the ``binary_data``/``binary_data_output`` parameters when the request has
        ``parameters`` or ``outputs`` at all.
        """
        request.started = started = time.perf_counter()
        self._answering.add(request)
        state = self.replica
        model, batcher = state.model, state.batcher
        try:
            if model is None or batcher is None:  # (checked at the head; gone since: stopping)
                raise InvalidStateError(f"model {state.name!r} is not ready any more")
            body = request.body
            header_length = request.headers.get(_HEADER_LENGTH)
            if len(body) > _INLINE_DECODE_BYTES:  # keep the event loop free while it parses
                return self._infer_large(request, model, batcher, header_length)
            decoded = _decode(body, model, header_length)
            outputs = batcher.enqueue(decoded.inputs)
        except Exception as exc:
            return self._finish(request, self._infer_error(exc))
        return self._when_done(request, model, decoded, outputs, started)

    # --- the inference path --------------------------------------------------------------------

    def _serving(self, request: Request) -> tuple[OnnxModel, Batcher]:
        state = self.replica
        _check_target(state, request.params["model_name"], request.params.get("model_version"))
        model, batcher = state.model, state.batcher
        if model is None or batcher is None or not batcher.running:
            raise InvalidStateError(f"model {state.name!r} is not ready yet")
        if _HEADER_LENGTH in request.headers:  # a bad value is refused before the body is read
            binary.parse_header_length(request.headers[_HEADER_LENGTH])
        batcher.admit()  # shed before reading and decoding anything
        return model, batcher

    async def _infer_large(
        self, request: Request, model: OnnxModel, batcher: Batcher, header_length: str | None
    ) -> Response:
        started = request.started
        try:
            with batcher.arriving():  # only now may a batch wait for this request
                decoded = await asyncio.to_thread(_decode, request.body, model, header_length)
            outputs = batcher.enqueue(decoded.inputs)
        except Exception as exc:
            return self._finish(request, self._infer_error(exc))
        return await self._when_done(request, model, decoded, outputs, started)

    def _when_done(
        self,
        request: Request,
        model: OnnxModel,
        decoded: _Decoded,
        outputs: asyncio.Future[dict[str, np.ndarray]],
        started: float,
    ) -> asyncio.Future[Response]:
        """A future of the response, set when ``outputs`` is; cancelling it (the client left)
        cancels ``outputs``, which takes the request off the queue."""
        answer: asyncio.Future[Response] = outputs.get_loop().create_future()
        queued = time.perf_counter()  # decoded and queued: the rest is the model's

        def done(result: asyncio.Future[dict[str, np.ndarray]]) -> None:
            if answer.done() or result.cancelled():
                return
            predicted = time.perf_counter()
            try:
                error = result.exception()
                if error is None:
                    response = self._answer(model, decoded, result.result())
                    finished = time.perf_counter()
                    self.replica.stats.record_success(
                        triton.request_rows(decoded.inputs, batchable=model.batchable),
                        finished - started,
                        queued - started,
                        predicted - queued,
                        finished - predicted,
                    )
                else:
                    response = self._infer_error(error)
            except Exception as exc:
                response = self._infer_error(exc)
            answer.set_result(self._finish(request, response))

        outputs.add_done_callback(done)
        answer.add_done_callback(lambda a: outputs.cancel() if a.cancelled() else None)
        return answer

    def _answer(
        self, model: OnnxModel, decoded: _Decoded, outputs: dict[str, np.ndarray]
    ) -> Response:
        if decoded.binary:
            return self._answer_binary(decoded, outputs)
        datatypes = self._datatypes or {t.name: t.datatype for t in model.outputs}
        self._datatypes = datatypes
        body = encode_response(
            model_name=self.replica.name,
            model_version=self.replica.version,
            request_id=decoded.id if decoded.id is not None else os.urandom(16).hex(),
            outputs=outputs,
            names=decoded.outputs,
            datatypes=datatypes,
        )
        return Response(200, body)

    def _answer_binary(self, decoded: _Decoded, outputs: dict[str, np.ndarray]) -> Response:
        """Outputs asked for in binary go as raw bytes after the JSON header, whose length the
        ``Inference-Header-Content-Length`` response header gives."""
        body, header_length = binary.encode_response(
            {name: outputs[name] for name in decoded.outputs},
            model_name=self.replica.name,
            model_version=self.replica.version,
            request_id=decoded.id if decoded.id is not None else os.urandom(16).hex(),
            binary=decoded.binary,
        )
        if header_length is None:
            return Response(200, body)
        return Response(
            200,
            body,
            content_type=binary.CONTENT_TYPE,
            headers=((binary.HEADER_LENGTH, str(header_length)),),
        )

    def _infer_error(self, exc: BaseException) -> Response:
        if isinstance(exc, OverloadedError):
            self.replica.metrics.count_shed(exc.reason)
            return _error(429, exc.message, headers=(("retry-after", str(exc.retry_after)),))
        if isinstance(exc, ShipyardError):
            return _error(_status_for(exc), exc.message)
        # a bug, not a bad request: log it, still answer in OIP form
        _log.error("inference request failed", exc_info=exc)
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    def _finish(self, request: Request, response: Response) -> Response:
        self._answering.discard(request)
        self._count(request, response.status)
        return response

    def _refused(self, request: Request, response: Response) -> Response:
        if _is_infer(request):
            self._count(request, response.status)
        return response

    def _count(self, request: Request, status: int) -> None:
        metrics = self.replica.metrics
        metrics.count_request(status)
        if request.started:
            elapsed = time.perf_counter() - request.started
            metrics.request_latency.observe(elapsed)
            if status != 200 and status != 404:  # (a 404 is not this model's request)
                self.replica.stats.record_request(rows=1, ok=False, total_ns=int(elapsed * 1e9))

    # --- gRPC ModelInfer calls (grpc_server.InferObserver) -------------------------------------

    def infer_started(self) -> None:
        self._grpc_in_flight += 1

    def infer_finished(self, error: BaseException | None, seconds: float) -> None:
        """Count a gRPC call as the HTTP request it stands for: its status code is the one the
        same outcome gets over HTTP (499: the client went away)."""
        self._grpc_in_flight -= 1
        if error is None:
            status = 200
        elif isinstance(error, asyncio.CancelledError):
            status = CLIENT_GONE
        elif isinstance(error, ShipyardError):
            status = _status_for(error)
            if isinstance(error, OverloadedError):
                self.replica.metrics.count_shed(error.reason)
        else:
            status = 500
        metrics = self.replica.metrics
        metrics.count_request(status)
        metrics.request_latency.observe(seconds)


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
    inline_below_ms: float = 0.2,
    deployment: str | None = None,
    model_name: str | None = None,
) -> ReplicaApp:
    """The OIP v2 app for one model version.

    Give ``model`` (already loaded) or ``loader`` (run in a thread at startup; the replica
    answers live at once and ready only when it has finished). The batcher starts and stops
    with the app (``startup``/``shutdown``, or the ASGI lifespan). ``max_queue_rows``/
    ``max_queue_ms``/``max_queue_calls`` bound the batcher's queue (None: that bound off);
    ``body_timeout_s`` bounds the time to receive a request body; model calls measured under
    ``inline_below_ms`` run on the event loop (0: always in the batcher's thread);
    ``deployment`` adds that label to the metrics, whose ``model`` label is ``model_name`` (the
    registered model's name; default: ``name``).
    """
    state = ReplicaState(
        name=name,
        version=str(version),
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        max_body_bytes=max_body_bytes,
        metrics=ReplicaMetrics(
            model=model_name or name, version=str(version), deployment=deployment
        ),
        body_timeout_s=body_timeout_s,
        max_queue_rows=max_queue_rows,
        max_queue_ms=max_queue_ms,
        max_queue_calls=max_queue_calls,
        inline_below_ms=inline_below_ms,
    )
    return ReplicaApp(state, model=model, loader=loader)


def main(argv: list[str] | None = None) -> int:
    """``python -m shipyard.serving.replica``; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        validate_name(args.name, field="--name")
        if args.deployment is not None:
            validate_name(args.deployment, field="--deployment")
        if args.model_name is not None:
            validate_name(args.model_name, field="--model-name")
        max_body = parse_size(args.max_body_bytes)
        grpc_max = parse_size(args.grpc_max_message_bytes, field="--grpc-max-message-bytes")
        if args.grpc_port is not None:
            if not 0 <= args.grpc_port <= 65535:
                raise InvalidInputError(
                    "--grpc-port must be between 0 (any free port) and 65535", field="--grpc-port"
                )
            _require_loopback(args.grpc_host, field="--grpc-host")
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
        if args.inline_below_ms < 0:
            raise InvalidInputError(
                "--inline-below-ms must not be negative", field="--inline-below-ms"
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
        inline_below_ms=args.inline_below_ms,
        deployment=args.deployment,
        model_name=args.model_name,
    )
    _log_to_stderr(args.log_level)
    try:
        sock = (
            # socket(fileno=...) reads the real family (AF_INET) off the inherited descriptor.
            socket.socket(fileno=args.fd) if args.fd is not None else _bind(args.host, args.port)
        )
    except OSError as exc:
        print(f"shipyard replica: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    host, port = sock.getsockname()[:2]
    grpc_bind = None if args.grpc_port is None else (args.grpc_host, args.grpc_port, grpc_max)
    return uvloop.run(_serve(app, sock, grpc_bind, http_url=f"http://{host}:{port}"))


async def _serve(
    app: ReplicaApp, sock: socket.socket, grpc_bind: tuple[str, int, int] | None, *, http_url: str
) -> int:
    """Serve HTTP on ``sock`` and, with ``grpc_bind`` (host, port, message limit), gRPC in the
    same event loop, through the same model and batcher; returns the exit status."""
    state = app.replica
    if grpc_bind is not None:
        grpc_host, grpc_port, max_message = grpc_bind
        try:
            state.grpc = await start_grpc_server(
                None,  # handed over (with the batcher) once the app has started
                name=state.name,
                version=state.version,
                host=grpc_host,
                port=grpc_port,
                stats=state.stats,
                max_message_bytes=max_message,
                observer=app,
            )
        except ShipyardError as exc:
            print(f"shipyard replica: {exc.message}", file=sys.stderr, flush=True)
            sock.close()
            return 1
        shown = f"[{grpc_host}]" if ":" in grpc_host else grpc_host
        print(f"{GRPC_LISTENING}{shown}:{state.grpc.port}", flush=True)
    print(f"shipyard replica: serving on {http_url}", flush=True)
    server = HttpServer(app, graceful_s=10.0, server_name=SERVER_NAME)
    await server.serve([sock], handle_signals=True)
    return 0


def parse_size(value: str | int, *, field: str = "--max-body-bytes") -> int:
    """``8MB``, ``512KiB``, ``1048576`` -> bytes (K/M/G are powers of 1024)."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(i?B)?\s*", str(value), flags=re.IGNORECASE)
    if not match or int(match.group(1)) <= 0:
        raise InvalidInputError(
            f"{field}: size {value!r} is not valid: use a positive number of bytes, e.g. "
            "1048576, 512KB, 8MB",
            field=field,
        )
    scale = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[match.group(2).upper()]
    return int(match.group(1)) * scale


# --- helpers ------------------------------------------------------------------------------------

_PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(slots=True)
class _Decoded:
    """A checked inference request, from JSON or binary: its arrays, the outputs asked for (in
    order) and which of them go back in binary."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[str]
    binary: frozenset[str]


_NO_BINARY: frozenset[str] = frozenset()


def _decode(body: bytes, model: OnnxModel, header_length: str | None = None) -> _Decoded:
    if header_length is not None:
        checked = binary.decode_request(
            body,
            header_length=binary.parse_header_length(header_length),
            inputs=model.inputs,
            outputs=model.outputs,
        )
        return _Decoded(checked.id, checked.inputs, checked.outputs, checked.binary_outputs)
    payload = parse_json(body)  # refuses JSON nested too deep before it is parsed
    decoded: InferenceRequest = decode_request(payload, inputs=model.inputs, outputs=model.outputs)
    wanted = _NO_BINARY
    if "parameters" in payload or "outputs" in payload:  # binary outputs need one of them
        wanted = binary.binary_outputs(payload, decoded.outputs)
    return _Decoded(decoded.id, decoded.inputs, decoded.outputs, wanted)


def _is_infer(request: Request) -> bool:
    return request.route is not None and request.route.head is not None


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


def _readiness(state: ReplicaState) -> Response:
    if state.ready:
        return _json({"ready": True})
    reason = (
        f"the model failed to load: {state.load_error}"
        if state.load_error
        else "the model is loading"
    )
    # The protocol answers "not ready" with a 4xx status.
    return _json({"ready": False, "error": reason}, status=400)


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


def _json(content: Any, *, status: int = 200) -> Response:
    return Response(status, orjson.dumps(content))


def _error(
    status: int, message: str, *, headers: tuple[tuple[str, str], ...] = (), close: bool = False
) -> Response:
    return Response(status, orjson.dumps({"error": message}), headers=headers, close=close)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=1024)


def _log_to_stderr(level: str) -> None:
    """Send the replica's own log lines (``shipyard.*``) to stderr, i.e. the replica log."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
    logger = logging.getLogger("shipyard")
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False


@functools.cache
def _package_version() -> str:
    try:
        return metadata.version("shipyard")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _require_loopback(host: str, *, field: str = "--host") -> None:
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise InvalidInputError(
        f"{field} {host!r} is not a loopback address; a replica has no authentication of its "
        "own, so it only binds 127.0.0.1, ::1 or localhost",
        field=field,
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
        "--inline-below-ms",
        type=float,
        default=0.2,
        help="run model calls measured under this many ms on the event loop, with no thread "
        "hop (0: always in the model thread)",
    )
    parser.add_argument(
        "--deployment", help="deployment name, added as the 'deployment' label of the metrics"
    )
    parser.add_argument(
        "--model-name",
        help="the registered model's name, the 'model' label of the metrics (default: --name)",
    )
    parser.add_argument(
        "--grpc-port",
        type=int,
        help="also serve the KServe v2 / Triton gRPC API on this port (0: any free port; the "
        f"bound one is printed as '{GRPC_LISTENING}HOST:PORT'); default: no gRPC",
    )
    parser.add_argument(
        "--grpc-host", default="127.0.0.1", help="gRPC bind address (loopback only)"
    )
    parser.add_argument(
        "--grpc-max-message-bytes",
        default=str(DEFAULT_MAX_MESSAGE_BYTES),
        help="largest gRPC message accepted or sent (e.g. 8MB); larger ones get RESOURCE_EXHAUSTED",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    return parser


if __name__ == "__main__":
    sys.exit(main())
