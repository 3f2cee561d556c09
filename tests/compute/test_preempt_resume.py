"""Preemption that does not lose work, end to end through the real scheduler and executor.

A preemptible low-priority training job (``resumable_train.py``) holds the machine's CPUs; a
high-priority job that needs them arrives. The first is SIGTERMed (its SDK flushes its metrics
and exits leaving the run running), requeued - not failed -, and once the capacity is back it
runs again as attempt 2 of the same job, on the same run: it resumes from its last checkpoint,
its metric steps continue, and it ends SUCCEEDED with the final loss of an uninterrupted run.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from shipyard.compute import jobs
from shipyard.domain.models import JobSpec, JobStatus, Resources, RunStatus
from shipyard.tracking import checkpoints, runs
from tests.compute import resumable_train
from tests.compute.conftest import MakeCtx
from tests.conftest import wait_for

SCRIPT = Path(__file__).with_name("resumable_train.py")


@pytest.mark.slow
def test_a_preempted_job_resumes_from_its_checkpoint_and_ends_the_same(
    make_ctx: MakeCtx,
) -> None:
    ctx = make_ctx(cpus=2)  # room for one 2-CPU job at a time
    low = jobs.submit_job(
        ctx,
        project="default",
        spec=JobSpec(
            command=[sys.executable, str(SCRIPT)],
            env={"STEP_S": "0.04", "FLUSH_S": "600", "SHIPYARD_SYSTEM_METRICS": "0"},
            resources=Resources(cpus=2),
            priority=-100,
            preemptible=True,
            name="resumable",
        ),
    )
    assert low.run_id is not None
    run_id = low.run_id

    def mid_way() -> bool:
        jobs.get_job(ctx, job_id=low.id)  # keeps the embedded home's pipeline moving
        latest = checkpoints.latest_checkpoint(ctx, run_id=run_id)
        return latest is not None and (latest.step or 0) >= 10

    wait_for(mid_way, timeout=60, what="the low-priority job's checkpoints")
    high = jobs.submit_job(
        ctx,
        project="default",
        spec=JobSpec(
            command=[sys.executable, "-c", "pass"],
            resources=Resources(cpus=2),
            priority=100,
            name="urgent",
        ),
    )
    urgent = jobs.wait_job(ctx, job_id=high.id, timeout=90)
    assert urgent.status == JobStatus.SUCCEEDED, urgent
    resumed = jobs.wait_job(ctx, job_id=low.id, timeout=90)
    log, _, _ = jobs.read_logs(ctx, job_id=low.id)
    text = log.decode(errors="replace")
    assert resumed.status == JobStatus.SUCCEEDED, (resumed, text)
    assert resumed.attempt == 2 and resumed.preemptions == 1, resumed
    assert "attempt 1 resumed from step 0" in text, text
    from_step = re.findall(r"attempt 2 resumed from step (\d+)", text)
    assert from_step and int(from_step[0]) >= 10, text  # not from scratch
    assert resumed.run_id == run_id
    history = runs.metric_history(ctx, run_id=run_id, key="loss")
    steps = [p.step for p in history]
    assert steps == list(range(len(steps))) and len(steps) >= 100  # none lost, none twice
    final = runs.metric_history(ctx, run_id=run_id, key="final_loss")
    assert [p.value for p in final] == [resumable_train.reference_final()]
    assert runs.get_run(ctx, run_id=run_id).status == RunStatus.FINISHED
    saved = checkpoints.list_checkpoints(ctx, run_id=run_id)
    assert {c.attempt for c in saved} == {1, 2}
