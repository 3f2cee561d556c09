"""Triton's protocol extensions, as the clients call them: model configuration, repository index,
statistics.

Pure functions build the JSON payloads Triton's HTTP endpoints answer (``GET
/v2/models/{m}/config``, ``POST /v2/repository/index``, ``GET /v2/models/{m}/stats``); the gRPC
service parses the very same dicts into its messages (``google.protobuf.json_format.ParseDict``),
so both protocols answer alike. Integers stay JSON numbers, as Triton writes them (not the strings
protobuf's JSON mapping would use for 64-bit fields).

:class:`InferenceStats` accumulates what the statistics extension reports; it is thread-safe, so
the event loop (requests) and the batcher (model calls, through ``on_batch``) may both feed it.
Its ``record_success`` is the replica's hot path: lock-free, for one thread (the event loop).
Triton's meanings: ``inference_count`` counts the rows of successful requests (each inference
in a batch counts), ``execution_count`` counts model calls; ``success``/``fail`` count requests
with their total time, and ``queue``/``compute_input``/``compute_infer``/``compute_output``
split the time of successful requests; ``batch_stats`` has one entry per batch size the model
ran with.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shipyard.serving.runtime import PLATFORM, OnnxModel, TensorSpec

BACKEND = "onnxruntime"
# Ours of the extensions Triton lists in its server metadata. The repository extension's load and
# unload are refused: a replica serves the one model version its deployment gave it.
EXTENSIONS = ("binary_tensor_data", "model_configuration", "model_repository", "statistics")

TRITON_DATATYPES: dict[str, str] = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "BYTES": "TYPE_STRING",
    "BF16": "TYPE_BF16",
}

STATE_READY = "READY"
STATE_LOADING = "LOADING"
STATE_UNAVAILABLE = "UNAVAILABLE"

__all__ = [
    "BACKEND",
    "EXTENSIONS",
    "STATE_LOADING",
    "STATE_READY",
    "STATE_UNAVAILABLE",
    "TRITON_DATATYPES",
    "IndexEntry",
    "InferenceStats",
    "StatsSnapshot",
    "index_entry",
    "model_config",
    "model_statistics",
    "repository_index",
    "request_rows",
    "server_metadata",
]


def server_metadata(*, name: str, version: str) -> dict[str, Any]:
    """``GET /v2`` / ``ServerMetadata``: the server's name, version and extensions."""
    return {"name": name, "version": version, "extensions": list(EXTENSIONS)}


def model_config(
    model: OnnxModel,
    *,
    name: str,
    max_batch_size: int,
    max_queue_delay_us: int | None = None,
) -> dict[str, Any]:
    """Triton's model configuration for a loaded ONNX model served under ``name``.

    A batchable model (dynamic dim 0 on every input) reports ``max_batch_size`` and dims without
    the batch dimension, as Triton does; any other model reports ``max_batch_size`` 0 and its
    full shapes. ``max_queue_delay_us`` (the batcher's longest wait) adds ``dynamic_batching``.
    A dimension of unknown size is -1; a tensor of unknown rank has dims ``[-1]``.
    """
    batching = model.batchable and max_batch_size > 1
    config: dict[str, Any] = {
        "name": name,
        "platform": PLATFORM,
        "backend": BACKEND,
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": max_batch_size if batching else 0,
        "input": [
            {
                "name": spec.name,
                "data_type": TRITON_DATATYPES[spec.datatype],
                "format": "FORMAT_NONE",
                "dims": _dims(spec, batching=batching),
                "is_shape_tensor": False,
                "allow_ragged_batch": False,
                "optional": False,
            }
            for spec in model.inputs
        ],
        "output": [
            {
                "name": spec.name,
                "data_type": TRITON_DATATYPES[spec.datatype],
                "dims": _dims(spec, batching=batching),
                "label_filename": "",
                "is_shape_tensor": False,
            }
            for spec in model.outputs
        ],
        "instance_group": [
            {
                "name": name,
                "kind": "KIND_GPU" if "CUDAExecutionProvider" in model.providers else "KIND_CPU",
                "count": 1,
            }
        ],
    }
    if batching and max_queue_delay_us is not None:
        config["dynamic_batching"] = {
            "preferred_batch_size": [],
            "max_queue_delay_microseconds": max_queue_delay_us,
        }
    return config


