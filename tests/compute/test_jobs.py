"""The jobs service end to end: real SQLite, real supervisors, real job processes."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

import psutil
import pytest
from sqlalchemy import select

from shipyard.compute import admission, jobs
from shipyard.compute.processes import process_alive
from shipyard.context import Context
from shipyard.domain.models import Job, JobSpec, JobStatus, Resources
from shipyard.errors import (
    InvalidInputError,
    InvalidStateError,
    NotFoundError,
    PayloadTooLargeError,
    ResourceUnavailableError,
)
from shipyard.security.audit import list_events, verify_chain
from shipyard.store.queries import project_id
from shipyard.store.tables import JobRow, RunRow
from tests.compute.conftest import MakeCtx, gated, gone, job_row, python_job
from tests.conftest import wait_for


def finished(ctx: Context, job_id: str, timeout: float = 30.0) -> Job:
    def done() -> Job | None:
        job = jobs.get_job(ctx, job_id=job_id)
        return job if job.status.finished else None

    return wait_for(done, timeout=timeout, what=f"job {job_id} to finish")


def status_of(ctx: Context, job_id: str) -> JobStatus:
    return jobs.get_job(ctx, job_id=job_id).status


def logs(ctx: Context, job_id: str) -> str:
    data, _, _ = jobs.read_logs(ctx, job_id=job_id)
    return data.decode()


def job_count(ctx: Context) -> int:
    with ctx.db.read() as s:
        return len(s.scalars(select(JobRow.id)).all())


def make_run(ctx: Context, project: str, run_id: str) -> None:
    with ctx.db.transaction() as s:
        s.add(
            RunRow(
                id=run_id,
                project_id=project_id(s, project, create=True),
                name="r",
                status="running",
                params={},
                tags={},
            )
        )


def on_record(ctx: Context, job_id: str) -> tuple[int, float, int]:
    """(supervisor pid, its start time, job pid) once the supervisor has recorded them."""

    def recorded() -> tuple[int, float, int] | None:
        ref = job_row(ctx, job_id).executor_ref or {}
        if ref.get("supervisor_pid") and ref.get("supervisor_started") and ref.get("pid"):
            return ref["supervisor_pid"], ref["supervisor_started"], ref["pid"]
        return None

    return wait_for(recorded, what=f"job {job_id}'s processes on record")


def run_status(ctx: Context, run_id: str) -> tuple[str, object]:
    with ctx.db.read() as s:
        run = s.get(RunRow, run_id)
        assert run is not None
        return run.status, run.finished_at


# --- a job's life -------------------------------------------------------------------------------


def test_a_job_that_prints_and_exits_0_succeeds_with_logs_and_usage(cctx: Context) -> None:
    code = "import sys; print('hello from the job'); print('to stderr', file=sys.stderr)"
    job = jobs.submit_job(cctx, project="p", spec=python_job(code, name="hello"))
    assert job.status in (JobStatus.QUEUED, JobStatus.RUNNING)
    assert job.name == "hello" and job.project == "p" and job.created_by == "tester"
    job = jobs.wait_job(cctx, job_id=job.id, timeout=30)
    assert job.status is JobStatus.SUCCEEDED, job.message
    assert job.exit_code == 0
    assert job.started_at is not None and job.finished_at is not None
    assert job.created_at <= job.started_at <= job.finished_at
    assert job.usage.wall_seconds > 0
    assert job.usage.peak_memory_mb > 0
    assert job.usage.cpu_seconds > 0
    text = logs(cctx, job.id)
    assert "hello from the job" in text and "to stderr" in text
    with cctx.db.read() as s:
        actions = [(e.action, e.resource) for e in list_events(s, limit=1000)]
        assert verify_chain(s) is None
    resource = f"project/p/job/{job.id}"
    assert [a for a, r in actions if r == resource] == ["job.submit", "job.start", "job.finish"]


def test_a_failing_job_fails_with_its_exit_code_and_the_end_of_its_log(cctx: Context) -> None:
    code = "import sys; print('loading'); print('boom: bad data'); sys.exit(3)"
    job = jobs.wait_job(
        cctx, job_id=jobs.submit_job(cctx, project="p", spec=python_job(code)).id, timeout=30
    )
    assert job.status is JobStatus.FAILED
    assert job.exit_code == 3
    assert "exited with code 3" in job.message
    assert "boom: bad data" in job.message


def test_a_job_whose_program_cannot_start_fails_naming_the_command(
    cctx: Context, tmp_path: Path
) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "run.sh").write_text("#!/bin/sh\necho hi\n")  # present, but not executable
    job = jobs.submit_job(cctx, project="p", spec=JobSpec(command=["run.sh"]), code_dir=code)
    job = finished(cctx, job.id)
    assert job.status is JobStatus.FAILED
    assert "could not start command 'run.sh'" in job.message
    assert "Permission denied" in job.message


def test_a_script_of_the_code_runs_by_its_bare_name(cctx: Context, tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    script = code / "run.sh"
    script.write_text("#!/bin/sh\necho ran from code with $1\n")
    script.chmod(0o755)
    job = jobs.submit_job(cctx, project="p", spec=JobSpec(command=["run.sh", "arg"]), code_dir=code)
    job = finished(cctx, job.id)
    assert job.status is JobStatus.SUCCEEDED, job.message
    assert logs(cctx, job.id) == "ran from code with arg\n"


# --- bad input ----------------------------------------------------------------------------------


def test_an_unknown_command_is_refused_and_nothing_is_stored(cctx: Context) -> None:
    with pytest.raises(InvalidInputError) as err:
        jobs.submit_job(cctx, project="p", spec=JobSpec(command=["no-such-program-xyz", "-v"]))
    assert err.value.field == "command"
    assert "'no-such-program-xyz' was not found on PATH" in err.value.message
    assert job_count(cctx) == 0
    assert jobs.list_jobs(cctx) == []


def test_an_unknown_command_names_the_code_dir_too(cctx: Context, tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "train.py").write_text("")
    with pytest.raises(InvalidInputError) as err:
        jobs.submit_job(cctx, project="p", spec=JobSpec(command=["./tran.py"]), code_dir=code)
    assert err.value.field == "command"
    assert "code_dir" in err.value.message
    assert job_count(cctx) == 0


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (JobSpec(command=[""]), "command"),
        (JobSpec(command=["python3", "a\0b"]), "command"),
        (JobSpec(command=[sys.executable], env={"A=B": "x"}), "env"),
        (JobSpec(command=[sys.executable], name="../bad"), "name"),
    ],
    ids=["empty-program", "nul-argument", "bad-env-name", "bad-name"],
)
def test_bad_specs_name_the_field_and_store_nothing(
    cctx: Context, spec: JobSpec, field: str
) -> None:
    with pytest.raises(InvalidInputError) as err:
        jobs.submit_job(cctx, project="p", spec=spec)
    assert err.value.field == field
    assert job_count(cctx) == 0


def test_bad_project_code_dir_and_run_are_refused(cctx: Context, tmp_path: Path) -> None:
    spec = python_job("pass")
    with pytest.raises(InvalidInputError) as err:
        jobs.submit_job(cctx, project="no/slash", spec=spec)
    assert err.value.field == "project"
    with pytest.raises(InvalidInputError) as err:
        jobs.submit_job(cctx, project="p", spec=spec, code_dir=tmp_path / "missing")
    assert err.value.field == "code_dir"
    with pytest.raises(NotFoundError) as err:
        jobs.submit_job(cctx, project="p", spec=spec, run_id="nosuchrun")
    assert err.value.field == "run_id"
    assert job_count(cctx) == 0


def test_a_code_dir_over_the_budget_is_refused(cctx: Context, tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    with open(code / "data.bin", "wb") as fh:
        fh.truncate(51 * 1024 * 1024)  # sparse: costs no disk
    with pytest.raises(PayloadTooLargeError) as err:
        jobs.submit_job(cctx, project="p", spec=python_job("pass"), code_dir=code)
    assert err.value.field == "code_dir"
    assert "data.bin" in err.value.message
    assert job_count(cctx) == 0


def test_resources_beyond_the_machine_are_refused(make_ctx: MakeCtx) -> None:
    ctx = make_ctx(cpus=2, memory_mb=1000, gpus=2)
    for resources, what in [
        (Resources(gpus=3), "needs 3 GPUs; the largest node ("),
        (Resources(cpus=4), "needs 4 CPUs; the largest node ("),
        (Resources(memory_mb=2000), "needs 2000 MB of memory; the largest node ("),
    ]:
        with pytest.raises(ResourceUnavailableError) as err:
            jobs.submit_job(ctx, project="p", spec=python_job("pass", resources=resources))
        assert err.value.field == "resources"
        assert what in err.value.message
    assert job_count(ctx) == 0


def test_lookups_of_unknown_things(cctx: Context) -> None:
    with pytest.raises(NotFoundError) as err:
        jobs.get_job(cctx, job_id="nope")
    assert err.value.field == "job_id"
    with pytest.raises(NotFoundError):
        jobs.cancel_job(cctx, job_id="nope")
    with pytest.raises(NotFoundError):
        jobs.read_logs(cctx, job_id="nope")
    with pytest.raises(InvalidInputError) as err:
        jobs.list_jobs(cctx, status="sleeping")
    assert err.value.field == "status"
    with pytest.raises(NotFoundError) as err:
        jobs.list_jobs(cctx, project="nobody")
    assert err.value.field == "project"


# --- limits and stopping ------------------------------------------------------------------------


CHILD_TREE = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])
# One that leaves the job's process group, as daemons do.
escaped = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'],
                           start_new_session=True)
with open(os.path.join(os.environ['OUT'], 'pids.tmp'), 'w') as fh:
    fh.write(f'{os.getpid()} {child.pid} {escaped.pid}')
os.rename(os.path.join(os.environ['OUT'], 'pids.tmp'), os.path.join(os.environ['OUT'], 'pids'))
time.sleep(600)
"""


