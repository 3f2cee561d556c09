"""A job a server launches gets an allowlisted environment, a job token, its own user and folder,
and no way to the server's database (issue 5, item 7). Embedded jobs keep today's behaviour."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from shipyard.cli.main import app as cli_app
from shipyard.client import Client
from shipyard.compute import jobs
from shipyard.compute.sandbox import (
    JobUser,
    LaunchedJob,
    fresh_dir,
    job_env,
    resolve_job_user,
    sandbox_dir,
)
from shipyard.context import Context, open_context
from shipyard.domain.models import JobStatus, RunStatus
from shipyard.errors import AuthenticationError, InvalidInputError, InvalidStateError
from shipyard.security.tokens import create_token
from shipyard.server.app import create_app, with_server_url
from shipyard.settings import DEFAULT_JOB_USER, Settings
from shipyard.store.engine import forget_database
from tests.compute.conftest import MakeCtx, python_job
from tests.conftest import LiveServer, wait_for
from tests.job_user import job_command

SECRET = "aws-secret-that-must-not-leak"
SERVER_ENV = {
    "PATH": "/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "TZ": "UTC",
    "AWS_SECRET_ACCESS_KEY": SECRET,
    "SHIPYARD_HOME": "/srv/shipyard",
    "SHIPYARD_DB": "postgresql://shipyard:pw@db/shipyard",
    "SHIPYARD_BLOBS": "s3://bucket/blobs",
    "SHIPYARD_SERVER_URL": "http://127.0.0.1:8340",
    "HOME": "/root",
}
JOB = LaunchedJob(job_id="j1", project="p", run_id="r1", gpus=[])
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="a job user needs a server run as root")


# --- the environment ----------------------------------------------------------------------------


def test_a_server_job_gets_an_allowlist_never_the_server_environment(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, server_url="http://127.0.0.1:8340")
    env = job_env(
        JOB,
        {
            "EPOCHS": "3",
            "SHIPYARD_DB": "sqlite:////stolen.db",
            "SHIPYARD_JOB_ID": "forged",
            "SHIPYARD_AUDIT_KEY_FILE": "/tmp/forged.key",
        },
        shipyard_url="http://127.0.0.1:8340",
        token="shp_job",
        settings=settings,
        home=tmp_path / "h",
        tmpdir=tmp_path / "t",
        user=JobUser(name="nobody", uid=65534, gid=65534),
        parent_env=SERVER_ENV,
    )
    assert env == {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TZ": "UTC",
        "EPOCHS": "3",
        "HOME": str(tmp_path / "h"),
        "TMPDIR": str(tmp_path / "t"),
        "USER": "nobody",
        "LOGNAME": "nobody",
        "SHIPYARD_URL": "http://127.0.0.1:8340",
        "SHIPYARD_TOKEN": "shp_job",
        "SHIPYARD_JOB_ID": "j1",
        "SHIPYARD_PROJECT": "p",
        "SHIPYARD_RUN_ID": "r1",
        "SHIPYARD_ATTEMPT": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONUNBUFFERED": "1",
    }


def test_an_embedded_job_keeps_its_users_environment_and_home(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    env = job_env(
        JOB,
        {"EPOCHS": "3"},
        shipyard_url=None,
        token=None,
        settings=settings,
        parent_env={**SERVER_ENV, "SHIPYARD_JOB_USER": "x"},
    )
    assert env["AWS_SECRET_ACCESS_KEY"] == SECRET and env["HOME"] == "/root"  # the user's own
    assert env["SHIPYARD_HOME"] == str(tmp_path)
    assert env["SHIPYARD_DB"] == settings.database_url
    assert env["EPOCHS"] == "3" and env["SHIPYARD_JOB_ID"] == "j1"
    assert "SHIPYARD_SERVER_URL" not in env and "SHIPYARD_JOB_USER" not in env


def test_an_embedded_job_runs_as_before(cctx: Context) -> None:
    code = "import os; print(os.environ['SHIPYARD_HOME'], os.getuid())"
    job = jobs.wait_job(
        cctx, job_id=jobs.submit_job(cctx, project="p", spec=python_job(code)).id, timeout=30
    )
    assert job.status is JobStatus.SUCCEEDED, job.message
    text = jobs.read_logs(cctx, job_id=job.id)[0].decode().split()
    assert text == [str(cctx.settings.home), str(os.getuid())]


# --- the job user and its folder ----------------------------------------------------------------


@root_only
def test_the_job_user_must_exist_and_must_not_be_root(tmp_path: Path) -> None:
    served = Settings(home=tmp_path, server_url="http://127.0.0.1:1")
    assert resolve_job_user(Settings(home=tmp_path)) is None  # embedded: ourselves
    user = resolve_job_user(served)
    assert user is not None and user.name == DEFAULT_JOB_USER and user.uid != 0
    for name, words in (("no-such-user-xyz", "does not exist"), ("root", "is root")):
        with pytest.raises(InvalidInputError, match=words) as info:
            resolve_job_user(Settings(home=tmp_path, server_url="x", job_user=name))
        assert info.value.field == "SHIPYARD_JOB_USER"


@root_only
def test_a_server_job_with_no_such_job_user_fails_saying_so(make_ctx: MakeCtx) -> None:
    served = make_ctx(server_url="http://127.0.0.1:1", job_user="no-such-user-xyz")
    job = jobs.submit_job(served, project="p", spec=python_job("print('ran')"))
    job = jobs.wait_job(served, job_id=job.id, timeout=30)
    assert job.status is JobStatus.FAILED
    assert "job user 'no-such-user-xyz' does not exist" in job.message
    assert "ran" not in jobs.read_logs(served, job_id=job.id)[0].decode()


@root_only
def test_a_job_root_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    user = JobUser(name="nobody", uid=65534, gid=65534)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    with pytest.raises(InvalidStateError) as info:
        sandbox_dir(Settings(home=tmp_path, job_root=theirs), "j1", user)
    assert info.value.field == "SHIPYARD_JOB_ROOT"
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    with pytest.raises(InvalidStateError):
        sandbox_dir(Settings(home=tmp_path, job_root=link), "j1", user)
    ours = sandbox_dir(Settings(home=tmp_path, job_root=tmp_path / "ours"), "j1", user)
    assert ours == tmp_path / "ours" / "j1"
    assert stat.S_IMODE((tmp_path / "ours").stat().st_mode) == 0o711


def test_a_fresh_job_folder_drops_what_a_job_planted_there(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "code").symlink_to(outside)  # a link the job left for the next attempt
    fresh_dir(folder)
    assert list(folder.iterdir()) == [] and (outside / "keep").read_text() == "x"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


# --- end to end: a real server, a real job ------------------------------------------------------

PROBE = """
import json, os, sys
report = {"env": dict(os.environ), "uid": os.getuid(), "cwd": os.getcwd()}
for name, path in (("db", sys.argv[1]), ("home", sys.argv[2])):
    try:
        open(path, "rb").close() if name == "db" else os.listdir(path)
        report[name] = "opened"
    except OSError as exc:
        report[name] = type(exc).__name__
