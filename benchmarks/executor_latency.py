"""Submit-to-running latency and jobs/s admitted, through the admission pipeline, on the local
executor and on a Ray cluster.

Both parts submit ``--jobs`` trivial jobs (``true``; default 1,000) as a server's request does
(a QUEUED row, a wake-up of the background pipeline) while one thread runs the pipeline as a
server's does (``admission.step`` every 0.5 s, or at once when woken), on an embedded home
(SQLite) with a server URL set (jobs get the served environment and a job token):

- ``local``: the local executor (a detached supervisor process and the job's process per job),
  12 one-CPU slots declared;
- ``ray``: the Ray executor against a ``ray.cluster_utils.Cluster`` started here (a head and two
  worker nodes, 4 declared CPUs each: 12 slots too, Ray Client on the head), the same kind of
  cluster the tests use; each job is a placement group and an actor (a Python process).

Per job: submit (the call), submit -> admitted (``started_at``, the pipeline's decision; with
more jobs than slots this is mostly the wait for a free slot), submit -> running and admitted ->
running (the executor's ``launch`` returned and its reference is stored: the executor's own
cost), submit -> done (SUCCEEDED). Reported: p50/p99 of each, jobs/s admitted (jobs over
the time from the first submit to the last admission) and jobs/s done.

Run: ``.venv/bin/python benchmarks/executor_latency.py [--quick] [--jobs N] [--ray-jobs N]
[--local-jobs N] [--out F]`` (``benchmarks/run.py --only executor``). Ray is the ``shipyard[ray]``
extra; without it the Ray part is reported as skipped.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import free_port, latency_summary, loadavg, machine, progress, write_result

from shipyard import wiring
from shipyard.compute import admission, jobs
from shipyard.context import Context, open_context
from shipyard.domain.models import JobSpec, Resources
from shipyard.settings import Settings
from shipyard.store.tables import JobRow

NAME = "executor_latency"
LOCAL_SLOTS = 12
RAY_CPUS_PER_NODE = 4
TIMEOUT_S = 3600.0
SPEC = JobSpec(command=["true"], resources=Resources(cpus=1, memory_mb=128))


class Pipeline:
    """The server's background thread: a step every 0.5 s, or at once when woken."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.stop_flag = threading.Event()
        self.steps: list[float] = []
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop_flag.is_set():
            started = time.perf_counter()
            try:
                admission.step(self.ctx)
            except Exception as exc:  # reported, and the pipeline goes on, as a server's does
                self.errors.append(repr(exc))
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
        self.thread.join(120)
        admission.background(False)


