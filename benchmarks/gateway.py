"""Gateway overhead: requests/s through the server's front door versus straight to the replica.

One deployment (a digits-sized ONNX MLP, one replica) behind ``python -m shipyard.server``;
``wrk`` (one thread, ``--concurrency`` connections, single-row requests) measures the replica's
own URL and the gateway's ``/v2/models/{name}/infer``, alternately, ``--rounds`` times each; the
medians are compared. Auth off (loopback) and auth on (a bearer token on every request).
Target (issue 8): the gateway keeps at least 70% of the direct throughput.

Each run also notes the CPU time per request of the server's event-loop thread and of the
replica process (Linux: from /proc): on a small shared machine, where the gateway, the replica
and wrk compete for cores, the throughput ratio swings with the load of other processes, while
the gateway's own cost per request does not.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    PYTHON,
    child,
    child_env,
    free_port,
    loadavg,
    machine,
    progress,
    ratio,
    wait_http_ok,
    write_result,
)

from serving import build_mlp, parse_wrk, request_body

NAME = "digits"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--seconds", type=float, default=None, help="per wrk run")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    seconds = args.seconds or (3.0 if args.quick else 8.0)
    rounds = args.rounds or (1 if args.quick else 3)
    wrk = shutil.which("wrk")
    if wrk is None:
        print("gateway benchmark: wrk is not installed; skipped", file=sys.stderr)
        return 0
    started = machine()
    variants: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="shipyard-bench-gateway-") as tmp:
        for auth in (False, True):
            key = "auth_on" if auth else "auth_off"
            variants[key] = _measure(
                Path(tmp) / key, wrk, auth=auth, seconds=seconds, rounds=rounds,
                concurrency=args.concurrency,
            )  # fmt: skip
    ratios = {k: v["ratio_gateway_to_direct"] for k, v in variants.items()}
    result = {
        "workload": {
            "model": "MLP 64 -> 128 ReLU -> 10, one row per request",
            "concurrency": args.concurrency,
            "seconds_per_run": seconds,
            "rounds": rounds,
            "client": "wrk -t1",
            "replicas": 1,
        },
        "machine": {**started, "loadavg_after": loadavg()},
        "variants": variants,
        "ratios": ratios,
        "ratio_definition": "gateway req/s / direct replica req/s (higher is better; target 0.7)",
        "headline": {k: f"{v:.2f}x of direct" for k, v in ratios.items() if v is not None},
        "caveats": [
            "wrk, the server, the replica and anything else on the machine share its cores: on "
            "a 2-core machine the gateway competes with the replica for CPU, which a server on "
            "its own host would not",
        ],
    }
    write_result("gateway", result, args.out)
    print(json.dumps(result["headline"], indent=2))
    return 0


def _measure(
    home: Path, wrk: str, *, auth: bool, seconds: float, rounds: int, concurrency: int
) -> dict[str, Any]:
    from shipyard.client import Client
    from shipyard.client.http import HttpBackend
    from shipyard.context import open_context
    from shipyard.security.tokens import create_token
    from shipyard.settings import Settings
    from shipyard.tracking.registry import register_version, set_alias

    home.mkdir(parents=True)
    ctx = open_context(Settings(home=home))
    digest = ctx.blobs.put_bytes(build_mlp()).digest
    register_version(ctx, project="default", model=NAME, digest=digest)
    set_alias(ctx, project="default", model=NAME, alias="production", version=1)
    token = create_token(ctx, name="bench")[1] if auth else None
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [PYTHON, "-m", "shipyard.server", "--host", "127.0.0.1", "--port", str(port)]
    argv.append("--no-access-log")  # a line per request costs ~20% of a gateway hop
    if auth:
        argv.append("--auth")
    env = child_env(SHIPYARD_HOME=str(home), SHIPYARD_SERVER_URL=url)
    with child(argv, env=env, log_path=home.parent / f"server-{port}.log") as server:
        why = wait_http_ok(server, f"{url}/healthz")
        if why is not None:
            raise AssertionError(f"the server did not start: {why}")
        with Client(backend=HttpBackend(url, token=token)) as client:
            deployment = client.deployments.create(NAME, model=NAME, timeout=120)
            replica = deployment.replicas[0].url
            assert replica is not None
            pids = {"server": server.proc.pid, "replica": deployment.replicas[0].pid}
            progress(f"{'auth on' if auth else 'auth off'}: replica {replica}, gateway {url}")
            row = np.random.default_rng(0).standard_normal(64).astype(np.float32)
            lua = _lua(home / "post.lua", request_body(row).decode(), token)
            runs: dict[str, list[dict[str, Any]]] = {"direct": [], "gateway": []}
            for _ in range(rounds):
                for which, base in (("direct", replica), ("gateway", url)):
                    target = f"{base}/v2/models/{NAME}/infer"
                    runs[which].append(_wrk(wrk, target, lua, concurrency, seconds, pids))
                    run = runs[which][-1]
                    progress(
                        f"  {which}: {run['rps']:.0f} req/s; CPU per request: server "
                        f"{run['server_cpu_us_per_request']} us, replica "
                        f"{run['replica_cpu_us_per_request']} us"
                    )
            client.deployments.stop(NAME)
    direct = statistics.median(r["rps"] for r in runs["direct"])
    gateway = statistics.median(r["rps"] for r in runs["gateway"])
    server_cpu = [r["server_cpu_us_per_request"] for r in runs["gateway"]]
    return {
        "direct_rps": direct,
        "gateway_rps": gateway,
        "ratio_gateway_to_direct": ratio(gateway, direct),
        "gateway_server_cpu_us_per_request": (
            statistics.median(server_cpu) if None not in server_cpu else None
        ),
        "runs": runs,
    }


def _wrk(
    wrk: str, url: str, lua: Path, concurrency: int, seconds: float, pids: dict[str, int | None]
) -> dict[str, Any]:
    import subprocess

    argv = [wrk, "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--latency", "-s", str(lua), url]
    # the server's main thread only (its reconciler and scheduler threads tick on their own)
    stats = {"server": _task_stat(pids["server"], main_thread=True),
             "replica": _task_stat(pids["replica"], main_thread=False)}  # fmt: skip
    before = {k: _cpu_s(v) for k, v in stats.items()}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    used = {k: _minus(_cpu_s(v), before[k]) for k, v in stats.items()}
    if done.returncode != 0:
        raise AssertionError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    measured = parse_wrk(done.stdout)
    if measured["non_2xx"] or measured["socket_errors"]:
        raise AssertionError(f"errors under load against {url}:\n{done.stdout}")
    n = measured.get("requests") or 0
    for key, seconds_used in used.items():
        per = round(seconds_used * 1e6 / n) if seconds_used is not None and n else None
        measured[f"{key}_cpu_us_per_request"] = per
    return measured


def _task_stat(pid: int | None, *, main_thread: bool) -> Path | None:
    if pid is None:
        return None
    path = Path(f"/proc/{pid}/task/{pid}/stat" if main_thread else f"/proc/{pid}/stat")
    return path if path.exists() else None


def _cpu_s(stat: Path | None) -> float | None:
    """User + system CPU seconds from a /proc stat file (None where there is none)."""
    if stat is None:
        return None
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _minus(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


def _lua(path: Path, body: str, token: str | None) -> Path:
    auth = f'wrk.headers["Authorization"] = "Bearer {token}"\n' if token else ""
    path.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"{auth}wrk.body = {json.dumps(body)}\n"
    )
    return path


if __name__ == "__main__":
    sys.exit(main())
