"""Serving throughput and latency: a shipyard replica against a plain FastAPI app (issue 8).

Both serve the same digits-sized ONNX model, an MLP 64 -> 128 (ReLU) -> 10 built with
``onnx.helper`` (dynamic batch dimension), to batch-1 Open Inference Protocol v2 JSON requests
(``POST /v2/models/digits/infer``, one row of 64 floats in [0, 16], like scikit-learn's
digits). The baseline is ``benchmarks/serving_fastapi_app.py``: FastAPI + pydantic + ONNX
Runtime, under uvicorn (httptools and uvloop, as installed), access log off.

Each server runs pinned to one core (``taskset -c 0``) and the load generator, ``wrk``, on
another (``taskset -c 1 wrk -t1 -cC -dD --latency -s post.lua``, a Lua script posting the
JSON body). Rounds alternate the two servers at every concurrency (1, 16, 64), so slow drifts
in the machine's other load hit both alike; figures are medians over rounds. Per run:
requests/s, p50 and p99 latency (wrk's), non-2xx answers, and the server process's CPU time per
request (user + system, from psutil), which depends less on other load than requests/s does.
Every server's answer is checked against ONNX Runtime in-process before it is measured.

Peers (``--peers``, default all three): the same model, body and wrk script against LitServe
(``serving_litserve_app.py``), BentoML (``serving_bentoml_app.py``, ``bentoml serve``, one
worker) and Ray Serve (``serving_rayserve_app.py``, one replica of one CPU), each with its own
batching off (a batch-1 comparison), its access log off, pinned with every process it starts to
the server core, and alternated with the other servers in the same rounds. Each peer runs from
an environment of its own, ``benchmarks/.venv-peers-NAME`` (made and filled by pip on the first
run, with this environment's onnxruntime and numpy; it holds a ``.gitignore`` of ``*``): Ray
Serve would move protobuf to 7 and BentoML opentelemetry-api back a release in shipyard's
environment. A peer that cannot be installed, does not start, answers wrongly or dies under
load is reported under ``skipped`` with the reason. ``vs_peers`` holds shipyard's ratios to
each server that ran, ``table`` one row per (server, c). CPU per request counts the server
process and all its descendants.

Batching lift (``batching``): a model large enough to be compute-bound, an MLP 64 -> 2048 ->
2048 -> 10 (ReLU; ~2 ms a batch-1 call on one thread), served by the replica with
``--max-batch-size 32`` and with ``--max-batch-size 1``, at concurrency 1 (batching must not
make a lone request slower) and 16 (it must lift throughput, >= 3x).

Overload (``overload``, issue 5 item 15): a model that is the bottleneck (a fixed batch
dimension, so no batching, and ~1 GFLOP a call on one thread) served with load shedding
(``--max-queue-rows 1 --max-queue-ms`` one model call). First the unloaded latency (one request
at a time); then an open-loop burst at ``--overload`` (10) times the rate the replica sustains
one at a time, for ``--overload-seconds``, from asyncio on 64 keep-alive connections (latency
counted from when each request was due). Reported: admitted p99 / unloaded p99, the share shed
(429), the shed requests' latency, the shed counts by reason from ``/metrics``, and the latency
of the first request after the burst. ``replica_overload_calls`` admits only requests whose
predicted wait is at most one model call (``--max-queue-calls 1``); ``replica_overload_defaults``
runs the same burst against a replica started with no queue flags. Without ``--quick`` the same
burst also runs against a replica whose queue is unbounded (``replica_overload_unbounded``).

Run: ``.venv/bin/python benchmarks/serving.py [--quick] [--rounds N] [--seconds S]
[--concurrency 1,16,64] [--peers litserve,bentoml,rayserve] [--no-batching]
[--no-overload | --only-overload]``. Needs ``wrk`` (Debian: ``apt-get
install wrk``) and, for pinning, ``taskset`` and two cores (without them it runs unpinned and
says so).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    BENCH_DIR,
    PYTHON,
    SHIPYARD_ENV,
    ChildProcess,
    child,
    child_env,
    free_port,
    latency_summary,
    loadavg,
    machine,
    peer_python,
    peer_versions,
    progress,
    ratio,
    tree_cpu_seconds,
    wait_http_ok,
    write_result,
)

NAME = "serving"
MODEL_NAME = "digits"
INPUT = "input"
N_IN, N_HIDDEN, N_OUT = 64, 128, 10
BIG_HIDDEN = 2048
CONCURRENCY = (1, 16, 64)
SERVER_CORE, CLIENT_CORE = "0", "1"
TARGET_RATIO = 3.0
# The lift compares model throughput: neither replica may answer 429 instead of computing.
_NO_SHEDDING = [
    "--max-queue-rows",
    "100000",
    "--max-queue-ms",
    "600000",
    "--max-queue-calls",
    "1e9",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 3, 1 quick)")
    parser.add_argument("--seconds", type=float, help="wrk duration per run (default 5, 2 quick)")
    parser.add_argument(
        "--concurrency", default=",".join(map(str, CONCURRENCY)), help="e.g. 1,16,64"
    )
    parser.add_argument("--out", type=Path, help="result file (default results/serving.json)")
    parser.add_argument("--overload", type=float, default=10.0, help="burst rate / capacity")
    parser.add_argument("--overload-seconds", type=float, help="burst length (default 3, 2 quick)")
    parser.add_argument("--no-overload", action="store_true", help="skip the overload scenario")
    parser.add_argument("--no-batching", action="store_true", help="skip the batching lift")
    parser.add_argument(
        "--peers",
        default=",".join(PEERS),
        help=f"other serving frameworks to compare with (default {','.join(PEERS)}; '' none)",
    )
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
    wrk = shutil.which("wrk")
    if wrk is None:
        print("benchmarks/serving.py needs wrk: apt-get install wrk", file=sys.stderr)
        return 2
    result = run(
        wrk=wrk,
        rounds=args.rounds or (1 if args.quick else 3),
        seconds=args.seconds or (2.0 if args.quick else 5.0),
        concurrency=tuple(int(c) for c in args.concurrency.split(",")),
        batching=not args.no_batching,
        quick=args.quick,
        peers=[p for p in args.peers.split(",") if p],
    )
    if not args.no_overload:
        overload = run_overload(factor=args.overload, seconds=overload_seconds, quick=args.quick)
        result["overload"] = overload
        result["headline"].extend(overload["headline"])
    write_result(NAME, result, args.out)
    return 0


def run(
    *,
    wrk: str,
    rounds: int,
    seconds: float,
    concurrency: tuple[int, ...],
    batching: bool,
    quick: bool,
    peers: list[str] | None = None,
) -> dict[str, Any]:
    unknown = sorted(set(peers or []) - set(PEERS))
    if unknown:
        raise SystemExit(f"unknown peer(s) {unknown}: choose from {', '.join(PEERS)}")
    info = machine()
    pin = _pinning()
    where = f"server on core {SERVER_CORE}, wrk on core {CLIENT_CORE}" if pin else "unpinned"
    progress(
        f"serving: shipyard replica vs {', '.join(['FastAPI', *(peers or [])])}, MLP "
        f"{N_IN}->{N_HIDDEN}->{N_OUT}, c={concurrency}, "
        f"{rounds} rounds x {seconds:g} s ({info['cpus']} CPUs, load {info['loadavg']}; {where})"
    )
    with tempfile.TemporaryDirectory(prefix="shipyard-bench-serving-") as tmp_name:
        tmp = Path(tmp_name)
        digits = _prepare(tmp, "digits", build_mlp())
        servers: dict[str, Callable[[], _Server]] = {
            "fastapi": lambda: _start_fastapi(tmp, digits, pin=pin),
            "shipyard": lambda: _start_replica(tmp, digits, "shipyard", [], pin=pin),
        }
        skipped: dict[str, str] = {}
        peer_info: dict[str, dict[str, Any]] = {}
        for peer in peers or []:
            python = peer_python(peer, PEERS[peer]["requirements"])
            if isinstance(python, str):
                skipped[peer] = python
                progress(f"  {peer}: skipped: {python}")
                continue
            peer_info[peer] = {
                "setup": PEERS[peer]["setup"],
                "python": str(python),
                "packages": peer_versions(python, PEERS[peer]["packages"]),
            }
            servers[peer] = lambda peer=peer, python=python: _start_peer(
                peer, python, tmp, digits, pin=pin
            )
        comparison = _compare(
            wrk,
            servers,
            digits,
            concurrency=concurrency,
            rounds=rounds,
            seconds=seconds,
            pin=pin,
            optional=set(PEERS),
            skipped=skipped,
        )
        lift: dict[str, Any] = {}
        if batching:
            big = _prepare(tmp, "big", build_mlp(hidden=BIG_HIDDEN, layers=2))
            lift = _batching_lift(wrk, tmp, big, rounds=rounds, seconds=seconds, pin=pin)
    ratios: dict[str, dict[str, float | None]] = {}
    for c in concurrency:
        base, ours = comparison["fastapi"][str(c)], comparison["shipyard"][str(c)]
        ratios[f"c{c}"] = {
            "rps": ratio(ours["rps"], base["rps"]),
            "p50": ratio(ours["p50_ms"], base["p50_ms"]),
            "p99": ratio(ours["p99_ms"], base["p99_ms"]),
            "cpu_per_request": ratio(
                base["cpu_us_per_request"], ours["cpu_us_per_request"]
            ),  # > 1: shipyard uses less CPU per request
        }
    headline: list[dict[str, Any]] = []
    for c in concurrency:
        ours, base = comparison["shipyard"][str(c)], comparison["fastapi"][str(c)]
        headline.append(
            {
                "name": f"shipyard / FastAPI requests/s at c={c}",
                "value": ratios[f"c{c}"]["rps"],
                "unit": "x",
                "detail": f"shipyard {ours['rps']:.0f} req/s (p50 {ours['p50_ms']} ms, p99 "
                f"{ours['p99_ms']} ms, {ours['cpu_us_per_request']} us CPU/req); FastAPI "
                f"{base['rps']:.0f} req/s (p50 {base['p50_ms']} ms, p99 {base['p99_ms']} ms, "
                f"{base['cpu_us_per_request']} us CPU/req)",
            }
        )
    if lift:
        headline.append(
            {
                "name": "batching lift at c=16 (max-batch-size 32 / 1), compute-bound model",
                "value": lift["lift_rps_c16"],
                "unit": "x",
                "detail": lift["detail"],
            }
        )
    vs_peers = _vs_peers(comparison, concurrency)
    for peer, by_c in vs_peers.items():
        if peer == "fastapi":  # already in the headline, one entry per c
            continue
        key_c = 16 if 16 in concurrency else concurrency[-1]
        headline.append(
            {
                "name": f"shipyard / {peer} requests/s at c={key_c}",
                "value": by_c[f"c{key_c}"]["rps"],
                "unit": "x",
                "detail": "; ".join(
                    f"c={c}: {comparison[peer][str(c)]['rps']:.0f} req/s, p50 "
                    f"{comparison[peer][str(c)]['p50_ms']} ms, p99 "
                    f"{comparison[peer][str(c)]['p99_ms']} ms ({by_c[f'c{c}']['rps']}x)"
                    for c in concurrency
                ),
            }
        )
    for peer, why in skipped.items():
        headline.append({"name": f"shipyard / {peer}", "value": None, "skipped": why})
    table = _table(comparison, vs_peers, concurrency)
    for line in table["text"]:
        progress(line)
    c16 = ratios.get("c16")
    return {
        "benchmark": NAME,
        "quick": quick,
        "workload": {
            "model": f"MLP {N_IN}->{N_HIDDEN} relu->{N_OUT}, FP32, dynamic batch",
            "request": "one row per request (OIP v2 JSON, shape [1, 64], FP32), POST "
            f"/v2/models/{MODEL_NAME}/infer",
            "baseline": "benchmarks/serving_fastapi_app.py under uvicorn (auto: httptools, "
            "uvloop), --no-access-log",
            "shipyard": "python -m shipyard.serving.replica (defaults: --max-batch-size 32, "
            "--max-wait-ms 5, --threads 1)",
            "peers": peer_info,
            "cpu_accounting": "CPU time of the server process and all its descendants",
            "load_generator": f"wrk -t1 -cC -d{seconds:g}s --latency, Lua POST script, "
            "closed loop, keep-alive",
            "pinning": {"server_core": SERVER_CORE, "wrk_core": CLIENT_CORE} if pin else None,
            "rounds": rounds,
            "concurrency": list(concurrency),
        },
        "machine": info,
        "variants": comparison,
        "skipped": skipped,
        "ratios": ratios,
        "vs_peers": vs_peers,
        "table": table["rows"],
        "ratio_definition": "rps, p50, p99: shipyard / FastAPI (rps > 1: faster; latency < 1: "
        "lower); cpu_per_request: FastAPI CPU per request / shipyard's (> 1: shipyard cheaper); "
        "vs_peers: the same ratios with each peer (FastAPI included) in FastAPI's place",
        "target": {
            "rps_c16_at_least": TARGET_RATIO,
            "met_rps_c16": None if c16 is None else (c16["rps"] or 0) >= TARGET_RATIO,
            "met_p99_c16": None if c16 is None else (c16["p99"] or 99) <= 1.0,
            "met_p50_c1": None if "c1" not in ratios else (ratios["c1"]["p50"] or 99) <= 1.0,
        },
        "batching": lift,
        "headline": headline,
        "loadavg_after": loadavg(),
        "caveats": [
            "Medians of alternating rounds, wall-clock time on a shared machine: other work on "
            "the machine (see loadavg) slows both servers; compare the ratios within one run.",
            "cpu_us_per_request is the server process's CPU time over a run divided by its "
            "requests; under contention it grows too (caches, context switches), less than "
            "requests/s falls.",
            "wrk reports latency percentiles from its own HdrHistogram; at c=1 p50 is the "
            "round-trip of one request.",
            "Every server, with all the processes it starts (LitServe's API server and worker, "
            "BentoML's arbiter and worker, Ray's GCS, raylet, proxy, controller and replica), "
            "is pinned to the one server core: a framework that splits a request over "
            "processes pays for the hops on that core, as it would on a one-core replica.",
            "Ray Serve on one core is hit hardest by the pinning: a request crosses its HTTP "
            "proxy actor and its replica actor (each with dozens of threads), and Ray's GCS, "
            "raylet and agents (about 10% of a core while idle, counted in its CPU per request) "
            "share that core. Ray also binds its internal ports on all interfaces (its HTTP "
            "proxy is on 127.0.0.1; the benchmark's traffic stays on loopback).",
            "Peers run from environments of their own (benchmarks/.venv-peers-NAME) with the "
            "same onnxruntime and numpy as shipyard's; their FastAPI/uvicorn/pydantic are what "
            "each framework's pinned version installs (see workload.peers).",
        ],
    }


# --- the comparison ------------------------------------------------------------------------------


def _compare(
    wrk: str,
    servers: dict[str, Any],
    model: dict[str, Any],
    *,
    concurrency: tuple[int, ...],
    rounds: int,
    seconds: float,
    pin: bool,
    optional: set[str] | None = None,
    skipped: dict[str, str] | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Start each server once; alternate them run by run; medians per (server, concurrency).

    A server named in ``optional`` that does not start, answers wrongly or dies under load is
    dropped with the reason in ``skipped``; any other server's failure stops the benchmark.
    """
    optional = optional or set()
    skipped = skipped if skipped is not None else {}
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {
        n: {c: [] for c in concurrency} for n in servers
    }
    started: dict[str, _Server] = {}

    def drop(name: str, why: str) -> None:
        skipped[name] = why
        progress(f"  {name}: skipped: {why}")
        if name in started:
            started.pop(name).stop()

    try:
        for name, start in servers.items():
            try:
                started[name] = start()
                _check_answers(started[name], model, retry_s=60.0 if name in optional else 0.0)
                _wrk(wrk, started[name].port, model["lua"], 4, min(seconds, 2.0), pin=pin)
            except (AssertionError, OSError) as exc:
                if name not in optional:
                    raise
                drop(name, f"did not start or answered wrongly: {exc}")
        for r in range(rounds):
            order = list(started) if r % 2 == 0 else list(reversed(started))
            for c in concurrency:
                for name in order:
                    if name not in started:
                        continue
                    try:
                        outcome = _measured(wrk, started[name], model["lua"], c, seconds, pin=pin)
                    except AssertionError as exc:
                        if name not in optional:
                            raise
                        drop(name, f"failed under load at c={c}, round {r + 1}: {exc}")
                        continue
                    runs[name][c].append(outcome)
                    progress(
                        f"  round {r + 1} {name:8s} c={c:<3d} {outcome['rps']:8.0f} req/s  p50 "
                        f"{outcome['p50_ms']:.3f} ms  p99 {outcome['p99_ms']:.3f} ms  "
                        f"{outcome['cpu_us_per_request']:.0f} us CPU/req"
                        + (f"  {outcome['non_2xx']} non-2xx" if outcome["non_2xx"] else "")
                    )
    finally:
        for proc in started.values():
            proc.stop()
    return {
        name: {str(c): _median_run(runs[name][c]) for c in concurrency}
        for name in servers
        if name not in skipped
    }


