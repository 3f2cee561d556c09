"""Preemption on the local executor, through the real pipeline: SIGTERM, grace, SIGKILL, requeue.

The machine is made small (``cpus=1``) so a high-priority job needs the capacity a preemptible
low-priority one holds.
"""

from __future__ import annotations

import json
from pathlib import Path

from shipyard.compute import jobs
from shipyard.compute.policy.base import MAX_PREEMPTIONS
from shipyard.context import Context
from shipyard.domain.models import Job, JobStatus, Resources
from shipyard.security.audit import list_events
from shipyard.store.tables import JobRow
from tests.compute.conftest import MakeCtx, gated, job_row, python_job
from tests.conftest import wait_for

# Notes its attempt, then runs until its gate exists (a later attempt: until then too).
VICTIM = """
import os, sys, time
out = os.environ["OUT"]
attempt = os.environ["SHIPYARD_ATTEMPT"]
with open(os.path.join(out, "attempts"), "a") as fh:
    fh.write(attempt + " ")
print("victim attempt", attempt, "running", flush=True)
while not os.path.exists(os.path.join(out, "gate")):
    time.sleep(0.02)
print("victim done", flush=True)
"""

# Ignores SIGTERM: only the SIGKILL after the grace period stops it.
STUBBORN = """
import os, signal, time
signal.signal(signal.SIGTERM, lambda *_: print("ignoring SIGTERM", flush=True))
open(os.path.join(os.environ["OUT"], "started"), "w").write(str(os.getpid()))
while True:
    time.sleep(0.02)
"""

ONE_CPU = Resources(cpus=1)


def get(ctx: Context, job_id: str) -> Job:
    return jobs.get_job(ctx, job_id=job_id)


def attempts(out: Path) -> list[str]:
    path = out / "attempts"
    return path.read_text().split() if path.exists() else []


def logs(ctx: Context, job_id: str) -> str:
    data, _, _ = jobs.read_logs(ctx, job_id=job_id)
    return data.decode()


def actions(ctx: Context, job_id: str) -> list[str]:
    with ctx.db.read() as s:
        return [e.action for e in list_events(s, limit=1000) if e.resource.endswith(job_id)]


def test_a_preemptible_job_is_requeued_for_a_higher_priority_one_and_later_succeeds(
    make_ctx: MakeCtx, tmp_path: Path
) -> None:
    ctx = make_ctx(cpus=1, preempt_grace_s=5.0)
    victim = jobs.submit_job(
        ctx,
        project="p",
        spec=python_job(
            VICTIM, env={"OUT": str(tmp_path)}, preemptible=True, priority=-100, resources=ONE_CPU
        ),
    )
    wait_for(lambda: attempts(tmp_path) == ["1"], what="the victim's first attempt to run")
    high_gate = tmp_path / "high-gate"
    high = jobs.submit_job(
        ctx, project="p", spec=python_job(gated(high_gate), priority=100, resources=ONE_CPU)
    )
    # the victim is stopped and requeued (not failed); the high one takes its CPU
    wait_for(
        lambda: get(ctx, high.id).status is JobStatus.RUNNING,
        timeout=30,
        what="the high-priority job to start",
    )
    stopped = get(ctx, victim.id)
    assert stopped.status is JobStatus.QUEUED, stopped.message
    assert stopped.attempt == 2 and stopped.preemptions == 1
    assert stopped.message.startswith("waiting:"), stopped.message
    assert "shipyard: attempt 1 preempted:" in logs(ctx, victim.id)
    assert "; requeued" in logs(ctx, victim.id)
    (tmp_path / "gate").touch()  # the next attempt runs to its end
    high_gate.touch()
    done = jobs.wait_job(ctx, job_id=victim.id, timeout=60)
    assert done.status is JobStatus.SUCCEEDED, done.message
    assert done.attempt == 2 and done.preemptions == 1
    assert done.run_id == victim.run_id  # the same run, every attempt
    assert attempts(tmp_path) == ["1", "2"]
    text = logs(ctx, victim.id)
    assert text.index("attempt 1 preempted") < text.index("shipyard: attempt 2 started")
    assert text.count("victim attempt") == 2 and "victim done" in text
    assert jobs.wait_job(ctx, job_id=high.id, timeout=30).status is JobStatus.SUCCEEDED
    assert "job.requeue" in actions(ctx, victim.id)


