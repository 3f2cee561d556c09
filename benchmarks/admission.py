"""Submit-to-running latency and admission throughput of the pipeline (``compute.admission``).

All parts on an embedded home (SQLite) with a server URL set, submitting as a server's request
does (queue, wake the background pipeline, return) while one thread runs the pipeline as a
server's does (a step every 0.5 s, or at once when woken - by a submit, or by a step that
admitted jobs while others still wait):

- ``pipeline``: ``--jobs`` trivial jobs (default 1,000) against ``NullExecutor``, which starts
  nothing and reports each job finished at its next look: what the pipeline itself costs (the
  submit, the decision over every pending job, the writes, leases and audit events). Capacity:
  64 one-CPU slots, so jobs queue and finish while others are submitted. One process submits
  and steps, so jobs/s admitted here is bounded by how fast one thread submits.
- ``backlog``: the same ``--jobs`` queued first with no pipeline running (a burst, or a server
  coming back), then drained by the pipeline alone: jobs/s admitted by the pipeline itself.
- ``local``: ``--local-jobs`` jobs running ``true`` on the real local executor (a detached
  supervisor process and the job's process each; ``executor_latency.LOCAL_SLOTS`` slots), and
- ``ray``: ``--ray-jobs`` jobs through the Ray executor on a 3-node ``ray.cluster_utils.Cluster``
  started here (Ray Client, ``ray://127.0.0.1:PORT``; each job a placement group and an actor),
  both measured as ``executor_latency.run_part`` does: submit -> admitted (the decision),
  submit -> running (the executor's reference is stored), submit -> done.

Reported: submit latency, submit-to-running and submit-to-done p50/p99, jobs/s admitted.

Run: ``.venv/bin/python benchmarks/admission.py [--quick] [--jobs N] [--local-jobs N]
[--ray-jobs N] [--out F]`` (``benchmarks/run.py --only admission``). The local part is bounded
by process starts (a supervisor imports shipyard: ~0.5 s of CPU), so 1,000 jobs take minutes
on 2 cores; Ray's default is 200 jobs (each starts a Ray worker process, and the cluster
itself takes a while to start): see ``--ray-jobs``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import latency_summary, loadavg, machine, progress, write_result
from executor_latency import headline_of, local_part, ray_part
from sqlalchemy import func, select

from shipyard import wiring
from shipyard.compute import admission, jobs
from shipyard.compute.executors.base import (
    Executor,
    Launch,
    NodeInfo,
    Observation,
    StopReason,
)
from shipyard.compute.policy.base import Node
from shipyard.context import Context, open_context
from shipyard.domain.models import JobSpec, JobStatus
from shipyard.settings import Settings
from shipyard.store.tables import JobRow

NAME = "admission"
SLOTS = 64
LAUNCHED: dict[str, float] = {}


class NullExecutor(Executor):
    """Starts nothing; a launched job is finished at the next look."""

    name = "null"

    def __init__(self, url: str, settings: Settings) -> None:
        self.settings = settings

    def nodes(self) -> list[NodeInfo]:
        return [NodeInfo(node=Node(id="n0", cpus=float(SLOTS), memory_mb=SLOTS * 1024))]

    def launch(self, ctx: Any, launch: Launch) -> dict[str, Any]:
        LAUNCHED[launch.job_id] = time.perf_counter()
        return {"at": LAUNCHED[launch.job_id]}

    def observe(self, ctx: Any, refs: Mapping[str, Mapping[str, Any]]) -> dict[str, Observation]:
        return {
            job_id: Observation(
                job_id=job_id, state="finished", status=JobStatus.SUCCEEDED, exit_code=0
            )
            for job_id in refs
        }

    def stop(
        self, ctx: Any, job_id: str, ref: Mapping[str, Any], *, reason: StopReason, grace_s: float
    ) -> None:
        pass

    def read_logs(
        self, ctx: Any, job_id: str, ref: Mapping[str, Any] | None, *, offset: int, limit: int
    ) -> tuple[bytes, int]:
        return b"", 0


class Pipeline:
    """The server's background thread: a step every 0.5 s, or at once when woken."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.stop_flag = threading.Event()
        self.steps: list[float] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop_flag.is_set():
            started = time.perf_counter()
            admission.step(self.ctx)
            self.steps.append(time.perf_counter() - started)
            admission.WAKE.wait(admission.STEP_INTERVAL_S)
            admission.WAKE.clear()

    def __enter__(self) -> Pipeline:
        admission.background(True)
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop_flag.set()
        admission.WAKE.set()
        self.thread.join(60)
        admission.background(False)


def unfinished(ctx: Context) -> int:
    """QUEUED + RUNNING jobs: one COUNT, so the benchmark's own polling stays out of the figures
    (a ``list_jobs`` of 1,000 rows every 0.2 s would compete with the pipeline for the GIL)."""
    with ctx.db.read() as s:
        return int(
            s.scalar(
                select(func.count())
                .select_from(JobRow)
                .where(JobRow.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]))
            )
            or 0
        )


