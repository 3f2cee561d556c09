"""The local executor behind the seam: launch, observe (lost), stop, read_logs, nodes - and what
its supervisor gives a job (the contract's environment, declared outputs, the launch's token)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from shipyard import wiring
from shipyard.compute import jobs
from shipyard.compute.executors.base import Launch
from shipyard.compute.executors.local import LocalExecutor
from shipyard.compute.policy.base import Placement, WorkerPlacement
from shipyard.context import Context
from shipyard.domain.models import JobSpec, JobStatus, Resources
from shipyard.store.tables import JobRow, RunArtifactRow, TokenRow
from tests.compute.conftest import MakeCtx, gated, gone, job_row, python_job
from tests.conftest import wait_for


def executor(ctx: Context) -> LocalExecutor:
    found = wiring.open_executor("local", ctx.settings)
    assert isinstance(found, LocalExecutor)
    return found


def on_record(ctx: Context, job_id: str) -> dict[str, object]:
    def recorded() -> dict[str, object] | None:
        ref = job_row(ctx, job_id).executor_ref or {}
        return ref if ref.get("supervisor_pid") and ref.get("pid") else None

    return wait_for(recorded, what=f"job {job_id}'s processes on record")


def test_wiring_names_the_local_executor_and_its_node_is_this_machine(make_ctx: MakeCtx) -> None:
    ctx = make_ctx(cpus=3, memory_mb=4096, gpus=2, gpu_model="A100", gpu_memory_mb=40000)
    local = executor(ctx)
    assert local.name == "local"
    [info] = local.nodes()
    assert info.node.id == socket.gethostname()
    assert info.node.cpus == 3 and info.node.memory_mb == 4096
    assert [(g.index, g.model, g.memory_mb) for g in info.node.gpus] == [
        (0, "A100", 40000),
        (1, "A100", 40000),
    ]
    assert info.gpu_source == "declared" and info.address == "127.0.0.1"


def test_a_launch_whose_job_is_not_running_exits_and_is_reported_lost(cctx: Context) -> None:
    local = executor(cctx)
    job_id = "0123456789abcdef"  # no such row: the supervisor finds nothing to run and exits
    launch = Launch(
        job_id=job_id,
        project="p",
        attempt=1,
        spec=python_job("print('never')"),
        placement=Placement(job_id=job_id, workers=(WorkerPlacement(node_id="n"),)),
        code_digest=None,
        run_id=None,
    )
    ref = local.launch(cctx, launch)
    assert set(ref) == {"supervisor_pid", "supervisor_started", "host"}
    assert ref["host"] == socket.gethostname()
    pid = ref["supervisor_pid"]
    assert isinstance(pid, int)
    wait_for(lambda: job_id in local.observe(cctx, {job_id: ref}), what="the supervisor to exit")
    seen = local.observe(cctx, {job_id: ref})[job_id]
    assert seen.state == "lost" and f"pid {pid}" in seen.message
    # a ref of another machine's supervisor is not ours to judge
    assert local.observe(cctx, {job_id: {**ref, "host": "elsewhere"}}) == {}


def test_observe_is_quiet_while_a_supervisor_lives_and_stop_lost_kills_what_is_left(
    cctx: Context, tmp_path: Path
) -> None:
    local = executor(cctx)
    job = jobs.submit_job(cctx, project="p", spec=python_job(gated(tmp_path / "gate")))
    ref = on_record(cctx, job.id)
    assert local.observe(cctx, {job.id: ref}) == {}
    supervisor, leader = ref["supervisor_pid"], ref["pid"]
    assert isinstance(supervisor, int) and isinstance(leader, int)
    os.kill(supervisor, signal.SIGKILL)
    wait_for(lambda: gone(supervisor), what="the supervisor to die")
    seen = local.observe(cctx, {job.id: ref})
    assert seen[job.id].state == "lost" and "supervisor lost" in seen[job.id].message
    assert not gone(leader)  # its job still runs, orphaned
    local.stop(cctx, job.id, ref, reason="lost", grace_s=1.0)
    assert gone(leader)


def test_stop_for_a_cancel_has_the_supervisor_stop_the_job_at_once(
    cctx: Context, tmp_path: Path
) -> None:
    local = executor(cctx)
    job = jobs.submit_job(cctx, project="p", spec=python_job(gated(tmp_path / "gate")))
    ref = on_record(cctx, job.id)
    with cctx.db.transaction() as s:  # what jobs.cancel_job commits before it calls stop
        row = s.get(JobRow, job.id)
        assert row is not None
        row.cancel_requested = True
    local.stop(cctx, job.id, ref, reason="cancel", grace_s=1.0)
    done = jobs.wait_job(cctx, job_id=job.id, timeout=30)
    assert done.status is JobStatus.CANCELLED
    assert isinstance(ref["pid"], int) and gone(ref["pid"])


def test_read_logs_pages_the_combined_log(cctx: Context) -> None:
    local = executor(cctx)
    job = jobs.submit_job(cctx, project="p", spec=python_job("print('0123456789')"))
    jobs.wait_job(cctx, job_id=job.id, timeout=30)
    data, size = local.read_logs(cctx, job.id, None, offset=0, limit=4)
    assert data == b"0123" and size >= 11
    data, _ = local.read_logs(cctx, job.id, None, offset=4, limit=100)
    assert data.startswith(b"456789\n")
    assert local.read_logs(cctx, "fedcba9876543210", None, offset=0, limit=10) == (b"", 0)


ENV_DUMP = """
import json, os
keys = ["SHIPYARD_JOB_ID", "SHIPYARD_RUN_ID", "SHIPYARD_PROJECT", "SHIPYARD_ATTEMPT",
        "CUDA_VISIBLE_DEVICES", "SHIPYARD_GPU_FRACTION", "SHIPYARD_GPU_MEMORY_MB", "MASTER_ADDR",
        "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
        "TORCHELASTIC_RUN_ID", "SHIPYARD_LAUNCH_TOKEN"]
