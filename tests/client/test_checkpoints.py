"""The SDK's side of preemption: checkpoints, attempts, steps that continue, SIGTERM, gangs.

Each SDK scenario runs both ways: on the embedded home, and over HTTP against the real app (the
same home) through httpx. The preemption scenario runs the fixture script
``tests/compute/resumable_train.py`` as a real process, SIGTERMs it mid-way, then runs its
second attempt (in this process). ``tests/compute/test_preempt_resume.py`` does it all through
the scheduler and the local executor.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

import shipyard
from shipyard.client import Client, HttpBackend, LocalBackend
from shipyard.context import Context
from shipyard.domain.checkpoints import CheckpointKind
from shipyard.domain.models import RunStatus
from shipyard.errors import (
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    ShipyardError,
)
from shipyard.security import principals
from shipyard.server.app import create_app
from shipyard.tracking import checkpoints, runs
from tests.compute import resumable_train
from tests.conftest import wait_for

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

SCRIPT = Path(__file__).parents[1] / "compute" / "resumable_train.py"
REPO = Path(__file__).parents[2]


@pytest.fixture(params=["embedded", "http"])
def client(request: pytest.FixtureRequest, ctx: Context) -> Iterator[Client]:
    if request.param == "embedded":
        yield Client(settings=ctx.settings, backend=LocalBackend(ctx))
        return
    app = create_app(ctx.settings, auth=False, scheduler=False)
    # a failure mid-response reaches the client as a cut stream, as from a real server
    with TestClient(app, raise_server_exceptions=False) as http:
        backend = HttpBackend("http://testserver", transport=http._transport)
        yield Client(settings=ctx.settings, backend=backend)
        backend.close()


@pytest.fixture
def job_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("SHIPYARD_RUN_ID", "SHIPYARD_JOB_ID", "SHIPYARD_ATTEMPT", "RANK"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_save_and_restore_the_latest_folder_and_file(
    client: Client, tmp_path: Path, job_env: pytest.MonkeyPatch
) -> None:
    run = shipyard.init(project="default", client=client)
    assert run.attempt == 1 and run.latest_checkpoint(tmp_path / "none") is None
    folder = tmp_path / "ckpt"
    (folder / "opt").mkdir(parents=True)
    (folder / "model.bin").write_bytes(b"\x00weights-1")
    (folder / "opt" / "state.json").write_text('{"lr": 0.1}')
    first = run.save_checkpoint(folder, step=10)
    assert first.kind is CheckpointKind.FOLDER and first.step == 10 and first.attempt == 1
    (folder / "model.bin").write_bytes(b"\x00weights-2")
    (folder / "extra.txt").write_text("added")
    second = run.save_checkpoint(folder, step=20)
    assert second.number == 2 and second.digest != first.digest

    dest = tmp_path / "restore"
    restored = run.latest_checkpoint(dest)
    assert restored == dest and _tree(dest) == _tree(folder)
    anywhere = run.latest_checkpoint()  # a temp folder
    assert anywhere is not None and _tree(anywhere) == _tree(folder)
    shutil.rmtree(anywhere)

    single = tmp_path / "w.pt"
    single.write_bytes(b"one file")
    third = run.save_checkpoint(single, step=30)
    assert third.kind is CheckpointKind.FILE
    got = run.latest_checkpoint(tmp_path / "one")
    assert got == tmp_path / "one" / "w.pt" and got.read_bytes() == b"one file"
    assert [(c.number, c.step) for c in run.checkpoints()] == [(1, 10), (2, 20), (3, 30)]
    run.finish()


def test_bad_checkpoints_are_refused_and_nothing_is_recorded(
    client: Client, tmp_path: Path, job_env: pytest.MonkeyPatch
) -> None:
    run = shipyard.init(project="default", client=client)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidInputError, match="contains no files") as info:
        run.save_checkpoint(empty)
    assert info.value.field == "path"
    with pytest.raises(NotFoundError) as missing:
        run.save_checkpoint(tmp_path / "nope")
    assert missing.value.field == "path"
    (empty / "x").write_text("x")
    with pytest.raises(InvalidInputError) as step:
        run.save_checkpoint(empty, step=-3)
    assert step.value.field == "step"
    assert run.checkpoints() == []
    run.finish()
    with pytest.raises(Exception, match="finished"):
        run.save_checkpoint(empty)


def test_a_corrupted_checkpoint_is_not_restored(
    client: Client, ctx: Context, tmp_path: Path, job_env: pytest.MonkeyPatch
) -> None:
    with shipyard.init(project="default", client=client) as run:
        state = tmp_path / "state.bin"
        state.write_bytes(b"good weights")
        saved = run.save_checkpoint(state, step=1)
        Path(ctx.blobs._path(saved.files[0].digest)).write_bytes(b"rotten weight")
        dest = tmp_path / "restore"
        with pytest.raises(ShipyardError):  # IntegrityError, or the server cutting it short
            run.latest_checkpoint(dest)
        assert not (dest / "state.bin").exists()  # nothing half-written in its place


def test_a_new_attempt_attaches_and_its_automatic_steps_continue(
    client: Client, job_env: pytest.MonkeyPatch
) -> None:
    first = shipyard.init(project="default", client=client)
    for i in range(5):
        first.log({"loss": 1.0 / (i + 1)})
    first.log({"val": 0.5}, step=2)
    first.flush()
    job_env.setenv("SHIPYARD_RUN_ID", first.id)
    job_env.setenv("SHIPYARD_ATTEMPT", "2")
    again = shipyard.init(client=client)
    assert again.id == first.id and again.attempt == 2
    for i in range(3):
        again.log({"loss": 0.1 * i})
    again.log({"val": 0.7}, step=3)  # explicit steps are stored as given
    again.finish()
    first.finish()  # already finished by the attempt that attached: nothing to do
    history = client.backend.metric_history(first.id, key="loss")
    assert [p.step for p in history] == list(range(8))  # no duplicate, none missing
    assert [p.step for p in client.backend.metric_history(first.id, key="val")] == [2, 3]


def test_bad_attempt_or_rank_in_the_environment_is_named(
    client: Client, job_env: pytest.MonkeyPatch
) -> None:
    for name, value in (("SHIPYARD_ATTEMPT", "0"), ("SHIPYARD_ATTEMPT", "two"), ("RANK", "-1")):
        job_env.setenv(name, value)
        with pytest.raises(InvalidInputError) as info:
            shipyard.init(project="default", client=client)
        assert info.value.field == name
        job_env.delenv(name)


def test_only_rank_0_logs_and_finishes_a_gang_run(
    ctx: Context, job_env: pytest.MonkeyPatch
) -> None:
    client = Client(settings=ctx.settings, backend=LocalBackend(ctx))
    run = runs.create_run(ctx, project="default", name="gang")
    job_env.setenv("SHIPYARD_RUN_ID", run.id)
    job_env.setenv("RANK", "1")
    other = shipyard.init(client=client, params={"lr": 0.1}, tags={"who": "rank1"})
    other.log({"loss": 9.0})
    other.finish()  # flushes; the run is rank 0's to finish
    loud = shipyard.init(client=client, all_ranks=True)
    loud.log({"rank1_only": 1.0})
    loud.finish()
    job_env.setenv("RANK", "0")
    lead = shipyard.init(client=client, params={"lr": 0.2})
    lead.log({"loss": 1.0})
    lead.finish()
    got = runs.get_run(ctx, run_id=run.id)
    assert got.status == RunStatus.FINISHED and got.params == {"lr": "0.2"}
    assert "who" not in got.tags
    assert set(got.metrics) == {"loss", "rank1_only"} and got.metrics["loss"] == 1.0


def test_every_rank_samples_its_system_metrics(ctx: Context, job_env: pytest.MonkeyPatch) -> None:
    client = Client(settings=ctx.settings, backend=LocalBackend(ctx))
    run = runs.create_run(ctx, project="default")
    job_env.setenv("SHIPYARD_RUN_ID", run.id)
    job_env.setenv("RANK", "1")
    active = shipyard.init(
        client=client, system_metrics=True, system_interval=0.05, flush_interval=0.05
    )
    for key in ("system/rank1/cpu_percent", "system/rank1/rss_mb"):
        wait_for(
            lambda key=key: len(runs.metric_history(ctx, run_id=run.id, key=key)) >= 2,
            timeout=10,
            what=key,
        )
    active.finish()
    rss = runs.metric_history(ctx, run_id=run.id, key="system/rank1/rss_mb")
    assert rss[0].value > 1 and [p.step for p in rss] == list(range(len(rss)))
    assert runs.get_run(ctx, run_id=run.id).status == RunStatus.RUNNING  # rank 1 left it
    job_env.delenv("RANK")
    job_env.delenv("SHIPYARD_RUN_ID")
    before = signal.getsignal(signal.SIGTERM)
    outside = shipyard.init(project="default", client=client)  # not a job: off by default
    assert outside._process is None
    assert signal.getsignal(signal.SIGTERM) is before  # and SIGTERM is left alone
    outside.finish()


def test_the_exit_flush_sends_even_when_the_signal_landed_inside_log(
    ctx: Context, job_env: pytest.MonkeyPatch
) -> None:
    client = Client(settings=ctx.settings, backend=LocalBackend(ctx))
    run = shipyard.init(project="default", client=client, flush_interval=600)
    for i in range(5):
        run.log({"x": float(i)})

    def sender_is_sending() -> bool:
        free = run._send_lock.acquire(blocking=False)
        if free:
            run._send_lock.release()
        return not free

    with run._lock:  # as if SIGTERM interrupted log() while it held the buffer
        run._wake.set()  # and the sender woke up to send, and now waits for that lock
        wait_for(sender_is_sending, timeout=10, what="the sender inside its send")
        assert run._flush_for_exit(5) == 0
    assert [p.step for p in runs.metric_history(ctx, run_id=run.id, key="x")] == list(range(5))
    run.finish()  # left running for the next attempt: nothing to do
    assert runs.get_run(ctx, run_id=run.id).status == RunStatus.RUNNING
    with pytest.raises(Exception, match="next attempt"):
        run.log({"x": 9.0})


# --- preemption: real processes -------------------------------------------------------------------


class Script:
    """``resumable_train.py`` as a process; its stdout lines collected by a thread."""

    def __init__(
        self,
        home: Path,
        workdir: Path,
        *,
        run_id: str,
        attempt: int,
        flush_s: float,
    ) -> None:
        env = {
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(REPO / "src"),
            "SHIPYARD_HOME": str(home),
            "SHIPYARD_JOB_ID": "job-resumable",
            "SHIPYARD_RUN_ID": run_id,
            "SHIPYARD_ATTEMPT": str(attempt),
            "SHIPYARD_SYSTEM_METRICS": "0",
            "SHIPYARD_TEST": "1",
            "FLUSH_S": str(flush_s),
            "WORKDIR": str(workdir),
        }
        self.process = subprocess.Popen(
            [sys.executable, str(SCRIPT)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def logged(self) -> int:
        counts = [int(line.split()[1]) for line in list(self.lines) if line.startswith("logged ")]
        return counts[-1] if counts else 0

    def wait(self) -> int:
        code = self.process.wait(timeout=60)
        self._reader.join(timeout=10)
        return code


def test_sigterm_keeps_every_point_and_the_next_attempt_resumes(
    ctx: Context,
    home_env: Path,
    tmp_path: Path,
    job_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    home = home_env
    run = runs.create_run(ctx, project="default", name="resumable")
    # a long flush interval: only the checkpoints' and the SIGTERM handler's flushes send
    first = Script(home, tmp_path / "a1", run_id=run.id, attempt=1, flush_s=600)
    try:

        def mid_way() -> bool:
            latest = checkpoints.latest_checkpoint(ctx, run_id=run.id)
            return latest is not None and first.logged() >= (latest.step or 0) + 3

        wait_for(mid_way, timeout=30, what="a checkpoint, then more steps")
        first.process.send_signal(signal.SIGTERM)
        code = first.wait()
    finally:
        if first.process.poll() is None:
            first.process.kill()
    assert code == 143, first.lines
    assert any("left running" in line for line in first.lines), first.lines
    assert "own SIGTERM handler ran" in first.lines  # the script's own handler was chained
    assert runs.get_run(ctx, run_id=run.id).status == RunStatus.RUNNING
    logged = first.logged()
    stored = [p.step for p in runs.metric_history(ctx, run_id=run.id, key="loss")]
    # every point logged before the signal is stored (one more if it landed between log and
    # print), none twice
    assert len(stored) in (logged, logged + 1) and stored == list(range(len(stored)))
    resume_at = checkpoints.latest_checkpoint(ctx, run_id=run.id)
    assert resume_at is not None and resume_at.step is not None
    assert 0 < resume_at.step < 100 and resume_at.attempt == 1

    # attempt 2 in this process (its SDK sees no SHIPYARD_JOB_ID: no handler here)
    for name, value in {
        "SHIPYARD_RUN_ID": run.id,
        "SHIPYARD_ATTEMPT": "2",
        "STEP_S": "0",
        "WORKDIR": str(tmp_path / "a2"),
    }.items():
        job_env.setenv(name, value)
    capsys.readouterr()
    assert resumable_train.main() == 0
    assert f"attempt 2 resumed from step {resume_at.step}" in capsys.readouterr().out
    history = runs.metric_history(ctx, run_id=run.id, key="loss")
    assert [p.step for p in history] == list(range(len(stored) + 100 - resume_at.step))
    final = runs.metric_history(ctx, run_id=run.id, key="final_loss")
    assert [p.value for p in final] == [resumable_train.reference_final()]
    assert runs.get_run(ctx, run_id=run.id).status == RunStatus.FINISHED
    later = [c for c in checkpoints.list_checkpoints(ctx, run_id=run.id) if c.attempt == 2]
    assert later and all(c.step and c.step > resume_at.step for c in later)


def test_a_job_token_checkpoints_its_own_run_through_the_server(
    ctx: Context, tmp_path: Path, job_env: pytest.MonkeyPatch
) -> None:
    """Over HTTP, auth on, with the token the server gives a job: its own run's checkpoints are
    saved and restored; another run's are refused, another project's hidden."""
    principals.create_project(ctx, name="alpha")
    principals.create_project(ctx, name="beta")
    own = runs.create_run(ctx, project="alpha", name="job-run")
    sibling = runs.create_run(ctx, project="alpha")
    elsewhere = runs.create_run(ctx, project="beta")
    secret = principals.issue_job_token(ctx, job_id="j1", project="alpha", run_id=own.id)
    app = create_app(ctx.settings, auth=True, scheduler=False)
    with TestClient(app) as http:
        backend = HttpBackend(
            "http://testserver", token=secret, project="alpha", transport=http._transport
        )
        client = Client(settings=ctx.settings, backend=backend)
        job_env.setenv("SHIPYARD_RUN_ID", own.id)
        job_env.setenv("SHIPYARD_ATTEMPT", "3")
        run = shipyard.init(client=client)
        folder = tmp_path / "ckpt"
        folder.mkdir()
        (folder / "state.json").write_text('{"step": 7}')
        saved = run.save_checkpoint(folder, step=7)
        assert saved.attempt == 3 and saved.project == "alpha"
        restored = run.latest_checkpoint(tmp_path / "restore")
        assert restored is not None and (restored / "state.json").read_text() == '{"step": 7}'
        with pytest.raises(PermissionDeniedError):
            backend.save_checkpoint(sibling.id, local_path=folder)
        with pytest.raises(NotFoundError):
            backend.latest_checkpoint(elsewhere.id, project="beta")
        with pytest.raises(NotFoundError):
            backend.list_checkpoints(elsewhere.id)  # not in alpha: hidden like a missing id
        run.finish()
        backend.close()
    assert checkpoints.list_checkpoints(ctx, run_id=sibling.id) == []
    assert [c.step for c in checkpoints.list_checkpoints(ctx, run_id=own.id)] == [7]
