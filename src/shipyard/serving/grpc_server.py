"""The KServe v2 / Triton gRPC inference service (``inference.GRPCInferenceService``).

``tritonclient.grpc`` and KServe's gRPC clients work unchanged: ServerLive, ServerReady,
ModelReady, ServerMetadata, ModelMetadata, ModelInfer (inputs in ``raw_input_contents`` or in
typed ``contents``; outputs in ``raw_output_contents``), and Triton's ModelConfig,
ModelStatistics and RepositoryIndex. Other methods answer UNIMPLEMENTED.

Requests are checked against the model's signature before they reach the model, with the same
rules and messages as the REST replica (:mod:`shipyard.serving.binary`): a bad request is
INVALID_ARGUMENT naming the input, an unknown model or version NOT_FOUND, a shed request or a
model not loaded yet UNAVAILABLE. A message larger than ``max_message_bytes`` (either way) is
RESOURCE_EXHAUSTED: gRPC refuses an oversized request before it is read into memory, and a
response over the limit is refused with a message saying what to change.

Two ways to run it, both on ``grpc.aio``:

- :func:`start_grpc_server` inside a running event loop, e.g. the replica's, so ModelInfer goes
  through the replica's own :class:`~shipyard.serving.batcher.Batcher` and its requests batch
  with the REST ones;
- :func:`serve_grpc`, which runs its own event loop on a thread (with a batcher of its own when
  ``max_batch_size`` > 1) and returns a handle with the bound ``port`` and ``stop()``.

It binds 127.0.0.1 by default and refuses any non-loopback address: it has no authentication.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Protocol

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message

from shipyard.errors import (
    InvalidInputError,
    InvalidStateError,
    NotFoundError,
    PayloadTooLargeError,
    ShipyardError,
)
from shipyard.serving import binary, proto, triton
from shipyard.serving.batcher import Batcher, OverloadedError
from shipyard.serving.runtime import NUMPY_DTYPES, PLATFORM, OnnxModel, TensorSpec

DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024  # the REST replica's default body limit
SERVER_NAME = "shipyard"

# The typed ``InferTensorContents`` field each datatype's values travel in (FP16 and BF16 only
# travel raw).
CONTENTS_FIELDS: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_ALL_CONTENTS = tuple(dict.fromkeys(CONTENTS_FIELDS.values()))

Arrays = dict[str, np.ndarray]

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "GrpcServer",
    "GrpcServerThread",
    "InferObserver",
    "InferenceServicer",
    "decode_infer_request",
    "encode_infer_response",
    "serve_grpc",
    "start_grpc_server",
]


class InferObserver(Protocol):
    """Told of every ModelInfer call, e.g. by the replica to count it in its own metrics."""

    def infer_started(self) -> None:
        """A ModelInfer call arrived (before anything is checked)."""

    def infer_finished(self, error: BaseException | None, seconds: float) -> None:
        """It was answered (``error`` None), refused or failed (``error``: what was raised;
        ``asyncio.CancelledError`` when the client went away), ``seconds`` after it arrived."""


class InferenceServicer:
    """The service's handlers for one model version.

    ``model`` may be None while it loads (ServerReady and ModelReady say false, ModelInfer is
    UNAVAILABLE); :meth:`activate` hands it over once loaded. With a ``batcher`` (running in the
    server's event loop) ModelInfer submits to it; without one it calls ``model.predict`` on a
    worker thread. ``stats`` is shared with whoever else serves the model (the REST replica);
    ``observer``, if given, is told of every ModelInfer call.
    """

    def __init__(
        self,
        *,
        name: str,
        version: str,
        model: OnnxModel | None = None,
        batcher: Batcher | None = None,
        stats: triton.InferenceStats | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_batch_size: int = 1,
        max_wait_ms: float | None = None,
        workers: int = 1,
        server_version: str | None = None,
        observer: InferObserver | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.model = model
        self.batcher = batcher
        self.load_error: str | None = None
        self.stats = stats or triton.InferenceStats()
        self.max_message_bytes = max_message_bytes
        self.max_batch_size = max_batch_size
        self.max_wait_ms = max_wait_ms
        self.server_version = server_version or _package_version()
        self.observer = observer
        self._workers = workers
        self._executor: ThreadPoolExecutor | None = None

    def activate(self, model: OnnxModel, *, batcher: Batcher | None = None) -> None:
        """Serve ``model`` (loaded after the server started), through ``batcher`` if given."""
        self.model, self.batcher, self.load_error = model, batcher, None

    def loading_failed(self, reason: str) -> None:
        """The model could not be loaded: say why in the repository index and to ModelInfer."""
        self.model, self.batcher, self.load_error = None, None, reason

    @property
    def ready(self) -> bool:
        return self.model is not None and (self.batcher is None or self.batcher.running)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler that routes ``/inference.GRPCInferenceService/*`` here."""
        methods: dict[str, tuple[Callable[[Any, Any], Awaitable[Message]], type[Message]]] = {
            "ServerLive": (self.server_live, proto.ServerLiveRequest),
            "ServerReady": (self.server_ready, proto.ServerReadyRequest),
            "ModelReady": (self.model_ready, proto.ModelReadyRequest),
            "ServerMetadata": (self.server_metadata, proto.ServerMetadataRequest),
            "ModelMetadata": (self.model_metadata, proto.ModelMetadataRequest),
            "ModelInfer": (self.model_infer, proto.ModelInferRequest),
            "ModelConfig": (self.model_config, proto.ModelConfigRequest),
            "ModelStatistics": (self.model_statistics, proto.ModelStatisticsRequest),
            "RepositoryIndex": (self.repository_index, proto.RepositoryIndexRequest),
            "RepositoryModelLoad": (
                self.repository_refused,
                proto.message_class("RepositoryModelLoadRequest"),
            ),
            "RepositoryModelUnload": (
                self.repository_refused,
                proto.message_class("RepositoryModelUnloadRequest"),
            ),
        }
        return grpc.method_handlers_generic_handler(
            proto.SERVICE,
            {
                method: grpc.unary_unary_rpc_method_handler(
                    _guarded(fn),
                    request_deserializer=request_type.FromString,
                    response_serializer=_serialize,
                )
                for method, (fn, request_type) in methods.items()
            },
        )

    # --- health and metadata ----------------------------------------------------------------

    async def server_live(self, _request: Any, _context: Any) -> Message:
        return proto.ServerLiveResponse(live=True)

    async def server_ready(self, _request: Any, _context: Any) -> Message:
        return proto.ServerReadyResponse(ready=self.ready)

    async def model_ready(self, request: Any, _context: Any) -> Message:
        self._check_target(request.name, request.version)
        return proto.ModelReadyResponse(ready=self.ready)

    async def server_metadata(self, _request: Any, _context: Any) -> Message:
        return proto.ServerMetadataResponse(
            **triton.server_metadata(name=SERVER_NAME, version=self.server_version)
        )

    async def model_metadata(self, request: Any, _context: Any) -> Message:
        model = self._loaded(request.name, request.version)
        response = proto.ModelMetadataResponse(
            name=self.name, versions=[self.version], platform=PLATFORM
        )
        for specs, tensors in ((model.inputs, response.inputs), (model.outputs, response.outputs)):
            for spec in specs:
                tensors.add(
                    name=spec.name,
                    datatype=spec.datatype,
                    shape=[-1] if spec.shape is None else list(spec.shape),
                )
        return response

    # --- Triton's extensions ----------------------------------------------------------------

    async def model_config(self, request: Any, _context: Any) -> Message:
        model = self._loaded(request.name, request.version)
        config = triton.model_config(
            model,
            name=self.name,
            max_batch_size=self._batch_limit(),
            max_queue_delay_us=self._queue_delay_us(),
        )
        return proto.ModelConfigResponse(config=json_format.ParseDict(config, proto.ModelConfig()))

    async def model_statistics(self, request: Any, _context: Any) -> Message:
        if request.name:
            self._check_target(request.name, request.version)
        payload = triton.model_statistics([(self.name, self.version, self.stats.snapshot())])
        return json_format.ParseDict(payload, proto.ModelStatisticsResponse())

    async def repository_index(self, request: Any, _context: Any) -> Message:
        entry = triton.index_entry(
            name=self.name,
            version=self.version,
            loaded=self.model is not None,
            load_error=self.load_error,
        )
        index = triton.repository_index([entry], ready_only=request.ready)
        return json_format.ParseDict({"models": index}, proto.RepositoryIndexResponse())

    async def repository_refused(self, _request: Any, context: Any) -> Message:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"this replica serves {self.name!r} version {self.version} only; models are loaded "
            "and unloaded by deploying them with shipyard",
        )
        raise AssertionError("unreachable")  # context.abort raises

    # --- inference --------------------------------------------------------------------------

    async def model_infer(self, request: Any, context: Any) -> Message:
        observer = self.observer
        if observer is None:
            return await self._model_infer(request, context)
        started = time.perf_counter()
        observer.infer_started()
        try:
            response = await self._model_infer(request, context)
        except BaseException as exc:
            observer.infer_finished(exc, time.perf_counter() - started)
            raise
        observer.infer_finished(None, time.perf_counter() - started)
        return response

    async def _model_infer(self, request: Any, _context: Any) -> Message:
        started = time.perf_counter_ns()
        model = self._loaded(request.model_name, request.model_version)
        rows = 1
        batcher = self.batcher
        try:
            if batcher is not None:
                batcher.admit()  # shed before decoding anything
            # While it decodes, a batch being collected may wait for this request.
            with batcher.arriving() if batcher is not None else contextlib.nullcontext():
                inputs, outputs = decode_infer_request(
                    request, inputs=model.inputs, outputs=model.output_names
                )
            rows = triton.request_rows(inputs, batchable=model.batchable)
            decoded = time.perf_counter_ns()
            results, queue_ns = await self._predict(model, batcher, inputs)
            predicted = time.perf_counter_ns()
            response = encode_infer_response(
                {name: results[name] for name in outputs},
                model_name=self.name,
                model_version=self.version,
                request_id=request.id,
            )
            size = response.ByteSize()
            if size > self.max_message_bytes:
                raise PayloadTooLargeError(
                    f"the response is {size} bytes, over this server's gRPC message limit of "
                    f"{self.max_message_bytes}; send fewer rows per request, or raise the limit "
                    "(--grpc-max-message-bytes)",
                    field="outputs",
                )
        except ShipyardError:
            self.stats.record_request(
                rows=rows, ok=False, total_ns=time.perf_counter_ns() - started
            )
            raise
        done = time.perf_counter_ns()
        self.stats.record_request(
            rows=rows,
            ok=True,
            total_ns=done - started,
            queue_ns=queue_ns,
            compute_input_ns=decoded - started,
            compute_infer_ns=predicted - decoded - queue_ns,
            compute_output_ns=done - predicted,
        )
        return response

    async def _predict(
        self, model: OnnxModel, batcher: Batcher | None, inputs: Arrays
    ) -> tuple[Mapping[str, Any], int]:
        """The outputs, and how long the request queued (known only without a batcher)."""
        if batcher is not None:
            return await batcher.submit(inputs), 0
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix="grpc-predict")
        submitted = time.perf_counter_ns()
        timing: dict[str, int] = {}

        def run() -> dict[str, np.ndarray]:
            timing["start"] = time.perf_counter_ns()
            try:
                return model.predict(inputs)
            finally:
                timing["end"] = time.perf_counter_ns()

        try:
            results = await asyncio.get_running_loop().run_in_executor(self._executor, run)
        finally:
            if "end" in timing:
                rows = triton.request_rows(inputs, batchable=model.batchable)
                self.stats.observe_batch(rows, (timing["end"] - timing["start"]) / 1e9)
        return results, timing["start"] - submitted

    # --- helpers ----------------------------------------------------------------------------

    def _check_target(self, name: str, version: str) -> None:
        if name != self.name:
            raise NotFoundError(
                f"model {name!r} is not served here; this server serves {self.name!r}",
                field="model_name",
            )
        if version and version != self.version:
            raise NotFoundError(
                f"version {version!r} of model {name!r} is not served here; this server "
                f"serves version {self.version}",
                field="model_version",
            )

    def _loaded(self, name: str, version: str) -> OnnxModel:
        self._check_target(name, version)
        if self.model is None:
            reason = f"it failed to load: {self.load_error}" if self.load_error else "it is loading"
            raise InvalidStateError(f"model {self.name!r} is not ready: {reason}")
        return self.model

    def _queue_delay_us(self) -> int | None:
        if self.batcher is not None:
            return round(self.batcher.max_wait * 1_000_000)
        return None if self.max_wait_ms is None else round(self.max_wait_ms * 1000)

    def _batch_limit(self) -> int:
        return self.batcher.max_batch_size if self.batcher is not None else self.max_batch_size