print("ENV " + json.dumps({k: os.environ.get(k) for k in keys}))
"""


def test_a_job_of_one_worker_gets_the_contract_environment(make_ctx: MakeCtx) -> None:
    ctx = make_ctx(gpus=2)
    spec = python_job(ENV_DUMP, resources=Resources(gpus=1))
    job = jobs.wait_job(ctx, job_id=jobs.submit_job(ctx, project="p", spec=spec).id, timeout=30)
    assert job.status is JobStatus.SUCCEEDED, job.message
    data, _, _ = jobs.read_logs(ctx, job_id=job.id)
    line = data.decode().splitlines()[0]
    assert line.startswith("ENV ")  # a job of one worker: no "[rank 0] " prefix
    env = json.loads(line[4:])
    assert env["SHIPYARD_JOB_ID"] == env["TORCHELASTIC_RUN_ID"] == job.id
    assert env["SHIPYARD_RUN_ID"] == job.run_id and job.run_id
    assert env["SHIPYARD_PROJECT"] == "p" and env["SHIPYARD_ATTEMPT"] == "1"
    assert env["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, job.placement[0]["gpus"]))
    assert env["CUDA_VISIBLE_DEVICES"] in ("0", "1")
    assert env["RANK"] == env["LOCAL_RANK"] == env["GROUP_RANK"] == "0"
    assert env["WORLD_SIZE"] == env["LOCAL_WORLD_SIZE"] == "1"
    assert env["MASTER_ADDR"] == "127.0.0.1" and int(env["MASTER_PORT"]) > 0
    assert env["SHIPYARD_GPU_FRACTION"] is None and env["SHIPYARD_GPU_MEMORY_MB"] is None
    assert env["SHIPYARD_LAUNCH_TOKEN"] is None


WRITES = """
import os
os.makedirs("ckpt", exist_ok=True)
open("model.pt", "wb").write(b"weights")
open("ckpt/a.bin", "wb").write(b"a")
open("notes.txt", "w").write("not declared")
open("scratch.log", "w").write("not declared either")
"""


def test_declared_outputs_become_run_artifacts_and_the_log_says_where_the_rest_went(
    cctx: Context,
) -> None:
    spec = python_job(WRITES, outputs=["model.pt", "ckpt", "missing.bin"])
    job = jobs.wait_job(cctx, job_id=jobs.submit_job(cctx, project="p", spec=spec).id, timeout=30)
    assert job.status is JobStatus.SUCCEEDED, job.message
    assert sorted(job.outputs) == ["ckpt/a.bin", "model.pt"]
    with cctx.db.read() as s:
        stored = s.scalars(
            select(RunArtifactRow.path).where(RunArtifactRow.run_id == job.run_id)
        ).all()
    assert {"model.pt", "ckpt/a.bin"} <= set(stored)
    text = jobs.read_logs(cctx, job_id=job.id)[0].decode()
    assert f"as artifacts of run {job.run_id}" in text
    assert "declared output 'missing.bin' was not found" in text
    folder = cctx.settings.jobs_dir / job.id / "work"
    assert f"2 files the job wrote outside its declared outputs stay in {folder}" in text
    assert "notes.txt" in text and "scratch.log" in text


def test_a_job_without_declared_outputs_is_told_where_its_files_stay(cctx: Context) -> None:
    job = jobs.submit_job(cctx, project="p", spec=python_job("open('out.csv', 'w').write('x')"))
    job = jobs.wait_job(cctx, job_id=job.id, timeout=30)
    assert job.status is JobStatus.SUCCEEDED and job.outputs == []
    text = jobs.read_logs(cctx, job_id=job.id)[0].decode()
    assert "1 file the job wrote outside its declared outputs stay in" in text
    assert "out.csv" in text and "--output PATH" in text


@pytest.fixture
def job_root() -> Iterator[Path]:
    """A job root the job user can reach (pytest's tmp_path is 0700 root)."""
    parent = Path(tempfile.mkdtemp(prefix="shipyard-test-jobs-"))
    parent.chmod(0o711)
    yield parent / "jobs"
    shutil.rmtree(parent, ignore_errors=True)


def test_a_served_job_gets_the_one_token_the_pipeline_issued(
    make_ctx: MakeCtx, job_root: Path
) -> None:
    ctx = make_ctx(server_url="http://127.0.0.1:1", job_root=job_root)
    code = "import os; print('TOKEN', os.environ.get('SHIPYARD_TOKEN', '')[:10])"
    job = jobs.submit_job(ctx, project="p", spec=JobSpec(command=["python3", "-c", code]))
    job = jobs.wait_job(ctx, job_id=job.id, timeout=30)
    assert job.status is JobStatus.SUCCEEDED, job.message
    with ctx.db.read() as s:
        prefixes = s.scalars(select(TokenRow.prefix).where(TokenRow.name == f"job-{job.id}")).all()
    assert len(prefixes) == 1  # one per attempt: the supervisor issued none of its own
    text = jobs.read_logs(ctx, job_id=job.id)[0].decode()
    assert f"TOKEN {prefixes[0]}" in text


def test_job_env_gives_a_share_of_a_gpu_its_fraction_and_nothing_of_ours(tmp_path: Path) -> None:
    from shipyard.compute.sandbox import LaunchedJob, job_env
    from shipyard.settings import Settings

    ours = {"PATH": "/usr/bin", "SHIPYARD_GPU_MEMORY_MB": "80000", "SHIPYARD_GPU_FRACTION": "1"}
    settings = Settings(home=tmp_path)
    share = LaunchedJob(
        job_id="j1",
        project="p",
        run_id="r1",
        gpus=[0],
        attempt=3,
        gpu_fraction=0.25,
        gpu_memory_mb=2000,
    )
    env = job_env(share, {}, shipyard_url=None, token=None, settings=settings, parent_env=ours)
    assert env["SHIPYARD_GPU_FRACTION"] == "0.25" and env["SHIPYARD_GPU_MEMORY_MB"] == "2000"
    assert env["CUDA_VISIBLE_DEVICES"] == "0" and env["SHIPYARD_ATTEMPT"] == "3"
    whole = LaunchedJob(job_id="j1", project="p", run_id="r1", gpus=[1, 2])
    env = job_env(whole, {}, shipyard_url=None, token=None, settings=settings, parent_env=ours)
    assert "SHIPYARD_GPU_FRACTION" not in env and "SHIPYARD_GPU_MEMORY_MB" not in env
    assert env["CUDA_VISIBLE_DEVICES"] == "1,2" and env["SHIPYARD_ATTEMPT"] == "1"


def test_a_supervisor_whose_attempt_is_over_stops_its_job_and_records_nothing(
    cctx: Context, tmp_path: Path
) -> None:
    code = gated(tmp_path / "gate", before="open('model.pt', 'wb').write(b'w')")
    job = jobs.submit_job(cctx, project="p", spec=python_job(code, outputs=["model.pt"]))
    ref = on_record(cctx, job.id)
    folder = cctx.settings.jobs_dir / job.id / "work"
    wait_for(lambda: (folder / "model.pt").exists(), what="the job to write its output")
    with cctx.db.transaction() as s:  # as if a step had taken it for lost and relaunched it
        row = s.get(JobRow, job.id)
        assert row is not None
        row.attempt = 2
    supervisor = ref["supervisor_pid"]
    assert isinstance(supervisor, int) and isinstance(ref["pid"], int)
    wait_for(lambda: gone(supervisor), timeout=30, what="the stale supervisor to exit")
    assert gone(ref["pid"])
    text = jobs.read_logs(cctx, job_id=job.id)[0].decode()
    assert "shipyard: attempt 1 stopped: the job ended elsewhere" in text
    after = jobs.get_job(cctx, job_id=job.id)
    assert after.status is JobStatus.RUNNING and after.outputs == []  # attempt 2's to settle
    with cctx.db.read() as s:
        stored = s.scalars(select(RunArtifactRow.path).where(RunArtifactRow.run_id == job.run_id))
        assert list(stored) == []