import shipyard
with shipyard.init() as run:
    run.log({"probe": 1.0})
print("REPORT " + json.dumps(report), flush=True)
"""


@pytest.fixture
def job_root() -> Iterator[Path]:
    """A job root the job user can reach (pytest's tmp_path is 0700 root)."""
    parent = Path(tempfile.mkdtemp(prefix="shipyard-test-jobs-"))
    parent.chmod(0o711)
    yield parent / "jobs"
    shutil.rmtree(parent, ignore_errors=True)


@root_only
@pytest.mark.slow
def test_a_server_job_sees_no_secret_runs_unprivileged_and_cannot_read_the_database(
    tmp_path: Path, job_root: Path
) -> None:
    home = tmp_path / "server-home"
    home.mkdir()
    home.chmod(0o755)  # the server makes it private at start-up
    settings = Settings(home=home)
    admin = open_context(settings, actor="admin")
    _, secret = create_token(admin, name="ci")
    forget_database(settings.database_url)
    server = LiveServer(
        home,
        auth=True,
        env={"AWS_SECRET_ACCESS_KEY": SECRET, "SHIPYARD_JOB_ROOT": str(job_root)},
    )
    try:
        client = Client(settings=Settings(home=tmp_path / "unused", url=server.url, token=secret))
        run = client.backend.create_run(project="default", name="probe")
        code = tmp_path / "code"
        code.mkdir()
        (code / "probe.py").write_text(PROBE)
        db = home / "shipyard.db"
        command, env = job_command("probe.py", str(db), str(home))
        job = client.jobs.submit(command, code_dir=code, env={**env, "EPOCHS": "3"}, run_id=run.id)
        done = wait_for(
            lambda: (j := client.jobs.get(job.id)).status.finished and j,
            timeout=120,
            what="the probe job",
        )
        text, _, _ = client.backend.read_logs(job.id)
        assert done.status is JobStatus.SUCCEEDED, (done.message, text)
        assert SECRET not in text
        report = json.loads(text.split("REPORT ", 1)[1])
        job_env_seen = report["env"]

        # the environment: an allowlist, the spec's, shipyard's - never the server's
        assert "AWS_SECRET_ACCESS_KEY" not in job_env_seen
        for key in ("SHIPYARD_DB", "SHIPYARD_HOME", "SHIPYARD_BLOBS", "SHIPYARD_SERVER_URL"):
            assert key not in job_env_seen, key
        assert str(home) not in json.dumps(job_env_seen)
        assert job_env_seen["EPOCHS"] == "3"
        assert job_env_seen["SHIPYARD_URL"] == server.url
        assert job_env_seen["SHIPYARD_JOB_ID"] == job.id
        assert job_env_seen["SHIPYARD_RUN_ID"] == run.id
        assert job_env_seen["SHIPYARD_TOKEN"] != secret
        assert job_env_seen["HOME"].startswith(str(job_root))
        assert report["cwd"].startswith(str(job_root))

        # an unprivileged user, kept out of the server's home and its database
        assert report["uid"] == pwd.getpwnam(DEFAULT_JOB_USER).pw_uid
        assert report["db"] == "PermissionError" and report["home"] == "PermissionError"
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
        assert stat.S_IMODE(db.stat().st_mode) == 0o600
        blob_files = [p for p in (home / "blobs").rglob("*") if p.is_file()]
        assert blob_files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in blob_files)
        assert f"runs as user {DEFAULT_JOB_USER}" in done.enforcement

        # with its token, the job logged to its own run; the token died with the job
        tracked = client.runs.get(run.id)
        assert tracked.status is RunStatus.FINISHED and tracked.metrics == {"probe": 1.0}
        as_job = Client(
            settings=Settings(
                home=tmp_path / "unused", url=server.url, token=job_env_seen["SHIPYARD_TOKEN"]
            )
        )
        with pytest.raises(AuthenticationError):
            as_job.runs.get(run.id)
        as_job.close()
        client.close()
    finally:
        server.stop()