def _batching_lift(
    wrk: str, tmp: Path, model: dict[str, Any], *, rounds: int, seconds: float, pin: bool
) -> dict[str, Any]:
    call_ms = _call_ms(model["bytes"])
    progress(
        f"  batching: MLP {N_IN}->{BIG_HIDDEN}->{BIG_HIDDEN}->{N_OUT}, in-process call "
        f"batch 1 {call_ms['1']:.2f} ms, batch 16 {call_ms['16']:.2f} ms"
    )
    servers = {
        name: (lambda name=name, size=size: _start_replica(
            tmp, model, name, ["--max-batch-size", size, *_NO_SHEDDING], pin=pin))
        for name, size in (("batched", "32"), ("unbatched", "1"))
    }  # fmt: skip
    comparison = _compare(
        wrk, servers, model, concurrency=(1, 16), rounds=rounds, seconds=seconds, pin=pin
    )
    batched, unbatched = comparison["batched"], comparison["unbatched"]
    lift = ratio(batched["16"]["rps"], unbatched["16"]["rps"])
    return {
        "model": f"MLP {N_IN}->{BIG_HIDDEN} relu->{BIG_HIDDEN} relu->{N_OUT}, FP32, dynamic batch",
        "inprocess_call_ms": call_ms,
        "variants": comparison,
        "lift_rps_c16": lift,
        "c1_p50_batched_vs_unbatched": ratio(batched["1"]["p50_ms"], unbatched["1"]["p50_ms"]),
        "c1_p99_batched_vs_unbatched": ratio(batched["1"]["p99_ms"], unbatched["1"]["p99_ms"]),
        "detail": f"batched {batched['16']['rps']:.0f} req/s (p99 {batched['16']['p99_ms']} ms) "
        f"vs unbatched {unbatched['16']['rps']:.0f} req/s (p99 {unbatched['16']['p99_ms']} ms) "
        f"at c=16; c=1 p50 {batched['1']['p50_ms']} vs {unbatched['1']['p50_ms']} ms",
    }


