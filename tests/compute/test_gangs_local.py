"""Gangs on the local executor: every worker of a job in one supervisor, as torchrun starts them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from shipyard.cli import main as cli_main
from shipyard.compute import jobs
from shipyard.context import Context
from shipyard.domain.models import JobSpec, JobStatus, Resources
from tests.compute.conftest import MakeCtx, gone, job_row, python_job
from tests.conftest import wait_for

ENV_DUMP = """
import json, os
keys = ["MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
        "GROUP_RANK", "TORCHELASTIC_RUN_ID", "SHIPYARD_JOB_ID", "SHIPYARD_RUN_ID",
        "SHIPYARD_ATTEMPT", "CUDA_VISIBLE_DEVICES"]
env = {k: os.environ.get(k) for k in keys}
path = os.path.join(os.environ["OUT"], "rank" + env["RANK"] + ".json")
with open(path, "w") as fh:
    json.dump(env, fh)
print("hello from rank", env["RANK"])
"""


def logs(ctx: Context, job_id: str) -> str:
    data, _, _ = jobs.read_logs(ctx, job_id=job_id)
    return data.decode()


def test_a_gang_gets_the_torchrun_environment_per_rank_and_one_prefixed_log(
    make_ctx: MakeCtx, tmp_path: Path
) -> None:
    ctx = make_ctx(cpus=4, gpus=2)
    spec = python_job(
        ENV_DUMP, workers=2, resources=Resources(cpus=1, gpus=1), env={"OUT": str(tmp_path)}
    )
    job = jobs.wait_job(ctx, job_id=jobs.submit_job(ctx, project="p", spec=spec).id, timeout=60)
    assert job.status is JobStatus.SUCCEEDED, job.message
    envs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, env in enumerate(envs):
        assert env["RANK"] == env["LOCAL_RANK"] == str(rank)
        assert env["WORLD_SIZE"] == env["LOCAL_WORLD_SIZE"] == "2"
        assert env["GROUP_RANK"] == "0"
        assert env["MASTER_ADDR"] == "127.0.0.1"
        assert env["TORCHELASTIC_RUN_ID"] == env["SHIPYARD_JOB_ID"] == job.id
        assert env["SHIPYARD_RUN_ID"] == job.run_id and job.run_id
        assert env["SHIPYARD_ATTEMPT"] == "1"
    assert envs[0]["MASTER_PORT"] == envs[1]["MASTER_PORT"]
    assert 0 < int(envs[0]["MASTER_PORT"]) < 65536
    # each worker its own GPU, as the placement says, rank order
    assert [env["CUDA_VISIBLE_DEVICES"] for env in envs] == [
        ",".join(str(g) for g in w["gpus"]) for w in job.placement
    ]
    assert sorted(env["CUDA_VISIBLE_DEVICES"] for env in envs) == ["0", "1"]
    text = logs(ctx, job.id)
    assert "[rank 0] hello from rank 0" in text
    assert "[rank 1] hello from rank 1" in text
    worker_lines = [line for line in text.splitlines() if not line.startswith("shipyard:")]
    assert all(line.startswith("[rank ") for line in worker_lines), text
    assert job.usage.cpu_seconds > 0 and job.usage.wall_seconds > 0
    ref = job_row(ctx, job.id).executor_ref or {}
    assert len(ref.get("pids", [])) == 2


ONE_DIES = """
import os, sys, time
rank = int(os.environ["RANK"])
open(os.path.join(os.environ["OUT"], f"pid{rank}"), "w").write(str(os.getpid()))
if rank == 1:
    while not os.path.exists(os.path.join(os.environ["OUT"], "pid0")):
        time.sleep(0.02)
    print("rank 1 gives up", flush=True)
    sys.exit(3)
print("rank 0 works on", flush=True)
time.sleep(120)
"""


def test_one_worker_exiting_3_fails_the_whole_gang_naming_the_rank(
    cctx: Context, tmp_path: Path
) -> None:
    spec = python_job(ONE_DIES, workers=2, env={"OUT": str(tmp_path)})
    job = jobs.wait_job(cctx, job_id=jobs.submit_job(cctx, project="p", spec=spec).id, timeout=60)
    assert job.status is JobStatus.FAILED
    assert job.exit_code == 3
    assert "rank 1 exited with code 3" in job.message, job.message
    assert "stopped the other 1 worker" in job.message, job.message
    assert "[rank 1] rank 1 gives up" in job.message  # the end of the log
    survivor = int((tmp_path / "pid0").read_text())
    wait_for(lambda: gone(survivor), timeout=10, what="rank 0 to be stopped")
    assert "[rank 0] rank 0 works on" in logs(cctx, job.id)


def test_a_gang_that_cannot_start_fails_naming_the_rank_and_command(
    cctx: Context, tmp_path: Path
) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "run.sh").write_text("#!/bin/sh\necho hi\n")  # present, but not executable
    spec = JobSpec(command=["run.sh"], workers=2)
    job = jobs.submit_job(cctx, project="p", spec=spec, code_dir=code)
    job = jobs.wait_job(cctx, job_id=job.id, timeout=60)
    assert job.status is JobStatus.FAILED
    assert "could not start rank 0" in job.message and "run.sh" in job.message, job.message
    assert "Permission denied" in job.message


# --- `shipyard run` -------------------------------------------------------------------------


def cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    """``shipyard ARGS`` through the CLI's entry point in this process: (exit code, out, err)."""
    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(sys, "argv", ["shipyard", *args])
        patch.setattr(cli_main.console, "_width", 250)
        with pytest.raises(SystemExit) as exited:
            cli_main.main()
    out = capsys.readouterr()
    code = exited.value.code
    return (code if isinstance(code, int) else 1), out.out, out.err