def decode_infer_request(
    request: Any, *, inputs: Sequence[TensorSpec], outputs: Sequence[str]
) -> tuple[Arrays, list[str]]:
    """The arrays of a ``ModelInferRequest``, checked against the signature, and the outputs
    asked for (all, in the model's order, when none are named).

    Raises :class:`InvalidInputError` naming the input and the problem.
    """
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInputError(
            f"raw_input_contents has {len(raw)} entries but the request has "
            f"{len(request.inputs)} inputs; when raw_input_contents is used it must hold one "
            "entry per input, in order",
            field="raw_input_contents",
        )
    specs = {spec.name: spec for spec in inputs}
    arrays: Arrays = {}
    for index, tensor in enumerate(request.inputs):
        spec = specs.get(tensor.name)
        if spec is None:
            raise InvalidInputError(
                f"unknown input {tensor.name!r}; the model's inputs are {sorted(specs)}",
                field=f"inputs.{tensor.name}",
            )
        if spec.name in arrays:
            raise InvalidInputError(
                f"input {spec.name!r} is given twice", field=f"inputs.{spec.name}"
            )
        datatype = binary.check_datatype(tensor.datatype, spec)
        shape = binary.check_shape(list(tensor.shape), spec)
        if raw:
            if _contents_fields(tensor):
                raise InvalidInputError(
                    f"input {spec.name!r} has data in both raw_input_contents and contents; "
                    "send one of them",
                    field=f"inputs.{spec.name}.contents",
                )
            array = binary.tensor_from_bytes(
                raw[index], name=spec.name, datatype=datatype, shape=shape
            )
        else:
            array = _typed_tensor(tensor, spec.name, datatype, shape)
        arrays[spec.name] = array
    missing = [name for name in specs if name not in arrays]
    if missing:
        raise InvalidInputError(
            f"input {missing[0]!r} is missing; the model needs inputs {list(specs)}",
            field=f"inputs.{missing[0]}",
        )
    requested: list[str] = []
    for wanted in request.outputs:
        if wanted.name not in outputs:
            raise InvalidInputError(
                f"unknown output {wanted.name!r}; the model's outputs are {list(outputs)}",
                field=f"outputs.{wanted.name}",
            )
        if wanted.name not in requested:
            requested.append(wanted.name)
    return arrays, requested or list(outputs)