def _measured(
    wrk: str, proc: ChildProcess, lua: Path, concurrency: int, seconds: float, *, pin: bool
) -> dict[str, Any]:
    load = loadavg()
    before_cpu = tree_cpu_seconds(proc.proc.pid)
    before_batches = scrape_batches(proc.port) if proc.shipyard else None
    outcome = _wrk(wrk, proc.port, lua, concurrency, seconds, pin=pin)
    cpu = tree_cpu_seconds(proc.proc.pid) - before_cpu
    outcome["loadavg_before"] = load
    outcome["cpu_us_per_request"] = round(cpu / max(outcome["requests"], 1) * 1e6, 1)
    if before_batches is not None:
        outcome["batching"] = _batch_delta(before_batches, scrape_batches(proc.port))
    if not proc.alive():
        raise AssertionError(f"the server died under load: {proc.log_tail()}")
    return outcome


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("rps", "p50_ms", "p90_ms", "p99_ms", "max_ms", "cpu_us_per_request")
    median = {key: round(statistics.median(r[key] for r in runs), 3) for key in keys}
    median["requests"] = sum(r["requests"] for r in runs)
    median["non_2xx"] = sum(r["non_2xx"] for r in runs)
    median["socket_errors"] = sum(r["socket_errors"] for r in runs)
    median["rounds"] = [
        {k: r[k] for k in ("rps", "p50_ms", "p99_ms", "loadavg_before")} for r in runs
    ]
    if runs and "batching" in runs[-1]:
        calls = sum(r["batching"]["model_calls"] for r in runs)
        rows = sum(r["batching"]["rows"] for r in runs)
        median["mean_batch_size"] = round(rows / calls, 2) if calls else None
    return median