def tree_pids(out: Path) -> list[int]:
    text = wait_for(
        lambda: (out / "pids").exists() and (out / "pids").read_text(),
        what="the job to write its pids",
    )
    return [int(p) for p in text.split()]


def test_a_job_past_its_max_runtime_times_out_and_its_processes_are_gone(
    cctx: Context, tmp_path: Path
) -> None:
    spec = python_job(CHILD_TREE, env={"OUT": str(tmp_path)}, max_runtime_s=1.5)
    job = jobs.submit_job(cctx, project="p", spec=spec)
    pids = tree_pids(tmp_path)
    assert all(not gone(pid) for pid in pids)
    job = finished(cctx, job.id)
    assert job.status is JobStatus.TIMED_OUT
    assert "max runtime of 1.5s" in job.message
    assert job.usage.wall_seconds >= 1.5
    for pid in pids:
        wait_for(lambda pid=pid: gone(pid), timeout=10, what=f"process {pid} to be killed")


def test_cancel_a_running_job_kills_its_whole_tree(cctx: Context, tmp_path: Path) -> None:
    run_id = "run1"
    make_run(cctx, "p", run_id)
    job = jobs.submit_job(
        cctx, project="p", spec=python_job(CHILD_TREE, env={"OUT": str(tmp_path)}), run_id=run_id
    )
    pids = tree_pids(tmp_path)
    cancelled = jobs.cancel_job(cctx, job_id=job.id)
    assert cancelled.status is JobStatus.RUNNING  # the supervisor stops it
    assert jobs.cancel_job(cctx, job_id=job.id).status is JobStatus.RUNNING  # idempotent
    job = finished(cctx, job.id)
    assert job.status is JobStatus.CANCELLED
    for pid in pids:
        wait_for(lambda pid=pid: gone(pid), timeout=10, what=f"process {pid} to be killed")
    status, finished_at = run_status(cctx, run_id)
    assert status == "killed" and finished_at is not None
    with pytest.raises(InvalidStateError) as err:
        jobs.cancel_job(cctx, job_id=job.id)
    assert "already finished" in err.value.message


