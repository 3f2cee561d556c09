"""Load shedding in a real replica process (issue 5, item 15).

A 10x overload burst from an open-loop load generator (asyncio, raw keep-alive connections on
127.0.0.1) against ``python -m shipyard.serving.replica`` serving a model whose every call takes
a few milliseconds of real compute (fixed batch dimension: no batching, so the model is the
bottleneck). Admitted requests must keep a p99 within a small multiple of the unloaded p99
measured in the same test, the rest get 429 with ``Retry-After`` at once, ``/metrics`` counts
them by reason, and the first request after the burst is served at once.
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from prometheus_client.parser import text_string_to_metric_families

from shipyard.blobs.store import BlobStore
from tests.conftest import wait_for

REPLICA = [sys.executable, "-m", "shipyard.serving.replica"]
PATH = "/v2/models/heavy/infer"
OVERLOAD = 10  # offered rate / capacity
BURST_S = 3.0
# Admitted p99 <= this x unloaded p99. In theory about 2x (see below); measured 1.7x-4.4x with
# the 2 cores shared with other test runs (load average 5-7); without shedding it was 52x.
P99_BOUND = 8.0


def heavy_model(rows: int = 2048, width: int = 512, seed: int = 0) -> bytes:
    """x: FP32 [1, 64] (fixed batch) -> y: [1, 10], via a [rows, 64] x [64, width] x [width,
    width] product: ~1.1 GFLOP, 20-80 ms a call on one thread."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(np.array([rows, 64], dtype=np.int64), "shape"),
        numpy_helper.from_array((rng.standard_normal((64, width)) / 8).astype(np.float32), "W0"),
        numpy_helper.from_array(
            (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), "W1"
        ),
        numpy_helper.from_array((rng.standard_normal((width, 10)) / 8).astype(np.float32), "W2"),
    ]
    nodes = [
        helper.make_node("Expand", ["x", "shape"], ["xs"]),
        helper.make_node("MatMul", ["xs", "W0"], ["h0"]),
        helper.make_node("MatMul", ["h0", "W1"], ["m1"]),
        helper.make_node("Relu", ["m1"], ["h1"]),
        helper.make_node("ReduceMean", ["h1"], ["r"], axes=[0], keepdims=1),
        helper.make_node("MatMul", ["r", "W2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "heavy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def _model_call_seconds(data: bytes) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    x = np.ones((1, 64), dtype=np.float32)
    times = []
    for _ in range(15):
        started = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - started)
    return statistics.median(times[3:])


def _request_bytes(port: int) -> bytes:
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    body = json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [1, 64], "datatype": "FP32", "data": x.ravel().tolist()}
            ]
        }
    ).encode()
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body  # one write: no Nagle delay between head and body


async def _exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    request: bytes,
    started: float | None = None,
) -> tuple[int, dict[str, str], float]:
    """Send one request, read its answer: (status, headers, seconds since ``started``)."""
    started = time.perf_counter() if started is None else started
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, time.perf_counter() - started


async def _sequential(port: int, request: bytes, count: int) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        latencies = []
        for _ in range(count):
            status, _, seconds = await _exchange(reader, writer, request)
            assert status == 200, status
            latencies.append(seconds)
        return latencies
    finally:
        writer.close()
        await writer.wait_closed()


async def _burst(
    port: int, request: bytes, *, rate: float, seconds: float, connections: int = 64
) -> list[tuple[int, dict[str, str], float]]:
    """Open loop: request i is due at start + i / rate and goes out on the next free keep-alive
    connection; its latency counts from when it was due (waiting for a connection included)."""
    pool: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    opened = [await asyncio.open_connection("127.0.0.1", port) for _ in range(connections)]
    for conn in opened:
        pool.put_nowait(conn)
    results: list[tuple[int, dict[str, str], float]] = []

    async def one(due: float) -> None:
        conn = await pool.get()
        try:
            results.append(await _exchange(*conn, request, due))
        finally:
            pool.put_nowait(conn)

    start = time.perf_counter()
    tasks = []
    total = int(rate * seconds)
    try:
        for i in range(total):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(due)))
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    finally:
        for _, writer in opened:
            writer.close()
        await asyncio.gather(*(w.wait_closed() for _, w in opened), return_exceptions=True)
    return results


