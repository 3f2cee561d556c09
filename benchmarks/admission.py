"""Submit-to-running latency and admission throughput of the pipeline (``compute.admission``).

Two parts, both on an embedded home (SQLite), submitting as a server's request does (queue, wake
the background pipeline, return) while one thread runs the pipeline as a server's does (a step
every 0.5 s, or at once when woken):

- ``pipeline``: ``--jobs`` trivial jobs (default 1,000) against ``NullExecutor``, which starts
  nothing and reports each job finished at its next look: what the pipeline itself costs (the
  submit, the decision over every pending job, the per-row writes and leases). Capacity: 64
  one-CPU slots, so jobs queue and finish while others are submitted.
- ``local``: ``--local-jobs`` jobs running ``true`` on the real local executor (a detached
  supervisor process and the job's process each); submit-to-running is until the supervisor is
  launched, submit-to-done until the job is SUCCEEDED.

Reported: submit latency, submit-to-running and submit-to-done p50/p99, and jobs/s admitted.

Run: ``.venv/bin/python benchmarks/admission.py [--quick] [--jobs N] [--local-jobs N] [--out F]``
(``benchmarks/run.py --only admission``).
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
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            left = len(jobs.list_jobs(ctx, status="queued")) + len(
                jobs.list_jobs(ctx, status="running")
            )
            if left == 0:
                break
            time.sleep(0.2)
        done_all = time.perf_counter()
        steps = list(pipeline.steps)
    finished = {j.id: j for j in jobs.list_jobs(ctx, project="bench")}
    statuses: dict[str, int] = {}
    for job in finished.values():
        statuses[job.status.value] = statuses.get(job.status.value, 0) + 1
    to_running = [started_of(job_id) - t0 for job_id, t0 in submitted.items() if started_of(job_id)]
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
        "done_per_s": round(n / (done_all - began), 1),
        "steps": len(steps),
        "step": latency_summary(steps),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--local-jobs", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    n = args.jobs or (200 if args.quick else 1000)
    n_local = args.local_jobs if args.local_jobs is not None else (20 if args.quick else 1000)
    wiring.EXECUTORS["null"] = f"{__name__}:NullExecutor"
    load_before = loadavg()
    with tempfile.TemporaryDirectory(prefix="shipyard-bench-admission-") as tmp:
        base = Settings(home=Path(tmp) / "home", server_url="http://127.0.0.1:1")
        spec = JobSpec(command=["true"])
        progress(f"pipeline: {n} jobs against the null executor ({SLOTS} slots)")
        null_ctx = open_context(dataclasses.replace(base, executor="null"), actor="bench")
        pipeline = run_part(null_ctx, n, spec, started_of=LAUNCHED.get)
        local: dict[str, Any] | None = None
        if n_local:
            progress(f"local: {n_local} jobs running `true` on the local executor")
            local_settings = dataclasses.replace(
                base, home=Path(tmp) / "local", executor="local", cpus=float(SLOTS), gpus=0
            )
            local_ctx = open_context(local_settings, actor="bench")

            def started(job_id: str) -> float | None:
                job = jobs.get_job(local_ctx, job_id=job_id)
                if job.started_at is None:
                    return None
                # wall-clock -> perf_counter offset, measured once per lookup
                return job.started_at.timestamp() - time.time() + time.perf_counter()

            local = run_part(local_ctx, n_local, spec, started_of=started)
    result = {
        "name": NAME,
        "machine": machine(),
        "loadavg_before": load_before,
        "pipeline_null_executor": pipeline,
        "local_executor": local,
        "headline": [
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
            {"name": "jobs/s through (null)", "value": pipeline["done_per_s"], "unit": "jobs/s"},
        ]
        + (
            [
                {
                    "name": "submit-to-running p50 (local)",
                    "value": local["submit_to_running"]["p50_ms"],
                    "unit": "ms",
                    "detail": f"{n_local} jobs running `true`",
                },
                {
                    "name": "submit-to-done p50 (local)",
                    "value": local["submit_to_done"]["p50_ms"],
                    "unit": "ms",
                },
                {"name": "jobs/s through (local)", "value": local["done_per_s"], "unit": "jobs/s"},
            ]
            if local
            else []
        ),
    }
    write_result(NAME, result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