def test_cancel_a_queued_job_at_once(make_ctx: MakeCtx, tmp_path: Path) -> None:
    ctx = make_ctx(cpus=1)
    gate = tmp_path / "gate"
    blocker = jobs.submit_job(ctx, project="p", spec=python_job(gated(gate)))
    waiting = jobs.submit_job(ctx, project="p", spec=python_job("print('never')"))
    assert waiting.status is JobStatus.QUEUED
    cancelled = jobs.cancel_job(ctx, job_id=waiting.id)
    assert cancelled.status is JobStatus.CANCELLED
    assert cancelled.finished_at is not None and cancelled.started_at is None
    assert status_of(ctx, blocker.id) is JobStatus.RUNNING
    gate.touch()
    assert finished(ctx, blocker.id).status is JobStatus.SUCCEEDED
    assert not (ctx.settings.jobs_dir / waiting.id / "output.log").exists()
    assert status_of(ctx, waiting.id) is JobStatus.CANCELLED
    with pytest.raises(InvalidStateError):
        jobs.cancel_job(ctx, job_id=waiting.id)


def test_kill_9_of_the_supervisor_fails_the_job_at_the_next_tick(
    cctx: Context, tmp_path: Path
) -> None:
    make_run(cctx, "p", "run2")
    job = jobs.submit_job(
        cctx, project="p", spec=python_job(CHILD_TREE, env={"OUT": str(tmp_path)}), run_id="run2"
    )
    pids = tree_pids(tmp_path)
    supervisor, started, _ = on_record(cctx, job.id)
    assert process_alive(supervisor, started)
    os.kill(supervisor, signal.SIGKILL)
    wait_for(lambda: gone(supervisor), what="the supervisor to die")
    assert status_of(cctx, job.id) is JobStatus.RUNNING  # nobody has looked yet
    admission.step(cctx)
    job = jobs.get_job(cctx, job_id=job.id)
    assert job.status is JobStatus.FAILED
    assert "supervisor lost" in job.message
    for pid in pids:
        wait_for(lambda pid=pid: gone(pid), timeout=10, what=f"orphaned process {pid} to stop")
    assert run_status(cctx, "run2")[0] == "failed"


