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

Run: ``.venv/bin/python benchmarks/serving.py [--quick] [--requests N] [--concurrency C]``.
"""

from __future__ import annotations

import argparse
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
    args = parser.parse_args(argv)
    for key in SHIPYARD_ENV:
        os.environ.pop(key, None)
    result = run(
        requests=args.requests or (600 if args.quick else 5000),
        warmup=args.warmup or (100 if args.quick else 500),
        concurrency=args.concurrency,
        inprocess_calls=args.inprocess_calls or (10000 if args.quick else 100000),
        configs=QUICK_CONFIGS if args.quick else REPLICA_CONFIGS,
        quick=args.quick,
    )
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