@pytest.fixture
def on_home(
    make_ctx: MakeCtx, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Context:
    """The CLI on the test's home (a machine of 4 CPUs and 2 declared GPUs), in a code folder."""
    monkeypatch.setenv("SHIPYARD_HOME", str(home))
    for key in ("SHIPYARD_URL", "SHIPYARD_TOKEN", "SHIPYARD_PROJECT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in (("SHIPYARD_CPUS", "4"), ("SHIPYARD_MEMORY_MB", "8192")):
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SHIPYARD_GPUS", "2")
    code = tmp_path / "code"
    code.mkdir()
    (code / "train.py").write_text(
        "import os\n"
        "rank = os.environ['RANK']\n"
        "print('rank', rank, 'on GPU', os.environ['CUDA_VISIBLE_DEVICES'])\n"
        "if rank == '0':\n"
        "    open('model.pt', 'wb').write(b'weights')\n"
        "    open('extra.txt', 'w').write('not declared')\n"
    )
    monkeypatch.chdir(code)
    return make_ctx(cpus=4, memory_mb=8192, gpus=2)


def test_shipyard_run_starts_a_gang_and_says_where_the_outputs_went(
    on_home: Context, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(monkeypatch, capsys, "queues", "set", "team-a", "--gpus", "8")[0] == 0
    code, out, err = cli(
        monkeypatch,
        capsys,
        "run",
        "--workers",
        "2",
        "--gpus-per-worker",
        "1",
        "--gpu-type",
        "declared",
        "--preemptible",
        "--queue",
        "team-a",
        "--priority",
        "high",
        "--output",
        "model.pt",
        "--output",
        "missing.bin",
        "--",
        sys.executable,
        "train.py",
    )
    assert code == 0, (out, err)  # the job succeeded; missing.bin is reported, not an error
    assert "[rank 0] rank 0 on GPU" in out and "[rank 1] rank 1 on GPU" in out
    assert "succeeded" in err
    assert "outputs: 1 file(s) stored as artifacts of run" in err and "model.pt" in err
    assert "outputs not stored: missing.bin" in err
    assert "1 file the job wrote outside its declared outputs stay in" in out  # extra.txt
    [job] = jobs.list_jobs(on_home, project="default")
    assert job.status is JobStatus.SUCCEEDED, job.message
    spec = job.spec
    assert spec.workers == 2 and spec.resources.gpus == 1
    assert spec.resources.gpu_type == "declared" and spec.preemptible
    assert job.queue == "team-a" and spec.priority == 100
    assert spec.outputs == ["model.pt", "missing.bin"] and job.outputs == ["model.pt"]
    code, out, _ = cli(monkeypatch, capsys, "jobs", "list")
    assert code == 0
    row = next(line for line in out.splitlines() if job.id in line)
    assert "team-a" in row and " r0 " in row and " r1 " in row
    for worker in job.placement:
        assert f"{worker['node_id']}:{worker['gpus'][0]}" in row


def test_shipyard_run_refuses_what_no_node_could_hold_and_stores_nothing(
    on_home: Context, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = [
        (["--gpu-type", "H100", "--gpus", "1"], "model 'H100'"),
        (["--gpus", "3"], "largest node"),
        (["--workers", "2", "--cpus", "8"], "largest node"),
        (["--priority", "urgent"], "priority 'urgent' is neither"),
        (["--gpu-fraction", "1.5"], "resources.gpu_fraction"),
        (["--gpus", "1", "--gpus-per-worker", "2"], "disagree"),
        (["--queue", "nope"], "queue 'nope' does not exist"),
    ]
    for flags, words in cases:
        code, out, err = cli(monkeypatch, capsys, "run", "-d", *flags, "--", "python3", "-c", "1")
        assert code == 1, (flags, out, err)
        assert words in err, (flags, err)
        assert "Traceback" not in err and err.startswith("error"), err
    assert jobs.list_jobs(on_home, project="default") == []


def test_shipyard_run_with_a_fraction_of_a_gpu(
    on_home: Context, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli(
        monkeypatch,
        capsys,
        "run",
        "--gpu-fraction",
        "0.25",
        "--gpu-memory",
        "1000",
        "--",
        sys.executable,
        "-c",
        "import os; print('share', os.environ['SHIPYARD_GPU_FRACTION'], "
        "os.environ['SHIPYARD_GPU_MEMORY_MB'], os.environ['CUDA_VISIBLE_DEVICES'])",
    )
    assert code == 0, (out, err)
    assert "share 0.25 1000 " in out