def test_a_reused_supervisor_pid_does_not_keep_a_job_alive(cctx: Context, tmp_path: Path) -> None:
    """A live process with the recorded pid but another start time is not the supervisor."""
    gate = tmp_path / "gate"
    job = jobs.submit_job(cctx, project="p", spec=python_job(gated(gate)))
    supervisor, _, leader = on_record(cctx, job.id)
    os.kill(supervisor, signal.SIGKILL)
    wait_for(lambda: gone(supervisor), what="the supervisor to die")
    # Pretend the pid now belongs to this (live) test process.
    with cctx.db.transaction() as s:
        stored = s.get(JobRow, job.id)
        assert stored is not None
        stored.executor_ref = {
            **(stored.executor_ref or {}),
            "supervisor_pid": os.getpid(),
            "supervisor_started": psutil.Process().create_time() - 1000,
        }
    admission.step(cctx)
    assert status_of(cctx, job.id) is JobStatus.FAILED
    wait_for(lambda: gone(leader), timeout=10, what="the job's process to stop")


# --- admission ----------------------------------------------------------------------------------


STARTS_AND_ENDS = """
import os, time
log = os.environ['EVENTS']
def note(what):
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, f"{what} {os.environ['SHIPYARD_JOB_ID']}\\n".encode())
    os.close(fd)
note('start')
gate = os.path.join(os.environ['GATES'], os.environ['SHIPYARD_JOB_ID'])
while not os.path.exists(gate):
    time.sleep(0.02)
note('end')
"""