@dataclass(frozen=True)
class IndexEntry:
    """One model version in the repository index."""

    name: str
    version: str
    state: str  # READY, LOADING or UNAVAILABLE
    reason: str = ""


def index_entry(
    *, name: str, version: str, loaded: bool, load_error: str | None = None
) -> IndexEntry:
    """The index entry of a replica's model: READY once loaded, UNAVAILABLE (with the reason)
    when loading failed, LOADING before."""
    if loaded:
        return IndexEntry(name=name, version=version, state=STATE_READY)
    if load_error:
        return IndexEntry(name=name, version=version, state=STATE_UNAVAILABLE, reason=load_error)
    return IndexEntry(name=name, version=version, state=STATE_LOADING)


def repository_index(
    entries: Iterable[IndexEntry], *, ready_only: bool = False
) -> list[dict[str, Any]]:
    """``POST /v2/repository/index`` (body ``{"ready": true}`` sets ``ready_only``)."""
    index: list[dict[str, Any]] = []
    for entry in entries:
        if ready_only and entry.state != STATE_READY:
            continue
        item = {"name": entry.name, "version": entry.version, "state": entry.state}
        if entry.reason:
            item["reason"] = entry.reason
        index.append(item)
    return index


def request_rows(inputs: Mapping[str, np.ndarray], *, batchable: bool) -> int:
    """How many inferences a request holds, as the statistics count them: its batch size (dim 0)
    for a batchable model, else 1."""
    if not batchable:
        return 1
    for array in inputs.values():
        return int(array.shape[0]) if array.ndim else 1
    return 1


@dataclass(frozen=True)
class Duration:
    """A count of events and their cumulative time in nanoseconds."""

    count: int = 0
    ns: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass(frozen=True)
class StatsSnapshot:
    """The statistics at one moment (what :meth:`InferenceStats.snapshot` returns)."""

    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = Duration()
    fail: Duration = Duration()
    queue: Duration = Duration()
    compute_input: Duration = Duration()
    compute_infer: Duration = Duration()
    compute_output: Duration = Duration()
    batches: Mapping[int, Duration] = field(default_factory=dict)  # batch size -> model calls


_PHASES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


