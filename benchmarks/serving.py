"""Serving throughput and latency: a shipyard replica against the same ONNX model in-process.

The model is digits-sized: an MLP 64 -> 128 (ReLU) -> 10 built with ``onnx.helper`` (dynamic
batch dimension, so the replica's adaptive batcher can merge requests). Inputs are single rows of
64 floats in [0, 16], like scikit-learn's digits.

Variants:

- ``inprocess_single``: ``session.run`` on one row at a time in a loop, one thread: the limit
  for single-row inference on this machine, with no protocol, no network and no batching.
- ``inprocess_threads``: the same session called from ``--concurrency`` threads at once (what an
  application embedding the model would see under the same concurrency as the load test).
- ``replica_*``: ``python -m shipyard.serving.replica`` as a subprocess on 127.0.0.1, loaded from
  a blob store, driven by ``--concurrency`` closed-loop clients (threads, one keep-alive
  ``http.client`` connection each) sending single-row Open Inference Protocol v2 JSON requests
  (``POST /v2/models/digits/infer``), after a warm-up. Several batcher settings are measured:
  ``max_wait_ms`` 2 (the main figure), 0, 5 (the deployment default) and ``max_batch_size`` 1
  (batching off). The replica's ``/metrics`` batch-size histogram is read before and after the
  measured phase, so the mean batch size is for the measured requests only.

Every response is checked (status 200, argmax equal to the in-process answer for that row).

Overload (``replica_overload``, issue 5 item 15): a model that is the bottleneck (a fixed batch
dimension, so no batching, and ~1 GFLOP a call on one thread) served with load shedding
(``--max-queue-rows 1 --max-queue-ms`` one model call). First the unloaded latency (one request
at a time); then an open-loop burst at ``--overload`` (10) times the rate the replica sustains
one at a time, for ``--overload-seconds``, from asyncio on 64 keep-alive connections (latency
counted from when each request was due). Reported: admitted p99 / unloaded p99, the share shed
(429), the shed requests' latency, the shed counts by reason from ``/metrics``, and the latency
of the first request after the burst. ``replica_overload_calls`` admits only requests whose
predicted wait is at most one model call (``--max-queue-calls 1``); ``replica_overload_defaults``
runs the same burst against a replica started with no queue flags (what a deployment gets:
256 rows, a predicted wait of 2 model calls but at least 100 ms, at most 1 s).
Without ``--quick`` the same burst also runs against a replica whose queue is unbounded
(``replica_overload_unbounded``: the behaviour before shedding), for comparison.
``--only-overload`` runs just these.

Run: ``.venv/bin/python benchmarks/serving.py [--quick] [--requests N] [--concurrency C]
[--only-overload]``.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    PYTHON,
    SHIPYARD_ENV,
    child,
    child_env,
    free_port,
    latency_summary,
    loadavg,
    machine,
    progress,
    ratio,
    wait_http_ok,
    write_result,
)

NAME = "serving"
MODEL_NAME = "digits"
INPUT = "input"
N_IN, N_HIDDEN, N_OUT = 64, 128, 10
DISTINCT_ROWS = 512

# (name, max_batch_size, max_wait_ms); the first is the headline configuration.
REPLICA_CONFIGS = (
    ("replica_wait2ms", 32, 2.0),
    ("replica_wait0ms", 32, 0.0),
    ("replica_wait5ms", 32, 5.0),
    ("replica_nobatch", 1, 0.0),
)
QUICK_CONFIGS = REPLICA_CONFIGS[:2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--requests", type=int, help="measured requests per replica config")
    parser.add_argument("--warmup", type=int, help="warm-up requests per replica config")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent clients")
    parser.add_argument("--inprocess-calls", type=int, help="session.run calls per in-process run")
    parser.add_argument("--out", type=Path, help="result file (default results/serving.json)")
    parser.add_argument("--overload", type=float, default=10.0, help="burst rate / capacity")
    parser.add_argument("--overload-seconds", type=float, help="burst length (default 3, 2 quick)")
    parser.add_argument(
        "--only-overload", action="store_true", help="run only the overload scenario"
    )
    args = parser.parse_args(argv)
    for key in SHIPYARD_ENV:
        os.environ.pop(key, None)
    overload_seconds = args.overload_seconds or (2.0 if args.quick else 3.0)
    if args.only_overload:
        write_result(
            NAME if args.out else f"{NAME}_overload",
            run_overload(factor=args.overload, seconds=overload_seconds, quick=args.quick),
            args.out,
        )
        return 0
    result = run(
        requests=args.requests or (600 if args.quick else 5000),
        warmup=args.warmup or (100 if args.quick else 500),
        concurrency=args.concurrency,
        inprocess_calls=args.inprocess_calls or (10000 if args.quick else 100000),
        configs=QUICK_CONFIGS if args.quick else REPLICA_CONFIGS,
        quick=args.quick,
    )
    overload = run_overload(factor=args.overload, seconds=overload_seconds, quick=args.quick)
    result["overload"] = overload
    result["headline"].extend(overload["headline"])
    write_result(NAME, result, args.out)
    return 0


def run(
    *,
    requests: int,
    warmup: int,
    concurrency: int,
    inprocess_calls: int,
    configs: tuple[tuple[str, int, float], ...],
    quick: bool,
) -> dict[str, Any]:
    import onnxruntime as ort

    info = machine()
    progress(
        f"serving: MLP {N_IN}->{N_HIDDEN}->{N_OUT}, {concurrency} clients, {requests} requests "
        f"per replica config ({info['cpus']} CPUs, load {info['loadavg']})"
    )
    model_bytes = build_mlp()
    rng = np.random.default_rng(1)
    rows = rng.integers(0, 17, size=(DISTINCT_ROWS, N_IN)).astype(np.float32)
    # Same session settings as the replica's runtime (ORT defaults, CPU).
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model_bytes, sess_options=options, providers=["CPUExecutionProvider"]
    )
    expected = np.argmax(session.run(None, {INPUT: rows})[0], axis=1)
    bodies = [request_body(row) for row in rows]

    variants: dict[str, dict[str, Any]] = {}
    progress(f"  inprocess_single: {inprocess_calls} session.run calls, 1 thread ...")
    variants["inprocess_single"] = bench_inprocess(session, rows, expected, inprocess_calls, 1)
    _report("inprocess_single", variants["inprocess_single"])
    progress(f"  inprocess_threads: {inprocess_calls} calls from {concurrency} threads ...")
    variants["inprocess_threads"] = bench_inprocess(
        session, rows, expected, inprocess_calls, concurrency
    )
    _report("inprocess_threads", variants["inprocess_threads"])

    with tempfile.TemporaryDirectory(prefix="shipyard-bench-serving-") as tmp_name:
        tmp = Path(tmp_name)
        from shipyard.blobs import BlobStore

        blobs_url = (tmp / "blobs").as_uri()
        digest = BlobStore(blobs_url).put_bytes(model_bytes).digest
        for name, max_batch, max_wait in configs:
            progress(
                f"  {name}: replica max_batch_size={max_batch} max_wait_ms={max_wait}, "
                f"{warmup} warm-up + {requests} requests ..."
            )
            outcome = bench_replica(
                tmp / name,
                blobs_url=blobs_url,
                digest=digest,
                max_batch=max_batch,
                max_wait=max_wait,
                bodies=bodies,
                expected=expected,
                requests=requests,
                warmup=warmup,
                concurrency=concurrency,
            )
            variants[name] = outcome
            _report(name, outcome)

    ratios: dict[str, dict[str, float | None]] = {}
    single, threads = variants["inprocess_single"], variants["inprocess_threads"]
    for name in (n for n in variants if n.startswith("replica_")):
        v = variants[name]
        if "skipped" in v:
            continue
        ratios[name] = {
            "rps_vs_inprocess_single": ratio(v["rps"], single["rps"]),
            "rps_vs_inprocess_threads": ratio(v["rps"], threads["rps"]),
            "p50_vs_inprocess_threads": ratio(v["p50_ms"], threads["p50_ms"]),
            "p99_vs_inprocess_threads": ratio(v["p99_ms"], threads["p99_ms"]),
            "p50_vs_inprocess_single": ratio(v["p50_ms"], single["p50_ms"]),
            "p99_vs_inprocess_single": ratio(v["p99_ms"], single["p99_ms"]),
        }
    headline: list[dict[str, Any]] = []
    for name, v in variants.items():
        if "skipped" in v:
            headline.append({"name": name, "value": None, "skipped": v["skipped"]})
            continue
        detail = f"p50 {v['p50_ms']} ms, p99 {v['p99_ms']} ms"
        if "batching" in v:
            detail += f", mean batch {v['batching']['mean_batch_size']}"
            detail += f", replica CPU {v['cpu']['replica_us_per_request']} us/req"
        headline.append({"name": name, "value": v["rps"], "unit": "req/s", "detail": detail})
    main_config = configs[0][0]
    for versus in ("inprocess_single", "inprocess_threads"):
        if main_config in ratios:
            headline.append(
                {
                    "name": f"ratio {main_config} / {versus}",
                    "value": ratios[main_config][f"rps_vs_{versus}"],
                    "unit": "x rps",
                    "detail": f"p50 x{ratios[main_config][f'p50_vs_{versus}']}, "
                    f"p99 x{ratios[main_config][f'p99_vs_{versus}']}",
                }
            )
    return {
        "benchmark": NAME,
        "quick": quick,
        "workload": {
            "model": f"MLP {N_IN}->{N_HIDDEN} relu->{N_OUT}, FP32, dynamic batch, "
            f"{len(model_bytes)} bytes",
            "request": "one row per request (OIP v2 JSON, shape [1, 64], FP32)",
            "concurrency": concurrency,
            "requests_per_replica_config": requests,
            "warmup_per_replica_config": warmup,
            "inprocess_calls": inprocess_calls,
            "load_generator": "threads in the benchmark process, one keep-alive http.client "
            "connection each, closed loop; request bodies pre-encoded",
        },
        "machine": info,
        "variants": variants,
        "ratios": ratios,
        "ratio_definition": "rps_*: replica rps / in-process rps (< 1: the share of the "
        "in-process rate the endpoint reaches); p50/p99_*: replica latency / in-process latency "
        "(> 1: slower)",
        "headline": headline,
        "loadavg_after": loadavg(),
        "caveats": [
            "One run, wall-clock time on a shared machine; compare ratios within one run.",
            "The load generator and the replica share the machine's cores, so the client's own "
            "CPU (HTTP, JSON decode) is taken from the replica; on 2 cores this is a large share.",
            "In-process figures have no protocol, JSON or network; the ratios are the whole cost "
            "of serving over HTTP, not of shipyard's code alone (uvicorn, FastAPI and JSON "
            "encoding are most of it).",
            "In-process latencies are per session.run call; replica latencies are per HTTP "
            "request, measured at the client.",
            "cpu.replica_us_per_request (the replica process's CPU time over the measured phase "
            "divided by requests) depends less on other load than rps does.",
            "With 16 closed-loop clients and max_batch_size 32 a batch can never fill, so every "
            "batch waits the full max_wait_ms; the nobatch and wait0ms configs show the cost.",
        ],
    }


# --- overload ----------------------------------------------------------------------------------

HEAVY_NAME = "heavy"


def run_overload(*, factor: float, seconds: float, quick: bool) -> dict[str, Any]:
    """The overload scenario: shedding replica (and, unless quick, an unbounded one)."""
    model_bytes = build_heavy()
    call = _heavy_call_seconds(model_bytes)
    max_queue_ms = max(call * 1000, 5.0)
    progress(
        f"  overload: model call {call * 1000:.1f} ms; burst {factor:g}x capacity for "
        f"{seconds:g} s; shedding with --max-queue-rows 1 --max-queue-ms {max_queue_ms:.1f}"
    )
    variants: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="shipyard-bench-overload-") as tmp_name:
        tmp = Path(tmp_name)
        from shipyard.blobs import BlobStore

        blobs_url = (tmp / "blobs").as_uri()
        digest = BlobStore(blobs_url).put_bytes(model_bytes).digest
        configs = [("replica_overload", ["--max-queue-rows", "1", "--max-queue-ms",
                                         f"{max_queue_ms:.1f}"]),
                   ("replica_overload_calls", ["--max-queue-calls", "1"]),
                   ("replica_overload_defaults", [])]  # fmt: skip
        if not quick:
            configs.append(
                (
                    "replica_overload_unbounded",
                    ["--max-queue-rows", "100000000", "--max-queue-ms", "1e9",
                     "--max-queue-calls", "1e9"],
                )
            )  # fmt: skip
        for name, flags in configs:
            variants[name] = bench_overload(
                tmp / name,
                blobs_url=blobs_url,
                digest=digest,
                flags=flags,
                factor=factor,
                seconds=seconds,
            )
            v = variants[name]
            if "skipped" in v:
                progress(f"  {name}: skipped: {v['skipped']}")
                continue
            progress(
                f"  {name}: unloaded p99 {v['unloaded']['p99_ms']:.1f} ms; {v['offered']} "
                f"requests at {v['offered_rps']:.0f}/s: admitted p99 "
                f"{v['admitted'].get('p99_ms', 0):.1f} ms ({v['admitted_p99_vs_unloaded_p99']}x "
                f"unloaded), {v['share_shed']:.1%} shed; first request after: "
                f"{v['recovery_ms']:.1f} ms"
            )
    headline = []
    for name, v in variants.items():
        if "skipped" in v:
            headline.append({"name": name, "value": None, "skipped": v["skipped"]})
            continue
        headline.append(
            {
                "name": f"{name}: admitted p99 / unloaded p99",
                "value": v["admitted_p99_vs_unloaded_p99"],
                "unit": "x",
                "detail": f"admitted p99 {v['admitted'].get('p99_ms')} ms, unloaded p99 "
                f"{v['unloaded']['p99_ms']} ms, {v['share_shed']:.1%} shed at {factor:g}x "
                "overload",
            }
        )
    return {
        "workload": {
            "model": "x [1, 64] -> Expand [2048, 64] -> MatMul 512 -> MatMul 512x512 -> ReLU -> "
            "mean -> [1, 10]; FP32, fixed batch dimension (no batching), 1 ORT thread",
            "model_call_ms": round(call * 1000, 2),
            "overload_factor": factor,
            "burst_seconds": seconds,
            "load_generator": "asyncio in the benchmark process, 64 keep-alive connections, "
            "open loop (request i due at i / rate; latency from when it was due)",
        },
        "variants": variants,
        "headline": headline,
        "caveats": [
            "capacity = 1 / median unloaded latency (one request at a time), so the offered "
            "rate is factor x that; the replica, the load generator and anything else running "
            "share the machine's cores.",
            "With 64 connections an unbounded replica turns the open loop into 64 closed-loop "
            "clients once all are busy; latency still counts from when a request was due.",
        ],
    }


def bench_overload(
    where: Path,
    *,
    blobs_url: str,
    digest: str,
    flags: list[str],
    factor: float,
    seconds: float,
) -> dict[str, Any]:
    where.mkdir(parents=True)
    port = free_port()
    argv = [
        PYTHON, "-m", "shipyard.serving.replica", "--blobs", blobs_url, "--digest", digest,
        "--name", HEAVY_NAME, "--version", "1", "--host", "127.0.0.1", "--port", str(port),
        "--log-level", "warning", *flags,
    ]  # fmt: skip
    request = _heavy_request(port)
    with child(argv, env=child_env(PYTHONUNBUFFERED="1"), log_path=where / "replica.log") as rep:
        why = wait_http_ok(rep, f"http://127.0.0.1:{port}/v2/health/ready", timeout=60)
        if why is not None:
            return {"skipped": f"the replica did not become ready: {why}"}
        asyncio.run(_sequential(port, request, 5))
        unloaded = asyncio.run(_sequential(port, request, 40))
        capacity = 1 / float(np.median(unloaded))
        before = _shed_counts(port)
        started = time.perf_counter()
        results = asyncio.run(_burst(port, request, rate=factor * capacity, seconds=seconds))
        wall = time.perf_counter() - started
        recovery = asyncio.run(_sequential(port, request, 1))[0]
        after = _shed_counts(port)
        alive = rep.alive()
    admitted = [sec for status, _, sec in results if status == 200]
    shed = [sec for status, _, sec in results if status == 429]
    other = sorted({status for status, _, _ in results} - {200, 429})
    unloaded_summary = latency_summary(unloaded)
    admitted_summary = latency_summary(admitted) if admitted else {}
    return {
        "unloaded": {"requests": len(unloaded), **unloaded_summary},
        "capacity_rps": round(capacity, 1),
        "offered": len(results),
        "offered_rps": round(factor * capacity, 1),
        "burst_wall_s": round(wall, 3),
        "admitted": {"requests": len(admitted), **admitted_summary},
        "shed": {"requests": len(shed), **(latency_summary(shed) if shed else {})},
        "other_statuses": other,
        "share_shed": round(len(shed) / len(results), 4) if results else None,
        "admitted_p99_vs_unloaded_p99": ratio(
            admitted_summary.get("p99_ms"), unloaded_summary["p99_ms"]
        ),
        "shed_by_reason_from_metrics": {
            reason: after.get(reason, 0.0) - before.get(reason, 0.0) for reason in after
        },
        "recovery_ms": round(recovery * 1000, 3),
        "replica_alive_after": alive,
        "command": " ".join(["python", *argv[1:]]),
    }


def build_heavy(rows: int = 2048, width: int = 512, seed: int = 0) -> bytes:
    """x: FP32 [1, 64] (fixed batch) -> y [1, 10] through a [rows, 64] x [64, width] x
    [width, width] product (as tests/serving/test_replica_overload.py)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(np.array([rows, N_IN], dtype=np.int64), "shape"),
        numpy_helper.from_array((rng.standard_normal((N_IN, width)) / 8).astype(np.float32), "W0"),
        numpy_helper.from_array(
            (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), "W1"
        ),
        numpy_helper.from_array((rng.standard_normal((width, N_OUT)) / 8).astype(np.float32), "W2"),
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
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, N_IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N_OUT])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def _heavy_call_seconds(model_bytes: bytes) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    x = np.ones((1, N_IN), dtype=np.float32)
    times = []
    for _ in range(15):
        started = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - started)
    return float(np.median(times[3:]))