def test_admission_never_runs_more_than_the_cpus_allow(make_ctx: MakeCtx, tmp_path: Path) -> None:
    ctx = make_ctx(cpus=2)
    events, gates = tmp_path / "events", tmp_path / "gates"
    gates.mkdir()
    env = {"EVENTS": str(events), "GATES": str(gates)}
    stop = threading.Event()

    def hammer() -> None:  # concurrent ticks must not admit a job twice
        while not stop.is_set():
            admission.step(ctx)

    ticker = threading.Thread(target=hammer, daemon=True)
    ticker.start()
    try:
        ids = [
            jobs.submit_job(
                ctx, project="p", spec=python_job(STARTS_AND_ENDS, env=env, name=f"j{i}")
            ).id
            for i in range(3)
        ]
        first, second, third = ids
        wait_for(
            lambda: events.exists() and events.read_text().count("start") == 2,
            what="two jobs to start",
        )
        assert status_of(ctx, third) is JobStatus.QUEUED
        assert f"start {third}" not in events.read_text()
        (gates / first).touch()
        wait_for(lambda: f"start {third}" in events.read_text(), what="the third job to start")
        assert status_of(ctx, first) is JobStatus.SUCCEEDED
        assert status_of(ctx, second) is JobStatus.RUNNING
        (gates / second).touch()
        (gates / third).touch()
        for job_id in ids:
            assert finished(ctx, job_id).status is JobStatus.SUCCEEDED
    finally:
        stop.set()
        ticker.join(timeout=30)
    lines = events.read_text().split()
    running, peak = 0, 0
    for what in lines[::2]:
        running += 1 if what == "start" else -1
        peak = max(peak, running)
    assert peak == 2
    assert sorted(lines[1::2]) == sorted(ids * 2), "each job ran exactly once"


def test_higher_priority_runs_first(make_ctx: MakeCtx, tmp_path: Path) -> None:
    ctx = make_ctx(cpus=1)
    gate, order = tmp_path / "gate", tmp_path / "order"
    blocker = jobs.submit_job(ctx, project="p", spec=python_job(gated(gate)))
    note = f"open({str(order)!r}, 'a').write(__import__('os').environ['SHIPYARD_JOB_ID'] + ' ')"
    low = jobs.submit_job(ctx, project="p", spec=python_job(note, priority=0))
    high = jobs.submit_job(ctx, project="p", spec=python_job(note, priority=5))
    assert [j.id for j in jobs.list_jobs(ctx, status="queued")] == [high.id, low.id]
    gate.touch()
    for job_id in (blocker.id, low.id, high.id):
        finished(ctx, job_id)
    assert order.read_text().split() == [high.id, low.id]


def test_a_queued_job_that_no_longer_fits_the_machine_fails_as_unschedulable(
    make_ctx: MakeCtx, tmp_path: Path
) -> None:
    big = make_ctx(cpus=4)
    gate = tmp_path / "gate"
    blocker = jobs.submit_job(
        big, project="p", spec=python_job(gated(gate), resources=Resources(cpus=4))
    )
    waiting = jobs.submit_job(
        big, project="p", spec=python_job("pass", resources=Resources(cpus=3))
    )
    assert waiting.status is JobStatus.QUEUED
    small = make_ctx(cpus=2)  # the machine was declared smaller meanwhile
    admission.step(small)
    job = jobs.get_job(small, job_id=waiting.id)
    assert job.status is JobStatus.FAILED
    assert job.message.startswith("unschedulable: needs 3 CPUs; the largest node ("), job.message
    assert job.message.endswith(") has 2")
    assert status_of(big, blocker.id) is JobStatus.RUNNING
    gate.touch()
    finished(big, blocker.id)


GPU_JOB = """
import os, time
print('CUDA_VISIBLE_DEVICES=' + os.environ['CUDA_VISIBLE_DEVICES'], flush=True)
open(os.path.join(os.environ['OUT'], os.environ['SHIPYARD_JOB_ID']), 'w').close()
while not os.path.exists(os.path.join(os.environ['OUT'], 'gate')):
    time.sleep(0.02)
"""