def encode_infer_response(
    outputs: Mapping[str, Any],
    *,
    model_name: str,
    model_version: str,
    request_id: str = "",
) -> Message:
    """A ``ModelInferResponse`` with every output's bytes in ``raw_output_contents``."""
    response = proto.ModelInferResponse(
        model_name=model_name, model_version=model_version, id=request_id
    )
    for name, value in outputs.items():
        array = np.asarray(value)
        response.outputs.add(name=name, datatype=binary.datatype_of(array), shape=array.shape)
        response.raw_output_contents.append(binary.tensor_to_bytes(array))
    return response


@dataclass
class GrpcServer:
    """A started server in the current event loop: ``port`` is the bound port."""

    server: grpc.aio.Server
    servicer: InferenceServicer
    port: int
    host: str

    async def stop(self, grace: float | None = 1.0) -> None:
        """Stop accepting calls, let those in flight finish within ``grace`` seconds."""
        await self.server.stop(grace)
        self.servicer.close()


async def start_grpc_server(
    model: OnnxModel | None,
    *,
    name: str,
    version: str,
    host: str = "127.0.0.1",
    port: int = 0,
    batcher: Batcher | None = None,
    stats: triton.InferenceStats | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_batch_size: int = 1,
    max_wait_ms: float | None = None,
    workers: int = 1,
    observer: InferObserver | None = None,
) -> GrpcServer:
    """Start the service in the running event loop, bound to ``host:port`` (0: a free port).

    ``batcher``, if given, must run in this loop. ``max_batch_size``/``max_wait_ms`` are what
    the model configuration reports when no batcher is given. ``model`` may be None (still
    loading): hand it over later with ``servicer.activate``.
    """
    _require_loopback(host)
    if max_message_bytes < 1:
        raise InvalidInputError(
            "max_message_bytes must be at least 1", field="--grpc-max-message-bytes"
        )
    servicer = InferenceServicer(
        name=name,
        version=version,
        model=model,
        batcher=batcher,
        stats=stats,
        max_message_bytes=max_message_bytes,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        workers=workers,
        observer=observer,
    )
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
    )
    server.add_generic_rpc_handlers((servicer.handler(),))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise InvalidInputError(
            f"cannot bind the gRPC server to {address} (is the port in use?): {exc}",
            field="--grpc-port",
        ) from None
    await server.start()
    return GrpcServer(server=server, servicer=servicer, port=bound, host=host)


