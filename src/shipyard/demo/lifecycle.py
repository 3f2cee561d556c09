"""``shipyard demo``: one real journey through every plane, on whatever backend the client uses.

data -> job (scheduled, run as a subprocess, tracked) -> registered ONNX model with lineage ->
alias ``production`` -> endpoint (a replica process speaking OIP v2) -> predictions over HTTP ->
figures. Every step uses the public SDK, so the demo doubles as its example.
"""

from __future__ import annotations

import gc
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shipyard.client import Client
from shipyard.domain.models import (
    DatasetVersion,
    Deployment,
    DeploymentStatus,
    Job,
    JobStatus,
    ModelVersion,
    Run,
)
from shipyard.errors import BackendError, NotFoundError

TRAIN_SCRIPT = Path(__file__).with_name("train_digits.py")
DATASET = "digits"
MODEL = "digits"
ENDPOINT = "digits"


@dataclass
class DemoResult:
    dataset: DatasetVersion
    job: Job
    run: Run
    model: ModelVersion
    deployment: Deployment
    accuracy: float
    requests: int
    p50_ms: float
    p99_ms: float
    throughput_rps: float
    stopped: bool
    lineage: list[str] = field(default_factory=list)


class Reporter:
    """How the demo shows progress; the CLI passes a rich-backed one."""

    def step(self, title: str) -> None:
        print(f"\n==> {title}", flush=True)

    def info(self, text: str) -> None:
        print(f"    {text}", flush=True)

    def log_line(self, text: str) -> None:
        print(f"    | {text}", flush=True)

    def progress(self, done: int, total: int, what: str) -> None:
        pass