def test_gpu_jobs_get_distinct_devices(make_ctx: MakeCtx, tmp_path: Path) -> None:
    ctx = make_ctx(gpus=2)
    spec = python_job(
        GPU_JOB,
        env={"OUT": str(tmp_path), "CUDA_VISIBLE_DEVICES": "7"},
        resources=Resources(gpus=1),
    )
    a = jobs.submit_job(ctx, project="p", spec=spec)
    b = jobs.submit_job(ctx, project="p", spec=spec)
    c = jobs.submit_job(ctx, project="p", spec=spec)  # no GPU left for it yet
    wait_for(
        lambda: (tmp_path / a.id).exists() and (tmp_path / b.id).exists(),
        what="both GPU jobs to run",
    )
    assert status_of(ctx, c.id) is JobStatus.QUEUED
    seen = {jobs.get_job(ctx, job_id=j).assigned_gpus[0] for j in (a.id, b.id)}
    assert seen == {0, 1}
    (tmp_path / "gate").touch()
    printed = set()
    for job in (a, b, c):
        assert finished(ctx, job.id).status is JobStatus.SUCCEEDED
        printed.add(logs(ctx, job.id).strip())
    assert {logs(ctx, a.id).strip(), logs(ctx, b.id).strip()} == {
        "CUDA_VISIBLE_DEVICES=0",
        "CUDA_VISIBLE_DEVICES=1",
    }
    with pytest.raises(ResourceUnavailableError):
        jobs.submit_job(ctx, project="p", spec=python_job("pass", resources=Resources(gpus=3)))


# --- what the job sees --------------------------------------------------------------------------


def test_the_job_runs_the_code_as_it_was_at_submit(make_ctx: MakeCtx, tmp_path: Path) -> None:
    ctx = make_ctx(cpus=1)
    gate = tmp_path / "gate"
    blocker = jobs.submit_job(ctx, project="p", spec=python_job(gated(gate)))
    code = tmp_path / "code"
    (code / "pkg").mkdir(parents=True)
    (code / "main.py").write_text(
        "import os, pkg.data as d\nprint(d.VALUE, sorted(os.listdir('.')), os.getcwd())\n"
    )
    (code / "pkg" / "__init__.py").write_text("")
    (code / "pkg" / "data.py").write_text("VALUE = 'original'\n")
    (code / ".git").mkdir()
    (code / ".git" / "HEAD").write_text("ref")
    job = jobs.submit_job(
        ctx, project="p", spec=JobSpec(command=[sys.executable, "main.py"]), code_dir=code
    )
    assert job.status is JobStatus.QUEUED and job.code_digest is not None
    (code / "pkg" / "data.py").write_text("VALUE = 'changed'\n")
    (code / "new.py").write_text("")
    gate.touch()
    finished(ctx, blocker.id)
    job = finished(ctx, job.id)
    assert job.status is JobStatus.SUCCEEDED, job.message
    out = logs(ctx, job.id)
    assert out.startswith("original ['main.py', 'pkg'] ")
    assert out.strip().endswith(str(ctx.settings.jobs_dir / job.id / "code"))


def test_a_job_can_run_from_an_uploaded_snapshot(cctx: Context, tmp_path: Path) -> None:
    from shipyard.compute.snapshot import snapshot_code

    code = tmp_path / "code"
    code.mkdir()
    (code / "main.py").write_text("print('from upload')\n")
    digest = cctx.blobs.put_bytes(snapshot_code(code)).digest
    job = jobs.submit_job(
        cctx, project="p", spec=JobSpec(command=[sys.executable, "main.py"]), code_digest=digest
    )
    assert finished(cctx, job.id).status is JobStatus.SUCCEEDED
    assert logs(cctx, job.id) == "from upload\n"
    with pytest.raises(InvalidInputError) as err:
        jobs.submit_job(
            cctx, project="p", spec=JobSpec(command=["./missing.py"]), code_digest=digest
        )
    assert err.value.field == "command"
    with pytest.raises(NotFoundError) as err:
        jobs.submit_job(cctx, project="p", spec=python_job("pass"), code_digest="0" * 64)
    assert err.value.field == "code_digest"