# --- wrk -----------------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _wrk(
    wrk: str, port: int, lua: Path, concurrency: int, seconds: float, *, pin: bool
) -> dict[str, Any]:
    argv = [wrk, "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--latency", "-s", str(lua),
            f"http://127.0.0.1:{port}/v2/models/{MODEL_NAME}/infer"]  # fmt: skip
    if pin:
        argv = ["taskset", "-c", CLIENT_CORE, *argv]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if done.returncode != 0:
        raise AssertionError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)


def parse_wrk(text: str) -> dict[str, Any]:
    """requests, rps, latency percentiles (ms), non-2xx and socket errors from wrk's output."""
    percentiles = {
        f"p{m.group(1)}_ms": round(float(m.group(2)) * _UNITS[m.group(3)], 3)
        for m in re.finditer(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
    }
    latency_max = re.search(r"Latency\s+\S+\s+\S+\s+([\d.]+)(us|ms|s|m)", text)
    requests = re.search(r"^\s*(\d+) requests in", text, re.M)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    if requests is None or rps is None or "p99_ms" not in percentiles:
        raise AssertionError(f"cannot read wrk's output:\n{text}")
    return {
        "requests": int(requests.group(1)),
        "rps": float(rps.group(1)),
        **percentiles,
        "max_ms": round(float(latency_max.group(1)) * _UNITS[latency_max.group(2)], 3)
        if latency_max
        else None,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sum(int(x) for x in errors.groups()) if errors else 0,
    }


def _lua(path: Path, body: bytes) -> Path:
    path.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = {json.dumps(body.decode())}\n"
    )
    return path


