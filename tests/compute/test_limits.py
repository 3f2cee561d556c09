"""Resource requests are enforced (issue 5, item 8): memory, CPU affinity, CPU time of every
descendant, and what applied is on the job. Real supervisors and real job processes."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from shipyard.compute import jobs
from shipyard.compute.limits import as_limit_mb, plan_limits, release
from shipyard.context import Context
from shipyard.domain.models import Job, JobStatus, Resources
from tests.compute.conftest import python_job

ALLOCATE_1_5_GB = (
    "import sys\nprint('allocating', flush=True)\nblock = bytearray(1536 * 1024 * 1024)\n"
    "block[::4096] = b'x' * len(block[::4096])\nprint('allocated 1.5 GB')\n"
)


def run(ctx: Context, code: str, timeout: float = 60, **fields: Any) -> Job:
    job = jobs.submit_job(ctx, project="p", spec=python_job(code, **fields))
    return jobs.wait_job(ctx, job_id=job.id, timeout=timeout)


def output(ctx: Context, job_id: str) -> str:
    return jobs.read_logs(ctx, job_id=job_id)[0].decode()


def test_a_64_mb_job_that_allocates_1_5_gb_fails_saying_it_exceeded_its_limit(
    cctx: Context,
) -> None:
    job = run(cctx, ALLOCATE_1_5_GB, resources=Resources(memory_mb=64))
    assert job.status is JobStatus.FAILED, (job.status, job.message)
    assert "exceeded its memory limit of 64 MB" in job.message, job.message
    assert "allocated 1.5 GB" not in output(cctx, job.id)
    assert job.usage.peak_memory_mb < 1024  # it never got the memory
    assert job.enforcement.startswith(("cgroup v2", "rlimit")), job.enforcement


def test_a_job_within_its_memory_runs_and_says_how_it_was_limited(cctx: Context) -> None:
    # threads reserve address space far beyond what they touch: a job within its memory runs
    code = (
        "import threading\nts = [threading.Thread(target=lambda: bytearray(1 << 20)) "
        "for _ in range(8)]\n[t.start() for t in ts]\n[t.join() for t in ts]\n"
        "print(len(bytearray(16 * 1024 * 1024)))"
    )
    job = run(cctx, code, resources=Resources(memory_mb=256))
    assert job.status is JobStatus.SUCCEEDED, job.message
    assert "256 MB" in job.enforcement and "affinity: 1 of" in job.enforcement
    assert jobs.get_job(cctx, job_id=job.id).enforcement == job.enforcement  # stored


def test_a_job_that_holds_more_than_its_memory_is_stopped_saying_so(cctx: Context) -> None:
    code = "import time\nblock = bytearray(b'x') * (300 * 1024 * 1024)\ntime.sleep(60)\n"
    job = run(cctx, code, resources=Resources(memory_mb=100))
    assert job.status is JobStatus.FAILED, job.message
    assert "exceeded its memory limit of 100 MB" in job.message, job.message


def test_processes_that_together_hold_more_than_the_limit_are_stopped(cctx: Context) -> None:
    # Each process stays under its own RLIMIT_AS; together they hold more than the job asked for.
    code = (
        "import multiprocessing as mp, time\n"
        "def hold():\n"
        "    block = bytearray(b'x') * (110 * 1024 * 1024)\n"
        "    time.sleep(60)\n"
        "if __name__ == '__main__':\n"
        "    mp.set_start_method('fork')\n"
        "    ps = [mp.Process(target=hold) for _ in range(2)]\n"
        "    [p.start() for p in ps]\n"
        "    [p.join() for p in ps]\n"
    )
    job = run(cctx, code, resources=Resources(memory_mb=200))
    assert job.status is JobStatus.FAILED, job.message
    assert "exceeded its memory limit of 200 MB" in job.message
    assert "resident" in job.message


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to narrow")
def test_a_job_sees_only_ceil_cpus_cores(cctx: Context) -> None:
    code = "import os, json; print(json.dumps(sorted(os.sched_getaffinity(0))))"
    ours = os.sched_getaffinity(0)
    for cpus in (0.5, 1.0):
        job = run(cctx, code, resources=Resources(cpus=cpus))
        assert job.status is JobStatus.SUCCEEDED, job.message
        seen = json.loads(output(cctx, job.id).strip().splitlines()[-1])
        assert len(seen) == math.ceil(cpus) and set(seen) <= ours


def test_cpu_time_counts_multiprocessing_children_the_leader_did_not_wait_for(
    cctx: Context,
) -> None:
    """The leader exits without joining its children; they burn CPU until the supervisor stops
    them (SIGTERM), and say how much they used. All of it is the job's."""
    code = (
        "import multiprocessing as mp, os, signal, sys, time\n"
        "def burn(ready):\n"
        "    def stop(*_):\n"
        "        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a 2nd SIGTERM: no 2nd line\n"
        "        os.write(1, f'child cpu {time.process_time()}\\n'.encode())  # one write\n"
        "        os._exit(0)\n"
        "    signal.signal(signal.SIGTERM, stop)\n"
        "    while time.process_time() < 0.3:\n"
        "        pass\n"
        "    ready.set()\n"
        "    while True:\n"
        "        pass\n"
        "if __name__ == '__main__':\n"
        "    mp.set_start_method('fork')\n"
        "    events = [mp.Event() for _ in range(2)]\n"
        "    for e in events:\n"
        "        mp.Process(target=burn, args=(e,)).start()\n"
        "    for e in events:\n"
        "        e.wait()\n"
        "    time.sleep(0.5)\n"
        "    os._exit(0)  # no join, no atexit: the children are orphans now\n"
    )
    job = run(cctx, code, resources=Resources(cpus=2))
    assert job.status is JobStatus.SUCCEEDED, job.message
    reported = [
        float(line.split()[-1])
        for line in output(cctx, job.id).splitlines()
        if line.startswith("child cpu")
    ]
    assert len(reported) == 2, output(cctx, job.id)
    assert sum(reported) > 0.5
    assert job.usage.cpu_seconds >= sum(reported), (job.usage, reported)