# --- the server's files are its own -------------------------------------------------------------


def test_the_database_and_blob_files_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "blobs").mkdir(parents=True)
    (home / "blobs").chmod(0o755)
    ctx = open_context(Settings(home=home))
    try:
        digest = ctx.blobs.put_bytes(b"weights").digest
        with ctx.db.transaction() as s:  # a write, so the WAL files exist
            s.execute(text("SELECT 1"))
        for name in ("shipyard.db", "shipyard.db-wal", "shipyard.db-shm"):
            if (home / name).exists():
                assert stat.S_IMODE((home / name).stat().st_mode) == 0o600, name
        assert stat.S_IMODE((home / "blobs").stat().st_mode) == 0o700
        blob = next(p for p in (home / "blobs").rglob("*") if p.is_file() and digest in p.name)
        assert stat.S_IMODE(blob.stat().st_mode) == 0o600
    finally:
        forget_database(ctx.settings.database_url)


def test_a_server_knows_the_url_its_jobs_reach_it_on_and_keeps_its_home_private(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    settings = with_server_url(Settings(home=home), host="0.0.0.0", port=9001)
    assert settings.server_url == "http://127.0.0.1:9001"
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert with_server_url(Settings(home=home), host="::1", port=1).server_url == "http://[::1]:1"
    behind = Settings(home=home, server_url="https://shipyard.example")
    assert with_server_url(behind, host="127.0.0.1", port=1).server_url == behind.server_url
    app = create_app(Settings(home=home), scheduler=False)
    assert app.state.ctx.settings.server_url is not None  # a server never launches embedded jobs
    forget_database(app.state.ctx.settings.database_url)


def test_jobs_show_tells_how_the_limits_were_enforced(cctx: Context, home_env: Path) -> None:
    job = jobs.submit_job(cctx, project="p", spec=python_job("print(1)"))
    job = jobs.wait_job(cctx, job_id=job.id, timeout=30)
    result = CliRunner().invoke(cli_app, ["jobs", "show", job.id, "--project", "p"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["enforcement"] == job.enforcement and "affinity" in shown["enforcement"]