# --- the servers ---------------------------------------------------------------------------------


class _Server(ChildProcess):
    port: int
    shipyard: bool
    cleanup: str | None = None  # a folder to remove once stopped

    def stop(self, grace: float = 10.0) -> None:
        # Ray runs its actors in process groups of their own: give its driver time to end them.
        super().stop(grace=30.0 if self.cleanup else grace)
        if self.cleanup:
            shutil.rmtree(self.cleanup, ignore_errors=True)


def _pinning() -> bool:
    return shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2


def _prepare(tmp: Path, name: str, model_bytes: bytes) -> dict[str, Any]:
    """The model as a file and a blob, a request body, the expected answer and the wrk script."""
    import onnxruntime as ort

    from shipyard.blobs import BlobStore

    path = tmp / f"{name}.onnx"
    path.write_bytes(model_bytes)
    blobs_url = (tmp / "blobs").as_uri()
    digest = BlobStore(blobs_url).put_bytes(model_bytes).digest
    row = np.random.default_rng(1).integers(0, 17, size=N_IN).astype(np.float32)
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    expected = session.run(None, {INPUT: row[None, :]})[0][0]
    body = request_body(row)
    return {
        "bytes": model_bytes,
        "path": path,
        "blobs": blobs_url,
        "digest": digest,
        "body": body,
        "expected": expected,
        "lua": _lua(tmp / f"{name}.lua", body),
    }