class Watcher:
    """Notes (wall clock, every 20 ms) when each job's executor reference first appears."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.launched: dict[str, float] = {}
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from sqlalchemy import select

        while not self.stop_flag.is_set():
            now = time.time()
            with self.ctx.db.read() as s:  # RUNNING only: the finished pile grows to 1,000
                rows = s.execute(
                    select(JobRow.id, JobRow.executor_ref).where(JobRow.status == "running")
                ).all()
            for job_id, ref in rows:  # a JSON column: "no reference" may be a JSON null
                if ref:
                    self.launched.setdefault(job_id, now)
            self.stop_flag.wait(0.02)

    def __enter__(self) -> Watcher:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop_flag.set()
        self.thread.join(10)


def unfinished(ctx: Context) -> int:
    """QUEUED + RUNNING jobs, one COUNT (a list of 1,000 jobs every 0.2 s would compete with
    the pipeline for the CPU)."""
    from sqlalchemy import func, select

    with ctx.db.read() as s:
        return int(
            s.scalar(
                select(func.count())
                .select_from(JobRow)
                .where(JobRow.status.in_(["queued", "running"]))
            )
            or 0
        )


def run_part(ctx: Context, n: int, spec: JobSpec) -> dict[str, Any]:
    submitted: dict[str, float] = {}  # wall clock
    submit_s: list[float] = []
    with Watcher(ctx) as watcher, Pipeline(ctx) as pipeline:
        began = time.time()
        for _ in range(n):
            t0 = time.time()
            job = jobs.submit_job(ctx, project="bench", spec=spec)
            submit_s.append(time.time() - t0)
            submitted[job.id] = t0
        submitted_all = time.time()
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline and unfinished(ctx):
            time.sleep(0.2)
        done_all = time.time()
        time.sleep(0.05)
        steps, errors = list(pipeline.steps), list(pipeline.errors)
    finished = {j.id: j for j in jobs.list_jobs(ctx, project="bench")}
    statuses: dict[str, int] = {}
    for job in finished.values():
        statuses[job.status.value] = statuses.get(job.status.value, 0) + 1
    admitted = {
        job_id: finished[job_id].started_at.timestamp()  # type: ignore[union-attr]
        for job_id in submitted
        if finished[job_id].started_at is not None
    }
    to_admitted = [admitted[j] - t0 for j, t0 in submitted.items() if j in admitted]
    to_running = [watcher.launched[j] - t0 for j, t0 in submitted.items() if j in watcher.launched]
    launch_s = [
        watcher.launched[j] - admitted[j]
        for j in submitted
        if j in watcher.launched and j in admitted
    ]
    to_done = [
        finished[j].finished_at.timestamp() - t0  # type: ignore[union-attr]
        for j, t0 in submitted.items()
        if finished[j].finished_at is not None
    ]
    last_admitted = max(admitted.values()) if admitted else done_all
    failed = [j.message for j in finished.values() if j.status.value != "succeeded"][:3]
    return {
        "jobs": n,
        "statuses": statuses,
        "failures": failed,
        "seen_running": len(watcher.launched),  # a job can start and end between two looks
        "submit": latency_summary(submit_s),
        "submitted_per_s": round(n / max(submitted_all - began, 1e-9), 1),
        "submit_to_admitted": latency_summary(to_admitted) if to_admitted else None,
        "submit_to_running": latency_summary(to_running) if to_running else None,
        "admitted_to_running": latency_summary(launch_s) if launch_s else None,
        "submit_to_done": latency_summary(to_done) if to_done else None,
        "admitted_per_s": round(len(admitted) / max(last_admitted - began, 1e-9), 2),
        "done_per_s": round(n / max(done_all - began, 1e-9), 2),
        "wall_s": round(done_all - began, 1),
        "steps": len(steps),
        "step": latency_summary(steps) if steps else None,
        "pipeline_errors": errors[:3],
    }


def start_ray_cluster() -> tuple[Any, str]:
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    port = free_port()
    common: dict[str, Any] = {"memory": 8 * 1024**3, "object_store_memory": 80 * 1024 * 1024}
    cluster = Cluster()
    cluster.add_node(
        num_cpus=RAY_CPUS_PER_NODE, include_dashboard=False, ray_client_server_port=port, **common
    )
    for _ in range(2):
        cluster.add_node(num_cpus=RAY_CPUS_PER_NODE, **common)
    cluster.wait_for_nodes()
    return cluster, f"ray://127.0.0.1:{port}"


def local_part(home: Path, n: int) -> dict[str, Any]:
    """``n`` jobs running ``true`` on the local executor, ``LOCAL_SLOTS`` one-CPU slots."""
    progress(f"local: {n} jobs running `true` ({LOCAL_SLOTS} one-CPU slots)")
    settings = Settings(
        home=home,
        server_url="http://127.0.0.1:1",
        executor="local",
        cpus=float(LOCAL_SLOTS),
        gpus=0,
    )
    ctx = open_context(settings, actor="bench")
    try:
        part = run_part(ctx, n, SPEC)
    finally:
        wiring.close_executors()
    part["slots"] = LOCAL_SLOTS
    return part


def ray_part(home: Path, n: int) -> dict[str, Any] | None:
    """``n`` jobs running ``true`` through the Ray executor on a 3-node ``Cluster`` started
    here (Ray Client); None when Ray is not installed."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return None
    progress("ray: starting a 3-node cluster")
    t0 = time.monotonic()
    cluster, url = start_ray_cluster()
    started_s = round(time.monotonic() - t0, 1)
    try:
        progress(f"ray: {n} jobs running `true` at {url}")
        ctx = open_context(
            Settings(home=home, server_url="http://127.0.0.1:1", executor=url), actor="bench"
        )
        wiring.open_executor(url, ctx.settings).nodes()  # connect before timing
        part = run_part(ctx, n, SPEC)
        part["cluster_start_s"] = started_s
        part["cluster"] = f"3 nodes x {RAY_CPUS_PER_NODE} declared CPUs"
        return part
    finally:
        wiring.close_executors()
        from shipyard.compute.executors import ray as ray_executor

        ray_executor.disconnect()
        cluster.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 jobs each")
    parser.add_argument("--jobs", type=int, default=None, help="jobs per executor (1000)")
    parser.add_argument("--local-jobs", type=int, default=None, help="override for local")
    parser.add_argument("--ray-jobs", type=int, default=None, help="override for Ray")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    n = args.jobs or (20 if args.quick else 1000)
    n_local = n if args.local_jobs is None else args.local_jobs
    n_ray = n if args.ray_jobs is None else args.ray_jobs
    load_before = loadavg()
    result: dict[str, Any] = {"name": NAME, "machine": machine(), "loadavg_before": load_before}
    headline: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="shipyard-bench-executor-") as tmp:
        if n_local:
            local = local_part(Path(tmp) / "local", n_local)
            result["local"] = local
            headline += headline_of("local", local)
        if n_ray:
            ray_result = ray_part(Path(tmp) / "ray", n_ray)
            result["ray"] = ray_result
            if ray_result is None:
                headline.append({"name": "ray", "skipped": "ray is not installed (shipyard[ray])"})
            else:
                headline += headline_of("ray", ray_result)
    result["headline"] = headline
    write_result(NAME, result, args.out)
    return 0


def headline_of(which: str, part: dict[str, Any]) -> list[dict[str, Any]]:
    running = part["submit_to_running"] or {}
    return [
        {
            "name": f"submit-to-running p50 ({which})",
            "value": running.get("p50_ms"),
            "unit": "ms",
            "detail": f"{part['jobs']} jobs running `true`; {part['statuses']}",
        },
        {"name": f"submit-to-running p99 ({which})", "value": running.get("p99_ms"), "unit": "ms"},
        {
            "name": f"admitted-to-running p50 ({which})",
            "value": (part["admitted_to_running"] or {}).get("p50_ms"),
            "unit": "ms",
        },
        {"name": f"jobs/s admitted ({which})", "value": part["admitted_per_s"], "unit": "jobs/s"},
        {"name": f"jobs/s done ({which})", "value": part["done_per_s"], "unit": "jobs/s"},
    ]


if __name__ == "__main__":
    sys.exit(main())