def test_the_environment_reaches_the_job(cctx: Context) -> None:
    make_run(cctx, "team", "run3")
    code = (
        "import json, os\n"
        "keys = ['SHIPYARD_JOB_ID', 'SHIPYARD_RUN_ID', 'SHIPYARD_HOME', 'SHIPYARD_PROJECT',\n"
        "        'CUDA_VISIBLE_DEVICES', 'PYTHONUNBUFFERED', 'MY_SETTING', 'SHIPYARD_URL',\n"
        "        'PATH']\n"
        "print(json.dumps({k: os.environ.get(k) for k in keys} | {'cwd': os.getcwd()}))\n"
    )
    spec = python_job(
        code, env={"MY_SETTING": "42", "SHIPYARD_JOB_ID": "spoofed", "CUDA_VISIBLE_DEVICES": "0,1"}
    )
    job = jobs.submit_job(cctx, project="team", spec=spec, run_id="run3")
    job = finished(cctx, job.id)
    assert job.status is JobStatus.SUCCEEDED, job.message
    seen = json.loads(logs(cctx, job.id))
    assert seen == {
        "SHIPYARD_JOB_ID": job.id,
        "SHIPYARD_RUN_ID": "run3",
        "SHIPYARD_HOME": str(cctx.settings.home),
        "SHIPYARD_PROJECT": "team",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONUNBUFFERED": "1",
        "MY_SETTING": "42",
        "SHIPYARD_URL": None,
        "PATH": os.environ["PATH"],
        "cwd": str(cctx.settings.jobs_dir / job.id / "work"),
    }
    # The job never called shipyard.init(), so the executor settles the run it left open.
    assert run_status(cctx, "run3")[0] == "finished"


# --- reading ------------------------------------------------------------------------------------


def test_logs_page_by_offset_and_say_when_they_are_complete(cctx: Context) -> None:
    code = "print('x' * 999)\nprint('y' * 999)"
    job = finished(cctx, jobs.submit_job(cctx, project="p", spec=python_job(code)).id)
    first, offset, done = jobs.read_logs(cctx, job_id=job.id, limit=1000)
    assert (first, offset, done) == (b"x" * 999 + b"\n", 1000, False)
    second, offset, done = jobs.read_logs(cctx, job_id=job.id, offset=offset)
    assert (second, offset, done) == (b"y" * 999 + b"\n", 2000, True)
    assert jobs.read_logs(cctx, job_id=job.id, offset=2000) == (b"", 2000, True)
    for kwargs, field in [({"offset": -1}, "offset"), ({"limit": 0}, "limit")]:
        with pytest.raises(InvalidInputError) as err:
            jobs.read_logs(cctx, job_id=job.id, **kwargs)
        assert err.value.field == field


def test_list_filters_by_project_and_status_newest_first(make_ctx: MakeCtx, tmp_path: Path) -> None:
    ctx = make_ctx(cpus=1)
    gate = tmp_path / "gate"
    a = jobs.submit_job(ctx, project="alpha", spec=python_job(gated(gate)))
    b = jobs.submit_job(ctx, project="beta", spec=python_job("pass"))
    c = jobs.submit_job(ctx, project="alpha", spec=python_job("pass"))
    assert [j.id for j in jobs.list_jobs(ctx)] == [c.id, b.id, a.id]
    assert [j.id for j in jobs.list_jobs(ctx, project="alpha")] == [c.id, a.id]
    assert [j.id for j in jobs.list_jobs(ctx, status=JobStatus.RUNNING)] == [a.id]
    assert [j.id for j in jobs.list_jobs(ctx, project="beta", status="queued")] == [b.id]
    assert jobs.wait_job(ctx, job_id=b.id, timeout=0.2).status is JobStatus.QUEUED
    gate.touch()
    for job in (a, b, c):
        assert jobs.wait_job(ctx, job_id=job.id, timeout=30).status is JobStatus.SUCCEEDED


DAEMON = """
import os, sys, time
if os.fork() == 0:          # the classic double fork: the daemon ends up outside the job's tree
    os.setsid()
    if os.fork() == 0:
        with open(os.path.join(os.environ['OUT'], 'daemon.tmp'), 'w') as fh:
            fh.write(str(os.getpid()))
        os.rename(os.path.join(os.environ['OUT'], 'daemon.tmp'),
                  os.path.join(os.environ['OUT'], 'daemon'))
        time.sleep(600)
    os._exit(0)
while not os.path.exists(os.path.join(os.environ['OUT'], 'daemon')):
    time.sleep(0.02)
print('leaving a daemon behind')
"""