def _start_fastapi(tmp: Path, model: dict[str, Any], *, pin: bool) -> _Server:
    port = free_port()
    argv = [PYTHON, "-m", "uvicorn", "serving_fastapi_app:app", "--app-dir", str(BENCH_DIR),
            "--host", "127.0.0.1", "--port", str(port), "--no-access-log",
            "--log-level", "warning"]  # fmt: skip
    env = child_env(SERVING_BASELINE_MODEL=str(model["path"]), PYTHONUNBUFFERED="1")
    return _start(argv, env, tmp / "fastapi.log", port, pin=pin, shipyard=False)


def _start_replica(
    tmp: Path, model: dict[str, Any], name: str, flags: list[str], *, pin: bool
) -> _Server:
    port = free_port()
    argv = [PYTHON, "-m", "shipyard.serving.replica", "--blobs", model["blobs"],
            "--digest", model["digest"], "--name", MODEL_NAME, "--version", "1",
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
            *flags]  # fmt: skip
    env = child_env(PYTHONUNBUFFERED="1")
    return _start(argv, env, tmp / f"{name}-{port}.log", port, pin=pin, shipyard=True)


def _start(
    argv: list[str],
    env: dict[str, str],
    log: Path,
    port: int,
    *,
    pin: bool,
    shipyard: bool,
    ready: str | None = None,
    timeout: float = 90.0,
) -> _Server:
    if pin:
        argv = ["taskset", "-c", SERVER_CORE, *argv]
    proc = _Server(argv, env=env, log_path=log)
    proc.port, proc.shipyard = port, shipyard
    ready = ready or ("/v2/health/ready" if shipyard else "/docs")
    why = wait_http_ok(proc, f"http://127.0.0.1:{port}{ready}", timeout=timeout)
    if why is not None:
        proc.stop()
        raise AssertionError(f"{' '.join(argv)} did not start: {why}")
    return proc