def wait_all_done(ctx: Context, *, timeout_s: float = 1800.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and unfinished(ctx):
        time.sleep(0.05)


def run_part(ctx: Context, n: int, spec: JobSpec, *, started_of: Any) -> dict[str, Any]:
    submitted: dict[str, float] = {}
    submit_s: list[float] = []
    with Pipeline(ctx) as pipeline:
        began = time.perf_counter()
        for _ in range(n):
            t0 = time.perf_counter()
            job = jobs.submit_job(ctx, project="bench", spec=spec)
            submit_s.append(time.perf_counter() - t0)
            submitted[job.id] = t0
        submitted_all = time.perf_counter()
        wait_all_done(ctx)
        done_all = time.perf_counter()
        steps = list(pipeline.steps)
    finished = {j.id: j for j in jobs.list_jobs(ctx, project="bench")}
    statuses: dict[str, int] = {}
    for job in finished.values():
        statuses[job.status.value] = statuses.get(job.status.value, 0) + 1
    to_running = [started_of(job_id) - t0 for job_id, t0 in submitted.items() if started_of(job_id)]
    launched = [started_of(job_id) for job_id in submitted if started_of(job_id)]
    last = max(launched) if launched else done_all
    to_done = []
    for job_id in submitted:
        ended = finished[job_id].finished_at
        if ended is not None:
            to_done.append(ended.timestamp() - finished[job_id].created_at.timestamp())
    return {
        "jobs": n,
        "statuses": statuses,
        "submit": latency_summary(submit_s),
        "submitted_per_s": round(n / (submitted_all - began), 1),
        "submit_to_running": latency_summary(to_running),
        "submit_to_done": latency_summary(to_done),
        "admitted_per_s": round(len(launched) / max(last - began, 1e-9), 1),
        "done_per_s": round(n / (done_all - began), 1),
        "steps": len(steps),
        "step": latency_summary(steps),
    }


def run_backlog(ctx: Context, n: int, spec: JobSpec) -> dict[str, Any]:
    """``n`` jobs queued while no pipeline runs (a burst, or a server coming back), then the
    pipeline drains them: jobs/s admitted by the pipeline alone, with no submits competing for
    the database or the GIL. Admitted = launched (the null executor's ``launch`` was called)."""
    admission.background(True)  # a server's submit: queue and wake, no inline step
    try:
        ids = [jobs.submit_job(ctx, project="backlog", spec=spec).id for _ in range(n)]
    finally:
        admission.background(False)
    with Pipeline(ctx) as pipeline:
        began = time.perf_counter()
        wait_all_done(ctx)
        done_all = time.perf_counter()
        steps = list(pipeline.steps)
    launched = [LAUNCHED[job_id] for job_id in ids if job_id in LAUNCHED]
    last = max(launched) if launched else done_all
    return {
        "jobs": n,
        "launched": len(launched),
        "admitted_per_s": round(len(launched) / max(last - began, 1e-9), 1),
        "done_per_s": round(n / max(done_all - began, 1e-9), 1),
        "drain_s": round(done_all - began, 2),
        "steps": len(steps),
        "step": latency_summary(steps),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--jobs", type=int, default=None, help="null-executor jobs (1000)")
    parser.add_argument("--local-jobs", type=int, default=None, help="local jobs (1000)")
    parser.add_argument("--ray-jobs", type=int, default=None, help="Ray jobs (200; 0: skip)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    n = args.jobs or (200 if args.quick else 1000)
    n_local = args.local_jobs if args.local_jobs is not None else (20 if args.quick else 1000)
    n_ray = args.ray_jobs if args.ray_jobs is not None else (20 if args.quick else 200)
    wiring.EXECUTORS["null"] = f"{__name__}:NullExecutor"
    load_before = loadavg()
    with tempfile.TemporaryDirectory(prefix="shipyard-bench-admission-") as tmp:
        base = Settings(home=Path(tmp) / "home", server_url="http://127.0.0.1:1")
        spec = JobSpec(command=["true"])
        progress(f"pipeline: {n} jobs against the null executor ({SLOTS} slots)")
        null_ctx = open_context(dataclasses.replace(base, executor="null"), actor="bench")
        pipeline = run_part(null_ctx, n, spec, started_of=LAUNCHED.get)
        progress(f"backlog: {n} jobs queued first, then drained by the pipeline alone")
        backlog_ctx = open_context(
            dataclasses.replace(base, home=Path(tmp) / "backlog", executor="null"), actor="bench"
        )
        backlog = run_backlog(backlog_ctx, n, spec)
        wiring.close_executors()
        local = local_part(Path(tmp) / "local", n_local) if n_local else None
        ray = ray_part(Path(tmp) / "ray", n_ray) if n_ray else None
    headline: list[dict[str, Any]] = [
        {
            "name": "submit p50 (null executor)",
            "value": pipeline["submit"]["p50_ms"],
            "unit": "ms",
            "detail": f"{n} jobs; SQLite; submit = QUEUED row + run, wakes the pipeline",
        },
        {
            "name": "submit-to-running p50 (null)",
            "value": pipeline["submit_to_running"]["p50_ms"],
            "unit": "ms",
        },
        {
            "name": "submit-to-running p99 (null)",
            "value": pipeline["submit_to_running"]["p99_ms"],
            "unit": "ms",
        },
        {
            "name": "jobs/s admitted (null)",
            "value": pipeline["admitted_per_s"],
            "unit": "jobs/s",
            "detail": f"while one thread submits ({pipeline['submitted_per_s']} jobs/s)",
        },
        {"name": "jobs/s through (null)", "value": pipeline["done_per_s"], "unit": "jobs/s"},
        {
            "name": "jobs/s admitted, backlog (null)",
            "value": backlog["admitted_per_s"],
            "unit": "jobs/s",
            "detail": f"{n} jobs queued first, then drained by the pipeline alone",
        },
    ]
    if local is not None:
        headline += headline_of("local", local)
    if n_ray and ray is None:
        headline.append({"name": "ray", "skipped": "ray is not installed (shipyard[ray])"})
    elif ray is not None:
        headline += headline_of("ray", ray)
    result = {
        "name": NAME,
        "machine": machine(),
        "loadavg_before": load_before,
        "pipeline_null_executor": pipeline,
        "backlog_null_executor": backlog,
        "local_executor": local,
        "ray_executor": ray,
        "headline": headline,
    }
    write_result(NAME, result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
