"""Helpers shared by the benchmark scripts: machine notes, JSON output, ports, subprocesses.

Not a benchmark itself (the runner skips modules whose name starts with ``_``).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

_PACKAGES = (
    "shipyard",
    "mlflow-skinny",
    "mlflow",
    "onnxruntime",
    "onnx",
    "numpy",
    "sqlalchemy",
    "fastapi",
    "uvicorn",
    "httpx",
    "pydantic",
)

# Environment variables that would change what the SDK or a child process talks to.
SHIPYARD_ENV = (
    "SHIPYARD_URL",
    "SHIPYARD_TOKEN",
    "SHIPYARD_RUN_ID",
    "SHIPYARD_JOB_ID",
    "SHIPYARD_DB",
    "SHIPYARD_BLOBS",
    "SHIPYARD_AUTH",
    "SHIPYARD_PROJECT",
)


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def machine() -> dict[str, Any]:
    """What a reader needs to judge the numbers: cores, load, versions, commit."""
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str] = {}
    for name in _PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg": loadavg(),
        "packages": versions,
        "git": _git(),
    }


def loadavg() -> list[float] | None:
    """1, 5 and 15-minute load averages (other work on the machine skews every figure)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _git() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {}


def write_result(name: str, result: dict[str, Any], out: Path | None = None) -> Path:
    path = out or RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    progress(f"wrote {path}")
    return path


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def latency_summary(latencies_s: list[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean in milliseconds."""
    arr = np.asarray(latencies_s, dtype=np.float64) * 1000.0
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {
        "p50_ms": round(float(p50), 3),
        "p90_ms": round(float(p90), 3),
        "p99_ms": round(float(p99), 3),
        "max_ms": round(float(arr.max()), 3),
        "mean_ms": round(float(arr.mean()), 3),
    }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SHIPYARD_ENV}
    env.update(extra)
    return env


class ChildProcess:
    """A subprocess in its own session, logging to a file, stopped (SIGTERM, then SIGKILL)."""

    def __init__(self, argv: list[str], *, env: dict[str, str], log_path: Path) -> None:
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, grace: float = 10.0) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()


@contextlib.contextmanager
def child(argv: list[str], *, env: dict[str, str], log_path: Path) -> Iterator[ChildProcess]:
    proc = ChildProcess(argv, env=env, log_path=log_path)
    try:
        yield proc
    finally:
        proc.stop()


def wait_http_ok(proc: ChildProcess, url: str, *, timeout: float = 60.0) -> str | None:
    """Poll ``url`` until it answers 200; returns None when up, else why not."""
    import httpx

    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():
            return f"process exited with status {proc.proc.returncode}: {proc.log_tail()}"
        try:
            response = httpx.get(url, timeout=2.0)
            if response.status_code == 200:
                return None
            last = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as exc:
            last = str(exc) or type(exc).__name__
        time.sleep(0.2)
    return f"not ready after {timeout:.0f}s ({last}); log tail: {proc.log_tail()}"


PYTHON = sys.executable


# --- peers in environments of their own ------------------------------------------------------

PEERS_DIR = BENCH_DIR
"""Where ``peer_python`` makes ``.venv-peers-NAME`` (each holds a ``.gitignore`` of ``*``)."""


def peer_python(name: str, requirements: list[str], *, timeout: float = 1200.0) -> Path | str:
    """The python of ``benchmarks/.venv-peers-NAME``, made and filled on first use.

    A peer (a serving framework shipyard is compared with) goes into an environment of its own,
    never into the one running the benchmark: installing it there would move packages that
    shipyard pins (e.g. Ray Serve brings protobuf 7, BentoML an older opentelemetry-api).
    ``requirements`` are pip specifiers; the environment is remade when they change. Returns
    the interpreter's path, or a string saying why there is none (the caller skips the peer).
    """
    where = PEERS_DIR / f".venv-peers-{name}"
    python = where / "bin" / "python"
    marker = where / ".ready"
    wanted = "\n".join(requirements) + "\n"
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    progress(f"  installing {name} into {where} ({' '.join(requirements)}); once, a few minutes")
    log = where / "install.log"
    try:
        if where.exists():
            shutil.rmtree(where)
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(where)], check=True, timeout=120,
                       capture_output=True)  # fmt: skip
        (where / ".gitignore").write_text("*\n")  # as `uv venv` does: git never sees it
        with open(log, "wb") as out:
            done = subprocess.run(
                [str(python), "-m", "pip", "install", "--disable-pip-version-check",
                 *requirements],
                stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False,
            )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        return f"could not make the environment {where}: {exc}"
    if done.returncode != 0:
        lines = log.read_text(errors="replace").splitlines()
        tail = "\n".join([line for line in lines if "is ignored" not in line][-5:])
        return f"pip install {' '.join(requirements)} failed ({done.returncode}; {log}): {tail}"
    marker.write_text(wanted)
    return python


def peer_versions(python: Path, names: list[str]) -> dict[str, str]:
    """Installed versions of ``names`` in another environment (what a reader needs)."""
    code = (
        "import json, sys\nfrom importlib import metadata\nout = {}\n"
        "for n in sys.argv[1:]:\n"
        "    try: out[n] = metadata.version(n)\n"
        "    except metadata.PackageNotFoundError: pass\n"
        "print(json.dumps(out))\n"
    )
    try:
        done = subprocess.run([str(python), "-c", code, *names], capture_output=True,
                              text=True, timeout=60, check=True)  # fmt: skip
        return dict(json.loads(done.stdout))
    except (OSError, subprocess.SubprocessError, ValueError):
        return {}


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of a process and all its live descendants.

    Serving frameworks split a request over processes (LitServe's API server and worker,
    BentoML's arbiter and worker, Ray's proxy, replica, raylet and GCS): all of it is the
    server's cost. A descendant that has exited no longer counts.
    """
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            times = proc.cpu_times()
            total += times.user + times.system
    return total