def run_demo(
    client: Client,
    *,
    workdir: Path,
    reporter: Reporter | None = None,
    epochs: int = 40,
    keep_endpoint: bool = False,
    concurrency: int = 8,
) -> DemoResult:
    rep = reporter or Reporter()
    workdir.mkdir(parents=True, exist_ok=True)

    rep.step("1/6 data: commit scikit-learn's digits as a dataset version")
    data_dir = write_digits(workdir / "data")
    dataset = client.datasets.commit(
        data_dir, name=DATASET, message="digits, 80/20 split", progress=rep.progress
    )
    profile = {t.path: t.rows for t in dataset.profile.tables}
    rep.info(
        f"dataset {DATASET} v{dataset.version}: {dataset.file_count} files, "
        f"{dataset.total_bytes} bytes ({dataset.new_bytes} new), rows {profile}"
    )
    rep.info(
        f"manifest {dataset.manifest_digest[:16]}... (BLAKE3); validation: "
        + ", ".join(f"{v.check}={'ok' if v.passed else 'FAILED'}" for v in dataset.validation)
    )

    rep.step("2/6 training: submit a PyTorch job through the scheduler")
    code_dir = workdir / "code"
    code_dir.mkdir(exist_ok=True)
    shutil.copy2(TRAIN_SCRIPT, code_dir / TRAIN_SCRIPT.name)
    run = client.backend.create_run(
        project=client.project,
        name=f"digits-mlp-{int(time.time())}",
        tags={"source": "shipyard demo"},
    )
    job = client.jobs.submit(
        [
            sys.executable,
            TRAIN_SCRIPT.name,
            "--dataset",
            DATASET,
            "--version",
            str(dataset.version),
            "--epochs",
            str(epochs),
        ],
        code_dir=code_dir,
        cpus=1,
        memory_mb=2048,
        max_runtime_s=900,
        name="train-digits",
        run_id=run.id,
    )
    rep.info(f"job {job.id} {job.status.value}; run {run.id}")
    job = follow_job(client, job.id, on_line=rep.log_line)
    if job.status != JobStatus.SUCCEEDED:
        raise BackendError(
            f"training job {job.id} ended {job.status.value}: {job.message}; "
            f"see 'shipyard jobs logs {job.id}'"
        )
    rep.info(
        f"job {job.id} succeeded in {job.usage.wall_seconds:.1f}s wall, "
        f"{job.usage.cpu_seconds:.1f} CPU-s, peak {job.usage.peak_memory_mb:.0f} MB"
    )
    run = client.runs.get(run.id)
    rep.info("run metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(run.metrics.items())))

    rep.step("3/6 registry: register the ONNX model and point 'production' at it")
    model = client.models.register(
        MODEL,
        run_id=run.id,
        artifact_path="model.onnx",
        description="MLP on scikit-learn digits, trained by the demo",
    )
    model = client.models.set_alias(MODEL, "production", model.version)
    sig = model.signature
    rep.info(
        f"model {MODEL} v{model.version} ({model.format}, {model.artifact_size} bytes), "
        f"aliases {model.aliases}"
    )
    rep.info(
        "signature: "
        + ", ".join(f"{t.name}:{t.datatype}{t.shape}" for t in sig.inputs)
        + " -> "
        + ", ".join(f"{t.name}:{t.datatype}{t.shape}" for t in sig.outputs)
    )
    lineage = describe_lineage(client, dataset, run, model)
    for line in lineage:
        rep.info(f"lineage: {line}")

    rep.step("4/6 serving: deploy MODEL@production as an OIP v2 endpoint")
    stop_if_running(client, ENDPOINT)
    deployment = client.deployments.create(ENDPOINT, model=MODEL, ref="production")
    rep.info(
        f"endpoint {ENDPOINT} {deployment.status.value} at {deployment.url} "
        f"(replica pid {deployment.pid})"
    )

    rep.step("5/6 inference: send the held-out test set over HTTP")
    x_test, y_test = read_split(data_dir / "test.parquet")
    assert deployment.url is not None
    stats = predict_over_http(
        deployment.url, ENDPOINT, sig.inputs[0].name, x_test, concurrency=concurrency
    )
    accuracy = float(np.mean(stats.predictions == y_test))
    rep.info(
        f"accuracy {accuracy:.4f} on {len(y_test)} held-out digits; {stats.requests} "
        f"requests, p50 {stats.p50_ms:.2f} ms, p99 {stats.p99_ms:.2f} ms, "
        f"{stats.throughput_rps:.0f} req/s with {concurrency} concurrent clients"
    )
    rep.info(f"replica metrics: {deployment.url}/metrics")

    stopped = False
    rep.step("6/6 wrap-up")
    if not keep_endpoint:
        client.deployments.stop(ENDPOINT)
        stopped = True
        rep.info(
            f"endpoint {ENDPOINT} stopped (start it again: shipyard deploy "
            f"{MODEL}@production --name {ENDPOINT})"
        )
    else:
        rep.info(
            f"endpoint {ENDPOINT} left running; stop it with: shipyard endpoints stop {ENDPOINT}"
        )
    return DemoResult(
        dataset=dataset,
        job=job,
        run=run,
        model=model,
        deployment=deployment,
        accuracy=accuracy,
        requests=stats.requests,
        p50_ms=stats.p50_ms,
        p99_ms=stats.p99_ms,
        throughput_rps=stats.throughput_rps,
        stopped=stopped,
        lineage=lineage,
    )


def write_digits(dest: Path, *, seed: int = 0) -> Path:
    """scikit-learn's bundled digits as train/test Parquet files (stratified 80/20)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.data.astype(np.float32)
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test_idx: list[int] = []
    for label in range(10):
        members = np.flatnonzero(y == label)
        test_idx.extend(rng.choice(members, size=len(members) // 5, replace=False).tolist())
    test_mask = np.zeros(len(y), dtype=bool)
    test_mask[test_idx] = True
    dest.mkdir(parents=True, exist_ok=True)
    for split, mask in (("train", ~test_mask), ("test", test_mask)):
        columns = {f"p{i}": pa.array(x[mask, i]) for i in range(x.shape[1])}
        columns["label"] = pa.array(y[mask])
        pq.write_table(pa.table(columns), dest / f"{split}.parquet")
    return dest


def read_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(path)
    x = np.column_stack([table.column(f"p{i}").to_numpy() for i in range(64)]).astype(np.float32)
    return x, table.column("label").to_numpy()


FOLLOW_POLL_S = 0.2
FOLLOW_QUIET_POLL_S = 1.0


def follow_job(
    client: Client,
    job_id: str,
    *,
    on_line: Callable[[str], None],
    timeout: float = 1800,
    project: str | None = None,
) -> Job:
    """Stream a job's log lines until it finishes; returns the finished job.

    Looks every 0.2 s while lines come, backing off to once a second while the log is quiet: a
    quiet long job's follower then costs a fraction of a percent of a core, not 1.5% (on a
    2-core machine that is throughput the job's own workers lose)."""
    offset = 0
    pending = ""
    quiet_s = FOLLOW_POLL_S
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data, offset, finished = client.jobs.logs(job_id, offset=offset, project=project)
        pending += data
        *lines, pending = pending.split("\n")
        for line in lines:
            on_line(line)
        if finished:
            if pending:
                on_line(pending)
            return client.jobs.get(job_id, project=project)
        if data:
            quiet_s = FOLLOW_POLL_S
        else:
            time.sleep(quiet_s)
            quiet_s = min(FOLLOW_QUIET_POLL_S, quiet_s * 1.5)
    raise BackendError(f"job {job_id} did not finish within {timeout:.0f}s")


def describe_lineage(
    client: Client, dataset: DatasetVersion, run: Run, model: ModelVersion
) -> list[str]:
    lines = []
    for edge in client.backend.lineage(kind="run", id=run.id, project=run.project):
        lines.append(
            f"{edge.source_kind}:{edge.source_id} -[{edge.relation}]-> "
            f"{edge.target_kind}:{edge.target_id}"
        )
    lines.append(
        f"(dataset {dataset.dataset} v{dataset.version} -> run {run.name} -> "
        f"model {model.model} v{model.version})"
    )
    return lines


def stop_if_running(client: Client, name: str) -> None:
    try:
        current = client.deployments.get(name)
    except NotFoundError:
        return
    if current.status in (DeploymentStatus.RUNNING, DeploymentStatus.STARTING):
        client.deployments.stop(name)


@dataclass
class LoadStats:
    predictions: np.ndarray
    requests: int
    p50_ms: float
    p99_ms: float
    throughput_rps: float


def predict_over_http(
    url: str, model: str, input_name: str, x: np.ndarray, *, concurrency: int = 8
) -> LoadStats:
    """One OIP v2 request per row from ``concurrency`` clients; predicted classes + latencies.

    Each client opens its keep-alive connection first (a readiness probe, not counted), so the
    figures measure serving rather than TCP set-up.
    """
    predictions = np.full(len(x), -1, dtype=np.int64)
    latencies: list[float] = []
    lock = threading.Lock()
    clients = [httpx.Client(base_url=url, timeout=30) for _ in range(concurrency)]

    def worker(k: int) -> None:
        http = clients[k]
        for i in range(k, len(x), concurrency):
            body = {
                "inputs": [
                    {
                        "name": input_name,
                        "shape": [1, x.shape[1]],
                        "datatype": "FP32",
                        "data": x[i].tolist(),
                    }
                ]
            }
            started = time.perf_counter()
            response = http.post(f"/v2/models/{model}/infer", json=body)
            elapsed = time.perf_counter() - started
            response.raise_for_status()
            logits = response.json()["outputs"][0]["data"]
            with lock:
                latencies.append(elapsed * 1000)
                predictions[i] = int(np.argmax(logits))

    gc.collect()
    gc.disable()  # the caller's heap is large (sklearn...): keep its GC pauses out of the timings
    try:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            list(pool.map(lambda c: c.get("/v2/health/ready").raise_for_status(), clients))
            started = time.perf_counter()
            list(pool.map(worker, range(concurrency)))
            wall = time.perf_counter() - started
    finally:
        gc.enable()
        for http in clients:
            http.close()
    latencies.sort()
    return LoadStats(
        predictions=predictions,
        requests=len(latencies),
        p50_ms=statistics.median(latencies),
        p99_ms=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        throughput_rps=len(latencies) / wall,
    )