def _check_answers(proc: _Server, model: dict[str, Any], *, retry_s: float = 0.0) -> None:
    """One request, its answer against ONNX Runtime in-process; a non-200 is retried for
    ``retry_s`` (a framework whose health route answers before its model route does)."""
    deadline = time.monotonic() + retry_s
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=30)
        try:
            conn.request("POST", f"/v2/models/{MODEL_NAME}/infer", body=model["body"],
                         headers={"Content-Type": "application/json"})  # fmt: skip
            response = conn.getresponse()
            data = response.read()
        except OSError as exc:
            raise AssertionError(f"no answer from port {proc.port}: {exc}") from None
        finally:
            conn.close()
        if response.status == 200 or time.monotonic() >= deadline or not proc.alive():
            break
        time.sleep(0.5)
    if response.status != 200:
        raise AssertionError(f"HTTP {response.status}: {data[:300]!r}")
    try:
        got = np.asarray(json.loads(data)["outputs"][0]["data"], dtype=np.float32)
        np.testing.assert_allclose(got, model["expected"], rtol=1e-4, atol=1e-4)
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise AssertionError(f"not an OIP v2 answer ({exc}): {data[:300]!r}") from None


# --- the peers: other serving frameworks, each from an environment of its own -------------------


def _same(name: str) -> str:
    return f"{name}=={metadata.version(name)}"  # the version shipyard's environment runs


PEERS: dict[str, dict[str, Any]] = {
    "litserve": {
        "requirements": ["litserve==0.2.19", _same("onnxruntime"), _same("numpy")],
        "packages": ["litserve", "fastapi", "uvicorn", "pydantic", "pyzmq", "onnxruntime"],
        "setup": "benchmarks/serving_litserve_app.py: LitAPI, max_batch_size=1 (batching off), "
        "1 worker, 1 API server process, fast_queue=True (ZeroMQ), access log off",
    },
    "bentoml": {
        "requirements": ["bentoml==1.4.40", _same("onnxruntime"), _same("numpy")],
        "packages": ["bentoml", "starlette", "uvicorn", "pydantic", "onnxruntime"],
        "setup": "benchmarks/serving_bentoml_app.py: @bentoml.service(workers=1), async "
        "@bentoml.api (not batchable), access log off; `bentoml serve`",
    },
    "rayserve": {
        "requirements": ["ray[serve]==2.60.0", _same("onnxruntime"), _same("numpy")],
        "packages": ["ray", "starlette", "uvicorn", "fastapi", "onnxruntime"],
        "setup": "benchmarks/serving_rayserve_app.py: @serve.deployment(num_replicas=1, "
        "num_cpus=1, max_ongoing_requests=256), async __call__(starlette Request), no "
        "@serve.batch; ray.init(num_cpus=1, no dashboard), Serve's HTTP proxy",
    },
}


def _start_peer(peer: str, python: Path, tmp: Path, model: dict[str, Any], *, pin: bool) -> _Server:
    port = free_port()
    env = child_env(PYTHONUNBUFFERED="1", SERVING_BASELINE_MODEL=str(model["path"]))
    log = tmp / f"{peer}-{port}.log"
    if peer == "litserve":
        argv = [str(python), str(BENCH_DIR / "serving_litserve_app.py"),
                "--model", str(model["path"]), "--port", str(port)]  # fmt: skip
        return _start(argv, env, log, port, pin=pin, shipyard=False, ready="/health",
                      timeout=120)  # fmt: skip
    if peer == "bentoml":
        env.update(BENTOML_HOME=str(tmp / "bentoml"), BENTOML_DO_NOT_TRACK="True")
        argv = [str(python.parent / "bentoml"), "serve", "serving_bentoml_app:DigitsService",
                "--working-dir", str(BENCH_DIR), "--host", "127.0.0.1",
                "--port", str(port)]  # fmt: skip
        return _start(argv, env, log, port, pin=pin, shipyard=False, ready="/readyz",
                      timeout=120)  # fmt: skip
    if peer == "rayserve":
        # Ray's socket paths must stay under ~107 bytes: a short folder of its own.
        ray_tmp = tempfile.mkdtemp(prefix="sy-ray-", dir="/tmp")
        env.update(RAY_USAGE_STATS_ENABLED="0")
        argv = [str(python), str(BENCH_DIR / "serving_rayserve_app.py"),
                "--model", str(model["path"]), "--port", str(port),
                "--temp-dir", ray_tmp]  # fmt: skip
        proc = _start(argv, env, log, port, pin=pin, shipyard=False, ready="/-/healthz",
                      timeout=240)  # fmt: skip
        proc.cleanup = ray_tmp
        return proc
    raise AssertionError(f"no starter for peer {peer!r}")