def test_cancel_during_preemption_cancels_and_never_requeues(
    make_ctx: MakeCtx, tmp_path: Path
) -> None:
    ctx = make_ctx(cpus=1, preempt_grace_s=3.0)
    victim = jobs.submit_job(
        ctx,
        project="p",
        spec=python_job(
            STUBBORN, env={"OUT": str(tmp_path)}, preemptible=True, priority=-100, resources=ONE_CPU
        ),
    )
    wait_for(lambda: (tmp_path / "started").exists(), what="the victim to start")
    high = jobs.submit_job(
        ctx, project="p", spec=python_job("print('high')", priority=100, resources=ONE_CPU)
    )
    wait_for(
        lambda: "ignoring SIGTERM" in logs(ctx, victim.id),
        timeout=30,
        what="the victim to get its SIGTERM",
    )
    assert job_row(ctx, victim.id).preempt_requested
    jobs.cancel_job(ctx, job_id=victim.id)  # within its grace period
    done = jobs.wait_job(ctx, job_id=victim.id, timeout=30)
    assert done.status is JobStatus.CANCELLED, done.message
    assert done.attempt == 1
    assert "job.requeue" not in actions(ctx, victim.id)
    assert "preempted" in done.message
    assert jobs.wait_job(ctx, job_id=high.id, timeout=30).status is JobStatus.SUCCEEDED


def test_after_max_preemptions_a_job_runs_to_its_end_unpreemptible(
    make_ctx: MakeCtx, tmp_path: Path
) -> None:
    ctx = make_ctx(cpus=1, preempt_grace_s=5.0)
    victim = jobs.submit_job(
        ctx,
        project="p",
        spec=python_job(
            VICTIM, env={"OUT": str(tmp_path)}, preemptible=True, priority=-100, resources=ONE_CPU
        ),
    )
    wait_for(lambda: attempts(tmp_path) == ["1"], what="the victim's first attempt to run")
    # As if it had been preempted twice already (each round costs two process starts; the first
    # test shows one): the next preemption is its last.
    with ctx.db.transaction() as s:
        row = s.get(JobRow, victim.id)
        assert row is not None
        row.preemptions = MAX_PREEMPTIONS - 1
    quick = python_job("print('high')", priority=100, resources=ONE_CPU)
    high = jobs.submit_job(ctx, project="p", spec=quick)
    assert jobs.wait_job(ctx, job_id=high.id, timeout=30).status is JobStatus.SUCCEEDED
    wait_for(lambda: attempts(tmp_path) == ["1", "2"], timeout=30, what="the second attempt")
    assert get(ctx, victim.id).preemptions == MAX_PREEMPTIONS
    last = jobs.submit_job(ctx, project="p", spec=quick)
    # no more preemptions: the high-priority job waits for the victim to end
    assert jobs.wait_job(ctx, job_id=last.id, timeout=1.5).status is JobStatus.QUEUED
    running = get(ctx, victim.id)
    assert running.status is JobStatus.RUNNING and not job_row(ctx, victim.id).preempt_requested
    assert running.attempt == 2
    (tmp_path / "gate").touch()
    done = jobs.wait_job(ctx, job_id=victim.id, timeout=30)
    assert done.status is JobStatus.SUCCEEDED, done.message
    assert done.attempt == 2 and done.preemptions == MAX_PREEMPTIONS
    assert jobs.wait_job(ctx, job_id=last.id, timeout=30).status is JobStatus.SUCCEEDED


FRACTION = """
import json, os, time
out = os.environ["OUT"]
env = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "SHIPYARD_GPU_FRACTION",
                                      "SHIPYARD_GPU_MEMORY_MB")}
with open(os.path.join(out, os.environ["SHIPYARD_JOB_ID"]), "w") as fh:
    json.dump(env, fh)
while not os.path.exists(os.path.join(out, "gate")):
    time.sleep(0.02)
"""


def test_two_half_gpu_jobs_share_device_0_and_a_third_waits(
    make_ctx: MakeCtx, tmp_path: Path
) -> None:
    ctx = make_ctx(cpus=4, gpus=1, gpu_memory_mb=16000)
    half = Resources(cpus=1, gpu_fraction=0.5, gpu_memory_mb=4000)
    spec = python_job(FRACTION, env={"OUT": str(tmp_path)}, resources=half)
    first, second, third = (jobs.submit_job(ctx, project="p", spec=spec) for _ in range(3))
    for job in (first, second):
        wait_for(lambda j=job: (tmp_path / j.id).exists(), timeout=30, what=f"{job.id} to run")
        env = json.loads((tmp_path / job.id).read_text())
        assert env == {
            "CUDA_VISIBLE_DEVICES": "0",
            "SHIPYARD_GPU_FRACTION": "0.5",
            "SHIPYARD_GPU_MEMORY_MB": "4000",
        }
        placed = get(ctx, job.id).placement
        assert placed[0]["gpus"] == [0] and placed[0]["gpu_share"] == 0.5
    waiting = get(ctx, third.id)
    assert waiting.status is JobStatus.QUEUED
    assert waiting.message.startswith("waiting:"), waiting.message
    (tmp_path / "gate").touch()
    for job in (first, second, third):
        assert jobs.wait_job(ctx, job_id=job.id, timeout=30).status is JobStatus.SUCCEEDED