def test_processes_a_job_leaves_behind_are_stopped_when_it_ends(
    cctx: Context, tmp_path: Path
) -> None:
    job = jobs.submit_job(cctx, project="p", spec=python_job(DAEMON, env={"OUT": str(tmp_path)}))
    job = finished(cctx, job.id)
    assert job.status is JobStatus.SUCCEEDED, job.message
    daemon = int((tmp_path / "daemon").read_text())
    wait_for(lambda: gone(daemon), timeout=10, what="the job's daemon to be stopped")


def test_a_supervisor_told_to_stop_stops_its_job_and_says_so(cctx: Context, tmp_path: Path) -> None:
    job = jobs.submit_job(
        cctx, project="p", spec=python_job(CHILD_TREE, env={"OUT": str(tmp_path)})
    )
    pids = tree_pids(tmp_path)
    supervisor, _, _ = on_record(cctx, job.id)
    os.kill(supervisor, signal.SIGTERM)
    job = finished(cctx, job.id)
    assert job.status is JobStatus.FAILED
    assert "supervisor got SIGTERM" in job.message
    for pid in pids:
        wait_for(lambda pid=pid: gone(pid), timeout=10, what=f"process {pid} to be killed")


def test_an_uploaded_snapshot_that_would_escape_is_refused_at_submit(
    cctx: Context, tmp_path: Path
) -> None:
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("../../evil.py")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"pass"))
    digest = cctx.blobs.put_bytes(buffer.getvalue()).digest
    with pytest.raises(InvalidInputError) as err:
        jobs.submit_job(cctx, project="p", spec=python_job("pass"), code_digest=digest)
    assert err.value.field == "code_digest"
    assert "'..'" in err.value.message
    assert job_count(cctx) == 0


def test_a_corrupted_code_snapshot_fails_the_job_instead_of_running_it(
    make_ctx: MakeCtx, tmp_path: Path
) -> None:
    ctx = make_ctx(cpus=1)
    gate = tmp_path / "gate"
    blocker = jobs.submit_job(ctx, project="p", spec=python_job(gated(gate)))
    code = tmp_path / "code"
    code.mkdir()
    (code / "main.py").write_text("print('should not run')\n")
    job = jobs.submit_job(
        ctx, project="p", spec=JobSpec(command=[sys.executable, "main.py"]), code_dir=code
    )
    assert job.status is JobStatus.QUEUED and job.code_digest is not None
    digest = job.code_digest
    blob = Path(ctx.blobs.root) / digest[:2] / digest[2:4] / digest  # the store's local layout
    blob.write_bytes(blob.read_bytes()[:-1] + b"!")
    gate.touch()
    finished(ctx, blocker.id)
    job = finished(ctx, job.id)
    assert job.status is JobStatus.FAILED
    assert "could not prepare the job's code" in job.message and "corrupted" in job.message
    assert "should not run" not in logs(ctx, job.id)


def test_a_job_killed_from_outside_fails_naming_the_signal(cctx: Context, tmp_path: Path) -> None:
    """What the OOM killer or an operator's kill -9 looks like: the job fails, its run too."""
    make_run(cctx, "p", "run-k")
    code = "import os, time; print('pid', os.getpid(), flush=True); time.sleep(120)"
    job = jobs.submit_job(cctx, project="p", spec=python_job(code), run_id="run-k")
    text = wait_for(
        lambda: "pid" in logs(cctx, job.id) and logs(cctx, job.id),
        timeout=30,
        what="the job to print its pid",
    )
    pid = int(text.split("pid", 1)[1].split()[0])
    os.kill(pid, signal.SIGKILL)
    done = finished(cctx, job.id)
    assert done.status is JobStatus.FAILED
    assert done.exit_code == -signal.SIGKILL
    assert "SIGKILL" in done.message or "signal 9" in done.message, done.message
    assert run_status(cctx, "run-k")[0] == "failed"
    assert done.usage.wall_seconds > 0
