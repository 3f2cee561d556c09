"""The executor contract, run with the SAME test code against the local executor and against a
real Ray cluster (tests/compute/executors/conftest.py): submit through the job service, let the
admission pipeline launch and observe, and check what a user sees - status, message, exit code,
log, environment, GPUs, gang ranks, cancel, preemption, max runtime, declared outputs.

The home is served (``Settings.server_url`` set, as in a server process): jobs get the
allowlisted environment and a job token, and nothing steps inline, so the test drives
``admission.step`` itself, as a server's background thread would. To keep the suite fast, every
job of the contract is submitted at once per executor (``outcomes``) and runs side by side; each
test then checks its own job.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from shipyard import wiring
from shipyard.compute import admission, jobs
from shipyard.context import Context, open_context
from shipyard.domain.models import Job, JobSpec, JobStatus, Resources
from shipyard.settings import Settings
from shipyard.store.engine import forget_database
from shipyard.store.tables import JobRow
from tests.conftest import wait_for
from tests.job_user import job_command

SERVER_URL = "http://127.0.0.1:1"
PRINT_ENV = "import json, os; print('ENV ' + json.dumps(dict(os.environ)))"
SLEEP = "import time; print('started', flush=True); time.sleep(120)"
PREEMPTIBLE = (
    "import os, time; n = os.environ['SHIPYARD_ATTEMPT']; print('attempt', n, flush=True)\n"
    "if n == '1': time.sleep(120)"
)
GANG = (
    "import os; print('rank', os.environ['RANK'], 'of', os.environ['WORLD_SIZE'], "
    "'local', os.environ['LOCAL_RANK'], 'master', os.environ['MASTER_ADDR'], "
    "os.environ['MASTER_PORT'])"
)
GANG_FAILS = (
    "import os, sys, time\n"
    "if os.environ['RANK'] == '1': print('rank one gives up', flush=True); sys.exit(5)\n"
    "time.sleep(120)"
)
# Writes a link out of its folder and a file with a second (hard) name: declared, both refused.
UNSAFE_OUTPUTS = (
    "import os; os.symlink(os.path.dirname(os.getcwd()), 'escape')\n"
    "open('a.txt', 'w').write('a'); os.link('a.txt', 'b.txt'); print('wrote')"
)
# Small CPU shares, so that every job of the contract fits on the cluster at once.
SMALL = {"cpus": 0.25, "memory_mb": 256}


@dataclass
class Outcomes:
    ctx: Context
    executor: str
    jobs: dict[str, Job] = field(default_factory=dict)  # what each job ended as
    logs: dict[str, str] = field(default_factory=dict)
    refs: dict[str, dict] = field(default_factory=dict)  # its executor_ref while it ran


def _python(code: str, *, env: dict[str, str] | None = None, **fields: object) -> JobSpec:
    command, extra = job_command("-c", code)  # a Python the job user can run (as root)
    resources = fields.pop("resources", Resources(**SMALL))
    return JobSpec(command=command, env={**extra, **(env or {})}, resources=resources, **fields)  # type: ignore[arg-type]


SPECS: dict[str, JobSpec] = {
    "hello": _python("print('hello'); print('world')"),
    "fails": _python("import sys; print('boom: the data is missing'); sys.exit(3)"),
    "timeout": _python("import time; time.sleep(120)", max_runtime_s=1),
    "env": _python(PRINT_ENV, env={"MY_FLAG": "on"}),
    "gpu": _python(PRINT_ENV, resources=Resources(gpus=1, **SMALL)),
    "gang": _python(GANG, workers=2),
    "gang_fails": _python(GANG_FAILS, workers=2),
    "cancel": _python(SLEEP),
    "preempt": _python(PREEMPTIBLE, preemptible=True),
    "outputs": _python(UNSAFE_OUTPUTS, outputs=["escape", "a.txt", "b.txt", "missing.txt"]),
}


@pytest.fixture(scope="module", params=["local", "ray"])
def outcomes(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Outcomes]:
    """Every contract job run to its end on the local executor or on the Ray cluster."""
    url = "local"
    if request.param == "ray":
        # The session's executor keeps the process's Ray Client connection open between tests.
        url = request.getfixturevalue("ray_executor").url
    home = tmp_path_factory.mktemp(f"contract-{request.param}")
    # The local executor gets what the Ray cluster has: 2 GPUs ("A100"), a few CPUs.
    settings = Settings(
        home=home,
        executor=url,
        cpus=4,
        memory_mb=8000,
        gpus=2,
        gpu_model="A100",
        server_url=SERVER_URL,
    )
    ctx = open_context(settings, actor="tester")
    found = Outcomes(ctx=ctx, executor=request.param)
    try:
        t0 = time.monotonic()
        submitted = {
            name: jobs.submit_job(ctx, project="p", spec=spec).id for name, spec in SPECS.items()
        }
        ids = {job_id: name for name, job_id in submitted.items()}
        acted: set[str] = set()

        def everything_ended() -> bool:
            admission.step(ctx)
            pending = False
            for job in jobs.list_jobs(ctx):
                name = ids[job.id]
                if job.status.finished:
                    if name not in found.jobs:  # shown with -s, or when a test fails
                        print(f"{request.param}: {name} ended after {time.monotonic() - t0:.1f}s")
                    found.jobs[name] = job
                    continue
                pending = True
                ref = _ref(ctx, job.id)
                if ref:
                    found.refs.setdefault(name, ref)
                # the interactive ones, once they run (and say so)
                if name in acted or job.status is not JobStatus.RUNNING or not ref:
                    continue
                if name == "cancel" and "started" in _log(ctx, job.id):
                    jobs.cancel_job(ctx, job_id=job.id)
                    acted.add(name)
                elif name == "preempt" and "attempt 1" in _log(ctx, job.id):
                    _preempt(ctx, job.id)
                    acted.add(name)
            return not pending

        wait_for(everything_ended, timeout=120, interval=0.1, what="every contract job to end")
        found.logs = {name: _log(ctx, job.id) for name, job in found.jobs.items()}
        yield found
    finally:
        for job in jobs.list_jobs(ctx):
            if not job.status.finished:
                jobs.cancel_job(ctx, job_id=job.id)
        wiring.close_executors()
        forget_database(settings.database_url)


def test_a_job_succeeds_with_its_log(outcomes: Outcomes) -> None:
    job = outcomes.jobs["hello"]
    assert job.status is JobStatus.SUCCEEDED, job.message
    assert job.exit_code == 0 and "exited with code 0" in job.message
    assert outcomes.logs["hello"] == "hello\nworld\n"
    data, offset, finished = jobs.read_logs(outcomes.ctx, job_id=job.id, offset=6)
    assert data == b"world\n" and offset == 12 and finished
    assert job.usage is not None and job.usage.wall_seconds > 0
    assert job.executor == outcomes.executor


def test_a_failing_job_fails_with_its_exit_code_and_log_tail(outcomes: Outcomes) -> None:
    job = outcomes.jobs["fails"]
    assert job.status is JobStatus.FAILED
    assert job.exit_code == 3
    assert "exited with code 3" in job.message and "boom: the data is missing" in job.message


def test_cancel_stops_a_running_job(outcomes: Outcomes) -> None:
    job = outcomes.jobs["cancel"]
    assert job.status is JobStatus.CANCELLED, job.message
    assert outcomes.logs["cancel"] == "started\n"


def test_a_preempted_job_is_requeued_and_runs_again(outcomes: Outcomes) -> None:
    job = outcomes.jobs["preempt"]
    assert job.status is JobStatus.SUCCEEDED, job.message
    assert job.attempt == 2 and job.preemptions == 1
    assert outcomes.logs["preempt"].splitlines() == [
        "attempt 1",
        "shipyard: attempt 1 preempted: for a test; requeued",
        "shipyard: attempt 2 started",
        "attempt 2",
    ]
    assert job.message == "exited with code 0"


def test_max_runtime_times_the_job_out(outcomes: Outcomes) -> None:
    job = outcomes.jobs["timeout"]
    assert job.status is JobStatus.TIMED_OUT, job.message
    assert "max runtime of 1s" in job.message


def test_a_served_job_gets_its_ids_and_no_server_secrets(outcomes: Outcomes) -> None:
    job = outcomes.jobs["env"]
    assert job.status is JobStatus.SUCCEEDED, job.message
    env = _env_of(outcomes.logs["env"])
    assert env["SHIPYARD_JOB_ID"] == job.id and env["SHIPYARD_PROJECT"] == "p"
    assert env["SHIPYARD_RUN_ID"] == job.run_id and env["SHIPYARD_ATTEMPT"] == "1"
    assert env["SHIPYARD_URL"] == SERVER_URL and env["SHIPYARD_TOKEN"]
    assert env["MY_FLAG"] == "on"
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK"):
        assert env[key] == ("1" if "WORLD" in key else "0"), key
    assert env["MASTER_ADDR"] and int(env["MASTER_PORT"]) > 0
    assert env["TORCHELASTIC_RUN_ID"] == job.id
    for secret in ("SHIPYARD_DB", "SHIPYARD_HOME", "SHIPYARD_BLOBS", "SHIPYARD_SERVER_URL"):
        assert secret not in env, secret
    assert not [key for key in env if key.startswith("RAY_")]
    assert env["CUDA_VISIBLE_DEVICES"] == ""  # it asked for no GPU


def test_a_one_gpu_job_sees_one_device(outcomes: Outcomes) -> None:
    job = outcomes.jobs["gpu"]
    assert job.status is JobStatus.SUCCEEDED, job.message
    devices = _env_of(outcomes.logs["gpu"])["CUDA_VISIBLE_DEVICES"].split(",")
    assert len(devices) == 1 and devices[0] in ("0", "1")


def test_a_gang_gets_ranks_prefixed_logs_and_one_node(outcomes: Outcomes) -> None:
    job = outcomes.jobs["gang"]
    assert job.status is JobStatus.SUCCEEDED, job.message
    lines = sorted(outcomes.logs["gang"].splitlines())
    assert [line.split(" master ")[0] for line in lines] == [
        "[rank 0] rank 0 of 2 local 0",
        "[rank 1] rank 1 of 2 local 1",
    ]
    assert len({line.split(" master ")[1] for line in lines}) == 1  # one MASTER_ADDR:PORT
    assert len({w["node_id"] for w in job.placement}) == 1
    ref = outcomes.refs.get("gang", {})
    if "nodes" in ref:  # Ray: where Ray put the workers
        assert len(set(ref["nodes"])) == 1


def test_a_gang_fails_when_one_worker_dies(outcomes: Outcomes) -> None:
    job = outcomes.jobs["gang_fails"]
    assert job.status is JobStatus.FAILED
    assert "rank 1 exited with code 5" in job.message and "rank one gives up" in job.message
    assert job.exit_code == 5


def test_declared_outputs_keep_to_the_jobs_folder(outcomes: Outcomes) -> None:
    """A declared output that leaves the job's folder through a link, or a hard link, is refused
    (nothing of it read), a missing one is named; the job's outcome stands. (Stored outputs on
    Ray need a server the nodes reach: test_ray_server.py.)"""
    job = outcomes.jobs["outputs"]
    assert job.status is JobStatus.SUCCEEDED, job.message
    assert job.outputs == []
    lines = outcomes.logs["outputs"].splitlines()
    assert lines[:2] == [
        "wrote",
        "shipyard: declared output 'missing.txt' was not found in the job's folder; nothing "
        "was stored for it",
    ]
    refused = [line.removeprefix("shipyard: declared output not stored: ") for line in lines[2:]]
    assert [line.split(": ")[0] for line in refused] == ["escape", "a.txt", "b.txt"], lines
    assert "outside" in refused[0] and all("hard link" in line for line in refused[1:])


# --- helpers --------------------------------------------------------------------------------------


def _log(ctx: Context, job_id: str) -> str:
    return jobs.read_logs(ctx, job_id=job_id, limit=1_000_000)[0].decode()


def _env_of(text: str) -> dict[str, str]:
    line = next(line for line in text.splitlines() if line.lstrip().startswith("ENV "))
    return dict(json.loads(line.split("ENV ", 1)[1]))


def _ref(ctx: Context, job_id: str) -> dict:
    with ctx.db.read() as s:
        row = s.get(JobRow, job_id)
        assert row is not None
        return dict(row.executor_ref or {})


def _preempt(ctx: Context, job_id: str) -> None:
    """What the pipeline does for a victim: the flag, then the executor's stop."""
    with ctx.db.transaction() as s:
        row = s.get(JobRow, job_id)
        assert row is not None
        row.preempt_requested = True
        row.message = "preempting: for a test"
        executor, ref = row.executor, dict(row.executor_ref or {})
    admission.stop_job(ctx, executor=executor, job_id=job_id, ref=ref, reason="preempt")