class GrpcServerThread:
    """The service running on an event loop of its own, in a daemon thread; see
    :func:`serve_grpc`."""

    def __init__(self) -> None:
        self.port = 0
        self.servicer: InferenceServicer | None = None
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._server: GrpcServer | None = None
        self._batcher: Batcher | None = None

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop the server and its loop; returns once the thread has ended."""
        if self._thread is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._shutdown(grace), self._loop)
        with contextlib.suppress(Exception):
            future.result(timeout=(grace or 0) + 10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> GrpcServerThread:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _start(self, starter: Callable[[], Awaitable[tuple[GrpcServer, Batcher | None]]]) -> None:
        started: threading.Event = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self._server, self._batcher = self._loop.run_until_complete(starter())
            except BaseException as exc:
                failure.append(exc)
                started.set()
                return
            started.set()
            self._loop.run_forever()
            self._loop.close()

        self._thread = threading.Thread(target=run, name="grpc-server", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        assert self._server is not None
        self.port, self.servicer = self._server.port, self._server.servicer

    async def _shutdown(self, grace: float | None) -> None:
        if self._server is not None:
            await self._server.stop(grace)
        if self._batcher is not None:
            await self._batcher.stop()


def serve_grpc(
    model: OnnxModel,
    *,
    name: str,
    version: str,
    host: str = "127.0.0.1",
    port: int = 0,
    stats: triton.InferenceStats | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_batch_size: int = 1,
    max_wait_ms: float = 5.0,
    workers: int = 1,
) -> GrpcServerThread:
    """Serve ``model`` over gRPC from a thread of its own; returns once it listens.

    With ``max_batch_size`` > 1 and a batchable model, requests are batched by a
    :class:`Batcher` of the server's own (feeding ``stats``). Call ``stop()`` (or use it as a
    context manager) to end it.
    """
    shared = stats or triton.InferenceStats()
    handle = GrpcServerThread()

    async def starter() -> tuple[GrpcServer, Batcher | None]:
        batcher = None
        if max_batch_size > 1 and model.batchable:
            batcher = Batcher(
                model.predict,
                max_batch_size=max_batch_size,
                max_wait_ms=max_wait_ms,
                on_batch=shared.observe_batch,
                workers=workers,
            )
            await batcher.start()
        try:
            server = await start_grpc_server(
                model,
                name=name,
                version=version,
                host=host,
                port=port,
                batcher=batcher,
                stats=shared,
                max_message_bytes=max_message_bytes,
                max_batch_size=max_batch_size if model.batchable else 1,
                max_wait_ms=max_wait_ms,
                workers=workers,
            )
        except BaseException:
            if batcher is not None:
                await batcher.stop()
            raise
        return server, batcher

    handle._start(starter)
    return handle


# --- helpers ------------------------------------------------------------------------------------


def _guarded(
    fn: Callable[[Any, Any], Awaitable[Message]],
) -> Callable[[Any, Any], Awaitable[Message]]:
    """Turn our errors into gRPC status codes with their message."""

    async def call(request: Any, context: Any) -> Message:
        try:
            return await fn(request, context)
        except ShipyardError as exc:
            await context.abort(_status_for(exc), exc.message)
            raise AssertionError("unreachable") from None  # context.abort raises

    return call


def _status_for(exc: ShipyardError) -> grpc.StatusCode:
    if isinstance(exc, PayloadTooLargeError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, InvalidInputError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, NotFoundError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, OverloadedError | InvalidStateError):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


def _serialize(message: Message) -> bytes:
    data: bytes = message.SerializeToString()
    return data


def _contents_fields(tensor: Any) -> list[str]:
    if not tensor.HasField("contents"):
        return []
    return [f for f in _ALL_CONTENTS if len(getattr(tensor.contents, f))]


def _typed_tensor(tensor: Any, name: str, datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    where = f"inputs.{name}.contents"
    expected_field = CONTENTS_FIELDS.get(datatype)
    used = _contents_fields(tensor)
    if expected_field is None:
        raise InvalidInputError(
            f"input {name!r}: datatype {datatype} can only be sent in raw_input_contents",
            field=where,
        )
    stray = [f for f in used if f != expected_field]
    if stray:
        raise InvalidInputError(
            f"input {name!r} is {datatype}, but its data is in contents.{stray[0]}; {datatype} "
            f"values go in contents.{expected_field} (or raw_input_contents)",
            field=where,
        )
    values = getattr(tensor.contents, expected_field)
    expected = math.prod(shape)
    if len(values) != expected:
        raise InvalidInputError(
            f"input {name!r}: contents.{expected_field} has {len(values)} values but shape "
            f"{list(shape)} needs {expected}",
            field=where,
        )
    if datatype == "BYTES":
        array = np.empty(expected, dtype=object)
        try:
            array[:] = [bytes(v).decode("utf-8") for v in values]
        except UnicodeDecodeError:
            raise InvalidInputError(
                f"input {name!r}: a BYTES element is not valid UTF-8 (ONNX Runtime's string "
                "tensors hold text)",
                field=where,
            ) from None
        return array.reshape(shape)
    dtype = NUMPY_DTYPES[datatype]
    try:
        return np.array(values, dtype=dtype).reshape(shape)
    except OverflowError:
        raise InvalidInputError(
            f"input {name!r}: a value is outside the range of {datatype}", field=where
        ) from None


def _require_loopback(host: str) -> None:
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise InvalidInputError(
        f"gRPC host {host!r} is not a loopback address; the gRPC service has no authentication "
        "of its own, so it only binds 127.0.0.1, ::1 or localhost",
        field="--grpc-host",
    )


def _package_version() -> str:
    try:
        return metadata.version("shipyard")
    except metadata.PackageNotFoundError:
        return "0+unknown"
