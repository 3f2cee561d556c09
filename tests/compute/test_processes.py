"""Process helpers: liveness across pid reuse, usage metering, stopping a job's processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil

from shipyard.compute.processes import (
    UsageMeter,
    children,
    create_time,
    descendants,
    job_processes,
    kill_job,
    process_alive,
)
from tests.compute.conftest import gone
from tests.conftest import wait_for

STUBBORN = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, '-c',
    'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'],
    start_new_session=True)
with open(sys.argv[1] + '.tmp', 'w') as fh:
    fh.write(str(child.pid))
os.rename(sys.argv[1] + '.tmp', sys.argv[1])
time.sleep(600)
"""


def spawn(code: str, *args: str, job_id: str = "job1") -> subprocess.Popen[bytes]:
    env = dict(os.environ, SHIPYARD_JOB_ID=job_id)
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, start_new_session=True)


def test_liveness_checks_the_start_time_not_just_the_pid() -> None:
    me = os.getpid()
    started = create_time()
    assert started is not None
    assert process_alive(me, started)
    assert process_alive(me, None)
    assert not process_alive(me, started - 100)  # same pid, another process: reused
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not process_alive(proc.pid, None)


def test_a_zombie_counts_as_dead() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    wait_for(
        lambda: psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE,
        what="the child to exit unreaped",
    )
    assert not process_alive(proc.pid, None)
    proc.wait()


def test_kill_job_stops_processes_that_ignore_sigterm_and_left_the_group(tmp_path: Path) -> None:
    marker = tmp_path / "child"
    proc = spawn(STUBBORN, str(marker))
    child = int(wait_for(lambda: marker.exists() and marker.read_text(), what="the child pid"))
    assert {p.pid for p in job_processes("job1", proc.pid)} >= {proc.pid, child}
    assert job_processes("another-job", proc.pid) == []
    assert kill_job("job1", proc.pid, grace=0.3) >= 2
    proc.wait(timeout=10)
    assert proc.returncode < 0
    wait_for(lambda: gone(child), timeout=10, what="the escaped child to be killed")
    assert kill_job("job1", proc.pid, grace=0.3) == 0


def test_kill_job_leaves_other_jobs_alone(tmp_path: Path) -> None:
    mine = spawn("import time; time.sleep(600)", job_id="mine")
    other = spawn("import time; time.sleep(600)", job_id="other")
    try:
        wait_for(lambda: job_processes("other", other.pid), what="the other job to start")
        kill_job("mine", other.pid, grace=0.3)  # a wrong (reused) leader pid is not trusted
        kill_job("mine", mine.pid, grace=0.3)
        mine.wait(timeout=10)
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_usage_meter_sums_the_tree() -> None:
    code = (
        "import subprocess, sys, time\n"
        "data = b'x' * (64 * 1024 * 1024)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])\n"
        "time.sleep(30)\n"
    )
    proc = spawn(code)
    try:
        meter = UsageMeter()

        def grown() -> bool:
            meter.sample(proc.pid)
            return len(psutil.Process(proc.pid).children()) == 1 and meter.peak_memory_mb > 64

        wait_for(grown, what="the tree to grow")
        assert meter.samples > 0
        assert meter.cpu_seconds > 0
    finally:
        kill_job("job1", proc.pid, grace=0.3)
        proc.wait()


def test_descendants_from_proc_children_match_psutils_walk() -> None:
    """The watch's cheap walk (``/proc/PID/task/*/children``) finds the same tree as psutil's
    scan of every process, grandchildren and children of other threads included."""
    code = (
        "import subprocess, sys, threading, time\n"
        "subprocess.Popen([sys.executable, '-c', "
        '\'import subprocess, time; subprocess.Popen(["sleep", "30"]); time.sleep(30)\'])\n'
        "threading.Thread(target=lambda: subprocess.Popen(['sleep', '30'])).start()\n"
        "time.sleep(30)\n"
    )
    leader = subprocess.Popen([sys.executable, "-c", code])
    try:
        proc = psutil.Process(leader.pid)
        wait_for(lambda: len(proc.children(recursive=True)) == 3, what="three descendants")
        found = descendants(leader.pid)
        assert found is not None, "this kernel has /proc/PID/task/TID/children files"
        assert sorted(found) == sorted(p.pid for p in proc.children(recursive=True))
        assert children(os.getpid()) is not None and leader.pid in (children(os.getpid()) or [])
    finally:
        for member in psutil.Process(leader.pid).children(recursive=True):
            member.kill()
        leader.kill()
        leader.wait()
    assert descendants(leader.pid) is None  # gone: no answer rather than an empty tree
