"""A Ray node killed mid-job (``cluster.remove_node``): its job fails naming the node, a
preemptible one is requeued. This file sorts first in the folder on purpose: on this 2-core
machine a node added after the contract and DDP tests was declared dead by GCS before its first
job printed, in three runs out of three (the cause is not known yet: the session cluster's state
after those tests, not the executor's handling of a dead node); run first, it passed every time."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil

from shipyard import wiring
from shipyard.compute import jobs
from shipyard.context import open_context
from shipyard.domain.models import JobSpec, JobStatus, Resources
from shipyard.settings import Settings
from shipyard.store.engine import forget_database
from shipyard.store.tables import JobRow
from tests.compute.executors.test_ray import _drive, _log
from tests.conftest import wait_for


def test_jobs_on_a_node_that_dies_fail_naming_it_or_are_requeued(
    ray_cluster: Any, ray_executor: Any, home: Path
) -> None:
    """The node is killed (its raylet and workers, as a machine that goes away) mid-job: its
    job fails naming the node; a preemptible one goes back to the queue for another attempt."""
    node = ray_cluster.add_node(num_cpus=2, num_gpus=2, resources={"accelerator_type:T4": 1.0})
    ctx = open_context(Settings(home=home, executor=ray_executor.url), actor="tester")
    try:
        code = "import os, time; print('pid', os.getpid(), flush=True); time.sleep(120)"
        resources = Resources(cpus=0.5, gpus=1, gpu_type="T4")
        plain, preemptible = (
            jobs.submit_job(
                ctx,
                project="p",
                spec=JobSpec(
                    command=[sys.executable, "-c", code], resources=resources, preemptible=pre
                ),
            )
            for pre in (False, True)
        )
        for job in (plain, preemptible):
            _drive(ctx, job.id, lambda j: "pid" in _log(ctx, j.id))
        pid = int(_log(ctx, plain.id).split()[1])
        node_id = node.node_id
        with ctx.db.read() as s:
            row = s.get(JobRow, plain.id)
            assert row is not None and row.executor_ref["nodes"] == [node_id]
        ray_cluster.cluster.remove_node(node, allow_graceful=False)
        plain = _drive(ctx, plain.id, lambda j: j.status.finished)
        assert plain.status is JobStatus.FAILED
        assert node_id in plain.message and "lost" in plain.message, plain.message
        # requeued for attempt 2 (not failed) - which then finds no T4 left: unschedulable
        preemptible = _drive(ctx, preemptible.id, lambda j: j.attempt == 2)
        assert preemptible.preemptions == 0  # lost, not preempted
        assert node_id in preemptible.message or "no node has one" in preemptible.message, (
            preemptible.message
        )
        wait_for(lambda: not psutil.pid_exists(pid), timeout=30, what="the job's process to end")
    finally:
        for job in jobs.list_jobs(ctx):
            if not job.status.finished:
                jobs.cancel_job(ctx, job_id=job.id)
            # the dead node's folders (on a real cluster: that machine's disk)
            for leftover in Path(tempfile.gettempdir()).glob(f"shipyard-ray-*/{job.id}-*"):
                shutil.rmtree(leftover, ignore_errors=True)
        wiring.close_executors()
        forget_database(ctx.settings.database_url)
