"""A Ray node killed mid-job (``cluster.remove_node``): its job fails naming the node, a
preemptible one is requeued - on a node added after the executor reconnected, as after a server
restart, which is what crashed Ray 2.60's raylet when bundles reserved ``accelerator_type:X``
(see ``ray._model_selector``; the "node declared dead" this test used to see when it ran after
the folder's other tests was that crash)."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil

from shipyard import wiring
from shipyard.compute import jobs
from shipyard.compute.executors import ray as ray_module
from shipyard.context import open_context
from shipyard.domain.models import JobSpec, JobStatus, Resources
from shipyard.settings import Settings
from shipyard.store.engine import forget_database
from shipyard.store.tables import JobRow
from tests.compute.executors.test_ray import _drive, _log
from tests.conftest import wait_for


def _ray_failures(node: Any) -> str:
    """The fatal lines Ray's processes logged (a raylet's failed check, a GCS verdict), so a
    node that died on its own says why."""
    found: list[str] = []
    for path in sorted(Path(node.get_logs_dir_path()).glob("*")):
        if path.suffix not in {".out", ".err", ".log"} or not path.is_file():
            continue
        for line in path.read_text(errors="replace").splitlines():
            if "Check failed" in line or "marked as dead" in line or "FATAL" in line:
                found.append(f"{path.name}: {line[:400]}")
    return "; ".join(found[-6:]) or "nothing fatal logged"


def test_jobs_on_a_node_that_dies_fail_naming_it_or_are_requeued(
    ray_cluster: Any, ray_executor: Any, home: Path
) -> None:
    """The node is killed (its raylet and workers, as a machine that goes away) mid-job: its
    job fails naming the node; a preemptible one goes back to the queue for another attempt."""
    # A second Ray Client connection, as a restarted server (or one that lost its connection)
    # makes: with the ``accelerator_type:T4`` resource in the bundles, Ray 2.60's raylet on the
    # node added next crashed on the second group ("Check failed:
    # IsCPUOrPlacementGroupCPUResource"), 3 runs of 3; the executor places by label instead.
    ray_module.disconnect()
    assert ray_executor.nodes()  # reconnected, its handles of the old connection dropped
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
            started = _drive(ctx, job.id, lambda j: "pid" in _log(ctx, j.id) or j.status.finished)
            assert not started.status.finished, (
                f"job {job.id} ended before the node was killed: {started.message!r}; "
                f"Ray's logs: {_ray_failures(node)}"
            )
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