class InferenceStats:
    """Thread-safe counters for the statistics extension. Cheap: one lock, a few additions.

    :meth:`record_success` takes no lock: it is for one thread only (the event loop that
    answers the requests), and keeps counters of its own that :meth:`snapshot` adds in.
    """

    def __init__(self, *, clock_ms: Callable[[], int] | None = None) -> None:
        self._lock = threading.Lock()
        self._clock_ms = clock_ms or _now_ms
        self._last_inference_ms = 0
        self._inference_count = 0
        self._execution_count = 0
        self._phases: dict[str, list[int]] = {phase: [0, 0] for phase in _PHASES}
        self._batches: dict[int, list[int]] = {}
        # record_success's own: requests, rows, then seconds total/input/infer/output
        self._loop_ok: list[float] = [0, 0, 0.0, 0.0, 0.0, 0.0]
        self._loop_last_ms = 0

    def record_success(
        self, rows: int, total_s: float, input_s: float, infer_s: float, output_s: float
    ) -> None:
        """One successful request, timed in seconds (decode, model incl. queueing, encode).

        The event loop's fast path: no lock, no keywords; call it from one thread only."""
        ok = self._loop_ok
        ok[0] += 1
        ok[1] += rows
        ok[2] += total_s
        ok[3] += input_s
        ok[4] += infer_s
        ok[5] += output_s
        self._loop_last_ms = self._clock_ms()

    def record_request(
        self,
        *,
        rows: int,
        ok: bool,
        total_ns: int,
        queue_ns: int = 0,
        compute_input_ns: int = 0,
        compute_infer_ns: int = 0,
        compute_output_ns: int = 0,
    ) -> None:
        """One request answered: ``rows`` inferences (see :func:`request_rows`), its total time,
        and, for a success, how that time split (decode, wait, model, encode)."""
        with self._lock:
            if not ok:
                _add(self._phases["fail"], total_ns)
                return
            self._last_inference_ms = self._clock_ms()
            self._inference_count += rows
            _add(self._phases["success"], total_ns)
            _add(self._phases["queue"], queue_ns)
            _add(self._phases["compute_input"], compute_input_ns)
            _add(self._phases["compute_infer"], compute_infer_ns)
            _add(self._phases["compute_output"], compute_output_ns)

    def observe_batch(self, rows: int, seconds: float) -> None:
        """One model call of ``rows`` rows that took ``seconds``: the batcher's ``on_batch``."""
        with self._lock:
            self._execution_count += 1
            calls = self._batches.get(rows)
            if calls is None:
                self._batches[rows] = [1, max(0, int(seconds * 1e9))]
            else:
                calls[0] += 1
                calls[1] += max(0, int(seconds * 1e9))

    def snapshot(self) -> StatsSnapshot:
        count, rows, total_s, input_s, infer_s, output_s = self._loop_ok
        loop = {
            "success": total_s,
            "compute_input": input_s,
            "compute_infer": infer_s,
            "compute_output": output_s,
            "queue": 0.0,
        }
        with self._lock:
            phases = {}
            for name, (n, ns) in self._phases.items():
                if name in loop:
                    n, ns = n + int(count), ns + round(loop[name] * 1e9)
                phases[name] = Duration(n, ns)
            return StatsSnapshot(
                last_inference_ms=max(self._last_inference_ms, self._loop_last_ms),
                inference_count=self._inference_count + int(rows),
                execution_count=self._execution_count,
                batches={size: Duration(*pair) for size, pair in self._batches.items()},
                **phases,
            )


def model_statistics(
    stats: Sequence[tuple[str, str, StatsSnapshot]],
) -> dict[str, Any]:
    """``GET /v2/models/{m}[/versions/{v}]/stats``: ``{"model_stats": [...]}`` for each
    ``(name, version, snapshot)``."""
    return {"model_stats": [_model_stats(name, version, s) for name, version, s in stats]}


# --- helpers ------------------------------------------------------------------------------------


def _dims(spec: TensorSpec, *, batching: bool) -> list[int]:
    if spec.shape is None:
        return [-1]
    dims = list(spec.shape)
    return dims[1:] if batching and dims else dims


def _model_stats(name: str, version: str, s: StatsSnapshot) -> dict[str, Any]:
    zero = Duration().to_dict()
    return {
        "name": name,
        "version": version,
        "last_inference": s.last_inference_ms,
        "inference_count": s.inference_count,
        "execution_count": s.execution_count,
        "inference_stats": {
            "success": s.success.to_dict(),
            "fail": s.fail.to_dict(),
            "queue": s.queue.to_dict(),
            "compute_input": s.compute_input.to_dict(),
            "compute_infer": s.compute_infer.to_dict(),
            "compute_output": s.compute_output.to_dict(),
            "cache_hit": zero,
            "cache_miss": zero,
        },
        "batch_stats": [
            {
                "batch_size": size,
                "compute_input": zero,
                "compute_infer": calls.to_dict(),
                "compute_output": zero,
            }
            for size, calls in sorted(s.batches.items())
        ],
        "memory_usage": [],
    }


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _add(pair: list[int], ns: int) -> None:
    pair[0] += 1
    pair[1] += max(0, int(ns))