def _heavy_request(port: int) -> bytes:
    x = np.random.default_rng(0).standard_normal((1, N_IN)).astype(np.float32)
    tensor = {"name": "x", "shape": [1, N_IN], "datatype": "FP32", "data": x.ravel().tolist()}
    body = json.dumps({"inputs": [tensor]}).encode()
    head = (
        f"POST /v2/models/{HEAVY_NAME}/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes, started: float
) -> tuple[int, dict[str, str], float]:
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
            status, _, sec = await _exchange(reader, writer, request, time.perf_counter())
            if status != 200:
                raise AssertionError(f"an unloaded request got HTTP {status}")
            latencies.append(sec)
        return latencies
    finally:
        writer.close()
        await writer.wait_closed()


async def _burst(
    port: int, request: bytes, *, rate: float, seconds: float, connections: int = 64
) -> list[tuple[int, dict[str, str], float]]:
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
    try:
        for i in range(int(rate * seconds)):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(due)))
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=600)
    finally:
        for _, writer in opened:
            writer.close()
        await asyncio.gather(*(w.wait_closed() for _, w in opened), return_exceptions=True)
    return results


def _shed_counts(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "shipyard_serving_shed_requests_total":
                counts[sample.labels["reason"]] = sample.value
    return counts


# --- the model ---------------------------------------------------------------------------------


def build_mlp(seed: int = 0) -> bytes:
    """64 -> 128 (ReLU) -> 10, float32, batch dimension dynamic (as tests/onnx_models.py)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((N_IN, N_HIDDEN)) / np.sqrt(N_IN)).astype(np.float32)
    b1 = np.zeros(N_HIDDEN, dtype=np.float32)
    w2 = (rng.standard_normal((N_HIDDEN, N_OUT)) / np.sqrt(N_HIDDEN)).astype(np.float32)
    b2 = rng.standard_normal(N_OUT).astype(np.float32) * 0.1
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", [INPUT, "W1"], ["h0"]),
            helper.make_node("Add", ["h0", "B1"], ["h1"]),
            helper.make_node("Relu", ["h1"], ["h"]),
            helper.make_node("MatMul", ["h", "W2"], ["l0"]),
            helper.make_node("Add", ["l0", "B2"], ["logits"]),
        ],
        "digits_mlp",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", N_IN])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", N_OUT])],
        initializer=[
            numpy_helper.from_array(w1, "W1"),
            numpy_helper.from_array(b1, "B1"),
            numpy_helper.from_array(w2, "W2"),
            numpy_helper.from_array(b2, "B2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def request_body(row: np.ndarray) -> bytes:
    body = {
        "inputs": [{"name": INPUT, "shape": [1, N_IN], "datatype": "FP32", "data": row.tolist()}]
    }
    return json.dumps(body, separators=(",", ":")).encode()


# --- in-process --------------------------------------------------------------------------------


def bench_inprocess(
    session: Any, rows: np.ndarray, expected: np.ndarray, calls: int, threads: int
) -> dict[str, Any]:
    singles = [rows[i : i + 1] for i in range(len(rows))]
    for i in range(200):  # warm-up
        session.run(None, {INPUT: singles[i % len(singles)]})
    per_thread = _split(calls, threads)
    latencies: list[list[float]] = [[] for _ in range(threads)]
    wrong = [0] * threads
    barrier = threading.Barrier(threads + 1)

    def worker(t: int) -> None:
        lat = latencies[t]
        barrier.wait()
        offset = t * 7919
        for i in range(per_thread[t]):
            k = (offset + i) % len(singles)
            started = time.perf_counter()
            out = session.run(None, {INPUT: singles[k]})
            lat.append(time.perf_counter() - started)
            if int(np.argmax(out[0][0])) != expected[k]:
                wrong[t] += 1

    workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    barrier.wait()
    cpu = time.process_time()
    started = time.perf_counter()
    for w in workers:
        w.join()
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu
    flat = [x for lat in latencies for x in lat]
    if sum(wrong):
        raise AssertionError(f"{sum(wrong)} in-process predictions differ from the batch run")
    return {
        "calls": len(flat),
        "threads": threads,
        "seconds": round(wall, 4),
        "rps": round(len(flat) / wall, 1),
        **latency_summary(flat),
        "cpu": {"process_s": round(cpu, 3), "us_per_call": round(cpu / len(flat) * 1e6, 2)},
        "api": "onnxruntime.InferenceSession.run(None, {input: row[1, 64]})",
    }


# --- the replica -------------------------------------------------------------------------------


def bench_replica(
    where: Path,
    *,
    blobs_url: str,
    digest: str,
    max_batch: int,
    max_wait: float,
    bodies: list[bytes],
    expected: np.ndarray,
    requests: int,
    warmup: int,
    concurrency: int,
) -> dict[str, Any]:
    where.mkdir(parents=True)
    port = free_port()
    argv = [
        PYTHON,
        "-m",
        "shipyard.serving.replica",
        "--blobs",
        blobs_url,
        "--digest",
        digest,
        "--name",
        MODEL_NAME,
        "--version",
        "1",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-batch-size",
        str(max_batch),
        "--max-wait-ms",
        str(max_wait),
        "--log-level",
        "warning",
    ]
    with child(argv, env=child_env(PYTHONUNBUFFERED="1"), log_path=where / "replica.log") as rep:
        why = wait_http_ok(rep, f"http://127.0.0.1:{port}/v2/health/ready", timeout=60)
        if why is not None:
            return {"skipped": f"the replica did not become ready: {why}"}
        _load(port, bodies, expected, warmup, concurrency)
        before = scrape_batches(port)
        replica_cpu = _cpu_seconds(rep.proc.pid)
        client_cpu = time.process_time()
        started = time.perf_counter()
        latencies = _load(port, bodies, expected, requests, concurrency)
        wall = time.perf_counter() - started
        client_cpu = time.process_time() - client_cpu
        replica_cpu = _cpu_seconds(rep.proc.pid) - replica_cpu
        after = scrape_batches(port)
        alive = rep.alive()
    batching = _batch_delta(before, after)
    return {
        "requests": len(latencies),
        "concurrency": concurrency,
        "seconds": round(wall, 4),
        "rps": round(len(latencies) / wall, 1),
        **latency_summary(latencies),
        "max_batch_size": max_batch,
        "max_wait_ms": max_wait,
        "batching": batching,
        "cpu": {
            "replica_s": round(replica_cpu, 3),
            "load_generator_s": round(client_cpu, 3),
            "replica_us_per_request": round(replica_cpu / len(latencies) * 1e6, 1),
            "load_generator_us_per_request": round(client_cpu / len(latencies) * 1e6, 1),
        },
        "replica_alive_after": alive,
        "command": " ".join(["python", *argv[1:]]),
    }


def _load(
    port: int, bodies: list[bytes], expected: np.ndarray, total: int, concurrency: int
) -> list[float]:
    """``total`` requests from ``concurrency`` closed-loop clients; returns the latencies."""
    per_client = _split(total, concurrency)
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[str] = []
    barrier = threading.Barrier(concurrency)
    path = f"/v2/models/{MODEL_NAME}/infer"
    headers = {"Content-Type": "application/json"}

    def client(c: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        lat = latencies[c]
        try:
            conn.connect()
            barrier.wait()
            for i in range(per_client[c]):
                k = (c * 7919 + i) % len(bodies)
                started = time.perf_counter()
                conn.request("POST", path, body=bodies[k], headers=headers)
                response = conn.getresponse()
                data = response.read()
                lat.append(time.perf_counter() - started)
                if response.status != 200:
                    errors.append(f"HTTP {response.status}: {data[:200]!r}")
                    return
                logits = json.loads(data)["outputs"][0]["data"]
                if int(np.argmax(logits)) != expected[k]:
                    errors.append(f"row {k}: wrong class {int(np.argmax(logits))}")
                    return
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            barrier.abort()
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise AssertionError(f"{len(errors)} client(s) failed; first: {errors[0]}")
    return [x for lat in latencies for x in lat]


def scrape_batches(port: int) -> dict[str, Any]:
    """The replica's batch-size histogram from ``/metrics`` (cumulative buckets, sum, count)."""
    from prometheus_client.parser import text_string_to_metric_families

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    buckets: dict[str, float] = {}
    total = count = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != "shipyard_serving_batch_size":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                buckets[sample.labels["le"]] = sample.value
            elif sample.name.endswith("_sum"):
                total = sample.value
            elif sample.name.endswith("_count"):
                count = sample.value
    return {"buckets": buckets, "sum": total, "count": count}


def _batch_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    calls = after["count"] - before["count"]
    rows = after["sum"] - before["sum"]
    cumulative = {
        le: after["buckets"][le] - before["buckets"].get(le, 0.0) for le in after["buckets"]
    }
    # Cumulative "le" buckets -> how many model calls fell in each (previous, le] range.
    histogram: dict[str, int] = {}
    previous_le, previous = "0", 0.0
    for le, value in sorted(cumulative.items(), key=lambda kv: float(kv[0])):
        label = _fmt(le) if previous_le == "0" else f"{_fmt(previous_le)}<n<={_fmt(le)}"
        if float(le) == 1.0:
            label = "1"
        if value - previous:
            histogram[label] = int(value - previous)
        previous_le, previous = le, value
    return {
        "model_calls": int(calls),
        "rows": int(rows),
        "mean_batch_size": round(rows / calls, 2) if calls else None,
        "histogram": histogram,
    }


def _fmt(le: str) -> str:
    value = float(le)
    return "inf" if value == float("inf") else str(int(value))


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads)."""
    import psutil

    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _report(name: str, v: dict[str, Any]) -> None:
    if "skipped" in v:
        progress(f"  {name}: skipped: {v['skipped']}")
        return
    extra = ""
    if "batching" in v:
        b = v["batching"]
        extra = (
            f", {b['model_calls']} model calls, mean batch {b['mean_batch_size']}, "
            f"CPU/request: replica {v['cpu']['replica_us_per_request']} us, "
            f"load generator {v['cpu']['load_generator_us_per_request']} us"
        )
    progress(
        f"  {name}: {v['rps']:,.0f} req/s, p50 {v['p50_ms']:.3f} ms, p99 {v['p99_ms']:.3f} ms"
        + extra
    )


if __name__ == "__main__":
    sys.exit(main())