def test_cpu_time_counts_joined_multiprocessing_children(cctx: Context) -> None:
    code = (
        "import multiprocessing as mp, time\n"
        "def burn(q):\n"
        "    t = time.process_time()\n"
        "    while time.process_time() - t < 0.5:\n"
        "        pass\n"
        "    q.put(time.process_time())\n"
        "if __name__ == '__main__':\n"
        "    q = mp.Queue()\n"
        "    ps = [mp.Process(target=burn, args=(q,)) for _ in range(2)]\n"
        "    [p.start() for p in ps]\n"
        "    got = [q.get() for _ in ps]\n"
        "    [p.join() for p in ps]\n"
        "    print('children', sum(got))\n"
    )
    job = run(cctx, code, resources=Resources(cpus=2))
    assert job.status is JobStatus.SUCCEEDED, job.message
    children = float(output(cctx, job.id).split()[-1])
    assert job.usage.cpu_seconds >= children


# --- the plan -----------------------------------------------------------------------------------


def test_without_cgroup_v2_memory_falls_back_to_rlimit_as(tmp_path: Path) -> None:
    v1 = tmp_path / "cgroup"  # a hierarchy without cgroup.controllers, like cgroup v1 or hybrid
    v1.mkdir()
    limits = plan_limits(job_id="abc", cpus=1.5, memory_mb=64, gpus=0, cgroups=v1)
    # address space is not memory: the bound has headroom, the supervisor watches the rest
    assert limits.cgroup is None and limits.rlimit_as == (64 + 1024) * 1024 * 1024
    assert limits.cores is not None and len(limits.cores) == min(2, len(os.sched_getaffinity(0)))
    assert limits.description.startswith("rlimit: RLIMIT_AS 1088 MB of address space for 64 MB")
    assert as_limit_mb(4096) == 8192
    assert not list(v1.iterdir())  # nothing was created there


def test_gpu_jobs_get_no_address_space_limit(tmp_path: Path) -> None:
    # CUDA reserves far more address space than it uses: RLIMIT_AS would break it.
    limits = plan_limits(job_id="abc", cpus=1, memory_mb=64, gpus=1, cgroups=tmp_path)
    assert limits.rlimit_as is None
    assert "RLIMIT_AS would break CUDA" in limits.description


def test_cgroup_v2_limits_when_this_machine_allows_them() -> None:
    limits = plan_limits(job_id="probe-limits", cpus=0.5, memory_mb=64, gpus=0)
    if limits.cgroup is None:
        pytest.skip(f"no usable cgroup v2 here: {limits.description}")
    try:
        assert (limits.cgroup / "memory.max").read_text().strip() == str(64 * 1024 * 1024)
        assert (limits.cgroup / "cpu.max").read_text().split() == ["50000", "100000"]
        assert limits.rlimit_as is None and limits.description.startswith("cgroup v2")
    finally:
        release(limits)
    assert not limits.cgroup.exists()