def _metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _p99(values: list[float]) -> float:
    return float(np.percentile(values, 99))


@pytest.fixture
def heavy_replica(tmp_path: Path) -> Iterator[tuple[int, float]]:
    """A replica of the heavy model with a queue of one request and one call's wait."""
    data = heavy_model()
    call = _model_call_seconds(data)
    blobs = BlobStore(f"file://{tmp_path / 'blobs'}")
    digest = blobs.put_bytes(data).digest
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    max_queue_ms = max(call * 1000, 5.0)
    args = [
        "--blobs", blobs.url, "--digest", digest, "--name", "heavy", "--version", "1",
        "--fd", str(sock.fileno()),
        "--max-queue-rows", "1", "--max-queue-ms", f"{max_queue_ms:.1f}",
    ]  # fmt: skip
    log = tmp_path / "replica.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*REPLICA, *args], pass_fds=[sock.fileno()], stdout=out, stderr=subprocess.STDOUT
        )
    sock.close()
    try:

        def ready() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, timeout=60, what="the replica to be ready")
        yield port, call
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert "Traceback" not in log.read_text()


@pytest.mark.slow
def test_a_10x_overload_burst_is_shed_with_429_and_admitted_requests_stay_fast(
    heavy_replica: tuple[int, float],
) -> None:
    port, call = heavy_replica
    url = f"http://127.0.0.1:{port}"
    request = _request_bytes(port)

    asyncio.run(_sequential(port, request, 5))  # warm the connection path
    unloaded = asyncio.run(_sequential(port, request, 40))
    unloaded_p99 = _p99(unloaded)
    capacity = 1 / statistics.median(unloaded)  # requests/s one at a time: the model's pace
    before = _metrics(url)

    results = asyncio.run(
        _burst(port, request, rate=OVERLOAD * capacity, seconds=BURST_S, connections=64)
    )
    after_burst = time.perf_counter()
    recovery = asyncio.run(_sequential(port, request, 1))[0]  # 200 (asserted inside), at once
    recovered_in = time.perf_counter() - after_burst

    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 429}, sorted(set(statuses))
    admitted = [seconds for status, _, seconds in results if status == 200]
    shed = [(headers, seconds) for status, headers, seconds in results if status == 429]
    share_shed = len(shed) / len(results)
    admitted_p99 = _p99(admitted)
    figures = (
        f"model call {call * 1000:.1f} ms; unloaded p99 {unloaded_p99 * 1000:.1f} ms; "
        f"{len(results)} requests at {OVERLOAD * capacity:.0f}/s: {len(admitted)} admitted "
        f"(p50 {np.median(admitted) * 1000:.1f} ms, p99 {admitted_p99 * 1000:.1f} ms), "
        f"{share_shed:.0%} shed (p50 {np.median([s for _, s in shed] or [0]) * 1000:.1f} ms, "
        f"p99 {_p99([s for _, s in shed] or [0]) * 1000:.1f} ms); recovery "
        f"{recovery * 1000:.1f} ms"
    )
    print(figures)
    # Admitted: a wait <= --max-queue-ms (1 call) + its own call, against ~1 call unloaded.
    assert admitted_p99 <= P99_BOUND * unloaded_p99, figures
    assert share_shed >= 0.5, figures  # 10x offered: about 90% must be shed
    assert len(admitted) >= 0.25 * BURST_S * capacity, figures  # it kept serving meanwhile
    for headers, _ in shed:
        assert int(headers["retry-after"]) >= 1
    assert recovered_in < 5, figures

    after = _metrics(url)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted({"model": "heavy", "version": "1", **labels}.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    by_reason = {
        reason: delta("shipyard_serving_shed_requests_total", reason=reason)
        for reason in ("queue_full", "queue_time")
    }
    assert sum(by_reason.values()) == len(shed), (by_reason, figures)
    assert delta("shipyard_serving_requests_total", code="429") == len(shed)
    assert delta("shipyard_serving_requests_total", code="200") == len(admitted) + 1