def _vs_peers(
    comparison: dict[str, dict[str, dict[str, Any]]], concurrency: tuple[int, ...]
) -> dict[str, dict[str, dict[str, float | None]]]:
    """shipyard's ratios to every other server that ran (FastAPI and the peers)."""
    ours = comparison.get("shipyard")
    if ours is None:
        return {}
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for peer, runs in comparison.items():
        if peer == "shipyard":
            continue
        out[peer] = {
            f"c{c}": {
                "rps": ratio(ours[str(c)]["rps"], runs[str(c)]["rps"]),
                "p50": ratio(ours[str(c)]["p50_ms"], runs[str(c)]["p50_ms"]),
                "p99": ratio(ours[str(c)]["p99_ms"], runs[str(c)]["p99_ms"]),
                "cpu_per_request": ratio(
                    runs[str(c)]["cpu_us_per_request"], ours[str(c)]["cpu_us_per_request"]
                ),
            }
            for c in concurrency
        }
    return out


def _table(
    comparison: dict[str, dict[str, dict[str, Any]]],
    vs_peers: dict[str, dict[str, dict[str, float | None]]],
    concurrency: tuple[int, ...],
) -> dict[str, Any]:
    """One row per (server, c): req/s, p50, p99, CPU/request, shipyard's req/s ratio to it."""
    rows, text = (
        [],
        [
            f"{'server':10s} {'c':>3s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} "
            f"{'CPU us/req':>10s} {'shipyard x':>10s}"
        ],
    )
    for name, runs in comparison.items():
        for c in concurrency:
            run = runs[str(c)]
            x = None if name == "shipyard" else vs_peers.get(name, {}).get(f"c{c}", {}).get("rps")
            rows.append({"server": name, "c": c, "rps": run["rps"], "p50_ms": run["p50_ms"],
                         "p99_ms": run["p99_ms"], "cpu_us_per_request": run["cpu_us_per_request"],
                         "shipyard_rps_ratio": x})  # fmt: skip
            text.append(
                f"{name:10s} {c:3d} {run['rps']:8.0f} {run['p50_ms']:8.3f} {run['p99_ms']:8.3f} "
                f"{run['cpu_us_per_request']:10.0f} {'' if x is None else f'{x:.2f}x':>10s}"
            )
    return {"rows": rows, "text": text}


def _call_ms(model_bytes: bytes) -> dict[str, float]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    out = {}
    for rows in (1, 16):
        x = np.ones((rows, N_IN), dtype=np.float32)
        session.run(None, {INPUT: x})
        times = []
        for _ in range(20):
            started = time.perf_counter()
            session.run(None, {INPUT: x})
            times.append(time.perf_counter() - started)
        out[str(rows)] = round(float(np.median(times)) * 1000, 3)
    return out


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


def build_mlp(seed: int = 0, *, hidden: int = N_HIDDEN, layers: int = 1) -> bytes:
    """64 -> ``hidden`` (ReLU), ``layers`` times -> 10, float32, dynamic batch dimension."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    previous, width = INPUT, N_IN
    for i in range(layers):
        w = (rng.standard_normal((width, hidden)) / np.sqrt(width)).astype(np.float32)
        bias = np.zeros(hidden, dtype=np.float32)
        inits += [
            numpy_helper.from_array(w, f"W{i + 1}"),
            numpy_helper.from_array(bias, f"B{i + 1}"),
        ]
        nodes += [
            helper.make_node("MatMul", [previous, f"W{i + 1}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"B{i + 1}"], [f"a{i}"]),
            helper.make_node("Relu", [f"a{i}"], [f"h{i}"]),
        ]
        previous, width = f"h{i}", hidden
    w_out = (rng.standard_normal((width, N_OUT)) / np.sqrt(width)).astype(np.float32)
    b_out = rng.standard_normal(N_OUT).astype(np.float32) * 0.1
    inits += [numpy_helper.from_array(w_out, "WO"), numpy_helper.from_array(b_out, "BO")]
    nodes += [
        helper.make_node("MatMul", [previous, "WO"], ["l0"]),
        helper.make_node("Add", ["l0", "BO"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", N_IN])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", N_OUT])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def request_body(row: np.ndarray) -> bytes:
    body = {
        "inputs": [{"name": INPUT, "shape": [1, N_IN], "datatype": "FP32", "data": row.tolist()}]
    }
    return json.dumps(body, separators=(",", ":")).encode()


# --- metrics -----------------------------------------------------------------------------------


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


if __name__ == "__main__":
    sys.exit(main())
